"""Evaluate tab: pick a training run (its final adapter or any checkpoint's), score base vs tuned on its held-out
questions, see where the adapter helps.

The work is `finetune.evaluate.evaluation`; this module only turns its result (kept in the run folder) into tables
and charts.
"""

from __future__ import annotations

import threading

import gradio as gr
import pandas as pd

from finetune.config import GenerationParams
from finetune.evaluate import COLUMNS, METRIC_LABELS, EvalCancelled, evaluation, follow_evaluation
from finetune.models import ModelPool
from finetune.runs import adapter_label, adapter_ref, list_runs, open_run, parse_adapter_ref
from finetune.settings import Settings
from finetune.spaces import gpu
from finetune.ui.common import hide_empty, loss_frame, shown, user_errors

ORDERS = ("biggest wins", "biggest losses", "test order")
EVAL_GPU_SECONDS = 120  # ZeroGPU budget of one evaluation: 140 questions x2 answered in batches
SCORE_LABELS = {"exact_match": "EM", "f1": "F1", "rouge_l": "ROUGE-L", "similarity": "similarity"}  # short: bar labels
TABLE_COLUMNS = {
    "delta_f1": "Δ F1",
    "question": "question",
    "reference": "reference",
    "base_answer": "base answer",
    "tuned_answer": "tuned answer",
    "base_f1": "base F1",
    "tuned_f1": "tuned F1",
    "base_rouge_l": "base ROUGE-L",
    "tuned_rouge_l": "tuned ROUGE-L",
    "base_similarity": "base sim.",
    "tuned_similarity": "tuned sim.",
    "base_loss": "base loss",
    "tuned_loss": "tuned loss",
}


def summary_frame(result: dict) -> pd.DataFrame:
    """One row per metric, base and tuned side by side, and the change."""
    rows = []
    for key, label in METRIC_LABELS.items():
        base, tuned = (result["summary"][c][key] for c in COLUMNS)
        change = tuned - base if base is not None and tuned is not None else None
        rows.append({"metric": label, "base": base, "tuned": tuned, "change": change})
    return pd.DataFrame(rows).round(4)


def score_bars(result: dict) -> pd.DataFrame:
    """Long rows (bar, model, value) for the 0-1 scores; loss and perplexity have their own scale (table)."""
    rows = [
        {"bar": f"{label} · {c}", "model": c, "value": result["summary"][c][key]}
        for key, label in SCORE_LABELS.items()
        for c in COLUMNS
        if result["summary"][c][key] is not None
    ]
    return pd.DataFrame(rows, columns=["bar", "model", "value"])


def question_frame(result: dict, order: str = ORDERS[0]) -> pd.DataFrame:
    """The per-question table with the change in F1 first: sorted by it, wins and losses are at the top."""
    df = pd.DataFrame(result["rows"])
    columns = [c for c in TABLE_COLUMNS if c in df and df[c].notna().any()]
    df = df[columns]
    if order != "test order":
        df = df.sort_values("delta_f1", ascending=order == "biggest losses", kind="stable")
    return df.rename(columns=TABLE_COLUMNS).round(3)


def run_choices() -> list[tuple[str, str]]:
    """(label, adapter ref) of every adapter to evaluate: of each run, newest first, its final adapter, then its
    checkpoints' newest first (`run · final`, `run · step N`)."""
    choices = []
    for i in list_runs():
        steps = ([None] if i.has_adapter else []) + [c.step for c in reversed(i.run.checkpoints())]
        choices += [(adapter_label(i.run_id, step), adapter_ref(i.run_id, step)) for step in steps]
    return choices


def describe(result: dict) -> str:
    def change(key: str, digits: int) -> str:
        base, tuned = (result["summary"][c][key] for c in COLUMNS)
        return "n/a" if base is None or tuned is None else f"{base:.{digits}f} → {tuned:.{digits}f}"

    text = (
        f"**{adapter_label(result['run_id'], result.get('checkpoint'))}** · {result['questions']} held-out questions"
        f" · evaluated {result.get('created', '')}"
        f" in {result.get('elapsed_s', '?')} s. Perplexity {change('perplexity', 2)}, token F1 {change('f1', 3)}."
    )
    return text + "".join(f"\n\n*{note}*" for note in result.get("notes", []))


# What the tab shows before there is anything to show, and how to get there (the tables stay hidden till then).
NO_RUN = (
    "**No trained run yet.** Press **Fine-tune in 5 minutes** on the Start tab (or train one in the Train tab): "
    "then pick it here and press **Run evaluation** to see the same held-out questions answered by the base and "
    "the tuned model, scored side by side."
)
NOT_EVALUATED = (
    "**Not evaluated yet.** Press **Run evaluation**: the held-out questions, the base and the tuned model's answers "
    "and their scores (exact match, F1, similarity) appear here."
)


