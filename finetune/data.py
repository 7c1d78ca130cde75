"""Data sets for fine-tuning: load (bundled, upload, Hub), map columns to canonical fields, split, export.

Canonical rows have `instruction`, `input` and `output` (or `messages` for chat lists); the original
columns are kept beside them.

    from finetune.config import DataConfig
    from finetune.data import load_splits
    splits = load_splits(DataConfig("lamini_docs"))  # DatasetDict: train (1,260 rows), test (140 rows)
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, DatasetDict

from finetune import FinetuneError
from finetune.config import DataConfig

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED: dict[str, Path] = {
    "lamini_docs": ASSETS / "lamini_docs.jsonl",
    "alpaca_sample": ASSETS / "alpaca_en_demo.json",
}
PRETRAINING_SAMPLE = ASSETS / "c4_demo.jsonl"

# Column names we recognise for each canonical field, most specific first.
KNOWN_COLUMNS: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction", "question", "prompt", "input"),
    "input": ("input", "context"),
    "output": ("output", "answer", "response", "completion"),
}


def load_dataset_source(source: str) -> Dataset:
    """The raw rows of a bundled name or a local file."""
    path = BUNDLED.get(source) or Path(source)
    if not path.is_file():
        raise FinetuneError(f"No data set {source!r}: use {', '.join(BUNDLED)} or a .jsonl/.json/.csv/.parquet file.")
    kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix.lower())
    if kind is None:
        raise FinetuneError(f"{path.name}: unsupported file type; use .jsonl, .json, .csv or .parquet.")
    return Dataset.from_json(str(path)) if kind == "json" else getattr(Dataset, f"from_{kind}")(str(path))


def detect_mapping(columns: list[str]) -> dict[str, str]:
    """Propose canonical field -> column for a set of columns."""
    mapping: dict[str, str] = {}
    for canonical, names in KNOWN_COLUMNS.items():
        for name in names:
            if name in columns and name not in mapping.values():
                mapping[canonical] = name
                break
    if "instruction" not in mapping or "output" not in mapping:
        raise FinetuneError(
            f"Could not find a prompt/answer column pair among: {', '.join(columns)}. Choose the mapping by hand."
        )
    return mapping


def canonicalize(ds: Dataset, mapping: dict[str, str]) -> Dataset:
    """Add the canonical fields (instruction, input, output) next to the original columns."""

    def convert(row: dict) -> dict:
        return {field: str(row.get(col) or "") if col else "" for field, col in mapping_full.items()}

    mapping_full = {
        "instruction": mapping.get("instruction"),
        "input": mapping.get("input"),
        "output": mapping.get("output"),
    }
    return ds.map(convert)


def load_rows(cfg: DataConfig) -> Dataset:
    ds = load_dataset_source(cfg.source)
    if cfg.max_rows:
        ds = ds.select(range(min(cfg.max_rows, len(ds))))
    ds = canonicalize(ds, cfg.mapping or detect_mapping(ds.column_names))
    if len(ds) == 0:
        raise FinetuneError("The data set has no rows.")
    return ds


def split(ds: Dataset, test_size: float = 0.1, seed: int = 123) -> DatasetDict:
    """Train/test split, reproducible with the seed (the course's 90/10, seed 123)."""
    return ds.train_test_split(test_size=test_size, seed=seed, shuffle=True)


def load_splits(cfg: DataConfig) -> DatasetDict:
    return split(load_rows(cfg), cfg.test_size, cfg.seed)
