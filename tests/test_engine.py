"""Base and tuned on a serving engine: the completions route of OpenAIBackend, vLLM's runtime LoRA API, the Arena.

A fake vLLM (a local HTTP server answering as vLLM documents it, recording every request) stands in for the GPU
server; `transformers serve` with the real embedded Gemma checks the base column against a real server.
"""

from __future__ import annotations

import http.server
import json
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import transformers_serve  # tests/ is on sys.path
from test_generate_backends import make_tiny_adapter

from finetune.arena import serve_finished_runs
from finetune.backends import BackendError, LocalBackend, OpenAIBackend, stream_all
from finetune.config import GenerationParams, ModelSpec
from finetune.engine import ServeEngine, lora_name
from finetune.models import ModelPool, resolve_source
from finetune.runs import RunDir
from finetune.settings import Settings
from finetune.templates import TEMPLATES, conversation_prompt
from finetune.votes import VoteStore
from tests.test_arena import _fake_run
from tests.test_workshop import client, running_app

BASE_TEXT, TUNED_TEXT = "It is a base answer.", "Lamini is an LLM engine."


class FakeVLLM:
    """vLLM's OpenAI-compatible server with `--enable-lora` and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, as documented:
    `/v1/models` lists the base model and the loaded adapters, `/v1/load_lora_adapter` loads one (HTTP 400 when the
    name is taken), `/v1/unload_lora_adapter` unloads one (HTTP 404 when it is not there), `/v1/completions` streams.
    `load_answer` replaces the load's answer: (status, JSON body)."""

    def __init__(self, base: str = "base"):
        self.base, self.adapters = base, {}
        self.requests: list[tuple[str, str, dict | None]] = []  # (method, path, JSON body)
        self.load_answer: tuple[int, dict] | None = None
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                fake.requests.append(("GET", self.path, None))
                ids = [fake.base, *fake.adapters]
                self._json(200, {"object": "list", "data": [{"id": i, "object": "model"} for i in ids]})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
                fake.requests.append(("POST", self.path, body))
                if self.path == "/v1/load_lora_adapter":
                    self._load(body)
                elif self.path == "/v1/unload_lora_adapter":
                    self._unload(body)
                elif self.path == "/v1/completions":
                    self._complete(body)
                else:
                    self._json(404, {"detail": "Not Found"})

            def _load(self, body: dict) -> None:
                if fake.load_answer is not None:
                    return self._json(*fake.load_answer)
                if body["lora_name"] in fake.adapters:
                    message = f"The lora adapter '{body['lora_name']}' has already been loaded."
                    return self._json(400, {"error": {"message": message, "type": "BadRequestError", "code": 400}})
                fake.adapters[body["lora_name"]] = body["lora_path"]
                self._send(200, "text/plain", f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

            def _unload(self, body: dict) -> None:
                if fake.adapters.pop(body["lora_name"], None) is None:
                    message = f"The lora adapter '{body['lora_name']}' cannot be found."
                    return self._json(404, {"error": {"message": message, "type": "NotFoundError", "code": 404}})
                self._send(200, "text/plain", f"Success: LoRA adapter '{body['lora_name']}' removed successfully.")

            def _complete(self, body: dict) -> None:
                text = TUNED_TEXT if body["model"] in fake.adapters else BASE_TEXT
                # The server would stop at the stop string; this one goes on, so the client's own cut is checked too.
                pieces = [*text.split(" "), "\n\n### Question:\nnext"]
                events = [{"choices": [{"index": 0, "text": p + " ", "finish_reason": None}]} for p in pieces[:-1]]
                events.append({"choices": [{"index": 0, "text": pieces[-1], "finish_reason": "stop"}]})
                usage = {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}
                events.append({"choices": [], "usage": usage})
                head = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"]}
                sse = "".join(f"data: {json.dumps({**head, **e})}\n\n" for e in events) + "data: [DONE]\n\n"
                self._send(200, "text/event-stream", sse)

            def _json(self, status: int, body: dict) -> None:
                self._send(status, "application/json", json.dumps(body))

            def _send(self, status: int, kind: str, text: str) -> None:
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def loads(self) -> list[dict]:
        return [body for method, path, body in self.requests if path == "/v1/load_lora_adapter"]

    def unloads(self) -> list[dict]:
        return [body for method, path, body in self.requests if path == "/v1/unload_lora_adapter"]

    def completions(self) -> list[dict]:
        return [body for method, path, body in self.requests if path == "/v1/completions"]


@pytest.fixture
def vllm():
    fake = FakeVLLM()
    yield fake
    fake.server.shutdown()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FINETUNE_AUTH", raising=False)
    return tmp_path / "home"


@pytest.fixture(scope="module")
def tiny_adapter(tiny_llama, tmp_path_factory) -> Path:
    return make_tiny_adapter(tiny_llama, tmp_path_factory.mktemp("adapter"))


# --- vLLM's runtime LoRA API ------------------------------------------------------------------------------


def test_registration_posts_the_adapters_name_and_folder_as_vllm_documents(vllm, tiny_adapter):
    ServeEngine(vllm.url + "/v1").register("run-1", tiny_adapter)  # with or without /v1: the same server
    assert vllm.requests == [
        ("POST", "/v1/load_lora_adapter", {"lora_name": "run-1", "lora_path": str(tiny_adapter.resolve())})
    ]
    ServeEngine(vllm.url).register("run-1", tiny_adapter)  # vLLM: HTTP 400 "already been loaded": it is there
    assert ServeEngine(vllm.url).models() == ["base", "run-1"]


@pytest.mark.parametrize(
    ("status", "body", "says"),
    [
        (404, {"detail": "Not Found"}, ["--enable-lora", "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True", "HTTP 404"]),
        (400, {"error": {"message": "LoRA rank 64 is greater than max_lora_rank 16."}}, ["HTTP 400", "rank 64"]),
        (400, {"object": "error", "message": "Loading failed: bad config", "code": 400}, ["bad config"]),
        (404, {"error": {"message": "Loading lora x failed: No adapter found for /p"}}, ["No adapter", "machine"]),
        (500, {"detail": "Internal Server Error"}, ["HTTP 500", "Internal Server Error"]),
    ],
)  # fmt: skip
def test_a_refused_registration_shows_the_servers_own_words(vllm, tiny_adapter, status, body, says):
    vllm.load_answer = (status, body)
    with pytest.raises(BackendError) as error:
        ServeEngine(vllm.url).register("run-1", tiny_adapter)
    assert all(s in str(error.value) for s in says), str(error.value)


def test_an_unreachable_engine_says_so(free_port, tiny_adapter):
    with pytest.raises(BackendError, match="Could not connect to the serving engine.*is it running"):
        ServeEngine(f"http://127.0.0.1:{free_port}").register("run-1", tiny_adapter)


def _copy(adapter: Path, to: Path) -> Path:
    to.mkdir()
    for f in adapter.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


def test_the_name_on_the_server_changes_with_the_adapters_weights(tmp_path, tiny_adapter):
    copy = _copy(tiny_adapter, tmp_path / "adapter")
    before = lora_name("run-1", copy)
    assert before.startswith("run-1-") and lora_name("run-1", copy) == before
    (copy / "adapter_model.safetensors").write_bytes(b"resumed and saved again")  # a resumed run saves new weights
    assert lora_name("run-1", copy) != before


def test_a_resumed_runs_new_weights_replace_its_old_copy_on_the_server(vllm, tmp_path, tiny_adapter):
    engine, copy = ServeEngine(vllm.url), _copy(tiny_adapter, tmp_path / "adapter")
    neighbour = lora_name("run-10", tiny_adapter)  # another run whose name starts the same: left alone
    engine.register(neighbour, tiny_adapter)
    old = lora_name("run-1", copy)
    engine.register(old, copy)
    (copy / "adapter_model.safetensors").write_bytes(b"resumed and saved again")
    new = lora_name("run-1", copy)
    engine.register(new, copy)
    assert vllm.unloads() == [{"lora_name": old}]
    assert engine.models() == ["base", neighbour, new]  # one name of run-1 on the server: its newest weights
    engine.unload(old)  # another user's app unloaded it first: vLLM's HTTP 404 "cannot be found" is no error
    assert vllm.unloads()[-1] == {"lora_name": old}


def test_an_adapter_above_the_engines_max_lora_rank_is_refused_before_it_is_sent(vllm, tmp_path, tiny_adapter):
    copy = _copy(tiny_adapter, tmp_path / "adapter")
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, "r": 128}))
    with pytest.raises(BackendError) as error:
        ServeEngine(vllm.url, max_lora_rank=64).register("run-1", copy)
    message = str(error.value)
    assert "rank 128" in message and "64" in message and "lora_r" in message and "--max-lora-rank" in message
    assert vllm.requests == []
    ServeEngine(vllm.url, max_lora_rank=128).register("run-1", copy)  # a server started for it takes it
    assert [body["lora_name"] for body in vllm.loads()] == ["run-1"]


