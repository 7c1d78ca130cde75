"""Small pieces every tab uses: user errors as popups, the logged-in user, the machine line, a run's loss chart, the
adapters to choose from."""

from __future__ import annotations

import functools
import inspect

import gradio as gr
import pandas as pd

from finetune import FinetuneError
from finetune.arena import list_adapters
from finetune.config import TrainConfig
from finetune.hardware import cpu_busy, machine
from finetune.plan import estimate_run
from finetune.runs import RunDir


def user_errors(fn):
    """Show `FinetuneError` as a `gr.Error` popup: one clear sentence, and the app keeps serving. Generators too."""

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stream(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except FinetuneError as e:
                raise gr.Error(str(e)) from e

        return stream

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FinetuneError as e:
            raise gr.Error(str(e)) from e

    return wrapper


def current_user(request: gr.Request | None) -> str | None:
    """The logged-in name (FINETUNE_AUTH), None without login: it owns the runs it starts."""
    return getattr(request, "username", None) if request is not None else None


def adapter_choices() -> list[tuple[str, str]]:
    """(label, folder) of each adapter the tuned column can use: the Arena's dropdown, and the guided path's pick.
    Adapters tuned on votes say so: `... (DPO)`."""
    choices = []
    for a in list_adapters():
        tuned = " (DPO)" if a.method == "dpo" else ""
        choices.append((f"{a.name} ({a.origin}; {a.base_model}; {a.template} template){tuned}", str(a.path)))
    return choices


def machine_line(cfg: TrainConfig) -> str:
    """The machine, the choices `auto` makes here, and what this run will take (shown before pressing Train)."""
    try:
        return estimate_run(cfg, busy=cpu_busy()).line  # counts what the machine is busy with as the form shows
    except Exception as e:  # noqa: BLE001 - a half-typed form (unknown model, missing file): say why no estimate
        return f"{machine().describe()} · no estimate for this form yet: {str(e).splitlines()[0][:160]}"


def loss_frame(run: RunDir | None) -> pd.DataFrame:
    """The run's training and held-out loss against step, long format for `gr.LinePlot(color="series")`."""
    rows = run.loss_curve() if run is not None else []
    # Typed even when empty: the chart keeps the axis types of its first value (object columns = categories).
    return pd.DataFrame(rows, columns=["step", "loss", "series"]).astype({"step": "int64", "loss": "float64"})


def shown(frame: pd.DataFrame):
    """A table or chart hidden while it has no rows (an empty one shows headers `1 2 3`)."""
    return gr.update(value=frame, visible=not frame.empty)


def _is_empty(value) -> bool:
    """A table (DataFrame), a chart (its PlotData) or a file list, as a handler's input, with nothing in it."""
    return value.empty if isinstance(value, pd.DataFrame) else not getattr(value, "data", value)


def hide_empty(event, components: list) -> None:
    """After `event`, a public endpoint (its API gives its values as they are, no `shown`): hide the `components` it
    left empty. Visibility only: the values stay as they were sent."""
    event.then(lambda *values: [gr.update(visible=not _is_empty(v)) for v in values], components, components,
               api_visibility="private")  # fmt: skip
