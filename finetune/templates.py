"""Prompt templates and the loss mask.

A fine-tuning row is a prompt (what the model is given) and an answer (what it learns to write).
Rows use the canonical fields `instruction`, `input` and `output` (see `finetune.data` for the
column mapping); `messages` rows (chat lists) use the model's chat template, and `text` rows
(pretraining-style plain text) the `text` template, which trains on the whole text.

A conversation (chat rows, tool calls) trains on every assistant turn, tool calls included, never on system, user or
tool turns. Each turn's text is found by rendering the conversation's prefixes with the chat template (the turn is
what the next prefix adds). The model's own template is used when it knows tools; the `tools` template is a plain one
of our own for any model (see `TOOLS_CHAT_TEMPLATE`).

    from finetune.templates import TEMPLATES, render, encode
    prompt, answer = render(TEMPLATES["qa"], {"instruction": "What is Lamini?", "output": "An LLM engine."})
    ids = encode(tokenizer, prompt, answer, max_length=256)  # input_ids, labels (-100 on the prompt)
    ids = encode_row(tokenizer, TEMPLATES["tools"], {"messages": [...], "tools": "[...]"})  # every assistant turn
"""

from __future__ import annotations

import json
import re
import string
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate, groupby

from finetune import FinetuneError

IGNORE_INDEX = -100  # label value PyTorch's cross-entropy skips: prompt tokens are not trained on
TRAINED = ("answer", "assistant")  # the kinds of text trained on; "prompt", "system", "user" and "tool" are not
Segment = tuple[str, str]  # (text, kind): a row rendered as consecutive pieces of text

# The `tools` template: conversations with tool calls as plain text, for models whose chat template has no tools
# (or none at all). Blocks `### Tools:` (one function's JSON schema a line), `### System:`, `### User:`,
# `### Assistant:` and `### Tool:` are separated by a blank line. A tool call is
# `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` (the Hermes format, which vLLM's `hermes` tool
# parser reads) and every assistant turn ends with the end-of-sequence token, so the model learns to stop after a
# call as after an answer. All output is in `{{ }}` expressions, so the renderer's whitespace options (transformers
# trims blocks) change nothing.
TOOLS_CHAT_TEMPLATE = (
    "{%- if tools %}{{ '### Tools:' }}{% for tool in tools %}"
    "{{ '\\n' + ((tool.function if tool.function is defined else tool) | tojson) }}{% endfor %}{% endif %}"
    "{%- for message in messages %}"
    "{%- if tools or not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{%- if message.role == 'assistant' %}{{ '### Assistant:\\n' }}"
    "{%- if message.content %}{{ message.content }}{% endif %}"
    "{%- for call in message.tool_calls or [] %}"
    "{%- if message.content or not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_call>\\n' + ({'name': call.function.name, 'arguments': call.function.arguments} | tojson)"
    " + '\\n</tool_call>' }}"
    "{%- endfor %}{{ eos_token }}"
    "{%- else %}{{ '### ' + (message.role | capitalize) + ':\\n' + message.content }}{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '\\n\\n### Assistant:\\n' }}{% endif %}"
)

_ALPACA_INTRO = "Below is an instruction that describes a task"


@dataclass(frozen=True)
class Template:
    name: str
    prompt: str = ""  # str.format template over the row's fields; empty for the chat template
    prompt_no_input: str = ""  # used instead of `prompt` when the row's `input` is empty
    answer_field: str = "output"
    chat: bool = False  # render with the tokenizer's own chat template
    chat_template: str = ""  # a Jinja chat template of our own for conversations, used instead of the model's
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
            "tools",
            chat_template=TOOLS_CHAT_TEMPLATE,
            description="Conversations and tool calls as plain ### blocks: any model, no chat template needed.",
        ),
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
    if template.chat or template.chat_template:
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


def _arguments(text):
    """A call's arguments as an object, as chat templates expect them (rows keep them as JSON text)."""
    try:
        parsed = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError:
        return text
    return parsed if isinstance(parsed, dict) else text