def build_eval_tab(settings: Settings, pool: ModelPool) -> dict[str, gr.components.Component]:
    """Builds the tab; returns the controls the lesson note's "try this" can fill, by name."""
    cancels: dict[str, threading.Event] = {}  # session -> the cancel switch of its running evaluation

    gr.Markdown(
        "Run the held-out questions of a training run through the **base** model and the **tuned** model "
        "(base + the run's adapter) and compare: loss and perplexity on the reference answers, and scores of "
        "the generated answers (exact match, token F1, ROUGE-L, embedding similarity)."
    )
    with gr.Row():
        run = gr.Dropdown(label="Training run: its final adapter or a checkpoint's", choices=run_choices(), scale=3)
        refresh = gr.Button("Refresh", scale=0, min_width=100)
        limit = gr.Number(20, label="Questions (0 = the whole test split)", precision=0, minimum=0, scale=1)
        max_new_tokens = gr.Slider(
            16, settings.max_new_tokens, value=min(128, settings.max_new_tokens), step=16, label="Max new tokens"
        )
    with gr.Row():
        arc = gr.Checkbox(False, label="Also ARC-Easy (needs lm-eval and the ai2_arc data set)")
        start = gr.Button("Run evaluation", variant="primary")
        stop = gr.Button("Cancel", variant="stop")
    status = gr.Markdown(lambda: "" if run_choices() else NO_RUN)  # on each page load
    with gr.Row():
        summary = gr.Dataframe(label="Summary: base vs tuned", interactive=False, scale=1, visible=False)
        bars = gr.BarPlot(
            x="bar",
            y="value",
            color="model",
            sort=[f"{label} · {c}" for label in SCORE_LABELS.values() for c in COLUMNS],
            y_lim=[0, 1],
            x_label_angle=-30,
            x_title=" ",
            y_title="score",
            label="Scores (0-1, higher is better)",
            scale=1,
            visible=False,
        )
    curve = gr.LinePlot(x="step", y="loss", color="series", label="This run's training loss", visible=False)
    order = gr.Radio(list(ORDERS), value=ORDERS[0], label="Order questions by change in F1 (tuned - base)")
    table = gr.Dataframe(label="Per question", interactive=False, wrap=True, max_height=600, visible=False)
    files = gr.File(label="Per-question table (CSV, JSONL)", file_count="multiple", interactive=False, visible=False)
    outputs = [status, summary, bars, curve, table, files]

    @user_errors
    def show(run_id: str | None, how: str, note: str = ""):
        if not run_id:
            return NO_RUN, *(pd.DataFrame(),) * 4, None
        run_id, step = parse_adapter_ref(run_id)  # checked as an id, never taken as a path
        run_dir = open_run(run_id)
        result, curve_df = run_dir.read_eval(step), loss_frame(run_dir)
        if result is None:
            empty = pd.DataFrame()
            return note or NOT_EVALUATED, empty, empty, curve_df, empty, None
        downloads = [str(path) for path in run_dir.eval_exports_of(step) if path.is_file()]
        return (
            (note + "\n\n" if note else "") + describe(result),
            summary_frame(result),
            score_bars(result),
            curve_df,
            question_frame(result, how),
            downloads or None,
        )

    @user_errors
    def run_eval(
        run_id: str | None,
        n: float | None,
        max_tokens: float,
        with_arc: bool,
        how: str,
        request: gr.Request,
        progress=gr.Progress(),
    ):
        if not run_id:
            raise gr.Error("Pick a training run first (train one in the Train tab).")
        picked, step = parse_adapter_ref(run_id)
        cancel = cancels[request.session_hash] = threading.Event()
        progress(0, desc="Loading the model and the test split...")
        # ZeroGPU: a GPU while the questions are answered (the model pool is touched only in there), in a worker that
        # gets the arguments pickled: plain values and the pool's handle; progress and Cancel stay on this side.
        steps = gpu(duration=EVAL_GPU_SECONDS)(evaluation)(
            picked,
            limit=int(n) if n else None,
            pool=pool,
            params=GenerationParams(max_new_tokens=min(int(max_tokens), settings.max_new_tokens)),
            benchmarks=with_arc,
            checkpoint=step,
        )
        try:
            follow_evaluation(steps, lambda done, total, text: progress((done, total), desc=text), cancel)
        except EvalCancelled as e:
            return show(run_id, how, f"{e} The last finished evaluation (if any) is shown.")
        finally:
            cancels.pop(request.session_hash, None)
        return show(run_id, how)

    def show_in_page(run_id: str | None, how: str):
        """`show`, with each table, chart and file list hidden while it is empty (the status says what to do)."""
        status_, summary_, bars_, curve_, table_, files_ = show(run_id, how)
        frames = (shown(frame) for frame in (summary_, bars_, curve_, table_))
        return status_, *frames, gr.update(value=files_, visible=bool(files_))

    def cancel_eval(request: gr.Request) -> str:
        event = cancels.get(request.session_hash)
        if event is None:
            return "Nothing is running."
        event.set()
        return "Cancelling after the current batch of questions..."

    def refresh_runs(current: str | None = None):
        choices = run_choices()
        refs = [ref for _, ref in choices]
        return gr.update(choices=choices, value=current if current in refs else (refs[0] if refs else None))

    # On page load (runs trained since the app started) and on Refresh: update the list, then show the choice.
    private = {"api_visibility": "private"}
    gr.on(None, lambda: refresh_runs(), None, run, **private).then(show_in_page, [run, order], outputs, **private)
    refresh.click(refresh_runs, run, run, **private).then(show_in_page, [run, order], outputs, **private)
    gr.on([run.input, order.change], show_in_page, [run, order], outputs, **private)
    evaluated = start.click(
        run_eval,
        [run, limit, max_new_tokens, arc, order],
        outputs,
        api_name="evaluate",  # plain values: the tables and files as they are
        concurrency_limit=1,
        concurrency_id="evaluate",
    )
    hide_empty(evaluated, [summary, bars, curve, table, files])  # its own values: a cancel's note stays
    stop.click(cancel_eval, None, status, api_name=False)
    return {"limit": limit, "run": run}
