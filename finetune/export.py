"""A run's adapter taken elsewhere: merged into its base model and saved (safetensors, with the chat template it was
trained with), or pushed to the Hub.

    python -m finetune export RUN_DIR OUT_DIR [--checkpoint STEP]
    from finetune.export import export_merged; export_merged("runs/<id>", "merged/")
"""

from __future__ import annotations

import os
from pathlib import Path

from finetune import FinetuneError
from finetune.config import TrainConfig, load_train_config
from finetune.runs import RunDir, is_adapter, run_of_adapter
from finetune.serving import serving_chat_template, write_chat_template
from finetune.templates import get_template


def adapter_and_config(path: str | Path, step: int | None = None) -> tuple[Path, TrainConfig]:
    """A run folder's adapter (or its checkpoint's at `step`), or an adapter folder; and the config it was trained
    with (its run's, else the defaults)."""
    path = Path(path)
    if step is not None or RunDir(path).adapter_dir.is_dir():
        path = RunDir(path).adapter_path(step)
    if not is_adapter(path):
        raise FinetuneError(f"No LoRA adapter in {path}: give a run folder or an adapter folder.")
    found = run_of_adapter(path)  # an adapter folder inside a run: its config says which base model
    return path, found[0].read_config() if found else load_train_config()


def export_merged(path: str | Path, out_dir: str | Path, base: str | None = None, step: int | None = None) -> Path:
    """Merge a run's adapter (or its checkpoint's at `step`) into its (unquantized) base model and save model +
    tokenizer as safetensors, with the chat template of the run's prompt template (so a server prompts it as
    trained)."""
    from finetune.models import save_tokenizer

    adapter, cfg = adapter_and_config(path, step)
    spec = _base_spec(cfg, base)
    merged, tokenizer = merged_model(adapter, cfg, base)
    out_dir = Path(out_dir)
    merged.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(spec, tokenizer, out_dir)
    write_chat_template(out_dir, serving_chat_template(get_template(cfg.data.template), tokenizer))
    return out_dir


def _base_spec(cfg: TrainConfig, base: str | None = None):
    from finetune.config import ModelSpec

    return ModelSpec(base or cfg.model.source, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)


def merged_model(adapter: Path, cfg: TrainConfig, base: str | None = None):
    """(the adapter merged into its unquantized base model on the CPU, the tokenizer)."""
    from peft import PeftModel

    from finetune.models import load_model

    model, tokenizer = load_model(_base_spec(cfg, base), device="cpu")
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload(), tokenizer


def push_adapter(path: str | Path, repo_id: str, private: bool = True) -> str:
    """Upload a run's adapter to the Hub with the token in HF_TOKEN (never printed); returns the repo URL."""
    from huggingface_hub import HfApi

    adapter, _ = adapter_and_config(path)
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise FinetuneError("Set the HF_TOKEN environment variable to push to the Hub.")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(adapter), commit_message="Upload LoRA adapter")
    except Exception as e:  # network and permission errors: say which, without the token
        raise FinetuneError(f"Could not push to {repo_id}: {type(e).__name__}. Check the repo id and token.") from None
    return str(url)