def _template_message(message: dict) -> dict:
    # Arrow gives every message of a data set every field: those a message does not have are null.
    out = {k: v for k, v in message.items() if v is not None}
    if out.get("tool_calls"):
        calls = [{k: v for k, v in call.items() if v is not None} for call in out["tool_calls"]]
        for call in calls:
            call["function"] = {**call["function"], "arguments": _arguments(call["function"].get("arguments"))}
        out["tool_calls"] = calls
    return out


def row_tools(row: dict) -> list[dict]:
    """The JSON schemas of the tools a row offers (rows keep them as JSON text)."""
    value = row.get("tools")
    if not value:
        return []
    return json.loads(value) if isinstance(value, str) else list(value)


def conversation(row: dict) -> tuple[list[dict], list[dict]]:
    """A row as a chat: its messages (a prompt/answer row: one user and one assistant turn) and its tools."""
    if row.get("messages"):
        messages = [_template_message(m) for m in row["messages"]]
    else:
        answer = str(row.get("output") or "")
        messages = [{"role": "user", "content": _user_text(row)}]
        messages += [{"role": "assistant", "content": answer}] if answer else []
    return messages, row_tools(row)


def chat_messages(row: dict) -> tuple[list[dict], str]:
    """(messages before the last answer, that answer) of a row, for chat templates."""
    messages, _ = conversation(row)
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return messages, ""
    return messages[:last], messages[last].get("content") or ""


def _model_label(tokenizer) -> str:
    from finetune.models import CACHE_SUFFIX  # here, not at the top: it imports torch

    name = str(getattr(tokenizer, "name_or_path", "") or "").rstrip("/").rsplit("/", 1)[-1]
    return name.removesuffix(CACHE_SUFFIX) or "This model"


def chat_template_text(template: Template, tokenizer, messages: list[dict], tools: list[dict]) -> str:
    """The Jinja chat template that renders this conversation: the template's own, else the model's, which must
    know tools when the conversation has any (a template without them would drop the calls silently)."""
    if template.chat_template:
        return template.chat_template
    calls = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        hint = "`tools` plain template" if calls or tools else "Alpaca or Q/A template"
        raise FinetuneError(f"This model has no chat template: choose the {hint}.")
    text = tokenizer.get_chat_template(None, tools or None)
    needed = ["tools"] * bool(tools) + ["tool_calls"] * calls
    if not all(re.search(rf"\b{word}\b", text) for word in needed):
        raise FinetuneError(
            f"{_model_label(tokenizer)}'s chat template has no tool support: choose the `tools` plain template."
        )
    return text


def _render_chat(text: str, tokenizer, messages: list[dict], tools: list[dict], generation_prompt: bool) -> str:
    """`messages` rendered with the Jinja chat template `text`, as `tokenizer.apply_chat_template` does."""
    from transformers.utils.chat_template_utils import render_jinja_template

    specials = dict(tokenizer.special_tokens_map) if tokenizer is not None else {}
    try:
        rendered, _ = render_jinja_template(
            conversations=[messages],
            tools=tools or None,
            chat_template=text,
            add_generation_prompt=generation_prompt,
            **specials,
        )
    except Exception as e:  # the template's own checks (raise_exception) and type errors alike
        raise FinetuneError(
            f"The chat template could not render this conversation ({e}): fix the row's turns or choose the `tools` "
            "plain template."
        ) from None
    return rendered[0]


