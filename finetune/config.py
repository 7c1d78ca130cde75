"""Dataclass configs: one object travels from the UI form, a YAML recipe or CLI flags to the core."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class ModelSpec:
    """Which model to load, and how."""

    source: str = field(
        default="gemma-3-270m",
        metadata={"help": "Embedded name (gemma-3-270m, smollm2-135m-instruct), a Hub id, or a local folder."},
    )
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16."})
    quantization: str | None = field(default=None, metadata={"help": "None, '4bit' (NF4, QLoRA) or '8bit'."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run code from the model repo. Off unless asked."}
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})

    @property
    def key(self) -> tuple:
        return (self.source, self.dtype, self.quantization, self.trust_remote_code, self.revision)


@dataclass
class GenerationParams:
    """Decoding settings shared by every column of the Arena and by evaluation."""

    max_new_tokens: int = field(default=128, metadata={"help": "Upper bound on generated tokens."})
    temperature: float = field(default=0.0, metadata={"help": "0 means greedy decoding."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling mass (when temperature > 0)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "> 1 discourages repeating tokens."})
    stop: tuple[str, ...] = field(
        default=("###",), metadata={"help": "Stop when the text reaches one of these (the template's next header)."}
    )
    seed: int | None = field(default=None, metadata={"help": "Sampling seed, for reproducible samples."})

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


@dataclass
class AppSettings:
    """What the app serves; every field can be set by an environment variable (named in its help)."""

    base_model: str = field(default="gemma-3-270m", metadata={"help": "FINETUNE_BASE_MODEL: the base column."})
    reference_model: str = field(
        default="smollm2-135m-instruct", metadata={"help": "FINETUNE_REFERENCE_MODEL: the reference column."}
    )
    max_new_tokens: int = field(default=512, metadata={"help": "FINETUNE_MAX_NEW_TOKENS: upper bound per answer."})
    generation_concurrency: int = field(
        default=2, metadata={"help": "FINETUNE_GEN_CONCURRENCY: arena requests served at once."}
    )

    @classmethod
    def from_env(cls) -> AppSettings:
        return cls(
            base_model=_env("FINETUNE_BASE_MODEL", cls.base_model),
            reference_model=_env("FINETUNE_REFERENCE_MODEL", cls.reference_model),
            max_new_tokens=int(_env("FINETUNE_MAX_NEW_TOKENS", str(cls.max_new_tokens))),
            generation_concurrency=int(_env("FINETUNE_GEN_CONCURRENCY", str(cls.generation_concurrency))),
        )


@dataclass
class DataConfig:
    """Which data set to train/evaluate on, and how its rows become prompts."""

    source: str = field(
        default="lamini_docs",
        metadata={"help": "Bundled name (lamini_docs, alpaca_sample), a .jsonl/.json/.csv/.parquet path, or Hub id."},
    )
    mapping: dict[str, str] | None = field(
        default=None,
        metadata={"help": "Canonical field -> column, e.g. {instruction: question, output: answer}. None: detect."},
    )
    template: str = field(default="qa", metadata={"help": "alpaca, qa, chat, or a custom text with {placeholders}."})
    test_size: float = field(default=0.1, metadata={"help": "Held-out fraction (the course uses 0.1)."})
    seed: int = field(default=123, metadata={"help": "Split seed (the course uses 123)."})
    max_rows: int | None = field(default=None, metadata={"help": "Use only the first N rows (quick experiments)."})