# --- the completions route: a text template's prompt, stop strings --------------------------------------------


def test_a_text_template_goes_to_the_completions_api_with_the_local_prompt(vllm):
    backend = OpenAIBackend(vllm.url, "base", template="qa")
    messages = [{"role": "user", "content": "What is Lamini?"}]
    s = backend.stream(messages, GenerationParams(max_new_tokens=16, stop=()))
    assert "".join(s).strip() == BASE_TEXT  # cut at the template's next header
    (request,) = vllm.completions()
    assert request["prompt"] == conversation_prompt(TEMPLATES["qa"], messages)
    assert request["stop"] == ["###"] and request["max_tokens"] == 16 and request["stream"] is True
    assert s.tokens == 6  # cut before the server's usage came: one token per piece of text received


# --- the Arena: base and tuned on the engine -------------------------------------------------------------------


def _round(browser, adapter: Path, url: str, blind: bool = True, fallback: bool = False) -> tuple:
    """One /arena round with base and tuned on the engine at `url`: (three chats, three stats lines)."""
    result = browser.predict(
        question="What is Lamini?", max_new_tokens=16, blind=blind, adapter=str(adapter), serve_url=url,
        serve_fallback=fallback, api_name="/arena",
    )  # fmt: skip
    return result[:3], result[3:6]


