import logging
import threading
import time

import pytest
import torch

from finetune import FinetuneError
from finetune.config import ModelSpec
from finetune.hardware import machine
from finetune.models import EMBEDDED, ModelPool, load_model, quantization_config, resolve_source


def test_quantization_config_choices():
    assert quantization_config(None) is None and quantization_config("none") is None
    q4 = quantization_config("4bit")
    assert q4.load_in_4bit and q4.bnb_4bit_quant_type == "nf4" and q4.bnb_4bit_use_double_quant
    assert q4.bnb_4bit_compute_dtype == machine().quant_compute_dtype()  # per machine: tests/test_hardware.py
    assert quantization_config("8bit").load_in_8bit
    with pytest.raises(FinetuneError, match="Unknown quantization"):
        quantization_config("3bit")


def test_4bit_without_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("finetune.models.bitsandbytes_available", lambda: False)
    with pytest.raises(FinetuneError, match="bitsandbytes"):
        quantization_config("4bit")


def test_trust_remote_code_is_off_unless_asked(monkeypatch, tiny_llama):
    assert ModelSpec().trust_remote_code is False
    seen = []
    import transformers

    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_model(ModelSpec(tiny_llama))
    load_model(ModelSpec(tiny_llama, trust_remote_code=True))
    assert seen == [False, True]


@pytest.mark.parametrize("source", ["no-such-org/no-such-model-xyz", "../../etc", "/does/not/exist", ""])
def test_unknown_model_is_a_clear_error(source):
    with pytest.raises(FinetuneError, match="model|Model"):
        load_model(ModelSpec(source))


def test_local_folder_loads_on_cpu_in_eval_mode(tiny_llama):
    model, tokenizer = load_model(ModelSpec(tiny_llama, dtype="bfloat16"))
    assert model.dtype == torch.bfloat16 and not model.training and model.device.type == "cpu"
    assert tokenizer.pad_token is not None
    assert resolve_source(ModelSpec(tiny_llama)) == tiny_llama


def test_4bit_load_on_cpu(tiny_llama):
    model, _ = load_model(ModelSpec(tiny_llama, quantization="4bit"))
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    out = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out).all()


