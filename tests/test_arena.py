"""The Arena: columns, blind rounds, votes in SQLite, Elo / Bradley-Terry, and the app's named endpoints."""

from __future__ import annotations

import json
import random
import threading
import zipfile
from pathlib import Path

import pytest
import yaml

from finetune import FinetuneError
from finetune.arena import (
    LABELS,
    NO_ADAPTER,
    ArenaSession,
    ArenaSetup,
    Pace,
    Unavailable,
    ask,
    battles,
    install_adapter,
    list_adapters,
    make_backends,
    measured_note,
)
from finetune.backends import Backend, LocalBackend, OpenAIBackend
from finetune.config import GenerationParams
from finetune.generate import TextStream
from finetune.models import ModelPool
from finetune.settings import Settings
from finetune.votes import Vote, VoteStore
from tests.test_generate_backends import make_tiny_adapter

PARAMS = GenerationParams(max_new_tokens=24, stop=())


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def trained_adapter(tiny_llama, tmp_path_factory) -> Path:
    return make_tiny_adapter(tiny_llama, tmp_path_factory.mktemp("adapter"))


def _fake_run(home: Path, adapter: Path, base_model: str, run_id: str = "run-1") -> Path:
    """A training run folder as the Train tab leaves it: config.yaml + adapter/."""
    run = home / "runs" / run_id
    (run / "adapter").mkdir(parents=True)
    for f in adapter.iterdir():
        (run / "adapter" / f.name).write_bytes(f.read_bytes())
    config = {
        "model": {"source": base_model, "quantization": "4bit"},
        "data": {"source": "lamini_docs", "template": "alpaca"},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run / "adapter"


class Scripted(Backend):
    """Answers with fixed chunks; after the first chunk it waits for `gate` (when given)."""

    def __init__(self, name: str, chunks: list[str], gate: threading.Event | None = None):
        self.name, self.chunks, self.gate = name, chunks, gate

    @property
    def label(self) -> str:
        return self.name

    def stream(self, messages, params) -> TextStream:
        def chunks(out: TextStream):
            for i, c in enumerate(self.chunks):
                if i == 1 and self.gate is not None:
                    assert self.gate.wait(30)
                yield c
            out.tokens = len(self.chunks)

        return TextStream(chunks)


# --- adapters and columns -------------------------------------------------------------------------


def test_adapters_are_listed_with_their_training_model_and_template(home, trained_adapter, tiny_llama, tmp_path):
    path = _fake_run(home, trained_adapter, tiny_llama)
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in trained_adapter.iterdir():
            z.write(f, f"nested/{f.name}")
    uploaded = install_adapter([archive], "my adapter")
    infos = {a.name: a for a in list_adapters()}
    assert infos["run-1"].path == path and infos["run-1"].template == "alpaca"
    assert infos["run-1"].base_model == tiny_llama and infos["run-1"].origin == "run"
    assert infos["my-adapter"].path == uploaded.path == home / "adapters" / "my-adapter"
    assert infos["my-adapter"].base_model == tiny_llama  # from adapter_config.json
    with pytest.raises(Exception, match="lacks adapter_model.safetensors"):
        install_adapter([trained_adapter / "adapter_config.json"], "half")


def test_make_backends_shares_the_base_model_and_uses_each_columns_format(home, trained_adapter, tiny_llama):
    path = _fake_run(home, trained_adapter, tiny_llama)
    pool = ModelPool()
    backends = make_backends(pool, ArenaSetup(base_model=tiny_llama, adapter=path, reference_model=tiny_llama))
    base, tuned, reference = backends["base"], backends["tuned"], backends["reference"]
    assert isinstance(tuned, LocalBackend) and tuned.spec.key == base.spec.key  # one model, one batched pass
    assert base.template == tuned.template == "alpaca" and reference.template == "chat"
    assert tuned.label == f"{tiny_llama} + run-1"
    with pytest.raises(FinetuneError, match="Could not download adapter 'someone/no-such-lora'"):
        make_backends(pool, ArenaSetup(adapter="someone/no-such-lora"))  # the tests run with HF_HUB_OFFLINE=1
    endpoint = ArenaSetup(adapter=None, endpoint_url="http://127.0.0.1:9/v1", endpoint_model="m", api_key="k")
    backends = make_backends(pool, endpoint)
    assert isinstance(backends["reference"], OpenAIBackend) and isinstance(backends["tuned"], Unavailable)


def test_three_columns_stream_interleaved_with_per_column_history(home, trained_adapter, tiny_llama):
    path = _fake_run(home, trained_adapter, tiny_llama)
    pool = ModelPool()
    backends = make_backends(pool, ArenaSetup(base_model=tiny_llama, adapter=path, template="qa"))
    gate = threading.Event()
    backends["reference"] = Scripted("ref", ["Paris", " is", " the capital."], gate)
    session = ArenaSession.start()
    all_streaming = False
    for columns in ask(backends, session, "What is Lamini?", PARAMS):
        if all(c.text for c in columns.values()) and not any(c.done for c in columns.values()):
            all_streaming = True
        if columns["base"].text and columns["tuned"].text:
            gate.set()
    assert all_streaming  # every column had output before any had finished
    assert columns["base"].text != columns["tuned"].text and columns["reference"].text == "Paris is the capital."
    assert columns["base"].tokens == columns["tuned"].tokens == PARAMS.max_new_tokens
    # A follow-up keeps each column's own history.
    first = {role: col.text.strip() for role, col in columns.items()}
    for _ in ask(backends, session, "And then?", PARAMS):
        pass
    for role, h in session.histories.items():
        assert [m["role"] for m in h] == ["user", "assistant"] * 2
        assert (h[0]["content"], h[1]["content"], h[2]["content"]) == ("What is Lamini?", first[role], "And then?")
    assert session.histories["reference"][3]["content"] == "Paris is the capital."


def test_a_column_without_adapter_says_what_to_do_while_others_answer(home, tiny_llama):
    backends = make_backends(ModelPool(), ArenaSetup(base_model=tiny_llama, reference_model=tiny_llama))
    final = list(ask(backends, ArenaSession.start(), "Hi", PARAMS))[-1]
    assert final["tuned"].hint == NO_ADAPTER and not final["tuned"].error and "Fine-tune in 5 minutes" in NO_ADAPTER
    assert final["base"].text and final["reference"].text and not final["base"].error


# --- blind rounds and votes -------------------------------------------------------------------------


def test_blind_order_is_random_and_the_reveal_maps_back():
    orders = {tuple(ArenaSession.start(blind=True, rng=random.Random(seed)).order) for seed in range(40)}
    assert len(orders) == 6  # every permutation of three columns shows up
    assert ArenaSession.start(blind=False).order == ["base", "tuned", "reference"]
    session = ArenaSession.start(blind=True, rng=random.Random(3))
    backends = {role: Scripted(f"model-{role}", [f"answer of {role}"]) for role in ("base", "tuned", "reference")}
    for _ in ask(backends, session, "Q?", PARAMS):
        pass
    # The user sees answers by position; the one showing the tuned answer is the one they vote for.
    shown = {label: session.histories[role][-1]["content"] for label, role in zip(LABELS, session.order)}
    best = next(label for label, text in shown.items() if text == "answer of tuned")
    vote = session.vote(best)
    assert vote.winner == "tuned" and vote.models["tuned"] == "model-tuned" and vote.order == session.order
    assert vote.answers == {r: f"answer of {r}" for r in ("base", "tuned", "reference")}
    with pytest.raises(Exception, match="already voted"):
        session.vote("A")
    for _ in ask(backends, session, "Next round", PARAMS):
        pass
    assert not session.voted and len(session.histories["base"]) == 2  # a vote ends the round


def test_votes_persist_across_reopening_the_database(tmp_path):
    path = tmp_path / "votes.sqlite"
    votes = [
        Vote("tuned", "Q1", {"base": "a", "tuned": "b"}, {"base": "m1", "tuned": "m2"}, {"max_new_tokens": 8}),
        Vote("tie", "Q2", {"base": "c", "tuned": "d"}, {"base": "m1", "tuned": "m2"}, {"max_new_tokens": 8}),
    ]
    store = VoteStore(path)
    ids = [store.add(v) for v in votes]
    del store
    reopened = VoteStore(path).votes()  # a new store object, as after an app restart
    assert [v.id for v in reopened] == ids
    assert [(v.winner, v.prompt, v.answers, v.models, v.settings) for v in reopened] == [
        (v.winner, v.prompt, v.answers, v.models, v.settings) for v in votes
    ]
    assert reopened[0].time == pytest.approx(votes[0].time)


# --- votes as battles ---------------------------------------------------------------------------------


def test_votes_become_pairwise_battles():
    models = {"base": "b", "tuned": "t", "reference": "r"}
    votes = [Vote("tuned", "", {}, models, {}), Vote("bad", "", {}, models, {})]
    assert battles(votes) == [
        ("b", "t", "b"),
        ("t", "r", "a"),  # base vs reference is unknown when tuned was best
        ("b", "t", "tie"),
        ("b", "r", "tie"),
        ("t", "r", "tie"),
    ]


# --- the app's named endpoints ---------------------------------------------------------------------


def test_arena_vote_and_leaderboard_endpoints(home, trained_adapter, tiny_llama, free_port):
    from gradio_client import Client

    from finetune.ui import build_app

    _fake_run(home, trained_adapter, tiny_llama)
    settings = Settings(base_model=tiny_llama, reference_model=tiny_llama, max_new_tokens=32)
    app = build_app(settings).queue()
    app.launch(server_name="127.0.0.1", server_port=free_port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{free_port}/", verbose=False)
        job = client.submit("What is Lamini?", 16, 0.7, 0.95, True, True, api_name="/arena")  # blind
        updates = list(job)
        result = job.result()
        chats, stats = result[:3], result[3:6]
        assert len(updates) > 2  # streamed
        assert all([m["role"] for m in chat] == ["user", "assistant"] for chat in chats)
        assert all("tokens/s" in s for s in stats)
        *_chats, verdict, _board, _csv = client.predict("B", api_name="/vote")
        assert "**A** = " in verdict and "**B** = " in verdict
        table, csv_path = client.predict(api_name="/leaderboard")
        assert len(table["data"]) == 2  # base and tuned; the reference is the same tiny model as base
        assert Path(csv_path).read_text().startswith("model,elo")
    finally:
        app.close()
    # The vote survives the app: a new store on the same data dir reads it.
    (vote,) = VoteStore().votes()
    assert vote.prompt == "What is Lamini?" and vote.winner == vote.order[1]
    assert json.dumps(vote.settings)  # settings stored as plain JSON


@pytest.mark.parametrize("folder", ["gemma-3-270m", "gemma-3-270m-bf16"])
def test_adapter_naming_the_embedded_cache_folder_maps_to_the_embedded_model(tmp_path, folder):
    """Adapters made on a cached embedded model (older and current cache folders) share the pooled base model."""
    from finetune.arena import adapter_info
    from finetune.models import model_cache

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"base_model_name_or_path": str(model_cache() / folder), "peft_type": "LORA"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert adapter_info(adapter).base_model == "gemma-3-270m"


def test_embedded_model_records_its_short_name_for_adapters():
    from finetune.config import ModelSpec
    from finetune.models import load_model

    model, _ = load_model(ModelSpec("smollm2-135m-instruct"))
    assert model.config.name_or_path == "smollm2-135m-instruct"


def test_the_tuned_column_carries_what_the_guided_path_measured(tmp_path, tiny_llama):
    from conftest import make_run

    from finetune.runs import RunDir
    from finetune.ui.arena_tab import _chats

    run = RunDir(make_run(tmp_path, tiny_llama))
    assert measured_note(run.adapter_dir) == "" and measured_note(None) == ""  # nothing measured yet
    run.write_guided({"loss_before": 2.254, "loss_after": 1.786, "reduction": 0.2076, "questions": 40})
    assert measured_note(run.adapter_dir) == "held-out loss 2.25 → 1.79 (-21%)"
    assert measured_note(run.checkpoints_dir / "checkpoint-3") == ""  # a checkpoint: the numbers are the final one's
    session = ArenaSession.start()
    session.models, session.notes = {"tuned": "tiny + run-1"}, {"tuned": measured_note(run.adapter_dir)}
    titles = [chat.label for chat in _chats(session)[:3]]
    assert titles[1] == "Tuned · tiny + run-1 · held-out loss 2.25 → 1.79 (-21%)" and titles[0] == "Base"
    blind = ArenaSession.start(blind=True)
    blind.notes = session.notes
    assert all("held-out" not in chat.label for chat in _chats(blind)[:3])  # blind: no names, no numbers


def test_rounds_in_flight_share_the_screen_updates_and_each_sends_its_last():
    now = [0.0]
    pace = Pace(per_s=10, clock=lambda: now[0])

    def updates(times):
        for t in times:
            now[0] = t
            yield t

    assert list(pace.paced(updates([0, 0.05, 0.1, 0.15, 0.31, 0.32]))) == [0, 0.1, 0.31, 0.32]
    other = pace.paced(iter(range(3)))
    next(other)  # a second round in flight: each gets half of the 10 updates a second
    assert list(pace.paced(updates([0, 0.1, 0.2, 0.25]))) == [0, 0.2, 0.25]
    other.close()
    assert pace.rounds == 0