def _answers(chats) -> list[str]:
    """The last answer of each chat (gradio 6 gives a message's content as a list of typed parts)."""
    contents = [chat[-1]["content"] for chat in chats]
    return [c if isinstance(c, str) else "".join(p.get("text", "") for p in c) for c in contents]


def test_an_arena_round_with_base_and_tuned_on_the_engine(home, tiny_llama, tiny_adapter, vllm, free_port):
    adapter = _fake_run(home, tiny_adapter, tiny_llama)
    settings = Settings(base_model=tiny_llama, reference_model=tiny_llama, max_new_tokens=32)
    with running_app(settings, free_port) as url:
        browser = client(url)
        chats, stats = _round(browser, adapter, vllm.url)
        assert {BASE_TEXT, TUNED_TEXT} <= set(_answers(chats))  # blind: in a random order
        assert all("tokens/s" in s and "Error" not in s for s in stats), stats
        *_, verdict, _board, _csv = browser.predict("A", api_name="/vote")
        # Registered once, under the run's name and the fingerprint of its weights, from the run's folder.
        name = lora_name("run-1", adapter)
        assert vllm.loads() == [{"lora_name": name, "lora_path": str(adapter.resolve())}]
        _round(browser, adapter, vllm.url)  # listed by /v1/models now: not loaded again
        assert len(vllm.loads()) == 1
    models = {request["model"] for request in vllm.completions()}
    assert models == {tiny_llama, name}  # base: its name here (FINETUNE_SERVE_MODEL unset); tuned: the adapter
    prompts = {request["prompt"] for request in vllm.completions()}
    assert all(p.startswith("Below is an instruction") for p in prompts)  # the run's Alpaca template
    (vote,) = VoteStore().votes()
    host = vllm.url.removeprefix("http://")
    assert vote.models["base"] == f"{tiny_llama} @ {host}" and vote.models["tuned"] == f"{tiny_llama} + run-1 @ {host}"
    assert vote.answers["base"] == BASE_TEXT and vote.answers["tuned"] == TUNED_TEXT
    assert vote.models["reference"] == tiny_llama  # the reference column is untouched: the app's own model
    assert f"= base ({tiny_llama} @ {host})" in verdict


