"""Train tab: a form for one LoRA/QLoRA run, Train/Stop/Resume, and a live view of the selected run.

Everything shown is read from the run folders (status, metrics, log: `finetune.runs`) on a `gr.Timer`, so a page
reload, a second browser or an app restart shows the same runs; the training itself runs in a subprocess started
by `finetune.runner.Runner`. Below: the shown run's checkpoints (`ui.checkpoints`) and "Compare runs" (`ui.compare`).
Named API endpoints: train_start (returns the run id), train_status, train_stop, runs.
"""

from __future__ import annotations

import time

import gradio as gr
import pandas as pd

from finetune import FinetuneError
from finetune.config import RECIPES, DataConfig, TrainConfig, load_train_config
from finetune.data import BUNDLED, VOTES_SOURCE
from finetune.hardware import machine
from finetune.models import EMBEDDED, ModelPool
from finetune.runner import Runner
from finetune.runs import ACTIVE_STATES, RunInfo
from finetune.settings import Settings
from finetune.templates import TEMPLATES
from finetune.ui.checkpoints import build_checkpoints_panel
from finetune.ui.common import current_user, loss_frame, machine_line, shown, user_errors
from finetune.ui.compare import build_compare_panel
from finetune.ui.forms import component, form_config, get_dotted, help_of, more_settings


def default_config() -> TrainConfig:
    """The form's starting values: the QLoRA recipe where runs train on a GPU, else the quick CPU recipe (a ZeroGPU
    Space trains on its CPU)."""
    recipe = RECIPES / ("lamini_docs_qlora.yaml" if machine().train_device() != "cpu" else "cpu_quick.yaml")
    return load_train_config(recipe if recipe.is_file() else None)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def status_markdown(status: dict) -> str:
    if not status:
        return ("**No run yet.** Set one up on the left and press **Train** (or **Fine-tune in 5 minutes** on the "
                "Start tab): its loss curve, progress and time left appear here, and the runs below.")
    state = status.get("state", "?")
    parts = [f"**{state}**"]
    step, total = status.get("step") or 0, status.get("total")
    if total:
        parts.append(f"step {step}/{total} ({100 * step / total:.0f}%)")
    if state == "running" and status.get("eta_s") is not None:
        parts.append(f"ETA {_duration(status['eta_s'])}")
    if status.get("tokens_per_s"):
        parts.append(f"{status['tokens_per_s']:.0f} tokens/s")
    if status.get("loss") is not None:
        parts.append(f"loss {status['loss']:.3f}")
    if status.get("queue_position"):
        wait = status.get("wait_s")
        about = f", about {_duration(wait)} to wait" if wait is not None else ""
        parts.append(f"position {status['queue_position']} in the queue{about}")
    lines = [" · ".join(parts)]
    if status.get("message"):
        lines.append(status["message"])
    if status.get("notice"):
        lines.append(status["notice"])
    if status.get("summary") and status.get("summary") not in status.get("message", ""):
        lines.append(f"*{status['summary']}*")
    return "\n\n".join(lines)


def runs_frame(infos: list[RunInfo]) -> pd.DataFrame:
    rows = [
        {
            "run": i.run_id,
            "name": i.name,
            "state": i.state + (f" (#{i.queue_position})" if i.queue_position else ""),
            "step": f"{i.step}/{i.total}" if i.total else str(i.step),
            "loss": round(i.loss, 3) if i.loss is not None else None,
            "adapter": "yes" if i.has_adapter else "",
            "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(i.created)) if i.created else "",
        }
        for i in infos
    ]
    return pd.DataFrame(rows, columns=["run", "name", "state", "step", "loss", "adapter", "started"])


