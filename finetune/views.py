"""The Data tab's views of a data set: row and length statistics, a histogram, the token view (which tokens are
trained on) and table pages, all plain data (`finetune.ui.data_tab` draws them).

    from finetune.views import row_stats, token_lengths, token_view
    row_stats(load_rows(cfg)); token_view(tokenizer, get_template("qa"), row, max_length=256).kinds
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset

from finetune import FinetuneError
from finetune.data import CANONICAL, check_chat_rows, content_key, row_answer
from finetune.templates import IGNORE_INDEX, Template, encode_row


def _percentiles(values) -> dict[str, float]:
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return {}
    p50, p90, p95, p99 = np.percentile(values, [50, 90, 95, 99])
    return {
        "min": float(values.min()),
        "p50": float(p50),
        "p90": float(p90),
        "p95": float(p95),
        "p99": float(p99),
        "max": float(values.max()),
        "mean": round(float(values.mean()), 1),
    }


def row_stats(ds: Dataset) -> dict:
    """Rows, rows with an empty answer, exact duplicate rows, and percentiles of length in characters."""
    keys, empty, chars = set(), 0, []
    for row in ds.select_columns([c for c in CANONICAL if c in ds.column_names]):
        keys.add(content_key(row))
        empty += not row_answer(row).strip()
        if row.get("messages"):
            chars.append(sum(len(m["content"]) for m in row["messages"]))
        else:
            chars.append(sum(len(str(row.get(f) or "")) for f in ("instruction", "input", "output", "text")))
    return {
        "rows": len(ds),
        "empty_rows": empty,
        "duplicate_rows": len(ds) - len(keys),
        "length_chars": _percentiles(chars),
    }


def token_lengths(ds: Dataset, tokenizer, template: Template, limit: int | None = 5000) -> np.ndarray:
    """Tokens per row (prompt + answer + EOS, before truncation) of the first `limit` rows."""
    check_chat_rows(ds[0], tokenizer, template)
    rows = ds.select(range(min(limit, len(ds)))) if limit else ds
    return np.array([len(encode_row(tokenizer, template, row)["input_ids"]) for row in rows], dtype=np.int64)


def length_summary(lengths: np.ndarray, max_length: int) -> dict:
    """Percentiles of token lengths and how many rows `max_length` would truncate."""
    return {
        "rows_measured": int(lengths.size),
        "max_length": int(max_length),
        "truncated_rows": int((lengths > max_length).sum()),
        "length_tokens": _percentiles(lengths),
    }


def length_histogram(lengths: np.ndarray, max_length: int, bins: int = 30) -> list[dict]:
    """Histogram rows `{tokens (bin's upper edge), rows, fits}`; `max_length` is a bin edge, so each bar either
    fits or is truncated."""
    if lengths.size == 0:
        return []
    top = max(int(lengths.max()), max_length)
    below = max(1, round(bins * max_length / top))  # bars up to max_length, of equal width
    width = max_length / below
    index = np.maximum(np.ceil(lengths / width).astype(int) - 1, 0)  # bin i holds lengths in (i*w, (i+1)*w]
    counts = np.bincount(index, minlength=math.ceil(top / width))
    return [
        {"tokens": round((i + 1) * width), "rows": int(c), "fits": "fits" if i < below else "truncated"}
        for i, c in enumerate(counts)
    ]


PROMPT_TOKEN = "prompt (not trained on)"
ANSWER_TOKEN = "answer (trained on)"
CUT_TOKEN = "cut (past max length)"
# A conversation's tokens, by turn (see `finetune.templates.render_segments`): only the assistant's are trained on.
SYSTEM_TOKEN = "system (not trained on)"
USER_TOKEN = "user (not trained on)"
TOOL_TOKEN = "tool (not trained on)"
ASSISTANT_TOKEN = "assistant (trained on)"
TOKEN_KINDS = {
    "prompt": PROMPT_TOKEN,
    "answer": ANSWER_TOKEN,
    "system": SYSTEM_TOKEN,
    "user": USER_TOKEN,
    "tool": TOOL_TOKEN,
    "assistant": ASSISTANT_TOKEN,
}


@dataclass
class TokenView:
    pieces: list[tuple[str, str]]  # (token text, one of TOKEN_KINDS' labels or CUT_TOKEN)
    input_ids: list[int]  # after truncation: what the model is trained on
    labels: list[int]  # -100 where no loss is computed
    prompt_tokens: int  # kept tokens not trained on
    answer_tokens: int  # kept tokens trained on
    cut_tokens: int


def token_view(tokenizer, template: Template, row: dict, max_length: int | None = None) -> TokenView:
    """A row's tokens, each marked by what it is (prompt or answer; a conversation's system, user, assistant or tool
    turn), and whether it is trained on or cut by truncation."""
    check_chat_rows(row, tokenizer, template)
    full = encode_row(tokenizer, template, row)
    n_kept = len(full["input_ids"]) if max_length is None else min(max_length, len(full["input_ids"]))
    pieces = [
        (tokenizer.decode([t]), CUT_TOKEN if i >= n_kept else TOKEN_KINDS[kind])
        for i, (t, kind) in enumerate(zip(full["input_ids"], full["kinds"]))
    ]
    labels = full["labels"][:n_kept]
    trained = sum(label != IGNORE_INDEX for label in labels)
    return TokenView(
        pieces=pieces,
        input_ids=full["input_ids"][:n_kept],
        labels=labels,
        prompt_tokens=n_kept - trained,
        answer_tokens=trained,
        cut_tokens=len(full["input_ids"]) - n_kept,
    )


@dataclass
class Page:
    rows: list[dict]  # each with "row": its index in the data set
    matches: int  # rows matching the search
    page: int  # 1-based, clamped to 1..pages
    pages: int


def page_rows(ds: Dataset, page: int = 1, page_size: int = 20, query: str = "") -> Page:
    """One page of rows, optionally only those with `query` in a text column (case-insensitive)."""
    if query.strip():
        table = ds.with_format("arrow")[:]  # honours select()/max_rows, unlike ds.data
        mask = pa.array(np.zeros(len(ds), dtype=bool))
        for name in table.column_names:
            column = table[name]
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                hit = pc.fill_null(pc.match_substring(column, query.strip(), ignore_case=True), False)
                mask = pc.or_(mask, hit)
        indices = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
        if indices.size == 0:
            raise FinetuneError(f"No rows match {query.strip()!r}: search for another word or clear the search.")
    else:
        indices = np.arange(len(ds))
    pages = max(1, math.ceil(indices.size / page_size))
    page = min(max(1, int(page)), pages)
    chosen = indices[(page - 1) * page_size : page * page_size]
    rows = [{"row": int(i), **ds[int(i)]} for i in chosen]
    return Page(rows=rows, matches=int(indices.size), page=page, pages=pages)


