"""Chats and tool calls as one shape: OpenAI role/content messages, from OpenAI or ShareGPT rows.

ShareGPT's from/value turns, `function_call` and `observation` turns, OpenAI's `tool_calls` and `tool` replies
(arguments as an object or as JSON text) all become `{"role", "content", "tool_calls", "tool_call_id"}` messages;
a bad row raises `FinetuneError` naming it.
"""

from __future__ import annotations

import json
import re

from datasets import List, Value

from finetune import FinetuneError
from finetune.readers import MAX_NESTING, depth, kind_of, too_deep

ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "function_call": "assistant",  # ShareGPT: an assistant turn that calls a tool; its value is the call's JSON
    "system": "system",
    "tool": "tool",
    "observation": "tool",  # ShareGPT: what the called tool returned
    "function": "tool",  # OpenAI's older name
}
TOOL_ROLES = {name for name, role in ROLES.items() if role == "tool"} | {"function_call"}
# A chat message once a data set has tool calls: every message has every field (Arrow needs one schema per column);
# call arguments stay JSON text (see `_freeze_tool_json`).
TOOL_MESSAGE = {
    "role": Value("string"),
    "content": Value("string"),
    "tool_calls": List(
        {
            "type": Value("string"),
            "function": {"name": Value("string"), "arguments": Value("string")},
            "id": Value("string"),
        }
    ),
    "tool_call_id": Value("string"),
}


def as_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):  # OpenAI content parts: [{"type": "text", "text": ...}, ...]
        return "".join(p.get("text") or "" if isinstance(p, dict) else str(p) for p in value)
    return str(value)


def _bad_call(row_number: int) -> FinetuneError:
    return FinetuneError(
        f'Row {row_number}: a tool call must be JSON like {{"name": "get_weather", "arguments": {{"city": "Paris"}}}}.'
    )


def _tool_calls(value, row_number: int) -> list[dict]:
    """Calls as OpenAI's `[{"type": "function", "function": {"name", "arguments"}}]` (arguments as JSON text), from
    OpenAI `tool_calls` or a ShareGPT `function_call` turn's JSON (one call or a list)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _bad_call(row_number) from None
    calls = []
    for call in [value] if isinstance(value, dict) else value if isinstance(value, list) else [None]:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not function.get("name"):
            raise _bad_call(row_number)
        arguments = function.get("arguments", {})
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        calls.append({"type": "function", "function": {"name": str(function["name"]), "arguments": text}})
        if call.get("id"):
            calls[-1]["id"] = str(call["id"])
    if not calls:
        raise _bad_call(row_number)
    return calls


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return [_without_nulls(v) for v in value] if isinstance(value, list) else value


def normalize_tools(value, row_number: int = 1) -> str:
    """A row's tools as JSON text of OpenAI-style schemas `[{"type": "function", "function": {...}}]` ("" for none),
    from a list, or JSON text, of those or of bare function schemas (LLaMA-Factory's `tools`)."""
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
        except RecursionError:
            raise too_deep(f"Row {row_number}'s tools") from None
    if depth(value) > MAX_NESTING:
        raise too_deep(f"Row {row_number}'s tools")
    value = [value] if isinstance(value, dict) else value
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise FinetuneError(f"Row {row_number}: the tools column must hold a JSON list of function schemas.")
    # Parquet and Hub sets merge the keys of all schemas (see `_freeze_tool_json`): the nulls are not theirs.
    tools = [_without_nulls(t if "function" in t else {"type": "function", "function": t}) for t in value]
    return json.dumps(tools, ensure_ascii=False) if tools else ""


def normalize_messages(value, row_number: int = 1) -> list[dict]:
    """A chat list as `[{"role", "content"}]`, from OpenAI (role/content) or ShareGPT (from/value) style; assistant
    turns that call tools get `tool_calls`, and tools' replies are `tool` turns (with `tool_call_id` when given)."""
    if value is None:  # a row without a chat: nothing to train on, counted as an empty row
        return []
    if isinstance(value, str):  # CSV and some Parquet files store the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        except RecursionError:
            raise too_deep(f"Row {row_number}'s chat") from None
    if depth(value) > MAX_NESTING:
        raise too_deep(f"Row {row_number}'s chat")
    if not isinstance(value, list):
        raise FinetuneError(f"Row {row_number}: the chat column must hold a list of messages, not {kind_of(value)}.")
    messages = []
    for message in value:
        if not isinstance(message, dict):
            raise FinetuneError(f"Row {row_number}: each message must be an object with a role and a content.")
        role = message.get("role", message.get("from"))
        key = str(role).strip().lower()
        normal = ROLES.get(key)
        if normal is None:
            raise FinetuneError(
                f"Row {row_number}: unknown chat role {role!r}; use user, assistant, system or tool (ShareGPT: human, "
                "gpt, function_call, observation)."
            )
        out = {"role": normal, "content": as_text(message.get("content", message.get("value")))}
        if key == "function_call":
            out.update(content="", tool_calls=_tool_calls(out["content"], row_number))
        elif normal == "assistant" and message.get("tool_calls"):
            out["tool_calls"] = _tool_calls(message["tool_calls"], row_number)
        elif normal == "tool" and message.get("tool_call_id"):
            out["tool_call_id"] = str(message["tool_call_id"])
        messages.append(out)
    return messages


def has_tool_turns(chats: list) -> bool:
    """Whether a chat column holds tool calls or replies (its messages then all get the fields of TOOL_MESSAGE)."""
    for chat in chats:
        if isinstance(chat, str) and re.search(r'"(tool_calls|function_call|observation|tool|function)"', chat):
            return True
        for m in chat if isinstance(chat, list) else ():
            if isinstance(m, dict) and (
                m.get("tool_calls") or str(m.get("role", m.get("from"))).lower() in TOOL_ROLES
            ):
                return True
    return False


def answer_text(message: dict) -> str:
    """An answer's text for search and stats: its content, or its calls as `name(arguments)`."""
    calls = message.get("tool_calls") or []
    return message["content"] or "; ".join(f"{c['function']['name']}({c['function']['arguments']})" for c in calls)
