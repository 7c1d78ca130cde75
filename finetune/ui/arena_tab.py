"""Arena tab: one question, answers streamed side by side."""

from __future__ import annotations

import gradio as gr

from finetune import FinetuneError
from finetune.arena import Contender, answer
from finetune.config import AppSettings, GenerationParams, ModelSpec
from finetune.generate import Column
from finetune.models import ModelPool, inference_dtype

EXAMPLES = [
    "What is the capital of France?",
    "What do you think of Mars?",
    "How can I evaluate the performance and quality of the generated text from Lamini models?",
]


def _render(col: Column) -> str:
    if col.error:
        return f"{col.text}\n\n**Error:** {col.error}"
    stats = []
    if col.first_token_s is not None:
        stats.append(f"first token {col.first_token_s:.2f} s")
    if col.tokens_per_s is not None:
        stats.append(f"{col.tokens_per_s:.1f} tokens/s")
    return col.text.strip() + (f"\n\n*{' · '.join(stats)}*" if col.done and stats else "")


def build_arena_tab(settings: AppSettings, pool: ModelPool) -> None:
    dtype = inference_dtype()
    contenders = {
        "base": Contender(ModelSpec(settings.base_model, dtype=dtype), "qa"),
        "reference": Contender(ModelSpec(settings.reference_model, dtype=dtype), "chat"),
    }
    gr.Markdown(
        f"Ask one question; the **base** model (`{settings.base_model}`, pretrained, not instruction-tuned) "
        f"and the **reference** model (`{settings.reference_model}`, instruction-tuned) answer side by side."
    )
    with gr.Row():
        question = gr.Textbox(label="Question", placeholder="Ask something...", scale=4, lines=2)
        with gr.Column(scale=1, min_width=160):
            ask = gr.Button("Ask", variant="primary")
            max_new_tokens = gr.Slider(
                16, settings.max_new_tokens, value=min(128, settings.max_new_tokens), step=16, label="Max new tokens"
            )
    gr.Examples(EXAMPLES, inputs=question)
    with gr.Row(equal_height=True):
        base_out = gr.Markdown(label="Base", container=True, min_height=160)
        ref_out = gr.Markdown(label="Reference", container=True, min_height=160)

    def run(q: str, max_tokens: float):
        if not q or not q.strip():
            raise gr.Error("Type a question first.")
        params = GenerationParams(max_new_tokens=min(int(max_tokens), settings.max_new_tokens))
        try:
            for columns in answer(pool, contenders, q.strip(), params):
                yield _render(columns["base"]), _render(columns["reference"])
        except FinetuneError as e:
            raise gr.Error(str(e)) from e

    gr.on(
        [ask.click, question.submit],
        run,
        [question, max_new_tokens],
        [base_out, ref_out],
        api_name="arena",
        concurrency_limit=settings.generation_concurrency,
        concurrency_id="arena",
    )
