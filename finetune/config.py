"""Dataclass configs: one object travels from the UI form, a YAML recipe or CLI flags to the core."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

RECIPES = Path(__file__).resolve().parent / "recipes"  # bundled YAML recipes (package data)
# The allowed values of the settings that take a word: written here once, in their types; loading a config checks
# them (`_coerce`), and so do `check_choices` and the forms, which offer them.
Method = typing.Literal["sft", "dpo"]
MixedPrecision = typing.Literal["auto", "bf16", "fp16", "no"]
TrainVocab = typing.Literal["auto", "full", "data"]
ReportTo = typing.Literal["none", "tensorboard", "trackio"]  # trackers a run can also log to
REPORT_TO = typing.get_args(ReportTo)


@dataclass
class ModelSpec:
    """Which model to load, and how."""

    source: str = field(
        default="gemma-3-270m",
        metadata={"help": "Embedded name (gemma-3-270m, smollm2-135m-instruct), a Hub id, or a local folder."},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "auto (bfloat16 where this machine computes it natively, else float32), float32, bfloat16 "
                  "or float16."},
    )  # fmt: skip
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
    template: str = field(
        default="qa", metadata={"help": "alpaca, qa, chat, tools, text, or a custom text with {columns}."}
    )
    test_size: float = field(default=0.1, metadata={"help": "Held-out fraction (the course uses 0.1)."})
    seed: int = field(default=123, metadata={"help": "Split seed (the course uses 123)."})
    max_rows: int | None = field(default=None, metadata={"help": "Use only the first N rows (quick experiments)."})
    clean: bool = field(
        default=False, metadata={"help": "Drop rows with an empty answer and exact duplicates before splitting."}
    )


@dataclass
class TrainConfig:
    """One training run: base model, data, LoRA and optimizer settings (defaults: a quick CPU run, visible result).

    Saved as `config.yaml` in the run folder; the recipes in `finetune/recipes/` are the same YAML. Load with
    `load_train_config`.
    """

    model: ModelSpec = field(default_factory=ModelSpec, metadata={"help": "Base model; quantization 4bit = QLoRA."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Data set, column mapping, template."})
    method: Method = field(
        default="sft",
        metadata={"help": "sft: learn the answers (prompt/answer rows); dpo: learn which answer is preferred "
                  "(prompt/chosen/rejected rows, e.g. arena_votes: the Arena's blind votes), starting from "
                  "base_adapter."},
    )  # fmt: skip
    base_adapter: str | None = field(
        default=None,
        metadata={"help": "dpo: the SFT run whose adapter DPO starts from and compares with (run id or folder), or "
                  "latest: the newest SFT run on this base model. Its LoRA shape is kept (lora_* are ignored)."},
    )  # fmt: skip
    beta: float = field(
        default=0.1,
        metadata={"help": "dpo: how far the adapter may move from base_adapter (higher: less); DPO's beta."},
    )
    max_length: int = field(default=256, metadata={"help": "Tokens per row (prompt + answer); answers are cut."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling (alpha / r multiplies the update)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_layers: int = field(
        default=0,
        metadata={"help": "Adapt only the last N transformer layers (0: all): the backward pass then stops at the "
                  "first of them, so a step costs less."},
    )  # fmt: skip
    target_modules: str | list[str] = field(
        default="all-linear", metadata={"help": "'all-linear' (QLoRA paper) or module names, e.g. [q_proj, v_proj]."}
    )
    learning_rate: float = field(default=5e-4, metadata={"help": "Peak learning rate (LoRA takes 1e-4 to 1e-3)."})
    lr_scheduler: str = field(default="cosine", metadata={"help": "linear, cosine, constant, ..."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up steps; a value below 1 is a fraction."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    num_epochs: float = field(
        default=1.0, metadata={"help": "Passes over the training rows (when max_steps <= 0); caps max_steps auto."}
    )
    max_steps: int | str = field(
        default=120,
        metadata={"help": "Optimizer steps (overrides num_epochs when > 0), or auto: as many as fit in max_minutes on "
                  "this machine, timed at the start."},
    )  # fmt: skip
    max_minutes: float = field(
        default=0.0, metadata={"help": "Stop cleanly (adapter saved) after this many minutes of training (0: none)."}
    )
    batch_size: int | str = field(
        default=8, metadata={"help": "Rows per device per forward pass, or auto (8 on a CPU, more on a big GPU)."}
    )
    grad_accum: int = field(default=1, metadata={"help": "Forward passes per optimizer step."})
    eval_steps: int = field(default=0, metadata={"help": "Held-out loss every N steps (0: only at the end)."})
    eval_rows: int | None = field(default=64, metadata={"help": "Held-out rows for the loss in training (None: all)."})
    save_steps: int = field(default=40, metadata={"help": "Checkpoint every N steps: resume, evaluate or export any."})
    save_total_limit: int = field(
        default=2, metadata={"help": "Newest checkpoints kept on disk (0: all); older ones go as new ones come."}
    )
    keep_best: bool = field(
        default=True,
        metadata={"help": "Also keep the checkpoint with the lowest held-out loss, however old (the held-out loss is "
                  "then measured at every checkpoint)."},
    )  # fmt: skip
    logging_steps: int = field(default=5, metadata={"help": "Loss/metrics line every N steps."})
    seed: int = field(default=42, metadata={"help": "Seed for LoRA init and data order."})
    mixed_precision: MixedPrecision = field(
        default="auto",
        metadata={"help": "auto (bf16 where the GPU/CPU computes it natively, fp16 on older GPUs), bf16, fp16 or no."},
    )
    answer_only_logits: bool = field(
        default=True,
        metadata={"help": "Compute the vocabulary projection only where the loss needs it (same loss, much faster)."},
    )
    train_vocab: TrainVocab = field(
        default="auto",
        metadata={
            "help": "full; data: the training softmax covers only the data's tokens (faster for a big vocabulary; "
            "held-out loss stays full); auto: data on a CPU for a vocabulary of 64k tokens or more, else full."
        },
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for memory (big models)."})
    eval_at_end: bool = field(default=False, metadata={"help": "Run the evaluation (finetune.evaluate) at the end."})
    report_to: ReportTo = field(
        default="none",
        metadata={"help": "Also log the run's metrics to tensorboard (events in the run folder's tensorboard/) or "
                  "trackio, where installed; the app's own charts read the run folder either way."},
    )  # fmt: skip
    push_to_hub: str | None = field(
        default=None, metadata={"help": "Hub repo id to push the adapter to at the end (needs HF_TOKEN)."}
    )
    name: str | None = field(default=None, metadata={"help": "Display name of the run (default: model + data)."})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        return _from_dict(cls, values, "")


def decided_settings(cfg: TrainConfig) -> dict:
    """The settings `auto` leaves to the machine (`hardware.resolve_auto`) as `cfg` has them: a run keeps what it
    decided in its status (`RunDir.read_decided_config` puts them back)."""
    return {"dtype": cfg.model.dtype, "mixed_precision": cfg.mixed_precision, "batch_size": cfg.batch_size}


def with_decided(cfg: TrainConfig, decided: dict) -> TrainConfig:
    """`cfg` with each setting still `auto` set to its value in `decided` (decided_settings' keys, and max_steps)."""
    for key, value in decided.items():
        owner = cfg.model if key == "dtype" else cfg
        if value is not None and getattr(owner, key) == "auto":
            setattr(owner, key, value)
    return cfg


def _from_dict(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise _config_error(f"{prefix.rstrip('.') or 'The config'} must be a mapping of keys to values.")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise _config_error(f"Unknown setting {prefix}{unknown[0]}; known: {', '.join(sorted(known))}.")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def choices_of(hint) -> tuple[str, ...] | None:
    """The allowed words of a `Literal` setting, else None."""
    return typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None


def check_choice(value, hint, key: str):
    """`value` if it is one of the allowed words of `hint` (a `Literal`), else a FinetuneError naming them."""
    allowed = choices_of(hint)
    if allowed is not None and value not in allowed:
        raise _config_error(f"{key} must be one of {', '.join(allowed)} (got {value!r}).")
    return value


def check_choices(cfg) -> None:
    """Every word-valued setting of a config (and of the configs in it) is one of its allowed words: a config built
    in Python skips `_coerce`."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_choices(value)
        else:
            check_choice(value, hints[f.name], f.name)


# YAML 1.1 reads these words as booleans: `mixed_precision: no` would be False.
_YAML_BOOL_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def _coerce(value, hint, key: str):
    """YAML reads `3e-4` as text and `1` as int: convert scalars to the field's type."""
    allowed = choices_of(hint)
    if allowed is not None:
        if isinstance(value, bool):
            value = next((w for w in _YAML_BOOL_WORDS[value] if w in allowed), value)
        return check_choice(value.strip() if isinstance(value, str) else value, hint, key)
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None or (optional and value in ("", "null", "None", "none")):
        if optional:
            return None
        raise _config_error(f"{key} needs a value.")
    scalars = [t for t in (args or (hint,)) if t in (bool, int, float)]
    if not scalars or isinstance(value, scalars[0]) and not (scalars[0] is int and isinstance(value, bool)):
        return value
    kind = scalars[0]
    if str in args and isinstance(value, str) and not _numeric(value):
        return value.strip()  # a word where a number may also stand (max_steps: auto)
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
                return value.lower() in ("true", "yes", "1", "on")
            raise ValueError
        number = float(value)
        if kind is int:
            if number != int(number):
                raise ValueError
            return int(number)
        return number
    except (TypeError, ValueError):
        raise _config_error(f"{key} must be {_KIND_WORDS[kind]}, not {value!r}.") from None


_KIND_WORDS = {bool: "true or false", int: "a whole number", float: "a number"}


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _config_error(message: str) -> Exception:
    from finetune import FinetuneError  # finetune/__init__ is tiny; imported late only to keep this module leaf-like

    return FinetuneError(message)


def apply_overrides(values: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply `a.b=value` strings (values parsed as YAML) to a nested dict, in place; returns it."""
    import yaml

    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise _config_error(f"Override {item!r} must look like key=value, e.g. learning_rate=3e-4.")
        set_dotted(values, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return values


def set_dotted(values: dict, key: str, value) -> dict:
    """`values["a"]["b"] = value` for the key "a.b" (sections made as needed); returns `values`."""
    *parents, leaf = key.split(".")
    node = values
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise _config_error(f"Setting {key!r}: {part} is not a section.")
    node[leaf] = value
    return values


def load_train_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """A TrainConfig from a YAML recipe (or the defaults when `path` is None) plus `key=value` overrides."""
    import yaml

    values: dict = {}
    if path is not None:
        path = recipe_path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            names = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
            raise _config_error(f"No config file {path}: give a YAML file or a bundled recipe ({names}).") from None
        except yaml.YAMLError as e:
            raise _config_error(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return TrainConfig.from_dict(apply_overrides(values, overrides))


def recipe_path(path: str | Path) -> Path:
    """`path` when it exists, else the bundled recipe it names (`cpu_quick`, `recipes/cpu_quick.yaml`).

    So the recipe paths in the docs work in any directory, and after a `pip install .` that left no repository.
    """
    path = Path(path)
    if path.exists() or path.parent not in (Path("."), Path("recipes")):
        return path
    bundled = RECIPES / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    return bundled if bundled.is_file() else path


def dump_train_config(cfg: TrainConfig, path: str | Path | None = None) -> str:
    """YAML text of a config (keys in field order); also written to `path` when given."""
    import yaml

    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)
    if path is not None:
        Path(path).write_text(text)
    return text
