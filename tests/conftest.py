"""Shared fixtures: a private data dir per test session, and tiny random models that load in milliseconds.

The embedded models are converted once per machine into a persistent cache (`FINETUNE_MODEL_CACHE`),
so only the first test run pays for the GGUF conversion.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
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


QA = [
    ("What is Lamini?", "Lamini is an LLM engine for developers."),
    ("Can Lamini run offline?", "Yes, on your own hardware."),
    ("Which licence does it use?", "Apache 2.0."),
    ("How do I install it?", "pip install lamini"),
    ("Does it support fine-tuning?", "Yes: it fine-tunes models on your data with a few lines of code."),
    ("What is a LoRA adapter?", "Small low-rank matrices added to a frozen model."),
    ("Is it free?", "There is a free tier."),
    ("Who makes it?", "Lamini AI."),
]


def make_run(root, tiny_llama, run_id="run-1", adapter=True):
    """A run folder as training leaves it: config.yaml, metrics.jsonl and a LoRA adapter with non-zero B."""
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.config import DataConfig, ModelSpec

    run = root / "runs" / run_id
    run.mkdir(parents=True)
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QA))
    config = {
        "model": asdict(ModelSpec(tiny_llama, dtype="float32")),
        "data": asdict(DataConfig(source=str(data), template="qa", test_size=0.5, seed=1)),
        "max_length": 128,
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 3.5}\n{"step": 2, "loss": 2.5, "eval_loss": 2.9}\n{"step": 3, "loss": NaN}\n{"step'
    )
    if adapter:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(model, lora).save_pretrained(run / "adapter")
    return run


def trained_spans(enc: dict) -> list[tuple[int, int]]:
    """[start, end) token positions of each run of trained labels."""
    from finetune.templates import IGNORE_INDEX

    spans, start = [], None
    for i, label in enumerate(enc["labels"] + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans, start = spans + [(start, i)], None
    return spans


def assert_trained_exactly(tokenizer, enc: dict, pieces: list[tuple[str, bool]]) -> None:
    """The row's ids are its whole text's, and exactly the `True` pieces' tokens are trained (labels = ids there)."""
    from finetune.templates import IGNORE_INDEX

    text = "".join(piece for piece, _ in pieces)
    assert enc["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    expected, at, prefix = [], 0, ""
    for piece, trained in pieces:
        prefix += piece
        end = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
        expected += [(at, end)] if trained else []
        at = end
    assert trained_spans(enc) == expected
    assert [tokenizer.decode(enc["input_ids"][a:b]) for a, b in expected] == [p for p, t in pieces if t]
    trained = {i for a, b in expected for i in range(a, b)}
    assert enc["labels"] == [t if i in trained else IGNORE_INDEX for i, t in enumerate(enc["input_ids"])]


@contextlib.contextmanager
def transformers_serve(model_dir: str | Path, log_dir: Path, timeout_s: float = 120.0) -> Iterator[str]:
    """A real `transformers serve` of `model_dir` on 127.0.0.1 (the OpenAI-compatible server of transformers); yields
    its URL once it answers, stops it after."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = log_dir / "serve.log"
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
