"""The arena: one question answered by several models at once, streamed side by side.

pool = ModelPool()
contenders = {"base": Contender(ModelSpec("gemma-3-270m"), "qa"),
              "reference": Contender(ModelSpec("smollm2-135m-instruct"), "chat")}
for columns in answer(pool, contenders, "What is Lamini?", GenerationParams()):
    print({name: col.text for name, col in columns.items()})
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from finetune.config import GenerationParams, ModelSpec
from finetune.generate import Column, merge_streams, stream
from finetune.models import ModelPool
from finetune.templates import TEMPLATES, build_prompt


@dataclass
class Contender:
    spec: ModelSpec
    template: str = "qa"  # how the question is put to this model: a template name from TEMPLATES


def _contender_stream(pool: ModelPool, contender: Contender, question: str, params: GenerationParams):
    loaded = pool.get(contender.spec)
    template = TEMPLATES[contender.template]
    prompt = build_prompt(template, question, tokenizer=loaded.tokenizer)
    params = replace(params, stop=template.stop)
    with loaded.lock:  # one generation per model at a time; other requests for it wait here
        yield from stream(loaded.model, loaded.tokenizer, prompt, params)


def answer(
    pool: ModelPool, contenders: dict[str, Contender], question: str, params: GenerationParams
) -> Iterator[dict[str, Column]]:
    """Stream every contender's answer to `question` at once; yields all columns after each chunk."""
    streams = {name: _contender_stream(pool, c, question, params) for name, c in contenders.items()}

    def counter(name: str):
        return lambda text: len(pool.get(contenders[name].spec).tokenizer(text, add_special_tokens=False).input_ids)

    yield from merge_streams(streams, count_tokens={name: counter(name) for name in contenders})
