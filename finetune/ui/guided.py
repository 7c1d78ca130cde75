"""The Start tab's "Fine-tune in 5 minutes" panel: one button runs `finetune.guided` with a step indicator.

The guided run's id is kept in the browser (`gr.BrowserState`, per browser, never global); on page load the panel
reads the run's state from disk (`guided.current_step`) and follows it again, so a reload lands on the same step
with the training still running in its own process. When the adapter is ready the Arena tab opens with it
selected and a held-out question filled in. After 10 blind votes on it, "Train on my votes" runs the last step (a
short DPO run from that adapter) and opens the Arena with the DPO adapter. Named API endpoints: `guided_start`
and `guided_votes` (each streams the steps).
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import gradio as gr

from finetune import FinetuneError
from finetune.guided import STEP_TITLES, STEPS, VOTES_NEEDED, Guide, GuidedStep, current_step
from finetune.runs import RunDir
from finetune.settings import Settings
from finetune.ui.common import adapter_choices, current_user, loss_frame, machine_line, shown, user_errors

STORAGE_KEY = "finetune-guided-run"
_COLORS = {"done": "#15803d", "current": "#1d4ed8", "error": "#b91c1c", "todo": "#6b7280"}
_MARKS = {"done": "✓", "current": "▶", "error": "✗"}
IDLE = (
    "Press the button: the app prepares lamini_docs with the Q/A template, trains a LoRA adapter on the base "
    "model, measures the held-out loss before and after, and opens the Arena. Read the lessons while it trains. "
    f"Then vote blind on {VOTES_NEEDED} of its answers in the Arena and train on your votes."
)


def steps_html(step: GuidedStep | None) -> str:
    """The step indicator: each step done, current, failed or still to do (`data-state`, for tests and CSS)."""
    items = []
    for i, name in enumerate(STEPS):
        if step is None or i > step.index:
            state = "todo"
        elif step.done or i < step.index:
            state = "done"
        else:
            state = "error" if step.error else "current"
        weight = "700" if state == "current" else "400"
        items.append(
            f'<li data-step="{name}" data-state="{state}" style="color:{_COLORS[state]};font-weight:{weight}">'
            f"{_MARKS.get(state, str(i + 1))} {html.escape(STEP_TITLES[name])}</li>"
        )
    return f'<ol class="guided-steps" style="display:flex;gap:1.5em;list-style:none;padding:0">{"".join(items)}</ol>'


@dataclass
class GuidedPanel:
    start: gr.Button
    run_id: gr.BrowserState
    steps: gr.HTML
    message: gr.Markdown
    adapter: gr.Textbox  # hidden: the tuned adapter folder once the Arena is ready
    question: gr.Textbox  # hidden: a held-out question for the Arena
    open_arena: gr.Button
    learn: gr.Button  # the vote step: train on the votes once there are enough
    finished: list  # events that end when the guided path has reached the Arena (or failed)
    learned: object  # the vote step's event: it opens the Arena only when it succeeded

    def opens_arena(self, tabs: gr.Tabs, arena_id: str, arena: dict) -> None:
        """Once ready (and on "Open the Arena"): select the Arena tab with the new adapter and a held-out question,
        and ask it (`arena`: what `build_arena_tab` returns)."""
        adapter, question = arena["adapter"], arena["question"]

        def to_arena(adapter_dir: str, text: str):
            if not adapter_dir:
                return gr.update(), gr.update(), gr.update()
            return gr.Tabs(selected=arena_id), gr.Dropdown(choices=adapter_choices(), value=adapter_dir), text

        args = (to_arena, [self.adapter, self.question], [tabs, adapter, question])
        for event in self.finished:
            arena["answer_after"](event.then(*args, api_visibility="private"), self.question)
        # A refusal (too few votes) stays on this tab.
        arena["answer_after"](self.learned.success(*args, api_visibility="private"), self.question)
        arena["answer_after"](self.open_arena.click(*args, api_visibility="private"), self.question)


def build_guided_panel(guide: Guide, page: gr.Blocks, extra_starts: list | None = None) -> GuidedPanel:
    """The panel; `page`: the app, whose load event resumes the browser's run; `extra_starts`: more buttons that
    start the guided run (the Start lesson's "try this")."""
    with gr.Group():
        gr.Markdown("## Fine-tune in 5 minutes\n" + IDLE)
        # Evaluated on each page load: the machine, what `auto` chose here, and the steps that fit the budget.
        gr.Markdown(lambda: machine_line(guide.config()), elem_id="guided-machine")
        steps = gr.HTML(steps_html(None), elem_id="guided-steps")
        message = gr.Markdown(elem_id="guided-message")
        # The loss drawing itself while the run trains (hidden until it has points).
        chart = gr.LinePlot(loss_frame(None), x="step", y="loss", color="series", label="Loss", height=220,
                            visible=False, elem_id="guided-chart")  # fmt: skip
        with gr.Row():
            start = gr.Button("Fine-tune in 5 minutes", variant="primary", elem_id="guided-start")
            open_arena = gr.Button("Open the Arena", visible=False, elem_id="guided-open-arena")
            learn = gr.Button(f"Train on my votes ({VOTES_NEEDED} needed)", visible=False, elem_id="guided-vote")
    run_id = gr.BrowserState(None, storage_key=STORAGE_KEY)
    adapter = gr.Textbox(visible=False)
    question = gr.Textbox(visible=False)

    def view(step: GuidedStep):
        result = step.result or {}
        text = f"**{STEP_TITLES[step.step]}**: {step.message}"
        run = _opened(guide, step.run_id)
        return (
            step.run_id,
            steps_html(step),
            text,
            shown(loss_frame(run)),
            result.get("adapter", "") if step.done else "",
            result.get("question", "") if step.done else "",  # what the Arena asks once it opens (`opens_arena`)
            gr.Button(visible=step.done),
            gr.Button(visible=step.done or step.step == "vote"),
        )

    @user_errors
    def start_guided(previous: str | None, request: gr.Request | None = None):
        if previous and _exists(guide, previous) and not _ended(guide, previous):
            steps_ = guide.follow(previous)  # a second click while one runs: follow it, start nothing new
        else:
            steps_ = guide.run(owner=current_user(request), limits=Settings.current())
        for step in steps_:
            yield view(step)

    def resume(previous: str | None):
        if not previous or not _exists(guide, previous):
            yield (
                None,
                steps_html(None),
                "",
                shown(loss_frame(None)),
                "",
                "",
                gr.Button(visible=False),
                gr.Button(visible=False),
            )
            return
        for step in guide.follow(previous):
            yield view(step)

    @user_errors
    def learn_from_votes(previous: str | None, request: gr.Request | None = None):
        if not previous or not _exists(guide, previous):
            raise FinetuneError("Press Fine-tune in 5 minutes first: your votes train the adapter it makes.")
        for step in guide.learn_from_votes(previous, owner=current_user(request), limits=Settings.current()):
            yield view(step)

    outputs = [run_id, steps, message, chart, adapter, question, open_arena, learn]
    triggers = [start.click, *(b.click for b in extra_starts or [])]
    started = gr.on(triggers, start_guided, run_id, outputs, api_name="guided_start", concurrency_limit=None)
    resumed = page.load(resume, run_id, outputs, api_visibility="private", concurrency_limit=None)
    learned = learn.click(learn_from_votes, run_id, outputs, api_name="guided_votes", concurrency_limit=None)
    return GuidedPanel(
        start, run_id, steps, message, adapter, question, open_arena, learn, [started, resumed], learned
    )


def _opened(guide: Guide, run_id: str | None) -> RunDir | None:
    """The run the browser's stored id names, or None (it comes from the client: `Runner.open` takes ids only)."""
    try:
        return guide.runner.open(run_id) if run_id else None
    except FinetuneError:
        return None


def _exists(guide: Guide, run_id: str) -> bool:
    return _opened(guide, run_id) is not None


def _ended(guide: Guide, run_id: str) -> bool:
    step = current_step(guide.runner, run_id)
    return step.done or step.error
