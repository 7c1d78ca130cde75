"""The Gradio app: `build_app()` assembles the tabs. The only package that imports gradio."""

from __future__ import annotations

import gradio as gr

from finetune.arena import serve_finished_runs
from finetune.guided import Guide, app_guide
from finetune.models import ModelPool
from finetune.runner import Runner
from finetune.settings import Settings
from finetune.ui.arena_tab import build_arena_tab
from finetune.ui.data_tab import build_data_tab
from finetune.ui.eval_tab import build_eval_tab
from finetune.ui.guided import build_guided_panel
from finetune.ui.lessons import lesson_note
from finetune.ui.train_tab import build_train_tab

TITLE = "Fine-tuning Workbench"


def build_app(
    settings: Settings | None = None,
    pool: ModelPool | None = None,
    runner: Runner | None = None,
    guide: Guide | None = None,
) -> gr.Blocks:
    settings = settings or Settings.current()
    pool = pool or ModelPool()
    runner = runner or Runner(on_finished=serve_finished_runs(settings.serve_url))
    guide = guide or app_guide(runner, pool, settings.base_model)
    with gr.Blocks(title=TITLE) as app:
        gr.Markdown(f"# {TITLE}\nPrepare data, train a LoRA adapter, evaluate it, and compare models side by side.")
        with gr.Tabs() as tabs:
            # Each tab opens with the course's lesson note; its "try this" fills the tab's controls.
            with gr.Tab("Start", id="start"):
                start_note = lesson_note("start")
                guided = build_guided_panel(guide, app, extra_starts=[start_note.button])
            with gr.Tab("Data", id="data"):
                note = lesson_note("data")
                data_tab = build_data_tab(settings)
                note.fill(vars(data_tab))
            with gr.Tab("Train", id="train"):
                note = lesson_note("train")
                note.fill(build_train_tab(settings, pool, runner, data_state=data_tab.prepared))
            with gr.Tab("Evaluate", id="evaluate"):
                note = lesson_note("evaluate")
                note.fill(build_eval_tab(settings, pool))
            with gr.Tab("Arena", id="arena") as arena_tab:
                note = lesson_note("arena", open=False)  # folded: the question and the answers fit the first screen
                arena = build_arena_tab(settings, pool, tab=arena_tab)
                note.fill(arena)
        guided.opens_arena(tabs, "arena", arena)
    return app
