"""The app's settings: one dataclass, each field naming its environment variable, default and help.

    from finetune.settings import Settings, offline
    Settings.current().max_upload_mb        # FINETUNE_MAX_UPLOAD_MB, or 100
    Settings.from_env({"FINETUNE_MAX_TRAIN_STEPS": "50"})   # any mapping: tests, a subprocess's env
    offline()                               # HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE

Variables that belong to other tools stay theirs: torch/accelerate's (RANK, WORLD_SIZE, LOCAL_RANK,
CUDA_VISIBLE_DEVICES, the oneDNN/ATen ISA caps), a Space's (SPACE_ID) and secrets (HF_TOKEN, API keys).
README's Configuration table lists exactly these fields (tests/test_settings.py checks it).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from finetune.config import _coerce  # numbers and booleans as a YAML recipe's: the same words, the same errors


@dataclass(frozen=True)
class Settings:
    """What the app serves and the limits that protect a shared box; every field is set by its `env` variable."""

    home: Path = field(
        default_factory=lambda: Path.home() / ".cache" / "finetune-workbench",
        metadata={"env": "FINETUNE_HOME", "help": "Data dir: model cache, runs, votes (/data on a Space)."},
    )
    model_cache: Path | None = field(
        default=None,
        metadata={"env": "FINETUNE_MODEL_CACHE", "help": "Where converted models are cached (None: home/models)."},
    )
    base_model: str = field(
        default="gemma-3-270m",
        metadata={"env": "FINETUNE_BASE_MODEL", "help": "Base model: embedded name, Hub id or local folder."},
    )
    reference_model: str = field(
        default="smollm2-135m-instruct",
        metadata={"env": "FINETUNE_REFERENCE_MODEL", "help": "Reference model of the Arena."},
    )
    max_new_tokens: int = field(
        default=512, metadata={"env": "FINETUNE_MAX_NEW_TOKENS", "help": "Upper bound on generated tokens per answer."}
    )
    arena_engine: Literal["auto", "llama.cpp", "transformers"] = field(
        default="auto",
        metadata={"env": "FINETUNE_ARENA_ENGINE", "help": "What answers the Arena's local columns: llama.cpp (the "
                  "GGUF files as shipped; auto: where it is installed and the app runs on a CPU) or transformers."},
    )  # fmt: skip
    generation_concurrency: int = field(
        default=0,
        metadata={"env": "FINETUNE_GEN_CONCURRENCY", "help": "Arena requests served at once (0: 24 on llama.cpp, "
                  "which decodes them together; 2 on transformers)."},
    )  # fmt: skip
    serve_url: str = field(
        default="",
        metadata={"env": "FINETUNE_SERVE_URL", "help": "Serving engine (vLLM with LoRA) for the Arena's base and "
                  "tuned columns, e.g. http://127.0.0.1:8000 (empty: this process)."},
    )  # fmt: skip
    serve_model: str = field(
        default="",
        metadata={"env": "FINETUNE_SERVE_MODEL", "help": "The base model's name on the serving engine "
                  "(empty: the base model's name here)."},
    )  # fmt: skip
    serve_max_lora_rank: int = field(
        default=64,
        metadata={"env": "FINETUNE_SERVE_MAX_LORA_RANK", "help": "Largest LoRA rank the serving engine accepts "
                  "(vLLM's --max-lora-rank); a larger adapter is refused before it is sent."},
    )  # fmt: skip
    app_device: str = field(
        default="auto",
        metadata={"env": "FINETUNE_APP_DEVICE", "help": "Device of the app's own models (auto: first GPU, MPS, CPU)."},
    )
    model_budget_gb: float = field(
        default=0.0,
        metadata={"env": "FINETUNE_MODEL_BUDGET_GB", "help": "Memory for loaded models, least recently used evicted "
                  "(0: half the app's GPU, no limit on a CPU)."},
    )  # fmt: skip
    auth: str = field(
        default="",
        metadata={"env": "FINETUNE_AUTH", "help": "Login: user:pass,user2:pass2 or a file of user:pass lines "
                  "(empty: no login); runs then belong to their user."},
    )  # fmt: skip
    admins: tuple[str, ...] = field(
        default=("admin",), metadata={"env": "FINETUNE_ADMINS", "help": "Users who may stop anyone's run."}
    )
    max_upload_mb: float = field(
        default=100.0, metadata={"env": "FINETUNE_MAX_UPLOAD_MB", "help": "Largest uploaded file (data, adapters)."}
    )
    max_train_steps: int = field(
        default=2000, metadata={"env": "FINETUNE_MAX_TRAIN_STEPS", "help": "Most optimizer steps one run may ask for."}
    )
    max_queued_runs: int = field(
        default=2,
        metadata={"env": "FINETUNE_MAX_QUEUED_RUNS", "help": "Runs one user may have queued or training at once."},
    )
    server_name: str = field(
        default="127.0.0.1", metadata={"env": "GRADIO_SERVER_NAME", "help": "Address the app listens on (--host)."}
    )
    server_port: int = field(
        default=7860, metadata={"env": "GRADIO_SERVER_PORT", "help": "Port the app listens on (--port)."}
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str | None] = os.environ) -> Settings:
        """Settings from `environ`: an unset or empty variable keeps the default; a bad value raises FinetuneError."""
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            text = (environ.get(f.metadata["env"]) or "").strip()
            if text:
                values[f.name] = _convert(text, hints[f.name], f.metadata["env"])
        return cls(**values)

    @classmethod
    def current(cls) -> Settings:
        """This process's settings, read from the environment once."""
        # Keyed on the variables' values rather than cached once for all: the same single parse in the app, and a
        # test's monkeypatch.setenv is seen without anyone clearing a cache.
        return _parsed(tuple(os.environ.get(name) for name in ENV_NAMES))


ENV_NAMES = tuple(f.metadata["env"] for f in dataclasses.fields(Settings))


@functools.lru_cache(maxsize=8)
def _parsed(values: tuple[str | None, ...]) -> Settings:
    return Settings.from_env(dict(zip(ENV_NAMES, values)))


def _convert(text: str, hint, name: str):
    """`text` as the field's type: a comma list for a tuple, a path (with ~) for a Path, numbers as a recipe's."""
    if hint == tuple[str, ...]:
        return tuple(item.strip() for item in text.split(",") if item.strip())
    if Path in (hint, *typing.get_args(hint)):
        return Path(text).expanduser()
    return _coerce(text, hint, name)


OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def offline() -> bool:
    """Whether Hugging Face downloads are off: any of OFFLINE_VARS is 1/true/yes/on (as huggingface_hub reads it)."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_VARS)