def test_a_refused_adapter_is_reported_in_its_column_or_falls_back_when_asked(
    home, tiny_llama, tiny_adapter, vllm, free_port
):
    adapter = _fake_run(home, tiny_adapter, tiny_llama)
    settings = Settings(base_model=tiny_llama, reference_model=tiny_llama, max_new_tokens=32)
    vllm.load_answer = (404, {"detail": "Not Found"})  # vLLM without VLLM_ALLOW_RUNTIME_LORA_UPDATING
    with running_app(settings, free_port) as url:
        # Each round from a new browser: one browser's next question would continue its conversation.
        chats, stats = _round(client(url), adapter, vllm.url, blind=False)  # base, tuned, reference in this order
        assert _answers(chats)[0] == BASE_TEXT and "Error" not in stats[0]
        assert "**Error:**" in stats[1] and "--enable-lora" in stats[1]
        assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in stats[1]
        # The checkbox: both columns answer in the app, as without a server.
        chats, stats = _round(client(url), adapter, vllm.url, blind=False, fallback=True)
        assert all("Error" not in s for s in stats), stats
        local = _round(client(url), adapter, "", blind=False)[0]
        assert _answers(chats)[:2] == _answers(local)[:2] and BASE_TEXT not in _answers(chats)
    assert len(vllm.completions()) == 1  # only the first round's base column reached the server


def test_a_finished_run_is_registered_at_once_and_says_so(home, tiny_llama, tiny_adapter, vllm, tmp_path):
    from finetune.runner import Runner
    from tests.test_runner import cfg_for

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": f"A{i}."}) + "\n" for i in range(8)))
    trainer = tmp_path / "trainer"  # stands in for `python -m finetune train`: saves an adapter and finishes
    trainer.write_text(
        f"#!{sys.executable}\nimport shutil, sys\nfrom pathlib import Path\nfrom finetune.runs import RunDir\n"
        "run = RunDir(Path(sys.argv[sys.argv.index('--run-dir') + 1]))\n"
        f"shutil.copytree({str(tiny_adapter)!r}, run.adapter_dir)\n"
        "run.update_status(state='finished', step=3, total=3, message='Finished 3 steps.')\n"
    )
    trainer.chmod(0o755)
    runner = Runner(home / "runs", python=str(trainer), poll_interval=0.1, on_finished=serve_finished_runs(vllm.url))
    try:
        run_id = runner.submit(cfg_for(tiny_llama, str(data)))
        assert runner.wait(run_id, timeout=60)["state"] == "finished"
        deadline = time.monotonic() + 30
        while "notice" not in runner.status(run_id) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        runner.close()
    adapter = RunDir(home / "runs" / run_id).adapter_dir
    name = lora_name(run_id, adapter)
    assert vllm.loads() == [{"lora_name": name, "lora_path": str(adapter.resolve())}]
    assert runner.status(run_id)["notice"] == f"Loaded into the serving engine as {name!r}."
    assert serve_finished_runs("") is None  # no engine: nothing to do after a run


# --- a real OpenAI-compatible server: transformers serve with the embedded Gemma -----------------------------


@pytest.fixture(scope="module")
def served_gemma(tmp_path_factory):
    """`transformers serve` of the embedded Gemma-3-270M (its folder is the model's name there)."""
    folder = resolve_source(ModelSpec("gemma-3-270m"))
    with transformers_serve(folder, tmp_path_factory.mktemp("serve"), timeout_s=300) as url:
        yield url, folder


@pytest.mark.slow
def test_the_base_column_streams_from_transformers_serve_and_stops_at_the_templates_header(served_gemma):
    url, folder = served_gemma
    engine = ServeEngine(url, folder)
    assert engine.models() == [folder]
    params = GenerationParams(max_new_tokens=64, stop=())
    # A held-out lamini_docs question that Gemma answers in one line (17 tokens), then starts the next "### Question".
    question = "Can Lamini generate technical documentation or user manuals for software projects?"
    messages = [{"role": "user", "content": question}]
    s = engine.backend("qa").stream(messages, params)
    chunks = list(s)
    assert len(chunks) > 1 and "###" not in "".join(chunks)
    assert s.tokens < params.max_new_tokens  # the server stopped at "###" itself, before the token limit
    # The same greedy answer as the app's own base column.
    (local,) = stream_all({"base": LocalBackend(ModelPool(), ModelSpec("gemma-3-270m"), "qa")}, {"base": messages},
                          params).values()  # fmt: skip
    assert "".join(chunks).strip() == "".join(local).strip()
    # No runtime LoRA API on this server: the tuned column's registration says how to start one that has it.
    with pytest.raises(BackendError, match="--enable-lora"):
        engine.register("run-1", folder)
