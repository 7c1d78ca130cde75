"""The Arena on llama.cpp: the embedded GGUF files as shipped, the tuned column as base + GGUF LoRA, every open answer
decoded together; and the same answers as the transformers path."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import make_run  # tests/ is on sys.path

from finetune import FinetuneError, llamacpp
from finetune.arena import ArenaSession, ArenaSetup, arena_concurrency, ask, local_engine, make_backends
from finetune.backends import LocalBackend, StreamState
from finetune.config import DataConfig, GenerationParams, ModelSpec
from finetune.data import load_splits
from finetune.models import EMBEDDED, ModelPool, cached_embedded, load_model
from finetune.settings import Settings
from finetune.templates import TEMPLATES, conversation_prompt

pytest.importorskip("llama_cpp")
SMOL, GEMMA = "smollm2-135m-instruct", "gemma-3-270m"


def qa_prompt(question: str) -> str:
    return conversation_prompt(TEMPLATES["qa"], [{"role": "user", "content": question}])


@pytest.fixture(scope="module")
def engine():
    return llamacpp.LlamaEngine(slots=4, per_slot=256)


@pytest.fixture(scope="module")
def smol(engine):
    return engine.model(EMBEDDED[SMOL].locate_gguf())


def answer(engine, model, prompt: str, params: GenerationParams, stops=("###",)) -> str:
    return "".join(engine.answer(model, None, prompt, params, stops))


def test_max_new_tokens_stop_strings_and_the_token_count(engine, smol):
    prompt = qa_prompt("What is Lamini?")
    full = answer(engine, smol, prompt, GenerationParams(max_new_tokens=24, stop=()), stops=())
    words = full.split()
    assert len(words) >= 4, full
    stream = llamacpp.LlamaBackend(EMBEDDED[SMOL].locate_gguf(), SMOL, "qa", llama=engine).stream(
        [{"role": "user", "content": "What is Lamini?"}], GenerationParams(max_new_tokens=5, stop=())
    )
    five = "".join(stream)
    assert stream.tokens == 5 and full.startswith(five)
    stop = " " + words[3]
    cut = answer(engine, smol, prompt, GenerationParams(max_new_tokens=24, stop=()), stops=(stop,))
    assert cut == full[: full.index(stop)]


def test_many_answers_at_once_share_each_decoding_step(engine, smol, monkeypatch):
    steps = []
    step = llamacpp._Context.step
    monkeypatch.setattr(llamacpp._Context, "step", lambda self, threads: (steps.append(1), step(self, threads)))
    params = GenerationParams(max_new_tokens=16, stop=())
    questions = load_splits(DataConfig("lamini_docs"))["test"]["instruction"][:4]
    alone = [answer(engine, smol, qa_prompt(q), params) for q in questions]
    steps.clear()
    together: dict[int, str] = {}

    def ask_one(i: int) -> None:
        together[i] = answer(engine, smol, qa_prompt(questions[i]), params)

    threads = [threading.Thread(target=ask_one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(together) == 4 and all(together[i] for i in range(4))
    tokens = sum(len(smol.tokenize(together[i])) for i in range(4))
    assert len(steps) < tokens / 2, (len(steps), tokens)  # one step decodes a token of each open answer
    # Batched kernels round differently from single rows: answers may part at near-tied tokens, not at the start.
    assert sum(together[i].split()[:3] == alone[i].split()[:3] for i in range(4)) >= 3


def test_closing_a_stream_frees_its_slot_for_the_next(smol):
    one_slot = llamacpp.LlamaEngine(slots=1, per_slot=512)
    long = one_slot.answer(smol, None, qa_prompt("Tell me everything."), GenerationParams(max_new_tokens=400), ())
    next(long)
    long.close()
    done = []
    short = GenerationParams(max_new_tokens=8)
    waiter = threading.Thread(target=lambda: done.append(answer(one_slot, smol, qa_prompt("Hi?"), short)))
    waiter.start()
    waiter.join(timeout=60)
    assert done, "the second answer never got the slot"


def test_idle_contexts_beyond_the_limit_are_freed_and_answers_go_on(smol, monkeypatch):
    monkeypatch.setattr(llamacpp, "MAX_CONTEXTS", 1)
    engine = llamacpp.LlamaEngine(slots=1, per_slot=256)
    gemma = engine.model(EMBEDDED[GEMMA].locate_gguf())
    params = GenerationParams(max_new_tokens=4)
    first = answer(engine, smol, qa_prompt("Hi?"), params)
    assert answer(engine, gemma, qa_prompt("Hi?"), params)
    assert [key[0] for key in engine._contexts] == [gemma.path]  # SmolLM2's context made way
    assert answer(engine, smol, qa_prompt("Hi?"), params) == first


def test_a_conversation_longer_than_the_context_gets_a_sentence(smol):
    small = llamacpp.LlamaEngine(slots=1, per_slot=64)
    with pytest.raises(FinetuneError, match="clear the Arena"):
        answer(small, smol, qa_prompt("word " * 80), GenerationParams(max_new_tokens=8))


def test_sampling_with_a_seed_repeats_and_the_repetition_penalty_is_transformers(engine, smol):
    params = GenerationParams(max_new_tokens=12, temperature=0.9, seed=7, stop=())
    prompt = qa_prompt("What is Lamini?")
    assert answer(engine, smol, prompt, params) == answer(engine, smol, prompt, params)
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = np.random.default_rng(0).normal(size=50).astype(np.float32)
    seen = [3, 7, 7, 11, 49]
    want = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seen]), torch.tensor(logits[None].copy()))[0].numpy()
    llamacpp._penalize(logits, seen, 1.3)
    np.testing.assert_allclose(logits, want, rtol=1e-6)


def test_free_cores_leave_a_busy_core_to_its_owner():
    free = llamacpp.FreeCores(cores=2)
    assert (free.count(0.0), free.count(0.5), free.count(0.8), free.count(1.0), free.count(3.0)) == (2, 2, 1, 1, 1)
    assert 1 <= free() <= 2


def test_the_engine_is_chosen_and_said(monkeypatch):
    assert local_engine("transformers") == "transformers"
    assert local_engine("auto") == "llama.cpp"  # installed here, and the app runs on the CPU
    assert arena_concurrency(Settings()) == llamacpp.SLOTS
    assert arena_concurrency(Settings(generation_concurrency=3)) == 3
    assert arena_concurrency(Settings(base_model="HuggingFaceTB/SmolLM2-135M")) == 2  # no GGUF: transformers
    gpu = type("Machine", (), {"app_device": lambda self: "cuda:0"})()
    with monkeypatch.context() as m:
        m.setattr("finetune.arena.machine", lambda: gpu)
        assert local_engine("auto") == "transformers"  # the app's models run on the GPU
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    assert local_engine("auto") == "transformers" and arena_concurrency(Settings()) == 2
    with pytest.raises(FinetuneError, match="pip install llama-cpp-python"):
        local_engine("llama.cpp")
    from finetune.ui.arena_tab import _stats

    col = StreamState(text="Hi", done=True, tokens=3, engine="llama.cpp", first_token_s=0.1, elapsed_s=0.2)
    assert _stats(col).endswith("· llama.cpp")


def test_models_without_a_gguf_and_adapters_without_a_gguf_lora_answer_with_transformers(tiny_llama, tmp_path):
    pool = ModelPool()
    backends = make_backends(pool, ArenaSetup(engine="llama.cpp"))
    assert [b.engine for b in backends.values()] == ["llama.cpp", "", "llama.cpp"]  # tuned: no adapter yet
    run = make_run(tmp_path, tiny_llama)  # a base with no GGUF of its own
    backends = make_backends(pool, ArenaSetup(base_model=tiny_llama, adapter=str(run / "adapter"), engine="auto"))
    assert all(isinstance(backends[r], LocalBackend) for r in ("base", "tuned"))
    warnings: list[str] = []
    gemma_run = make_run(tmp_path / "gemma", str(cached_embedded(GEMMA)))
    config = gemma_run / "adapter" / "adapter_config.json"
    config.write_text(config.read_text().replace('"use_dora": false', '"use_dora": true'))
    backends = make_backends(pool, ArenaSetup(adapter=str(gemma_run / "adapter")), warn=warnings.append)
    assert backends["tuned"].engine == "transformers" and "DoRA" in warnings[0]
    assert backends["base"].engine == "llama.cpp"


def test_the_gguf_lora_is_exported_once_per_adapter_file(tmp_path):
    run = make_run(tmp_path, str(cached_embedded(SMOL)))
    first = llamacpp.lora_gguf(run / "adapter")
    stamp = first.stat().st_mtime_ns
    assert llamacpp.lora_gguf(run / "adapter") == first and first.stat().st_mtime_ns == stamp
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes())  # a new file (a resumed run saved again): exported again
    assert llamacpp.lora_gguf(run / "adapter") != first


@pytest.mark.slow
def test_the_tuned_column_on_llama_cpp_answers_as_the_transformers_path(tmp_path):
    """Gemma's shipped Q4_K_M GGUF + the adapter as a GGUF LoRA, against the app's transformers path (the same 4-bit
    weights dequantized, + the PEFT adapter): the first words of greedy answers to held-out questions."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(ModelSpec(str(cached_embedded(GEMMA)), dtype="float32"))
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    peft = get_peft_model(model, lora)
    with torch.no_grad():  # an adapter that changes some answers and keeps them sentences
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peft.save_pretrained(tmp_path / "adapter")
    questions = load_splits(DataConfig("lamini_docs"))["test"]["instruction"][:4]
    pool, params = ModelPool(), GenerationParams(max_new_tokens=16, stop=())
    words: dict[str, list[tuple[list[str], list[str]]]] = {}
    for engine in ("llama.cpp", "transformers"):
        backends = make_backends(pool, ArenaSetup(adapter=str(tmp_path / "adapter"), engine=engine))
        del backends["reference"]
        assert {b.engine for b in backends.values()} == {engine}
        words[engine] = []
        for q in questions:
            *_, columns = ask(backends, ArenaSession.start(), q, params)
            words[engine].append((columns["base"].text.split()[:8], columns["tuned"].text.split()[:8]))
    same_tuned = sum(a[1] == b[1] for a, b in zip(words["llama.cpp"], words["transformers"]))
    same_base = sum(a[0] == b[0] for a, b in zip(words["llama.cpp"], words["transformers"]))
    assert same_tuned >= 3 and same_base >= 3, words
    assert any(base != tuned for base, tuned in words["llama.cpp"]), "the LoRA changed no answer on llama.cpp"
