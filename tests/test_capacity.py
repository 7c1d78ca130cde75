"""A room of participants: each waiting user sees an estimated wait (Train queue, Arena), and the capacity bench's
N=2 row serves everyone with the real embedded models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from finetune.runner import Runner
from finetune.runs import RunDir
from finetune.settings import Settings
from finetune.ui.train_tab import status_markdown
from tests.test_runner import cfg_for
from tests.test_workshop import ROOT, client, running_app


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FINETUNE_AUTH", raising=False)
    return tmp_path / "home"


def test_a_queued_run_sees_its_place_and_an_estimated_wait(home, tiny_llama, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": f"A{i}."}) + "\n" for i in range(8)))
    sleeper = tmp_path / "sleeper"  # stands in for the trainer: "trains" until stopped
    sleeper.write_text("#!/bin/sh\nsleep 60\n")
    sleeper.chmod(0o755)
    runner = Runner(home / "runs", python=str(sleeper), poll_interval=0.1)
    try:
        first = runner.submit(cfg_for(tiny_llama, str(data), max_steps=60))
        second = runner.submit(cfg_for(tiny_llama, str(data), max_steps=30))
        third = runner.submit(cfg_for(tiny_llama, str(data), max_steps=50, max_minutes=1.0))
        fourth = runner.submit(cfg_for(tiny_llama, str(data)))
        assert runner.status(second)["wait_s"] is None  # the running run has not timed its steps yet
        RunDir(runner.root / first).update_status(step=10, total=60, eta_s=100.0)  # 2 s a step, 100 s to go
        assert runner.wait_s(first) is None  # training, not waiting
        assert runner.wait_s(second) == 100.0
        assert runner.wait_s(third) == 100.0 + 30 * 2.0  # the second run's 30 steps at the running pace
        assert runner.wait_s(fourth) == 160.0 + 60.0  # the third's 50 steps end at its 1-minute budget
        status = runner.status(third)
        assert status["queue_position"] == 2
        assert "position 2 in the queue, about 2 min 40 s to wait" in status_markdown(status)
        RunDir(runner.root / first).update_status(step=60, eta_s=0.0)  # all steps done: evaluating, then free
        assert runner.wait_s(second) == 0.0
    finally:
        for run_id in (fourth, third, second, first):
            runner.stop(run_id)
        runner.close()


def test_the_arena_tells_how_long_a_round_takes_here(home, tiny_llama, free_port):
    settings = Settings(base_model=tiny_llama, reference_model=tiny_llama, max_new_tokens=32)
    with running_app(settings, free_port) as url:
        browser = client(url)
        assert browser.predict("What is Lamini?", 16, api_name="/arena")[-1] == ""  # nothing measured yet
        line = browser.predict("And LoRA?", 16, api_name="/arena")[-1]
    assert line.startswith("A round takes about ") and "(average of the last 1)" in line
    assert "2 at a time are answered" in line and "each place ahead of you in the queue adds about" in line


@pytest.mark.slow
def test_the_capacity_benchs_two_participant_row_serves_everyone(monkeypatch, tmp_path):
    """`bench/workshop.py`'s N=2 row, with the real Gemma and SmolLM2 in `python app.py`: all served, none failed."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.setattr(sys, "argv", ["workshop.py"])
    import workshop
    from common import pick_adapter

    from finetune.config import ModelSpec
    from finetune.models import BASE_MODEL, load_model

    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "runs-here"))  # no trained runs: a random LoRA
    adapter, _ = pick_adapter(BASE_MODEL, lambda: load_model(ModelSpec(BASE_MODEL))[0], str(tmp_path))
    questions = workshop.held_out_questions()
    with workshop.app_server({"FINETUNE_HOME": str(tmp_path / "home")}) as url:
        row = workshop.measure(url, 2, questions, max_new_tokens=16, adapter=str(adapter.path))
    assert (row["participants"], row["answers"], row["errors"]) == (2, 2, 0), row
    assert row["first token p50 s"] <= row["full answer p50 s"] and row["answers/min"] > 0
    assert workshop.capacity([row], limit_s=float("inf")) == 2
