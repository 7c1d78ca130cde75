"""Models that run elsewhere: a chat template that prompts a tuned model the way it was trained.

    python -m finetune export runs/<id> merged/   # the merged model, its chat_template.jinja, and these two lines:
    transformers serve /abs/merged --port 8000
    curl http://localhost:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{"model": ...}'

OpenAI-compatible servers (`transformers serve`, vLLM, TGI) build the prompt with the tokenizer's chat template. A
model tuned with the Q/A template must be asked `### Question: ... ### Answer:` as in training, not in the base
model's chat format: training leaves `serving_chat_template` in the adapter folder, `export_merged` in the merged
model's.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from finetune import FinetuneError
from finetune.templates import Template, build_prompt

QUESTION = "\x00question\x00"  # stands for the user's message in a rendered prompt


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a Jinja string literal: Jinja reads Python's backslash escapes


def _added_prefix(tokenizer) -> str:
    """The special tokens the tokenizer puts before a text (Gemma's <bos>), which training's prompts start with."""
    with_specials, plain = (tokenizer("x", add_special_tokens=flag)["input_ids"] for flag in (True, False))
    n = len(with_specials) - len(plain)
    return tokenizer.decode(with_specials[:n]) if n > 0 and with_specials[n:] == plain else ""


def serving_chat_template(template: Template, tokenizer) -> str | None:
    """A Jinja chat template that prompts as the app does and renders a conversation as training did.

    `chat`: the model's own. `tools`: ours. A text template (Q/A, Alpaca): each user message in the template's prompt,
    each earlier answer after it (trimmed, then a blank line: the app's history), the last answer with EOS (training).
    None where there is nothing to write: the model's templates are several (its tokenizer files carry them), or a
    custom template reads columns a chat message does not have.
    """
    if template.chat:
        return tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    # The specials as literals (not every server passes them to the template), BOS as the tokenizer adds it.
    head = f"{{%- set eos_token = {_literal(tokenizer.eos_token or '')} %}}"
    if prefix := _added_prefix(tokenizer):
        head += f"{{{{ {_literal(prefix)} }}}}"
    if template.chat_template:
        return head + template.chat_template
    try:
        prompt = build_prompt(template, QUESTION)
    except FinetuneError:
        return None
    if QUESTION not in prompt:  # plain text: no prompt, the text goes on
        return head + "{%- for message in messages %}{{ message.content }}{% endfor %}"
    user = " + message.content + ".join(_literal(part) for part in prompt.split(QUESTION))
    return head + (
        "{%- for message in messages %}"
        f"{{%- if message.role == 'user' %}}{{{{ {user} }}}}"
        "{%- elif message.role == 'assistant' and loop.last %}{{ message.content + eos_token }}"
        "{%- elif message.role == 'assistant' %}{{ (message.content | trim) + '\\n\\n' }}"
        "{%- endif %}{% endfor %}"
    )


def write_chat_template(folder: str | Path, text: str | None) -> Path | None:
    """Write `chat_template.jinja` (read by transformers and vLLM) into `folder`; where the folder holds a tokenizer,
    also into its tokenizer_config.json, where servers that predate that file look."""
    if text is None:
        return None
    folder = Path(folder)
    path = folder / "chat_template.jinja"
    path.write_text(text, encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        values = {**json.loads(config.read_text(encoding="utf-8")), "chat_template": text}
        config.write_text(json.dumps(values, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def serve_commands(model_dir: str | Path, port: int = 8000, question: str = "Hello!") -> str:
    """The command that serves a merged model with `transformers serve`, and a curl line that asks it `question`."""
    model = str(Path(model_dir).resolve())
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}]}, ensure_ascii=False)
    return (
        f"transformers serve {shlex.quote(model)} --port {port}\n"
        f"curl http://localhost:{port}/v1/chat/completions -H 'Content-Type: application/json' -d {shlex.quote(body)}"
    )