def test_pool_loads_once_and_evicts_least_recently_used():
    calls = []

    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(256))  # 1 KiB

    def loader(spec):
        calls.append(spec.source)
        time.sleep(0.05)
        return Fake(), object()

    pool = ModelPool(budget_bytes=2048, loader=loader)
    threads = [threading.Thread(target=pool.get, args=(ModelSpec("a"),)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["a"]  # four concurrent first requests, one load
    pool.get(ModelSpec("b"))
    pool.get(ModelSpec("a"))  # a is now the most recently used
    pool.get(ModelSpec("c"))  # over budget: b goes
    assert [s.source for s in pool.loaded()] == ["a", "c"]
    assert pool.get(ModelSpec("a")).nbytes == 1024


@pytest.mark.slow
def test_cache_round_trip_gives_the_same_logits(tmp_path, monkeypatch):
    """Convert the GGUF into a fresh cache, reload from safetensors: the GGUF-loaded model's logits, up to the
    bfloat16 rounding of the cached weights."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("FINETUNE_MODEL_CACHE", str(tmp_path))
    name = "smollm2-135m-instruct"
    cached, tokenizer = load_model(ModelSpec(name, dtype="float32"))
    assert (tmp_path / f"{name}-bf16" / "model.safetensors").is_file()
    assert not list(tmp_path.glob(f".{name}-*"))  # no temp dir left behind
    gguf = EMBEDDED[name].locate_gguf()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = cached(ids).logits, direct(ids).logits
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    torch.testing.assert_close(ours, theirs, atol=0.3, rtol=0.02)


def test_two_processes_assembling_gemmas_gguf_at_once_both_get_the_whole_file(tmp_path, monkeypatch):
    """A fresh machine: the app and a training run (or two test workers) each assemble the shipped chunks. Written in
    place, the second one found the first one's half-written file and refused it as corrupt."""
    from finetune import models

    monkeypatch.setenv("FINETUNE_MODEL_CACHE", str(tmp_path))
    barrier, found, errors = threading.Barrier(2), [], []

    def assemble():
        barrier.wait()
        try:
            found.append(models._gemma_gguf())
        except Exception as e:  # noqa: BLE001 (the verdict below)
            errors.append(e)

    threads = [threading.Thread(target=assemble) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(found) == 2 and found[0] == found[1], errors
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == [found[0].name]  # no temp folder left
    assert models._gemma_gguf() == found[0]  # and its SHA-256 is the shipped one (assemble checks it)


def test_pool_reloads_an_adapter_rewritten_on_disk(tiny_llama, tmp_path):
    import os

    from peft import LoraConfig, get_peft_model

    from finetune.models import load_model as load

    model, _ = load(ModelSpec(tiny_llama))
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    pool = ModelPool()
    _, first = pool.get_with_adapter(ModelSpec(tiny_llama), tmp_path)
    assert pool.get_with_adapter(ModelSpec(tiny_llama), tmp_path)[1] == first  # unchanged: attached once
    weights = tmp_path / "adapter_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert pool.get_with_adapter(ModelSpec(tiny_llama), tmp_path)[1] != first
    with pytest.raises(FinetuneError, match="adapter_config.json"):
        pool.get_with_adapter(ModelSpec(tiny_llama), tmp_path / "missing")


def test_concurrent_loads_of_different_models_are_complete(tiny_llama):
    """Two threads loading at once (the Arena's first question) both get the checkpoint's tied output layer."""
    reference = load_model(ModelSpec(tiny_llama))[0].lm_head.weight
    loaded = {}

    def load(dtype: str) -> None:
        loaded[dtype] = load_model(ModelSpec(tiny_llama, dtype=dtype))[0]

    threads = [threading.Thread(target=load, args=(d,)) for d in ("float32", "bfloat16") * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(loaded) == {"float32", "bfloat16"}
    for model in loaded.values():
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        torch.testing.assert_close(model.lm_head.weight.float(), reference.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EMBEDDED))
def test_embedded_tokenizer_loads_as_autotokenizer_would(name):
    """The cache's tokenizer.json loaded as is (fast, small) encodes, decodes and templates like AutoTokenizer."""
    import json

    from transformers import AutoTokenizer

    from finetune.data import BUNDLED
    from finetune.models import load_tokenizer

    ours, theirs = load_tokenizer(ModelSpec(name)), AutoTokenizer.from_pretrained(resolve_source(ModelSpec(name)))
    rows = [json.loads(line) for line in BUNDLED["lamini_docs"].read_text().splitlines()[:200]]
    texts = [f"### Question:\n{r['question']}\n\n### Answer:\n{r['answer']}" for r in rows] + ["<b> 日本語 \t x"]
    ids = ours(texts).input_ids
    assert ids == theirs(texts).input_ids
    assert [ours.decode(i) for i in ids[:20]] == [theirs.decode(i) for i in ids[:20]]
    assert ours.all_special_tokens == theirs.all_special_tokens and len(ours) == len(theirs)
    assert ours.chat_template == theirs.chat_template


def test_import_model_code_imports_the_architecture(tiny_llama):
    """The app's start-up preload: a later load of the model pays for its files only."""
    import subprocess
    import sys

    code = (
        "import sys; from finetune.config import ModelSpec; from finetune.models import import_model_code;"
        "before = 'transformers.models.llama.modeling_llama' in sys.modules;"
        f"import_model_code(ModelSpec({tiny_llama!r}));"
        "print(before, 'transformers.models.llama.modeling_llama' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False", "True"], done.stderr[-2000:]


@pytest.mark.slow
def test_an_embedded_tokenizer_is_saved_with_its_own_class(tmp_path):
    """Loaded with the generic class for speed, but an export keeps the model's own (Gemma's pads on the left)."""
    from transformers import AutoTokenizer

    from finetune.models import load_tokenizer, save_tokenizer

    spec = ModelSpec("gemma-3-270m")
    save_tokenizer(spec, load_tokenizer(spec), tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)
    assert type(saved).__name__ == "GemmaTokenizer" and saved.padding_side == "left"
    assert saved("Lamini").input_ids == load_tokenizer(spec)("Lamini").input_ids


def test_an_evicted_model_gives_its_gpu_memory_back(monkeypatch):
    """On one 16 GB GPU the pool's evictions make room for a training process beside it: torch's caching allocator
    keeps freed blocks reserved for this process until `empty_cache`."""
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    pool = ModelPool(budget_bytes=1500, loader=lambda spec: (torch.nn.Linear(16, 16), object()))  # ~1.1 KB each
    pool.get(ModelSpec("a"))
    assert not emptied
    pool.get(ModelSpec("b"))  # over budget: a goes, and its memory with it
    assert [s.source for s in pool.loaded()] == ["b"] and emptied


def test_a_pool_pickles_as_a_handle_to_itself():
    """ZeroGPU pickles a handler's arguments into a worker forked from the app: the pool crosses as its id, and a
    process that did not inherit it says so."""
    import pickle

    from finetune import models

    pool = ModelPool(budget_bytes=0)
    assert pickle.loads(pickle.dumps(pool)) is pool
    data = pickle.dumps(pool)
    models._POOLS.pop(id(pool))
    with pytest.raises(FinetuneError, match="forked"):
        pickle.loads(data)


@pytest.mark.slow
def test_gemma3_overflows_float16_so_it_loads_in_float32():
    """The T4 decision's reason, on a CPU: the embedded Gemma-3-270M's residual stream passes float16's 65504 by its
    9th layer (1e5 in float32), so in float16 its logits are NaN. Asked for float16, `load_model` gives float32."""
    from transformers import AutoModelForCausalLM

    from finetune.models import fp16_ok, load_tokenizer

    spec = ModelSpec("gemma-3-270m", dtype="float16")
    tokenizer = load_tokenizer(spec)
    ids = tokenizer("### Question:\nWhat is Lamini and how do I fine-tune a model with it?\n\n### Answer:\n",
                    return_tensors="pt")  # fmt: skip
    raw = AutoModelForCausalLM.from_pretrained(resolve_source(spec), dtype=torch.float16)
    with torch.no_grad():
        assert not torch.isfinite(raw(**ids).logits).all()
    del raw
    assert not fp16_ok(spec) and fp16_ok(ModelSpec("smollm2-135m-instruct"))
    model, _ = load_model(spec, device="cpu")
    assert next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()


def test_bitsandbytes_missing_online_kernel_is_not_shown_and_its_other_warnings_are(caplog):
    import finetune.models  # noqa: F401 (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "No module")
        logger.warning("Something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["Something else went wrong"]
