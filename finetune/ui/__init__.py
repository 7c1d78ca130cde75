"""The Gradio app: `build_app()` assembles the tabs. The only package that imports gradio."""

from __future__ import annotations

import gradio as gr

from finetune.config import AppSettings
from finetune.models import ModelPool
from finetune.runner import Runner
from finetune.ui.arena_tab import build_arena_tab
from finetune.ui.data_tab import build_data_tab
from finetune.ui.eval_tab import build_eval_tab
from finetune.ui.train_tab import build_train_tab

TITLE = "Fine-tuning Workbench"


def build_app(
    settings: AppSettings | None = None, pool: ModelPool | None = None, runner: Runner | None = None
) -> gr.Blocks:
    settings = settings or AppSettings.from_env()
    pool = pool or ModelPool()
    runner = runner or Runner()
    with gr.Blocks(title=TITLE) as app:
        gr.Markdown(f"# {TITLE}\nPrepare data, train a LoRA adapter, evaluate it, and compare models side by side.")
        with gr.Tabs():
            with gr.Tab("Data", id="data"):
                data_tab = build_data_tab(settings, pool)
            with gr.Tab("Train", id="train"):
                build_train_tab(settings, pool, runner, data_state=data_tab.prepared)
            with gr.Tab("Evaluate", id="evaluate"):
                build_eval_tab(settings, pool)
            with gr.Tab("Arena", id="arena"):
                build_arena_tab(settings, pool)
    return app
