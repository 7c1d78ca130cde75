"""Prompt templates and the loss mask.

A fine-tuning row is a prompt (what the model is given) and an answer (what it learns to write).
Rows use the canonical fields `instruction`, `input` and `output` (see `finetune.data` for the
column mapping); `messages` rows (chat lists) use the model's chat template, and `text` rows
(pretraining-style plain text) the `text` template, which trains on the whole text.

    from finetune.templates import TEMPLATES, render, encode
    prompt, answer = render(TEMPLATES["qa"], {"instruction": "What is Lamini?", "output": "An LLM engine."})
    ids = encode(tokenizer, prompt, answer, max_length=256)  # input_ids, labels (-100 on the prompt)
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from finetune import FinetuneError

IGNORE_INDEX = -100  # label value PyTorch's cross-entropy skips: prompt tokens are not trained on

_ALPACA_INTRO = "Below is an instruction that describes a task"


@dataclass(frozen=True)
class Template:
    name: str
    prompt: str = ""  # str.format template over the row's fields; empty for the chat template
    prompt_no_input: str = ""  # used instead of `prompt` when the row's `input` is empty
    answer_field: str = "output"
    chat: bool = False  # render with the tokenizer's own chat template
    stop: tuple[str, ...] = ("###",)  # where generation stops: the template's next header
    description: str = ""

    def fields(self, row: dict | None = None) -> set[str]:
        """Placeholders this template reads (for `row`, the ones of the variant that row would use)."""
        text = self._prompt_for(row or {"input": "x"})
        return {name for _, name, _, _ in string.Formatter().parse(text) if name}

    def _prompt_for(self, row: dict) -> str:
        if self.prompt_no_input and not str(row.get("input") or "").strip():
            return self.prompt_no_input
        return self.prompt


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            "alpaca",
            prompt=(
                f"{_ALPACA_INTRO}, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
            ),
            prompt_no_input=(
                f"{_ALPACA_INTRO}. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Response:\n"
            ),
            description="Alpaca: with an ### Input section when the row has one, without it otherwise.",
        ),
        Template(
            "qa",
            prompt="### Question:\n{instruction}\n\n### Answer:\n",
            description="The course's Q/A template: ### Question: ... ### Answer: ...",
        ),
        Template("chat", chat=True, stop=(), description="The model's own chat template (instruct models)."),
        Template(
            "text",
            answer_field="text",
            stop=(),
            description="Plain text, pretraining style: no prompt, the whole text is trained on.",
        ),
    )
}


def custom_template(prompt: str, answer_field: str = "output") -> Template:
    """A user template with `{column}` placeholders; checked for syntax here, against columns by `validate`."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(prompt) if name is not None]
    except ValueError as e:
        raise FinetuneError(
            f"The template is not valid: {e}. Use {{column}} placeholders, and {{{{ for a brace."
        ) from None
    if "" in fields or any(not f.isidentifier() for f in fields):
        raise FinetuneError("Template placeholders must be column names, like {question}; {} alone is not allowed.")
    return Template("custom", prompt=prompt, answer_field=answer_field, description="Your own template.")


def get_template(name_or_text: str) -> Template:
    """A built-in template by name, or a custom one from its text."""
    if name_or_text in TEMPLATES:
        return TEMPLATES[name_or_text]
    return custom_template(name_or_text)


def validate(template: Template, columns: list[str] | set[str]) -> None:
    """Raise a clear error when the template reads a field the data set does not have."""
    if template.chat:
        return
    missing = (template.fields() | {template.answer_field}) - set(columns)
    if missing:
        raise FinetuneError(
            f"Template placeholder(s) {', '.join('{' + m + '}' for m in sorted(missing))} are not columns of this "
            f"data set (columns: {', '.join(sorted(columns))})."
        )


def _user_text(row: dict) -> str:
    instruction, extra = str(row.get("instruction") or ""), str(row.get("input") or "")
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def chat_messages(row: dict) -> tuple[list[dict], str]:
    """(messages before the answer, answer) of a row, for chat templates."""
    if row.get("messages"):
        messages = [dict(m) for m in row["messages"]]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            return messages, ""
        return messages[:last], messages[last]["content"]
    return [{"role": "user", "content": _user_text(row)}], str(row.get("output") or "")


def render(template: Template, row: dict, tokenizer=None) -> tuple[str, str]:
    """(prompt, answer) text of one row. The chat template needs the model's tokenizer."""
    if template.chat or row.get("messages"):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise FinetuneError("This model has no chat template: choose the Alpaca or Q/A template.")
        messages, answer = chat_messages(row)
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not answer:
            return prompt, ""
        full = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": answer}], tokenize=False, add_generation_prompt=False
        )
        # The answer is what the full conversation adds after the generation prompt (incl. end-of-turn).
        return prompt, full[len(prompt) :] if full.startswith(prompt) else answer
    fields = {k: "" if v is None else v for k, v in row.items()}
    try:
        prompt = template._prompt_for(fields).format_map(fields)
    except KeyError as e:
        raise FinetuneError(f"Template placeholder {{{e.args[0]}}} is not a column of this data set.") from None
    return prompt, str(fields.get(template.answer_field, ""))


def build_prompt(template: Template, question: str, context: str = "", tokenizer=None) -> str:
    """The prompt a model is given at inference time (Arena, evaluation)."""
    return render(template, {"instruction": question, "input": context, "output": ""}, tokenizer)[0]


def pad_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else its end-of-sequence token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def encode(tokenizer, prompt: str, answer: str, max_length: int | None = None, chat: bool = False) -> dict:
    """Token ids of prompt + answer with labels masked (-100) on the prompt, so loss is on the answer only.

    Prompt and answer are tokenized separately (the boundary is a newline in our templates, so this
    matches joint tokenization) and the answer gets EOS, so the model learns to stop. Chat-template text
    already holds its special tokens (BOS, end-of-turn), so nothing is added to it. When the pair is too
    long the answer is cut, never the prompt: a row whose prompt fills `max_length` trains nothing.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] if answer else []
    eos = tokenizer.eos_token_id
    if not chat and eos is not None and (not answer_ids or answer_ids[-1] != eos):
        answer_ids = answer_ids + [eos]
    if max_length is not None:
        prompt_ids = prompt_ids[:max_length]
        answer_ids = answer_ids[: max(0, max_length - len(prompt_ids))]
    input_ids = prompt_ids + answer_ids
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
        "prompt_length": len(prompt_ids),
    }


def encode_row(tokenizer, template: Template, row: dict, max_length: int | None = None) -> dict:
    prompt, answer = render(template, row, tokenizer)
    return encode(tokenizer, prompt, answer, max_length, chat=template.chat or bool(row.get("messages")))
