"""Batched multi-adapter streaming and the two generation backends (local model, OpenAI-compatible HTTP)."""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path

import pytest
from conftest import transformers_serve  # tests/ is on sys.path

from finetune.backends import (
    BackendError,
    LocalBackend,
    OpenAIBackend,
    merge_streams,
    stream_all,
    token_counters,
)
from finetune.config import GenerationParams, ModelSpec
from finetune.generate import stream, stream_rows
from finetune.models import ModelPool, load_model
from finetune.templates import TEMPLATES, build_prompt, conversation_prompt

GREEDY = GenerationParams(max_new_tokens=16, stop=())


def make_tiny_adapter(base_dir: str, out_dir: Path, seed: int = 1) -> Path:
    """A LoRA adapter for the tiny model with random, non-zero B weights (so it really changes the output)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    assert any(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama, tmp_path_factory) -> Path:
    return make_tiny_adapter(tiny_llama, tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="module")
def pooled(tiny_llama, adapter_dir):
    """A pool whose tiny base model has the adapter attached (a PeftModel)."""
    pool = ModelPool()
    spec = ModelSpec(tiny_llama)
    entry, name = pool.get_with_adapter(spec, adapter_dir)
    return pool, spec, entry, name


def _text(streams) -> list[str]:
    return ["".join(s) for s in streams]


def test_mixed_adapter_batch_matches_separate_runs(pooled):
    _, _, entry, name = pooled
    model, tok = entry.model, entry.tokenizer
    prompt = build_prompt(TEMPLATES["qa"], "What is Lamini?")
    base_alone = "".join(stream(model, tok, prompt, GREEDY))
    tuned_alone = "".join(stream(model, tok, prompt, GREEDY, adapter_name=name))
    rows = stream_rows(model, tok, [prompt, prompt], GREEDY, adapter_names=[None, name])
    base_batched, tuned_batched = _text(rows)
    assert base_batched == base_alone and tuned_batched == tuned_alone
    assert base_alone != tuned_alone  # the adapter really changes the answer
    assert rows[0].tokens == rows[1].tokens == GREEDY.max_new_tokens


def test_rows_stop_independently_at_their_own_stop_string(pooled):
    _, _, entry, _ = pooled
    prompts = ["Hello there", "Hello there"]
    full = _text(stream_rows(entry.model, entry.tokenizer, prompts, GREEDY))[0]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut, whole = _text(stream_rows(entry.model, entry.tokenizer, prompts, GREEDY, stops=[(stop,), ()]))
    assert cut == full[: full.index(stop)] and whole == full


def test_stream_all_batches_local_columns_and_counts_tokens(pooled, adapter_dir):
    pool, spec, entry, name = pooled
    backends = {"base": LocalBackend(pool, spec, "qa"), "tuned": LocalBackend(pool, spec, "qa", adapter_dir)}
    question = [{"role": "user", "content": "What is Lamini?"}]
    streams = stream_all(backends, dict.fromkeys(backends, question), GREEDY)
    final = list(merge_streams(streams, token_counters(streams)))[-1]
    prompt = build_prompt(TEMPLATES["qa"], "What is Lamini?")
    assert final["base"].text == "".join(stream(entry.model, entry.tokenizer, prompt, GREEDY))
    assert final["tuned"].text == "".join(stream(entry.model, entry.tokenizer, prompt, GREEDY, adapter_name=name))
    assert final["base"].tokens == final["tuned"].tokens == GREEDY.max_new_tokens
    assert backends["tuned"].label.endswith("+ " + adapter_dir.name)


def test_broken_adapters_fail_their_own_column_only(pooled, tmp_path):
    pool, spec, _, _ = pooled
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text('{"peft_type": "LORA"}')  # no weights: PEFT itself fails
    backends = {
        "base": LocalBackend(pool, spec, "qa"),
        "missing": LocalBackend(pool, spec, "qa", tmp_path / "nothing"),
        "corrupt": LocalBackend(pool, spec, "qa", corrupt),
    }
    question = [{"role": "user", "content": "Hi"}]
    final = list(merge_streams(stream_all(backends, dict.fromkeys(backends, question), GREEDY)))[-1]
    assert "No LoRA adapter" in final["missing"].error and final["corrupt"].error
    assert final["base"].error is None and final["base"].text


def test_conversation_prompt_repeats_the_template_per_turn(smol_tokenizer):
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    qa = conversation_prompt(TEMPLATES["qa"], messages)
    assert qa == "### Question:\nQ1\n\n### Answer:\nA1\n\n### Question:\nQ2\n\n### Answer:\n"
    chat = conversation_prompt(TEMPLATES["chat"], messages, smol_tokenizer)
    assert chat.count("<|im_start|>user") == 2 and chat.endswith("<|im_start|>assistant\n")


# --- OpenAI-compatible endpoint ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def served_tiny(tiny_llama, tmp_path_factory):
    with transformers_serve(tiny_llama, tmp_path_factory.mktemp("serve")) as url:
        yield url


def test_openai_backend_streams_from_transformers_serve(served_tiny, tiny_llama):
    backend = OpenAIBackend(served_tiny, tiny_llama)  # `/v1` is added to the server root
    messages = [{"role": "user", "content": "What is Lamini?"}]
    s = backend.stream(messages, GREEDY)
    chunks = list(s)
    assert len(chunks) > 1
    # The same greedy answer as the local model with its chat template.
    model, tok = load_model(ModelSpec(tiny_llama))
    local = "".join(stream(model, tok, conversation_prompt(TEMPLATES["chat"], messages, tok), GREEDY))
    assert "".join(chunks) == local
    assert s.tokens == GREEDY.max_new_tokens


class _StubHandler(http.server.BaseHTTPRequestHandler):
    """Misbehaving OpenAI-compatible servers: the path picks the failure."""

    def do_POST(self):  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.startswith("/unauthorized"):
            self._send(401, "application/json", b'{"error": {"message": "Incorrect API key provided: sk-secret"}}')
        elif self.path.startswith("/malformed"):
            self._send(200, "text/event-stream", b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\n<html>oops')
        elif self.path.startswith("/slow"):
            self._send(200, "text/event-stream", b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\n', flush=True)
            time.sleep(3)
        elif self.path.startswith("/multiline"):
            # One JSON object over two `data:` lines: Server-Sent Events joins them with a newline.
            body = b'data: {"choices": [{"delta":\ndata:  {"content": "Hi there"}, "finish_reason": "stop"}]}\n\n'
            self._send(200, "text/event-stream", body + b"data: [DONE]\n\n")
        elif self.path.startswith("/record"):
            _StubHandler.seen.append(dict(self.headers))
            body = b'data: {"choices": [{"delta": {"content": "ok"}, "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'
            self._send(200, "text/event-stream", body)
        elif self.path.startswith("/error-event"):
            body = b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\n'
            body += b'data: {"error": {"message": "overloaded"}}\n\n'
            self._send(200, "text/event-stream", body)
        elif self.path.startswith("/bad-json"):
            self._send(200, "text/event-stream", b'data: {"choices": [\n\n')
        else:
            self._send(404, "application/json", b'{"error": {"message": "The model `m` does not exist"}}')

    seen: list[dict] = []  # request headers that /record received

    def _send(self, status: int, kind: str, body: bytes, flush: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.end_headers()
        self.wfile.write(body)
        if flush:
            self.wfile.flush()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def stub_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _error_of(backend: OpenAIBackend) -> tuple[str, str]:
    """(text before the error, error message) of one answer."""
    text = ""
    with pytest.raises(BackendError) as e:
        for chunk in backend.stream([{"role": "user", "content": "Hi"}], GREEDY):
            text += chunk
    return text, str(e.value)


def test_openai_backend_errors_are_clear_and_never_echo_the_key(stub_url, free_port):
    text, error = _error_of(OpenAIBackend(stub_url + "/unauthorized/v1", "m", api_key="sk-secret"))
    assert "HTTP 401" in error and "check the key" in error and "sk-secret" not in error
    assert "sk-secret" not in repr(OpenAIBackend(stub_url, "m", api_key="sk-secret"))
    text, error = _error_of(OpenAIBackend(stub_url + "/malformed/v1", "m"))
    assert text == "Hi" and "Malformed stream" in error
    text, error = _error_of(OpenAIBackend(stub_url + "/slow/v1", "m", timeout_s=0.5))
    assert text == "Hi" and "did not answer within 0.5 s" in error
    _, error = _error_of(OpenAIBackend(f"http://127.0.0.1:{free_port}", "m"))
    assert "Could not connect" in error


def test_openai_backend_reports_error_events_bad_json_and_unknown_models(stub_url):
    text, error = _error_of(OpenAIBackend(stub_url + "/error-event/v1", "m"))
    assert text == "Hi" and "The endpoint reported an error" in error and "overloaded" in error
    _, error = _error_of(OpenAIBackend(stub_url + "/bad-json/v1", "m"))
    assert "Malformed stream" in error and "bad JSON" in error
    _, error = _error_of(OpenAIBackend(stub_url + "/nowhere/v1", "m"))
    assert "HTTP 404" in error and "check the base URL and model name" in error and "does not exist" in error


def test_openai_backend_joins_a_multi_line_data_event(stub_url):
    s = OpenAIBackend(stub_url + "/multiline/v1", "m").stream([{"role": "user", "content": "Hi"}], GREEDY)
    assert "".join(s) == "Hi there" and s.tokens == 1  # no usage sent: one token per delta


def test_openai_backend_never_sends_credentials_from_the_environment(stub_url, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    monkeypatch.setenv("OPENAI_ORG_ID", "org-from-env")
    monkeypatch.setenv("OPENAI_CUSTOM_HEADERS", "Authorization: Bearer sk-custom-from-env")
    _StubHandler.seen.clear()
    question = [{"role": "user", "content": "Hi"}]
    assert "".join(OpenAIBackend(stub_url + "/record/v1", "m").stream(question, GREEDY)) == "ok"
    assert "".join(OpenAIBackend(stub_url + "/record/v1", "m", api_key="sk-user").stream(question, GREEDY)) == "ok"
    without_key, with_key = ({k.lower(): v for k, v in h.items()} for h in _StubHandler.seen)
    assert "from-env" not in str(without_key) and "from-env" not in str(with_key)
    assert with_key["authorization"] == "Bearer sk-user"


def test_a_failing_backend_does_not_stop_the_other_columns(pooled, free_port):
    long = GenerationParams(max_new_tokens=64, stop=())
    pool, spec, _, _ = pooled
    backends = {
        "base": LocalBackend(pool, spec, "qa"),
        "reference": OpenAIBackend(f"http://127.0.0.1:{free_port}/v1", "m"),
    }
    question = [{"role": "user", "content": "What is Lamini?"}]
    updates = [
        {n: (c.text, c.error, c.done) for n, c in cols.items()}
        # 64 tokens: the base keeps generating well past the instant refusal, even on a busy machine.
        for cols in merge_streams(stream_all(backends, dict.fromkeys(backends, question), long))
    ]
    text, error, done = updates[-1]["reference"]
    assert "Could not connect" in error and done
    base_text, base_error, _ = updates[-1]["base"]
    assert base_error is None and base_text
    # The base column kept streaming after the reference had failed.
    failed_at = next(i for i, u in enumerate(updates) if u["reference"][1])
    assert updates[failed_at]["base"][0] != base_text
