import threading

import pytest
import torch

from finetune.backends import merge_streams
from finetune.config import GenerationParams, ModelSpec
from finetune.generate import StopFilter, generate_batch, stream
from finetune.models import load_model
from finetune.templates import TEMPLATES, build_prompt


def test_stop_filter_cuts_at_stop_string_split_across_chunks():
    f = StopFilter(("###",))
    out = [f.push(c) for c in ["Paris is", " the capital.\n\n#", "## Question"]]
    assert "".join(out) == "Paris is the capital.\n\n" and f.stopped
    assert out[1] == " the capital.\n\n"  # the '#' that might start a header was held back


def test_stop_filter_releases_held_text_that_was_not_a_stop():
    f = StopFilter(("###",))
    assert f.push("C#") == "C"
    assert f.push(" is a language") == "# is a language"
    assert f.flush() == "" and f.text == "C# is a language"


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_model(ModelSpec(tiny_llama))


def test_stream_yields_several_chunks_and_matches_batch_generation(tiny):
    model, tokenizer = tiny
    prompt = build_prompt(TEMPLATES["qa"], "What is Lamini?")
    params = GenerationParams(max_new_tokens=12, stop=())
    chunks = list(stream(model, tokenizer, prompt, params))
    assert len(chunks) > 1
    assert "".join(chunks) == generate_batch(model, tokenizer, [prompt], params)[0]


def test_closing_a_stream_stops_generation(tiny):
    """Counted in decoding steps, not seconds (a busy machine makes any step slow): close() returns once `generate`
    has stopped, a step or two after the one it was in, not after the 400 it was asked for."""
    model, tokenizer = tiny
    steps = []
    hook = model.register_forward_hook(lambda *_: steps.append(1))
    try:
        it = stream(model, tokenizer, "Hello", GenerationParams(max_new_tokens=400, stop=()))
        next(it)
        at_close = len(steps)
        it.close()
        after = len(steps)
    finally:
        hook.remove()
    assert after - at_close <= 2 and after < 40, (at_close, after)


def _after_first(chunks, mine: threading.Event, other: threading.Event):
    """`chunks`, going on past the first only once the other stream has sent its first: by events, not sleeps (a busy
    machine can run one thread to its end before the other starts)."""
    for i, c in enumerate(chunks):
        yield c
        if i == 0:
            mine.set()
            assert other.wait(60), "the other stream never started"  # a guard against a hang, not the verdict


def test_merge_streams_interleaves_and_isolates_errors():
    def broken():
        yield "partial"
        raise ConnectionError("refused")

    order = []
    a_started, b_started = threading.Event(), threading.Event()
    a, b = _after_first("abcd", a_started, b_started), _after_first("wxyz", b_started, a_started)
    for cols in merge_streams({"a": a, "b": b, "c": broken()}):
        order.append((cols["a"].chunks, cols["b"].chunks))
        final = cols
    assert final["a"].text == "abcd" and final["b"].text == "wxyz"
    assert final["c"].error == "ConnectionError: refused" and final["c"].text == "partial"
    assert all(c.done for c in final.values())
    # Both columns had output before either finished.
    assert any(0 < a < 4 and 0 < b < 4 for a, b in order)


@pytest.mark.slow
def test_embedded_models_answer_offline():
    params = GenerationParams(max_new_tokens=24)
    ref, ref_tok = load_model(ModelSpec("smollm2-135m-instruct", dtype="bfloat16"))
    chunks = list(
        stream(
            ref, ref_tok, build_prompt(TEMPLATES["chat"], "What is the capital of France?", tokenizer=ref_tok), params
        )
    )
    assert len(chunks) > 1 and "Paris" in "".join(chunks)
    base, base_tok = load_model(ModelSpec("gemma-3-270m", dtype="bfloat16"))
    answer = "".join(stream(base, base_tok, build_prompt(TEMPLATES["qa"], "What is the capital of France?"), params))
    assert "Paris" in answer and "###" not in answer


def test_prompt_inputs_pads_left_without_touching_the_shared_tokenizer(smol_tokenizer):
    """Left padding is done here: `padding=True` would set the shared tokenizer's backend state, which another
    thread's call can reset mid-way (an unpadded batch)."""
    from finetune.generate import prompt_inputs

    smol_tokenizer.backend_tokenizer.no_padding()
    out = prompt_inputs(smol_tokenizer, ["Hi", "A much longer prompt than the first"], "cpu")
    short = smol_tokenizer("Hi")["input_ids"]
    width = out["input_ids"].shape[1]
    assert out["input_ids"][0, width - len(short) :].tolist() == short
    assert out["attention_mask"][0].tolist() == [0] * (width - len(short)) + [1] * len(short)
    assert out["attention_mask"][1].all()
    assert smol_tokenizer.backend_tokenizer.padding is None


def test_float32_output_layer_decodes_with_a_bfloat16_copy_where_that_is_faster(monkeypatch):
    """AVX2 CPUs multiply a few rows by a big weight 3x faster in bfloat16 (Probe.bf16_gemv_fast): decoding uses a
    bfloat16 copy of the output layer; products of more rows (held-out losses) keep the exact float32 weight."""
    from finetune.generate import DECODE_ROWS, prepare_head
    from finetune.hardware import GEMV_SHAPE, Machine, Probe

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(GEMV_SHAPE[1], GEMV_SHAPE[2], bias=False)

        def get_output_embeddings(self):
            return self.head

    fast = Machine(isa=("avx2",), probe=Probe(100.0, 3.0, gemv_float32=8.0, gemv_bfloat16=24.0))
    slow = Machine(isa=("avx2",), probe=Probe(100.0, 3.0, gemv_float32=8.0, gemv_bfloat16=3.0))
    torch.manual_seed(0)
    for m, patched in ((fast, True), (slow, False)):
        monkeypatch.setattr("finetune.generate.machine", lambda m=m: m)
        model = Model()
        prepare_head(model)
        few, many = torch.randn(2, GEMV_SHAPE[1]), torch.randn(DECODE_ROWS + 1, GEMV_SHAPE[1])
        exact = torch.nn.functional.linear(few, model.head.weight)
        out = model.head(few)
        assert out.dtype == torch.float32 and torch.equal(out, exact) != patched
        torch.testing.assert_close(out, exact, rtol=0.02, atol=0.02)
        assert torch.equal(model.head(many), torch.nn.functional.linear(many, model.head.weight))
