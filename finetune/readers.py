"""Reading a data file (.jsonl, .json, .csv, .parquet) into an in-memory `Dataset`, checked row by row.

Each mistake a user can make in a file (wrong encoding, a broken line, a column of mixed types, nesting too deep for
Arrow) raises `FinetuneError` with one sentence saying what to fix, naming the row where there is one.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
from datasets import Dataset

from finetune import FinetuneError
from finetune.settings import Settings

FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")
# Levels of objects and lists in one row, the row's own object being the first. Real data sets need under 10
# (a chat with content parts: 4). Turning rows into Arrow recurses ~20 Python frames per level and fails past
# ~45 levels from a bare stack (Arrow itself stops at 64), so the limit leaves room for the caller's frames.
MAX_NESTING = 20


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


def too_deep(what: str, where: str = "") -> FinetuneError:
    return FinetuneError(
        f"{what} nests too deeply to be a data set (more than {MAX_NESTING} levels{where}): make each row one "
        "object whose values are text, numbers, or lists of messages."
    )


def depth(value) -> int:
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
            raise too_deep(name, f" on line {number}") from None
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
        raise too_deep(name) from None
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


def kind_of(value) -> str:
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
        if depth(row) > MAX_NESTING:  # deeper rows break the Arrow conversion with a RecursionError
            raise too_deep(name, f" in row {number}")
        _freeze_tool_json(row)
        for column, value in row.items():
            if value is None:
                continue
            kind = kind_of(value)
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
        raise too_deep(name) from None