def _chat_segments(render: Callable[[list[dict], bool], str], messages: list[dict]) -> list[Segment]:
    """A conversation as segments: every assistant turn (after the first message) is trained on, the text between
    takes the kind of the turn it belongs to. A turn is what rendering one more message adds; a turn whose text is not
    a prefix of the whole (templates that rewrite earlier turns) stays inside its neighbour's segment, untrained."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0), default=None)
    if last is None:
        return [(render(messages, True), messages[-1]["role"] if messages else "user")]
    messages = messages[: last + 1]
    full = render(messages, False)

    def prefix(part: list[dict], generation_prompt: bool) -> str | None:
        try:
            text = render(part, generation_prompt)
        except FinetuneError:  # some templates refuse a conversation that ends with a system or tool turn
            return None
        return text if full.startswith(text) else None

    segments: list[Segment] = []
    pos, kind = 0, "prompt"
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i == 0:
            kind = m["role"] if m["role"] != "assistant" else "prompt"
            end = prefix(messages[: i + 1], False)
            ends = [(end, kind)] if end is not None else []
        else:
            before, through = prefix(messages[:i], True), full if i == last else prefix(messages[: i + 1], False)
            if before is None or through is None or not through.startswith(before) or len(before) < pos:
                if i < last:
                    continue
                # The last answer rendered unlike the prompt that asks for it: the bare answer follows the prompt.
                return [(render(messages[:i], True), kind), (m.get("content") or "", "assistant")]
            ends = [(before, kind), (through, "assistant")]
        for text, what in ends:
            if len(text) > pos:
                segments.append((full[pos : len(text)], what))
                pos = len(text)
    return segments


def render_segments(template: Template, row: dict, tokenizer=None) -> list[Segment]:
    """A row as consecutive (text, kind) segments: "prompt" then "answer" for a text template, a conversation's turns
    ("system", "user", "assistant", "tool") for a chat template. Segments of the kinds in TRAINED are trained on."""
    if template.chat or template.chat_template or row.get("messages"):
        messages, tools = conversation(row)
        text = chat_template_text(template, tokenizer, messages, tools)
        return _chat_segments(lambda part, gen: _render_chat(text, tokenizer, part, tools, gen), messages)
    fields = {k: "" if v is None else v for k, v in row.items()}
    try:
        prompt = template._prompt_for(fields).format_map(fields)
    except KeyError as e:
        raise FinetuneError(f"Template placeholder {{{e.args[0]}}} is not a column of this data set.") from None
    return [(prompt, "prompt"), (str(fields.get(template.answer_field, "")), "answer")]


def render(template: Template, row: dict, tokenizer=None) -> tuple[str, str]:
    """(prompt, answer) text of one row: the answer is its last trained segment (a chat's last assistant turn, with
    the end of turn). The chat template needs the model's tokenizer."""
    segments = render_segments(template, row, tokenizer)
    last = max((i for i, (_, kind) in enumerate(segments) if kind in TRAINED), default=len(segments))
    return "".join(text for text, _ in segments[:last]), "".join(text for text, _ in segments[last:])


def build_prompt(template: Template, question: str, context: str = "", tokenizer=None) -> str:
    """The prompt a model is given at inference time (Arena, evaluation)."""
    return render(template, {"instruction": question, "input": context, "output": ""}, tokenizer)[0]


def conversation_prompt(template: Template, messages: list[dict], tokenizer=None) -> str:
    """The prompt for a conversation that ends with the user's turn, in `template`'s format.

    A chat template (the model's, or the `tools` one) renders the whole message list; a text template (Q/A, Alpaca)
    repeats its question/answer block for each earlier turn, so a base model sees the history as in training.
    """
    if not messages or messages[-1]["role"] != "user":
        raise FinetuneError("A conversation must end with the user's question.")
    if template.chat or template.chat_template:
        return chat_prompt(template, messages, tokenizer)
    text, question = "", None
    for m in messages:
        if m["role"] == "user":
            question = m["content"]
        elif m["role"] == "assistant" and question is not None:
            text += build_prompt(template, question) + m["content"].strip() + "\n\n"
            question = None
    return text + build_prompt(template, messages[-1]["content"])


def chat_prompt(template: Template, messages: list[dict], tokenizer=None, tools: list[dict] | None = None) -> str:
    """The prompt for a conversation that ends with the user's (or a tool's) turn, with a chat-like template."""
    messages = [_template_message(m) for m in messages]
    text = chat_template_text(template, tokenizer, messages, tools or [])
    return _render_chat(text, tokenizer, messages, tools or [], True)


