"""Data sets for fine-tuning: load (bundled, upload, Hub), map columns to canonical fields, split, export.

A source is a bundled name (`lamini_docs`, `alpaca_sample`), a `.jsonl`/`.json`/`.csv`/`.parquet` file, or a
Hub id (`owner/name`, optionally `owner/name:config`) when online. Columns are detected and mapped to the
canonical fields `instruction`, `input`, `output` (prompt/answer pairs), `messages` (chat lists, OpenAI
role/content or ShareGPT from/value, with tool calls: OpenAI `tool_calls` and `tool` turns, ShareGPT `function_call`
and `observation` turns), `tools` (the JSON schemas a chat may call), `text` (plain text, trained on whole) or
`chosen` and `rejected` (preference pairs: two answers to one prompt, the first preferred; `output` is then the chosen
one); the original columns stay beside them. `arena_votes` is the Arena's blind votes as preference pairs
(`finetune.preferences`). Every user mistake raises `FinetuneError` with one sentence saying what to fix.

    from finetune.config import DataConfig
    from finetune.data import load_splits
    splits = load_splits(DataConfig("lamini_docs"))  # DatasetDict: train (1,260 rows), test (140 rows)

The Data tab's views of a data set (stats, token lengths, which tokens are trained on) are `finetune.views`.

Local files are parsed here (json, csv, pyarrow) into in-memory data sets, so nothing is written to the
`datasets` cache; exports and uploads kept for training go under `finetune.home()`.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
import socket
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
from datasets import Dataset, DatasetDict, Features, List, Value

from finetune import FinetuneError, home
from finetune.config import DataConfig
from finetune.preferences import votes_file
from finetune.runs import exports_dir, replaced_atomically
from finetune.security import safe_name
from finetune.settings import Settings, offline
from finetune.templates import Template, get_template, render, validate

ASSETS = Path(__file__).resolve().parent / "assets"  # package data: found after `pip install .` too
BUNDLED: dict[str, Path] = {
    "lamini_docs": ASSETS / "lamini_docs.jsonl",
    "alpaca_sample": ASSETS / "alpaca_en_demo.json",
}
PRETRAINING_SAMPLE = ASSETS / "c4_demo.jsonl"
VOTES_SOURCE = "arena_votes"  # the Arena's blind votes as preference pairs, exported when read
FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")
CANONICAL = ("instruction", "input", "output", "messages", "tools", "text", "chosen", "rejected")
PREFERENCE = ("chosen", "rejected")
# Levels of objects and lists in one row, the row's own object being the first. Real data sets need under 10
# (a chat with content parts: 4). Turning rows into Arrow recurses ~20 Python frames per level and fails past
# ~45 levels from a bare stack (Arrow itself stops at 64), so the limit leaves room for the caller's frames.
MAX_NESTING = 20


# --- reading files -------------------------------------------------------------------------------


def max_upload_mb() -> float:
    """Largest file accepted, in MB (`Settings.max_upload_mb`: the app's upload limit too)."""
    return Settings.current().max_upload_mb


def read_file(path: str | Path) -> Dataset:
    """The rows of a .jsonl, .json (array of objects), .csv or .parquet file, checked and held in memory."""
    path = Path(path)
    name = path.name
    kind = path.suffix.lower()
    if kind not in FILE_TYPES:
        raise FinetuneError(f"{name}: unsupported file type; use {', '.join(FILE_TYPES)}.")
    size = path.stat().st_size
    if size > max_upload_mb() * 2**20:
        raise FinetuneError(
            f"{name} is {size / 2**20:.1f} MB, over the {max_upload_mb():g} MB upload limit: upload a smaller "
            "file (or raise FINETUNE_MAX_UPLOAD_MB)."
        )
    if size == 0:
        raise FinetuneError(f"{name} is empty: upload a file with a header or one row per line.")
    if kind == ".parquet":
        ds = _read_parquet(path)
    else:
        text = _decode(path.read_bytes(), name)
        if not text.strip():
            raise FinetuneError(f"{name} is empty: upload a file with a header or one row per line.")
        parse = {".jsonl": _parse_jsonl, ".json": _parse_json, ".csv": _parse_csv}[kind]
        ds = _to_dataset(parse(text, name), name)
    if len(ds) == 0:
        raise FinetuneError(f"{name} has no rows: add at least one row of data.")
    return ds


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")  # -sig: Excel and Notepad write a byte-order mark
    except UnicodeDecodeError as e:
        raise FinetuneError(
            f"{name} is not UTF-8 text (invalid byte at position {e.start}): save it as UTF-8 "
            "(e.g. 'CSV UTF-8' in Excel) and upload it again."
        ) from None


def _too_deep(what: str, where: str = "") -> FinetuneError:
    return FinetuneError(
        f"{what} nests too deeply to be a data set (more than {MAX_NESTING} levels{where}): make each row one "
        "object whose values are text, numbers, or lists of messages."
    )


def _depth(value) -> int:
    """Levels of objects and lists in `value` (a scalar: 0), counted without recursion; stops past MAX_NESTING."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_NESTING:
            break
        todo.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _parse_jsonl(text: str, name: str) -> list[dict]:
    rows = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON text may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FinetuneError(f"{name}: invalid JSON on line {number} ({e.msg}): fix or remove that line.") from None
        except RecursionError:  # the decoder recurses once per level: ~1000 `[` exhaust the stack
            raise _too_deep(name, f" on line {number}") from None
        if not isinstance(row, dict):
            raise FinetuneError(f"{name}: line {number} is not a JSON object; write one {{...}} object per line.")
        rows.append(row)
    return rows


def _parse_json(text: str, name: str) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON Lines saved as .json
            return _parse_jsonl(text, name)
        raise FinetuneError(
            f"{name}: invalid JSON on line {e.lineno} ({e.msg}): fix the file and upload it again."
        ) from None
    except RecursionError:  # the decoder recurses once per level: ~1000 `[` exhaust the stack
        raise _too_deep(name) from None
    if not isinstance(data, list):
        raise FinetuneError(f"{name} must hold a JSON array of objects ([{{...}}, {{...}}]) or one object per line.")
    for number, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise FinetuneError(f"{name}: item {number} of the array is not a JSON object; make every item {{...}}.")
    return data


def _parse_csv(text: str, name: str) -> list[dict]:
    # Excel in many locales writes ';'; the header line (rarely quoted) tells the delimiter.
    header_line = text.lstrip().split("\n", 1)[0]
    delimiter = max(",;\t", key=header_line.count)
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long answers exceed the 128 KB default
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
        header = [h.strip() or f"column_{i + 1}" for i, h in enumerate(header)]
        rows = []
        for fields in reader:
            if not fields:  # blank line
                continue
            if len(fields) != len(header):
                raise FinetuneError(
                    f"{name}: line {reader.line_num} has {len(fields)} fields but the header has {len(header)}; "
                    "fix that row (quote fields that contain the delimiter)."
                )
            rows.append(dict(zip(header, fields)))
    except csv.Error as e:
        raise FinetuneError(f"{name}: line {reader.line_num} is not valid CSV ({e}); fix that row.") from None
    return rows


def _read_parquet(path: Path) -> Dataset:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise FinetuneError(f"{path.name} is not a valid Parquet file ({e}); export it again.") from None
    return Dataset(table)


def _kind(value) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "text", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _json_text(value):
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value


def _freeze_tool_json(row: dict) -> None:
    """Tool schemas and call arguments as JSON text: Arrow merges the keys of all objects in a column, so each tool
    would come back with every other tool's parameters as nulls (and parameters of differing types would not load)."""
    if "tools" in row:
        row["tools"] = _json_text(row["tools"])
    for value in row.values():
        for message in value if isinstance(value, list) else ():
            calls = message.get("tool_calls") if isinstance(message, dict) else None
            for call in calls if isinstance(calls, list) else ():
                function = call.get("function", call) if isinstance(call, dict) else None
                if isinstance(function, dict) and "arguments" in function:
                    function["arguments"] = _json_text(function["arguments"])


def _to_dataset(rows: list[dict], name: str) -> Dataset:
    """Rows -> Dataset, after checking each column holds one type (Arrow would fail with a cryptic message)."""
    first_seen: dict[str, tuple[str, int]] = {}
    for number, row in enumerate(rows, 1):
        if _depth(row) > MAX_NESTING:  # deeper rows break the Arrow conversion with a RecursionError
            raise _too_deep(name, f" in row {number}")
        _freeze_tool_json(row)
        for column, value in row.items():
            if value is None:
                continue
            kind = _kind(value)
            seen_kind, seen_row = first_seen.setdefault(column, (kind, number))
            if kind != seen_kind:
                raise FinetuneError(
                    f"{name}: column {column!r} mixes types ({seen_kind} in row {seen_row}, {kind} in row {number}); "
                    "make every value of a column the same type."
                )
    try:
        return Dataset.from_list(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise FinetuneError(
            f"{name}: values nested in a column have inconsistent types ({e}); make them uniform."
        ) from None
    except RecursionError:  # within MAX_NESTING, but called from a deep stack already
        raise _too_deep(name) from None


# --- sources: bundled, local files, the Hub -------------------------------------------------------


def is_hub_id(source: str) -> bool:
    return (
        bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?(:[\w.-]+)?", source)) and Path(source).suffix.lower() not in FILE_TYPES
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers (a quick connect, so offline fails in seconds, not after retries)."""
    if offline():
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _hub_args(source: str) -> tuple[str, str | None]:
    name, _, config = source.partition(":")
    return name, config or None


def _require_hub(source: str) -> None:
    if not hub_reachable():
        raise FinetuneError(
            f"{source!r} is not a bundled data set ({', '.join(BUNDLED)}) or a file, and the Hugging Face Hub is not "
            "reachable to load it: use a bundled data set or upload a file."
        )


@functools.lru_cache(maxsize=4)
def _load_hub(source: str) -> Dataset:
    import datasets

    _require_hub(source)
    name, config = _hub_args(source)
    try:
        # Its own cache under the app's data dir, so the Hub download stays with the app's files.
        return datasets.load_dataset(name, config, split="train", cache_dir=str(home() / "hub-datasets"))
    except Exception as e:  # the Hub raises many kinds; all mean "could not load this id"
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise FinetuneError(f"Could not load {source!r} from the Hub ({reason}); check the id and its config.") from e


@functools.lru_cache(maxsize=4)
def _read_cached(path: str, size: int, mtime_ns: int) -> Dataset:
    return read_file(path)


def _source_key(source: str) -> tuple:
    """What identifies a source's content in caches: a file's path, size and mtime (so an edit is seen)."""
    # The votes' file is rewritten when votes were cast since: a new mtime.
    path = votes_file() if source == VOTES_SOURCE else BUNDLED.get(source) or Path(source)
    if path.is_file():
        stat = path.stat()
        return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    return (source,)


def load_dataset_source(source: str) -> Dataset:
    """The raw rows of a bundled name, a local file or a Hub id (cached: repeated calls are free)."""
    key = _source_key(source)
    if len(key) == 3:
        return _read_cached(*key)
    if is_hub_id(source):
        return _load_hub(source)
    raise FinetuneError(
        f"No data set {source!r}: use {', '.join(BUNDLED)}, a {'/'.join(FILE_TYPES)} file or a Hub id."
    )


def pretraining_sample(n: int = 5, offset: int = 0) -> list[str]:
    """`n` texts of the bundled C4 sample: what a model sees in pretraining (unlabelled web text)."""
    texts = load_dataset_source(str(PRETRAINING_SAMPLE))["text"]
    return [texts[(offset + i) % len(texts)] for i in range(n)]


def finetuning_sample(n: int = 5, offset: int = 0) -> list[dict]:
    """`n` question/answer pairs of lamini_docs: what fine-tuning data looks like."""
    ds = load_dataset_source("lamini_docs")
    return [ds[(offset + i) % len(ds)] for i in range(n)]


def stream_hub_texts(source: str = "allenai/c4:en", n: int = 5) -> list[str]:
    """The first `n` texts of a Hub pretraining set, streamed (nothing downloaded in full); online only."""
    import datasets

    _require_hub(source)
    name, config = _hub_args(source)
    try:
        stream = datasets.load_dataset(
            name, config, split="train", streaming=True, cache_dir=str(home() / "hub-datasets")
        )
        rows = list(stream.take(n))
    except Exception as e:  # see _load_hub
        raise FinetuneError(f"Could not stream {source!r} from the Hub ({type(e).__name__}); check the id.") from e
    texts = [row.get("text") or next((v for v in row.values() if isinstance(v, str)), "") for row in rows]
    if not any(texts):
        raise FinetuneError(f"{source!r} has no text column to show; choose a pretraining set with a `text` column.")
    return texts


# --- columns -> canonical fields ------------------------------------------------------------------


@dataclass(frozen=True)
class Format:
    """A known layout of columns: canonical field -> column name (matched case-insensitively)."""

    name: str
    columns: dict[str, str]
    template: str  # the template that fits it


# Most specific first: the first format whose columns are all present wins.
FORMATS: tuple[Format, ...] = (
    Format(
        "preference pairs (prompt/chosen/rejected)",
        {"instruction": "prompt", "chosen": "chosen", "rejected": "rejected"},
        "qa",
    ),
    Format("chat messages (OpenAI role/content)", {"messages": "messages"}, "chat"),
    Format("chat conversations (ShareGPT from/value)", {"messages": "conversations"}, "chat"),
    Format(
        "Alpaca (instruction/input/output)",
        {"instruction": "instruction", "input": "input", "output": "output"},
        "alpaca",
    ),
    Format("instruction/response", {"instruction": "instruction", "output": "response"}, "alpaca"),
    Format("instruction/output", {"instruction": "instruction", "output": "output"}, "alpaca"),
    Format("question/answer", {"instruction": "question", "output": "answer"}, "qa"),
    Format("prompt/completion", {"instruction": "prompt", "output": "completion"}, "qa"),
    Format("prompt/response", {"instruction": "prompt", "output": "response"}, "qa"),
    Format("input/output", {"instruction": "input", "output": "output"}, "qa"),
    Format("plain text (pretraining style)", {"text": "text"}, "text"),
)
CONTEXT_COLUMNS = ("input", "context")  # an extra input beside an instruction (Dolly's `context`)


@dataclass(frozen=True)
class Detection:
    format: str
    mapping: dict[str, str]
    template: str


def detect_format(columns: list[str]) -> Detection:
    """The first known format the columns fit, its mapping and the template to propose."""
    by_lower = {c.strip().lower(): c for c in columns}
    for fmt in FORMATS:
        if all(name in by_lower for name in fmt.columns.values()):
            mapping = {field: by_lower[name] for field, name in fmt.columns.items()}
            template = fmt.template
            if "instruction" in mapping and "input" not in mapping:
                extra = next(
                    (by_lower[c] for c in CONTEXT_COLUMNS if c in by_lower and by_lower[c] not in mapping.values()),
                    None,
                )
                if extra:  # Q/A ignores an input; Alpaca shows it when a row has one
                    mapping["input"], template = extra, "alpaca"
            name = fmt.name
            if "messages" in mapping and "tools" in by_lower:  # the schemas of the functions a chat may call
                # Tool calls need a chat template that knows tools; the plain `tools` template fits any model.
                mapping["tools"], name, template = by_lower["tools"], f"{name} with tools", "tools"
            return Detection(name, mapping, template)
    raise FinetuneError(
        f"Could not find a prompt/answer column pair among: {', '.join(columns) or '(no columns)'}; rename the "
        "columns (e.g. question/answer) or choose the mapping by hand."
    )


def detect_mapping(columns: list[str]) -> dict[str, str]:
    """Propose canonical field -> column for a set of columns."""
    return detect_format(columns).mapping


def check_mapping(mapping: dict[str, str], columns: list[str]) -> None:
    """Raise a clear error when a mapping names unknown fields or columns, or has nothing to train on."""
    for field, column in mapping.items():
        if field not in CANONICAL:
            raise FinetuneError(f"Unknown field {field!r} in the mapping: use {', '.join(CANONICAL)}.")
        if column not in columns:
            raise FinetuneError(
                f"The mapping points to column {column!r}, which this data set does not have (columns: "
                f"{', '.join(columns)})."
            )
    if len(set(PREFERENCE) & set(mapping)) == 1:
        raise FinetuneError("A preference pair needs both answers: map a column to chosen and one to rejected.")
    if not {"output", "messages", "text", "chosen"} & set(mapping):
        raise FinetuneError(
            "Map a column to output (the answer), a chat column to messages, or a text column to text."
        )


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


def _as_text(value) -> str:
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
            raise _too_deep(f"Row {row_number}'s tools") from None
    if _depth(value) > MAX_NESTING:
        raise _too_deep(f"Row {row_number}'s tools")
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
            raise _too_deep(f"Row {row_number}'s chat") from None
    if _depth(value) > MAX_NESTING:
        raise _too_deep(f"Row {row_number}'s chat")
    if not isinstance(value, list):
        raise FinetuneError(f"Row {row_number}: the chat column must hold a list of messages, not {_kind(value)}.")
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
        out = {"role": normal, "content": _as_text(message.get("content", message.get("value")))}
        if key == "function_call":
            out.update(content="", tool_calls=_tool_calls(out["content"], row_number))
        elif normal == "assistant" and message.get("tool_calls"):
            out["tool_calls"] = _tool_calls(message["tool_calls"], row_number)
        elif normal == "tool" and message.get("tool_call_id"):
            out["tool_call_id"] = str(message["tool_call_id"])
        messages.append(out)
    return messages


def _has_tool_turns(chats: list) -> bool:
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


def _answer_text(message: dict) -> str:
    """An answer's text for search and stats: its content, or its calls as `name(arguments)`."""
    calls = message.get("tool_calls") or []
    return message["content"] or "; ".join(f"{c['function']['name']}({c['function']['arguments']})" for c in calls)


def canonicalize(ds: Dataset, mapping: dict[str, str]) -> Dataset:
    """Add the canonical fields next to the original columns.

    Prompt/answer pairs get instruction, input and output; chat lists get `messages` (normalized) plus
    instruction/output from their last user/assistant turns (for search, stats and evaluation), and `tools` (JSON
    text) when they call tools; plain text gets `text`; preference pairs get chosen and rejected, and the chosen
    answer as output (what SFT would learn).
    """
    tooled = "tools" in mapping or ("messages" in mapping and _has_tool_turns(ds[mapping["messages"]]))

    def convert(row: dict, index: int) -> dict:
        out = {}
        if "messages" in mapping:
            messages = normalize_messages(row.get(mapping["messages"]), index + 1)
            if tooled:
                messages = [{**dict.fromkeys(TOOL_MESSAGE), **m} for m in messages]
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
            question = next((m["content"] for m in reversed(messages[:last]) if m["role"] == "user"), "")
            answer = _answer_text(messages[last]) if last < len(messages) else ""
            out.update(messages=messages, instruction=question, input="", output=answer)
        if tooled:
            out["tools"] = normalize_tools(row.get(mapping["tools"]), index + 1) if "tools" in mapping else ""
        if {"instruction", "input", "output"} & set(mapping):
            out.update(
                {f: _as_text(row.get(mapping[f])) if f in mapping else "" for f in ("instruction", "input", "output")}
            )
        if "text" in mapping:
            out["text"] = _as_text(row.get(mapping["text"]))
        if "chosen" in mapping:
            out.update({f: _as_text(row.get(mapping[f])) for f in PREFERENCE})
            if "output" not in mapping:
                out["output"] = out["chosen"]
        return out

    if not tooled:
        return ds.map(convert, with_indices=True)
    # One schema for every row's messages, whichever rows call tools (Arrow would infer one per batch of rows).
    texts = ("instruction", "input", "output", "tools") + ("text",) * ("text" in mapping)
    features = Features({**ds.features, **{f: Value("string") for f in texts}, "messages": List(TOOL_MESSAGE)})
    return ds.map(convert, with_indices=True, features=features)


def is_preference(ds: Dataset) -> bool:
    """Whether the canonical rows are preference pairs (chosen and rejected answers)."""
    return "rejected" in ds.column_names


def row_answer(row: dict) -> str:
    return str(row.get("output") or row.get("text") or "")


def content_key(row: dict) -> str:
    return json.dumps([row.get(f) for f in CANONICAL], ensure_ascii=False, default=str)


def clean(ds: Dataset) -> Dataset:
    """Drop rows with nothing to train on (empty answer) and exact duplicates of an earlier row."""
    seen: set[str] = set()
    keep = []
    for i, row in enumerate(ds.select_columns([c for c in CANONICAL if c in ds.column_names])):
        key = content_key(row)
        if row_answer(row).strip() and key not in seen:
            keep.append(i)
        seen.add(key)
    return ds.select(keep) if len(keep) < len(ds) else ds


def load_rows(cfg: DataConfig) -> Dataset:
    """The canonical rows of a config: loaded, mapped, checked against the template, optionally cleaned."""
    return _load_rows(_source_key(cfg.source), json.dumps(asdict(cfg), sort_keys=True))


@functools.lru_cache(maxsize=8)
def _load_rows(source_key: tuple, cfg_json: str) -> Dataset:
    # Cached on the file's identity and the whole config: the UI asks for the same rows on every click.
    cfg = DataConfig(**json.loads(cfg_json))
    raw = load_dataset_source(cfg.source)
    if cfg.max_rows:
        raw = raw.select(range(min(cfg.max_rows, len(raw))))
    mapping = cfg.mapping or detect_mapping(raw.column_names)
    check_mapping(mapping, raw.column_names)
    ds = canonicalize(raw, mapping)
    validate(get_template(cfg.template), ds.column_names)
    if cfg.clean:
        ds = clean(ds)
        if len(ds) == 0:
            raise FinetuneError("No rows left after dropping empty and duplicate rows: check the column mapping.")
    if len(ds) == 0:
        raise FinetuneError("The data set has no rows.")
    if not any(
        row_answer(row).strip() for row in ds.select_columns([c for c in ("output", "text") if c in ds.column_names])
    ):
        raise FinetuneError("Every row has an empty answer: map the answer column to output (or text for plain text).")
    return ds


def split(ds: Dataset, test_size: float = 0.1, seed: int = 123) -> DatasetDict:
    """Train/test split, reproducible with the seed (the course's 90/10, seed 123); test_size 0 keeps all rows."""
    if test_size <= 0:
        return DatasetDict(train=ds, test=ds.select([]))
    n_test = math.ceil(test_size * len(ds)) if test_size < 1 else int(test_size)
    if not 0 < n_test < len(ds):
        raise FinetuneError(
            f"{len(ds)} rows are too few for a test split of {test_size:g}: add rows or choose a smaller test size."
        )
    return ds.train_test_split(test_size=test_size, seed=seed, shuffle=True)


def load_splits(cfg: DataConfig) -> DatasetDict:
    return split(load_rows(cfg), cfg.test_size, cfg.seed)


def check_chat_rows(row: dict, tokenizer, template: Template | None = None) -> None:
    """Chat rows need a chat template: the model's, unless the template has its own (`tools`). Say what to pick."""
    if (
        row.get("messages")
        and not (template and template.chat_template)
        and not getattr(tokenizer, "chat_template", None)
    ):
        raise FinetuneError(
            "Chat rows (messages) need a model with a chat template and this one has none: choose an instruct "
            "model, e.g. smollm2-135m-instruct, or the `tools` plain template."
        )




# --- export and hand-off to training --------------------------------------------------------------


def _digest(cfg: DataConfig) -> str:
    return hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:10]


def export_splits(cfg: DataConfig, tokenizer=None, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write each split as JSONL (the rendered training `text` plus the original fields); returns split -> path.

    The default folder is `exports_dir()/<source>-<config hash>/`, so exporting the same config twice overwrites.
    The chat template needs the model's tokenizer.
    """
    splits = load_splits(cfg)
    template = get_template(cfg.template)
    originals = [c for c in load_dataset_source(cfg.source).column_names if c != "text"]
    out = Path(out_dir) if out_dir else exports_dir() / f"{safe_name(Path(cfg.source).stem)}-{_digest(cfg)}"
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, ds in splits.items():
        if len(ds) == 0:
            continue
        path = out / f"{name}.jsonl"
        with replaced_atomically(path) as tmp, open(tmp, "w", encoding="utf-8") as f:  # two exports never collide
            for row in ds:
                record = {"text": "".join(render(template, row, tokenizer)), **{c: row[c] for c in originals}}
                f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        paths[name] = path
    return paths


def kept_dir() -> Path:
    """Where `persist_source` keeps uploads handed to training: `home()/datasets`."""
    return home() / "datasets"


def persist_source(source: str) -> str:
    """A source that outlives the upload: local files outside the app's data dir are copied into `kept_dir()`
    (named by content hash), since gradio deletes its temp files; others are returned as is."""
    path = Path(source)
    if source in BUNDLED or not path.is_file() or path.resolve().is_relative_to(home().resolve()):
        return source
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    dest = kept_dir() / f"{digest.hexdigest()[:12]}-{safe_name(path.stem)}{path.suffix.lower()}"
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(dest) as tmp:
            shutil.copyfile(path, tmp)
    return str(dest)


def persist_and_split(cfg: DataConfig, tokenizer=None) -> tuple[DataConfig, DatasetDict]:
    """The config the Train tab gets: a lasting source, the mapping made explicit; checked by splitting and,
    with a tokenizer, by rendering the first row (the chat template needs one)."""
    mapping = cfg.mapping or detect_mapping(load_dataset_source(cfg.source).column_names)
    ready = replace(cfg, source=persist_source(cfg.source), mapping=mapping)
    splits = load_splits(ready)
    if tokenizer is not None:
        template = get_template(ready.template)
        check_chat_rows(splits["train"][0], tokenizer, template)
        render(template, splits["train"][0], tokenizer)
    return ready, splits
