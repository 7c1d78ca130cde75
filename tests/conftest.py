"""Shared fixtures: a private data dir per test session, and tiny random models that load in milliseconds.

The embedded models are converted once per machine into a persistent cache (`FINETUNE_MODEL_CACHE`),
so only the first test run pays for the GGUF conversion.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("FINETUNE_MODEL_CACHE", str(Path.home() / ".cache" / "finetune-workbench" / "models"))
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach the Hub, even on a machine that could
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(autouse=True, scope="session")
def _session_home(tmp_path_factory):
    os.environ["FINETUNE_HOME"] = str(tmp_path_factory.mktemp("finetune-home"))


@pytest.fixture(autouse=True)
def _two_threads():
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))


def _save_tiny(path: Path, config, tokenizer) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The real SmolLM2 tokenizer (49k vocab, has a chat template)."""
    from finetune.config import ModelSpec
    from finetune.models import load_tokenizer

    return load_tokenizer(ModelSpec("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smol_tokenizer) -> str:
    """A 2-layer random Llama with the SmolLM2 tokenizer, saved as a local model folder."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=len(smol_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=smol_tokenizer.bos_token_id,
        eos_token_id=smol_tokenizer.eos_token_id,
        pad_token_id=smol_tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return str(_save_tiny(tmp_path_factory.mktemp("tiny-llama"), config, smol_tokenizer))


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
