"""Learning from the votes: blind votes -> preference pairs, a DPO run from an SFT adapter, preference sets in the
data layer, and the guided path's vote step."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune import FinetuneError
from finetune.arena import list_adapters
from finetune.config import DataConfig, ModelSpec, TrainConfig
from finetune.data import VOTES_SOURCE, check_mapping, detect_format, is_preference, load_rows
from finetune.preferences import adapter_votes, preference_pairs, write_pairs
from finetune.runs import RunDir
from finetune.train import check_config, train
from finetune.votes import Vote, VoteStore
from tests.conftest import make_run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path))
    return tmp_path


def vote(winner: str, prompt: str, answers: tuple[str, str, str], adapter: str = "run-1") -> Vote:
    models = {"base": "base-model", "tuned": f"base-model + {adapter}", "reference": "ref-model"}
    return Vote(winner, prompt, dict(zip(("base", "tuned", "reference"), answers)), models, {"max_new_tokens": 8})


def pairs_file(path: Path, n: int = 8) -> Path:
    rows = [
        {"prompt": f"What is item {i}?", "chosen": f"Item {i} is a small blue box.", "rejected": f"No idea about {i}."}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_votes_become_pairs_without_ties_and_all_bad(home):
    store = VoteStore()
    for v in (
        vote("tuned", "Q1", ("b1", "t1", "r1")),  # the winner over each of the two others: 2 pairs
        vote("reference", "Q2", ("b2", "t2", "r2")),
        vote("tie", "Q3", ("b3", "t3", "r3")),
        vote("bad", "Q4", ("b4", "t4", "r4")),
        vote("bad", "Q5", ("b5", "t5", "r5")),
        vote("base", "Q6", ("same", "same ", "r6"), adapter="other"),  # tuned said what base said: one pair only
    ):
        store.add(v)
    votes = store.votes()
    pairs = preference_pairs(votes)
    assert pairs.summary == (
        "6 votes -> 5 pairs; 1 ties and 2 all-bad left out; 1 pairs of identical answers skipped"
    )
    assert pairs.pairs[:2] == [
        {"prompt": "Q1", "chosen": "t1", "rejected": "b1"},
        {"prompt": "Q1", "chosen": "t1", "rejected": "r1"},
    ]
    assert {(p["chosen"], p["rejected"]) for p in pairs.pairs[2:]} == {("r2", "b2"), ("r2", "t2"), ("same", "r6")}
    assert len(adapter_votes(votes, "run-1")) == 5 and len(adapter_votes(votes, "run")) == 0

    written = write_pairs(pairs, home / "pairs.jsonl")
    assert [json.loads(line) for line in written.read_text().splitlines()] == pairs.pairs  # TRL's preference format

    rows = load_rows(DataConfig(VOTES_SOURCE))  # the Arena's votes as a data set, exported when read
    assert is_preference(rows) and len(rows) == 5
    first = rows[0]
    assert (first["instruction"], first["chosen"], first["output"], first["rejected"]) == ("Q1", "t1", "t1", "b1")

    cli = subprocess.run(
        [sys.executable, "-m", "finetune", "votes", "--adapter", "run-1", "--out", str(home / "run-1.jsonl")],
        cwd=ROOT, env={**os.environ, "FINETUNE_HOME": str(home)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert "5 votes -> 4 pairs; 1 ties and 2 all-bad left out" in cli.stdout
    assert len((home / "run-1.jsonl").read_text().splitlines()) == 4


def test_no_votes_yet_says_what_to_do(home):
    with pytest.raises(FinetuneError, match="give no preference pairs yet .* vote A, B or C in blind mode"):
        load_rows(DataConfig(VOTES_SOURCE))


def test_preference_sets_are_detected_and_mapped(tmp_path):
    found = detect_format(["Prompt", "chosen", "rejected", "score"])
    assert found.format == "preference pairs (prompt/chosen/rejected)" and found.template == "qa"
    assert found.mapping == {"instruction": "Prompt", "chosen": "chosen", "rejected": "rejected"}
    assert detect_format(["prompt", "completion"]).format == "prompt/completion"  # still an SFT set
    with pytest.raises(FinetuneError, match="needs both answers"):
        check_mapping({"instruction": "prompt", "chosen": "chosen"}, ["prompt", "chosen"])
    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt,chosen,rejected\nWhat is 2+2?,4,5\nCapital of France?,Paris,Lyon\n")
    rows = load_rows(DataConfig(str(csv)))
    assert is_preference(rows) and rows[1]["output"] == "Paris" and rows[1]["rejected"] == "Lyon"
    assert not is_preference(load_rows(DataConfig("lamini_docs", max_rows=4)))


def dpo_config(model: str, data: Path, **overrides) -> TrainConfig:
    values = dict(
        method="dpo", base_adapter="latest", max_length=64, max_steps=2, batch_size=2, learning_rate=1e-2,
        warmup_steps=0, save_steps=10, logging_steps=1, mixed_precision="no",
    )  # fmt: skip
    values.update(overrides)
    return TrainConfig(model=ModelSpec(model, dtype="float32"), data=DataConfig(str(data), test_size=0.25), **values)


def test_dpo_run_from_an_sft_adapter(home, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.ui.common import adapter_choices

    sft = make_run(home, tiny_llama)  # runs/run-1: the newest SFT run on this model, so base_adapter latest is it
    run_dir = home / "runs" / "dpo-1"
    adapter = train(dpo_config(tiny_llama, pairs_file(home / "pairs.jsonl")), run_dir)
    run = RunDir(run_dir)
    status = run.read_status()
    assert status["state"] == "finished" and status["step"] == status["total"] == 2
    assert "DPO from run-1" in status["summary"] and "reward margin" in status["message"]

    metrics = run.read_metrics()
    steps = [r for r in metrics if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["loss"]) for r in steps)
    assert all("reward_margin" in r and "reward_accuracy" in r for r in steps)
    start, end = [r for r in metrics if "eval_loss" in r]
    assert (start["step"], end["step"]) == (0, 2)
    assert start["eval_loss"] == pytest.approx(math.log(2), abs=1e-4)  # at the start it is the reference itself
    assert start["eval_reward_margin"] == pytest.approx(0, abs=1e-5)
    assert end["eval_loss"] < start["eval_loss"] and end["eval_reward_margin"] > 0  # it learned the preference
    assert [p["series"] for p in run.loss_curve()].count("train") == 2  # the Train tab's chart, unchanged
    import trl.trainer.utils

    assert trl.trainer.utils._use_triton(torch.device("cpu"))  # TRL's head projected the answer positions only

    # A plain PEFT adapter: the trained one only (no reference copy, no tokenizer), with the SFT adapter's shape.
    assert sorted(p.name for p in adapter.iterdir() if p.is_dir()) == []
    assert not (adapter / "tokenizer.json").exists()
    weights = "adapter_model.safetensors"
    before, after = load_file(sft / "adapter" / weights), load_file(adapter / weights)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), adapter)
    assert list(model.peft_config) == ["default"] and model.peft_config["default"].r == 4

    infos = {a.name: a for a in list_adapters()}
    assert (infos["dpo-1"].method, infos["run-1"].method) == ("dpo", "sft")
    labels = dict((path, label) for label, path in adapter_choices())
    assert labels[str(adapter)].endswith("(DPO)") and not labels[str(sft / "adapter")].endswith("(DPO)")


def test_check_config_says_what_a_dpo_run_needs(home, tiny_llama, tmp_path):
    pairs = pairs_file(tmp_path / "pairs.jsonl")
    with pytest.raises(FinetuneError, match="No SFT run on .* has an adapter yet"):
        check_config(dpo_config(tiny_llama, pairs))
    make_run(home, tiny_llama)
    check_config(dpo_config(tiny_llama, pairs))
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"What is {i}?", "answer": f"A box {i}."}) + "\n" for i in range(4)))
    with pytest.raises(FinetuneError, match="method dpo learns from preference pairs"):
        check_config(dpo_config(tiny_llama, qa))
    with pytest.raises(FinetuneError, match="was trained on .*: set model.source to"):
        check_config(dpo_config("smollm2-135m-instruct", pairs, base_adapter="run-1"))
    with pytest.raises(FinetuneError, match="No training run at nope"):
        check_config(dpo_config(tiny_llama, pairs, base_adapter="nope"))
    with pytest.raises(FinetuneError, match="method must be one of sft, dpo"):
        check_config(dpo_config(tiny_llama, pairs, method="rlhf"))


# --- the guided path's last step ----------------------------------------------------------------------------------


@pytest.fixture
def runner(home):
    from finetune.runner import Runner

    r = Runner(poll_interval=0.1)
    yield r
    r.close()


def test_guided_vote_step_needs_10_votes_then_trains_on_them(home, runner, tiny_llama):
    from finetune.guided import STEPS, Guide, current_step
    from finetune.models import ModelPool
    from finetune.settings import Settings

    make_run(home, tiny_llama, run_id="guided-1")
    store = VoteStore(home / "votes.sqlite")
    guide = Guide(runner, ModelPool(), poll_interval=0.1, store=store)
    store.add(vote("tuned", "Not this adapter", ("b", "t", "r"), adapter="another-run"))
    for i in range(9):
        store.add(vote("tuned" if i % 3 else "reference", f"Question {i}?", (f"b{i}", f"t{i}", f"r{i}"), "guided-1"))
    with pytest.raises(FinetuneError, match=r"9 of 10 blind votes on this adapter so far: .* vote on 1 more answers"):
        next(guide.learn_from_votes("guided-1"))
    assert [i.run_id for i in runner.runs()] == ["guided-1"]  # nothing started

    store.add(vote("tie", "Question 9?", ("b9", "t9", "r9"), "guided-1"))
    steps = list(guide.learn_from_votes("guided-1", limits=Settings.current()))
    assert steps[0].step == "vote" and steps[0].message.startswith("10 votes -> 18 pairs; 1 ties and 0 all-bad")
    last = steps[-1]
    assert last.step == "vote" and last.done and not last.error, last.message
    assert last.index == len(STEPS) - 1 and "Trained on your votes (DPO" in last.message
    dpo = RunDir(runner.root / last.result["dpo_run_id"])
    assert last.result["adapter"] == str(dpo.adapter_dir) and dpo.has_adapter
    cfg = dpo.read_config()
    assert (cfg.method, cfg.base_adapter, cfg.model.source, cfg.data.template) == ("dpo", "guided-1", tiny_llama, "qa")
    # A reloaded page lands on the same step, from the files alone.
    again = current_step(runner, "guided-1")
    assert again.step == "vote" and again.done and again.result["adapter"] == last.result["adapter"]