def pad_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else its end-of-sequence token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad_batch(features: list[dict], pad_id: int) -> dict:
    """Dynamic padding: pad encoded rows to the longest of this batch, on the right (positions stay 0..n-1 in every
    row, as in training), labels with -100: training's collator and the held-out loss alike."""
    import torch  # here: the rest of this module (the Data tab's views) needs no torch

    width = max(len(f["input_ids"]) for f in features)
    batch = {
        "input_ids": torch.full((len(features), width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(features), width), dtype=torch.long),
        "labels": torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long),
    }
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(f["input_ids"])
        batch["attention_mask"][i, :n] = 1
        batch["labels"][i, :n] = torch.tensor(f["labels"])
    return batch


def encode(tokenizer, prompt: str, answer: str, max_length: int | None = None, chat: bool = False) -> dict:
    """Token ids of prompt + answer with labels masked (-100) on the prompt, so loss is on the answer only.

    Prompt and answer are tokenized separately (the boundary is a newline in our templates, so this
    matches joint tokenization) and the answer gets EOS, so the model learns to stop. Chat-template text
    already holds its special tokens (BOS, end-of-turn), so nothing is added to it. When the pair is too
    long the answer is cut, never the prompt: a row whose prompt fills `max_length` trains nothing.
    """
    return encode_segments(tokenizer, [(prompt, "prompt"), (answer, "answer")], max_length, chat)


def _tokenize_run(tokenizer, run: list[Segment], add_special_tokens: bool) -> tuple[list[int], list[str]]:
    """Token ids of consecutive segments tokenized as one text, and each token's kind (by its offset)."""
    text = "".join(t for t, _ in run)
    if len(run) == 1 or not getattr(tokenizer, "is_fast", False):  # slow tokenizers have no offsets
        ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return ids, [run[-1][1]] * len(ids)
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ends = list(accumulate(len(t) for t, _ in run))
    kinds = [run[min(bisect_right(ends, start), len(run) - 1)][1] for start, _ in enc["offset_mapping"]]
    return enc["input_ids"], kinds


def encode_segments(tokenizer, segments: list[Segment], max_length: int | None = None, chat: bool = False) -> dict:
    """Token ids of the segments, labels -100 except on trained ones, and each token's kind (`kinds`).

    Consecutive segments that are all trained, or all not, are tokenized as one text (so a single prompt and answer
    tokenize as `encode` always did); only the first gets the tokenizer's BOS, and only without `chat`. Without
    `chat` a trained end gets EOS, so the model learns to stop. `max_length` cuts the end; `prompt_length` is the
    number of tokens before the first trained one.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    kinds: list[str] = []
    ids: list[int] = []
    for k, (trained, run) in enumerate(groupby(segments, key=lambda s: s[1] in TRAINED)):
        ids, run_kinds = _tokenize_run(tokenizer, list(run), add_special_tokens=k == 0 and not chat)
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
        kinds += run_kinds
    eos = tokenizer.eos_token_id
    if not chat and eos is not None and segments and segments[-1][1] in TRAINED and (not ids or ids[-1] != eos):
        input_ids, labels, kinds = input_ids + [eos], labels + [eos], kinds + [segments[-1][1]]
    if max_length is not None:
        input_ids, labels, kinds = input_ids[:max_length], labels[:max_length], kinds[:max_length]
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": labels,
        "prompt_length": next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels)),
        "kinds": kinds,
    }


def encode_row(tokenizer, template: Template, row: dict, max_length: int | None = None) -> dict:
    """A row's token ids and labels: trained on its answer, or on every assistant turn of a conversation."""
    own = template.chat or (bool(row.get("messages")) and not template.chat_template)  # text with its own specials
    return encode_segments(tokenizer, render_segments(template, row, tokenizer), max_length, chat=own)
