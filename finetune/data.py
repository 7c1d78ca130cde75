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

Files are read by `finetune.readers` (json, csv, pyarrow, into in-memory data sets, so nothing is written to the
`datasets` cache) and chats and tool calls normalized by `finetune.chats`; the Data tab's views of a data set (stats,
token lengths, which tokens are trained on) are `finetune.views`. Exports and uploads kept for training go under
`finetune.home()`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
import socket
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

from datasets import Dataset, DatasetDict, Features, List, Value

from finetune import ASSETS, FinetuneError, home
from finetune.chats import TOOL_MESSAGE, answer_text, as_text, has_tool_turns, normalize_messages, normalize_tools
from finetune.config import DataConfig
from finetune.preferences import votes_file
from finetune.readers import FILE_TYPES, read_file
from finetune.runs import exports_dir, replaced_atomically
from finetune.security import safe_name
from finetune.settings import offline
from finetune.templates import Template, get_template, render, validate

BUNDLED: dict[str, Path] = {
    "lamini_docs": ASSETS / "lamini_docs.jsonl",
    "alpaca_sample": ASSETS / "alpaca_en_demo.json",
}
PRETRAINING_SAMPLE = ASSETS / "c4_demo.jsonl"
VOTES_SOURCE = "arena_votes"  # the Arena's blind votes as preference pairs, exported when read
CANONICAL = ("instruction", "input", "output", "messages", "tools", "text", "chosen", "rejected")
PREFERENCE = ("chosen", "rejected")


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


def canonicalize(ds: Dataset, mapping: dict[str, str]) -> Dataset:
    """Add the canonical fields next to the original columns.

    Prompt/answer pairs get instruction, input and output; chat lists get `messages` (normalized) plus
    instruction/output from their last user/assistant turns (for search, stats and evaluation), and `tools` (JSON
    text) when they call tools; plain text gets `text`; preference pairs get chosen and rejected, and the chosen
    answer as output (what SFT would learn).
    """
    tooled = "tools" in mapping or ("messages" in mapping and has_tool_turns(ds[mapping["messages"]]))

    def convert(row: dict, index: int) -> dict:
        out = {}
        if "messages" in mapping:
            messages = normalize_messages(row.get(mapping["messages"]), index + 1)
            if tooled:
                messages = [{**dict.fromkeys(TOOL_MESSAGE), **m} for m in messages]
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
            question = next((m["content"] for m in reversed(messages[:last]) if m["role"] == "user"), "")
            answer = answer_text(messages[last]) if last < len(messages) else ""
            out.update(messages=messages, instruction=question, input="", output=answer)
        if tooled:
            out["tools"] = normalize_tools(row.get(mapping["tools"]), index + 1) if "tools" in mapping else ""
        if {"instruction", "input", "output"} & set(mapping):
            out.update(
                {f: as_text(row.get(mapping[f])) if f in mapping else "" for f in ("instruction", "input", "output")}
            )
        if "text" in mapping:
            out["text"] = as_text(row.get(mapping["text"]))
        if "chosen" in mapping:
            out.update({f: as_text(row.get(mapping[f])) for f in PREFERENCE})
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