def build_train_tab(
    settings: Settings, pool: ModelPool, runner: Runner, data_state: gr.State | None = None
) -> dict[str, gr.components.Component]:
    """Builds the tab; returns the controls the lesson note's "try this" can fill, by name."""
    defaults = default_config()
    defaults.model.source = settings.base_model
    gr.Markdown(
        "Train a **LoRA adapter** on top of a base model: only the small adapter matrices learn, on the answer "
        "tokens only. 4-bit quantization (QLoRA) shrinks the frozen base for big models on a GPU. "
        "Training runs in the background: you can reload the page or close the browser."
    )
    with gr.Row():
        with gr.Column(scale=2):
            machine_md = gr.Markdown(lambda: machine_line(defaults), elem_id="train-machine")
            # One component per config setting, keyed by its dotted name (the API's parameters, in this order).
            form: dict[str, gr.components.Component] = {}
            model_choices = list(dict.fromkeys([settings.base_model, *EMBEDDED]))
            form["model.source"] = gr.Dropdown(
                model_choices, value=settings.base_model, allow_custom_value=True, label="Base model",
                info="Embedded name, Hub id or local folder.",
            )  # fmt: skip
            with gr.Row():
                form["data.source"] = gr.Dropdown(
                    [*BUNDLED, VOTES_SOURCE], value=defaults.data.source, allow_custom_value=True, label="Data set",
                    info="Bundled name or file path; 'Use for training' in the Data tab fills this.",
                )  # fmt: skip
                form["data.template"] = gr.Dropdown(
                    list(TEMPLATES), value=defaults.data.template, allow_custom_value=True, label="Template"
                )
            form["model.quantization"] = gr.Radio(
                ["none", "4bit", "8bit"], value=defaults.model.quantization or "none", label="Quantization",
                info="4bit = QLoRA (NF4). On a CPU, none is faster for small models.",
            )  # fmt: skip
            def field(key: str, **kwargs) -> gr.components.Component:
                form[key] = component(key, get_dotted(defaults, key), **kwargs)
                return form[key]

            with gr.Row():
                field("max_steps", label="Steps", info=None)
                field("learning_rate", label="Learning rate", info=None, minimum=0)
                field("batch_size", label="Batch size", info=None)
            with gr.Row():
                field("max_length", label="Max length (tokens)", info=None, minimum=8)
                field("lora_r", label="LoRA rank r", info=None, minimum=1)
            with gr.Accordion("Advanced", open=False):
                with gr.Row():
                    field("lora_alpha", label="LoRA alpha", info=None)
                    field("lora_dropout", label="LoRA dropout", info=None, minimum=0, maximum=1)
                    field("grad_accum", label="Gradient accumulation", info=None, minimum=1)
                with gr.Row():
                    field("eval_rows", label="Held-out rows for the loss", info=None)
                    field("eval_steps", label="Eval every N steps (0: start+end)", info=None)
                    field("save_steps", label="Checkpoint every N steps", info=None)
                with gr.Row():
                    field("data.max_rows", label="Use only the first N rows", info=None)
                    field("seed", label="Seed", info=None)
                    form["model.dtype"] = gr.Dropdown(["auto", "float32", "bfloat16", "float16"],
                                                      value=defaults.model.dtype, label="Weights dtype")  # fmt: skip
                field("target_modules", label="LoRA target modules",
                      info="all-linear, or names separated by commas (q_proj, v_proj).")  # fmt: skip
                with gr.Row():
                    field("eval_at_end", label="Evaluate base vs tuned when done", info=None)
                    field(
                        "gradient_checkpointing", label="Gradient checkpointing",
                        info="Recompute activations in backward: much less memory, 20-30% more time per step.",
                    )  # fmt: skip
                # After the settings above: the API's positional parameters keep their order.
                with gr.Row():  # preference tuning: arena_votes (or any prompt/chosen/rejected set) from an SFT run
                    form["method"] = gr.Radio(["sft", "dpo"], value=defaults.method, label="Method",
                                              info=help_of("method"))  # fmt: skip
                    field("base_adapter", label="DPO: start from run")
                    field("beta", label="DPO beta", minimum=0)
            with gr.Accordion("More settings", open=False):
                form.update(more_settings(defaults, placed=form))
            with gr.Row():
                train_btn = gr.Button("Train", variant="primary")
                stop_btn = gr.Button("Stop", variant="stop")
                resume_btn = gr.Button("Resume")
            notice = gr.Markdown()
            started = gr.Textbox(visible=False)  # the new run's id: what the train_start endpoint returns
        with gr.Column(scale=3):
            with gr.Row():
                # A callable value is evaluated on each page load: a reload shows the run that is training.
                run = gr.Dropdown(_run_choices(runner), value=lambda: _latest(runner), label="Run",
                                  allow_custom_value=True, scale=4)  # fmt: skip
                download = gr.DownloadButton("Download adapter (.zip)", visible=False, scale=1)
            status_md = gr.Markdown(status_markdown({}))
            chart = gr.LinePlot(loss_frame(None), x="step", y="loss", color="series", label="Loss", height=260)
            log = gr.Textbox(label="Log (last lines)", lines=10, max_lines=10, autoscroll=True, interactive=False)
    runs_table = gr.Dataframe(runs_frame([]), label="Runs (click one to show it)", interactive=False, wrap=True,
                              visible=False)  # fmt: skip
    timer = gr.Timer(2.0)
    build_checkpoints_panel(runner, run, timer)
    build_compare_panel(runner, lambda: _run_choices(runner))
    prepared = {"prepared_data": data_state} if data_state is not None else {}

    def config_of(values: dict, prepared_data: dict | None = None) -> TrainConfig:
        """The form's config; data settings from the Data tab's "Use for training" when it names the same set."""
        base = default_config()
        if prepared_data and prepared_data.get("source") == values.get("data.source"):
            base.data = DataConfig(**prepared_data)
        else:
            base.data = DataConfig()
        return form_config(values, base)

    @user_errors
    def start(request: gr.Request, prepared_data: dict | None = None, **values):
        cfg = config_of(values, prepared_data)
        return runner.submit(cfg, owner=current_user(request), limits=Settings.current()), ""

    def estimate(prepared_data: dict | None = None, **values) -> str:
        try:
            cfg = config_of(values, prepared_data)
        except FinetuneError as e:
            return f"{machine().describe()} · no estimate for this form yet: {e}"
        return machine_line(cfg)

    @user_errors
    def stop(run_id: str | None, request: gr.Request | None = None) -> str:
        if not run_id:
            raise gr.Error("Pick a run first.")
        return runner.stop(run_id, user=current_user(request))

    @user_errors
    def resume(run_id: str | None, request: gr.Request | None = None) -> str:
        if not run_id:
            raise gr.Error("Pick a run first.")
        runner.resume(run_id, user=current_user(request))
        return "Queued to resume."

    def show(run_id: str | None):
        infos = runner.runs()
        try:
            run = runner.open(run_id) if run_id else None
        except FinetuneError:  # a typed name that is no run (the dropdown takes any value)
            run = None
        if run is None:
            return status_markdown({}), loss_frame(None), "", shown(runs_frame(infos)), gr.update(visible=False)
        status = runner.status(run_id)
        zipped = run.adapter_zip() if status.get("state") not in ACTIVE_STATES else None
        button = gr.update(value=str(zipped) if zipped else None, visible=zipped is not None)
        return status_markdown(status), loss_frame(run), run.log_tail(), shown(runs_frame(infos)), button

    def pick(event: gr.SelectData, table: pd.DataFrame):
        row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
        return gr.update(choices=_run_choices(runner), value=table.iloc[row]["run"])

    view = [status_md, chart, log, runs_table, download]
    train_btn.click(
        start, None, [started, notice], inputs_kwargs={**form, **prepared}, api_name="train_start",
        concurrency_limit=1,
    ).success(
        lambda run_id: gr.update(choices=_run_choices(runner), value=run_id), started, run, api_visibility="private"
    )  # fmt: skip
    estimate_inputs = [form[k] for k in ESTIMATE_KEYS]
    gr.on(
        [c.change for c in estimate_inputs], estimate, None, machine_md,
        inputs_kwargs={**{k: form[k] for k in ESTIMATE_KEYS}, **prepared}, api_visibility="private",
        show_progress="hidden", trigger_mode="always_last",
    )  # fmt: skip
    stop_btn.click(stop, run, notice, api_name="train_stop")
    resume_btn.click(resume, run, notice, api_name="train_resume")
    run.change(show, run, view, api_visibility="private", show_progress="hidden")
    timer.tick(show, run, view, api_visibility="private", show_progress="hidden", queue=False)
    runs_table.select(pick, runs_table, run, api_visibility="private")

    @user_errors
    def train_status(run_id: str) -> dict:
        """The status of a run, with its queue position."""
        return runner.status(run_id)

    def runs() -> list[dict]:
        """All runs, newest first."""
        return [
            {k: v for k, v in vars(i).items() if k != "run_dir"} | {"adapter": str(i.adapter_dir or "")}
            for i in runner.runs()
        ]

    gr.api(train_status, api_name="train_status")
    gr.api(runs, api_name="runs")

    if data_state is not None:

        def use_prepared(data: dict | None):
            if not data:
                return gr.update(), gr.update()
            return gr.update(value=data.get("source")), gr.update(value=data.get("template"))

        data_state.change(
            use_prepared, data_state, [form["data.source"], form["data.template"]], api_visibility="private"
        )
    return form


# The settings a step's time depends on: the machine line follows them as they change.
ESTIMATE_KEYS = ("model.source", "model.quantization", "model.dtype", "data.source", "data.template", "data.max_rows")
ESTIMATE_KEYS += ("max_steps", "batch_size", "max_length", "grad_accum")


def _run_choices(runner: Runner) -> list[tuple[str, str]]:
    return [(f"{i.name} · {i.state} · {i.run_id[:15]}", i.run_id) for i in runner.runs()]


def _latest(runner: Runner) -> str | None:
    """The run to show on page load: the one training, else the newest."""
    infos = runner.runs()
    active = next((i for i in infos if i.state in ("running", "stopping")), None)
    return (active or (infos[0] if infos else None)).run_id if infos else None
