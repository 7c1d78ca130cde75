"""The Train tab's "Compare runs": two or more runs' loss curves on one chart, the settings that differ, and their
results side by side. The work is `finetune.compare`; this only wires it. Named API endpoint: compare_runs.
"""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr
import pandas as pd

from finetune.compare import X_AXES, compare_runs, loss_curves
from finetune.runner import Runner
from finetune.ui.common import hide_empty, user_errors


def curve_frame(rows: list[dict], x: str) -> pd.DataFrame:
    """The chart's rows with the chosen axis as column "x": the plot's field stays the same and only its title
    changes (a LinePlot given another `x` in an update kept reading the old column: every point undefined)."""
    frame = pd.DataFrame(rows, columns=[x, "loss", "run", "series", "line"]).rename(columns={x: "x"})
    # Typed even when empty: the chart keeps the axis types of its first value (object columns = categories).
    return frame.astype({"x": "int64", "loss": "float64"})


def build_compare_panel(runner: Runner, choices: Callable[[], list[tuple[str, str]]]) -> None:
    """An accordion; `choices()` lists the runs as (label, run id), as the tab's run picker does."""
    with gr.Accordion("Compare runs", open=False) as accordion:
        with gr.Row():
            picked = gr.Dropdown(choices(), multiselect=True, label="Runs to compare (two or more)", scale=4)
            axis = gr.Radio(list(X_AXES), value="step", label="x axis", info="tokens: training tokens seen", scale=1)
            refresh = gr.Button("Refresh the list", scale=0, min_width=120)
        note = gr.Markdown("Pick two or more runs: their losses share one chart, with the settings that differ.")
        chart = gr.LinePlot(curve_frame([], "step"), x="x", x_title="step", y="loss", color="line",
                            label="Loss of the chosen runs", height=300, elem_id="compare-chart")  # fmt: skip
        # Hidden while empty (an empty table shows headers `1 2 3`): the note says what to do.
        settings = gr.Dataframe(label="Settings each run used that differ (auto as each run decided it)",
                                interactive=False, wrap=True, visible=False)  # fmt: skip
        results = gr.Dataframe(label="Results: final losses, and the evaluation where a run has one", wrap=True,
                               interactive=False, visible=False)  # fmt: skip

    @user_errors
    def show(run_ids: list[str] | None, x: str):
        run_ids = run_ids or []
        runs = [runner.open(run_id) for run_id in run_ids]  # ids only: a browser sends them
        plot = curve_frame(loss_curves(runs, x), x)  # a new value only: a LinePlot update lost it (axis title: below)
        if len(runs) < 2:
            return "Pick two or more runs to compare.", plot, pd.DataFrame(), pd.DataFrame()
        comparison = compare_runs(runs)
        told = "" if comparison.settings else "These runs have the same settings."
        return told, plot, pd.DataFrame(comparison.settings), pd.DataFrame(comparison.results)

    def refresh_choices(current: list[str] | None):
        listed = choices()
        ids = {run_id for _, run_id in listed}
        return gr.update(choices=listed, value=[i for i in current or [] if i in ids])

    # always_last: a change of axis while the runs' chart is still coming is drawn, not dropped
    compared = gr.on([picked.change, axis.change], show, [picked, axis], [note, chart, settings, results],
                     api_name="compare_runs", trigger_mode="always_last")  # fmt: skip
    hide_empty(compared, [settings, results])
    axis.change(lambda x: gr.LinePlot(x_title=x), axis, chart, api_visibility="private")
    gr.on([refresh.click, accordion.expand], refresh_choices, picked, picked, api_visibility="private")
