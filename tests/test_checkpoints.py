"""Every checkpoint is usable: a real tiny run's checkpoints list their losses, and one of them is evaluated, answers
in the Arena and is exported, like the final adapter. (Retention: tests/test_runs.py and test_train.py; resume from
a chosen checkpoint: tests/test_runner.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.arena import ArenaSession, ArenaSetup, ask, list_adapters, make_backends
from finetune.config import GenerationParams
from finetune.evaluate import evaluate_run
from finetune.export import export_merged
from finetune.models import ModelPool
from finetune.runs import RunDir
from finetune.train import train
from tests.test_train import qa_file, tiny_config  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def trained(tiny_llama, qa_file, tmp_path_factory) -> RunDir:  # noqa: F811
    """A finished 4-step run in <home>/runs with checkpoints at steps 2 and 4."""
    home = tmp_path_factory.mktemp("home")
    run = RunDir(home / "runs" / "ckpt-run")
    train(tiny_config(tiny_llama, qa_file, max_steps=4, save_steps=2, save_total_limit=0), run.path)
    return run


@pytest.fixture
def home(trained, monkeypatch) -> Path:
    monkeypatch.setenv("FINETUNE_HOME", str(trained.path.parent.parent))
    return trained.path.parent.parent


def test_checkpoints_list_their_step_train_and_held_out_loss(trained):
    metrics = trained.read_metrics()
    infos = trained.checkpoint_infos()
    assert [c.step for c in infos] == [2, 4]
    for c in infos:
        assert c.loss == next(r["loss"] for r in metrics if r["step"] == c.step and "loss" in r)
        assert c.eval_loss == next(r["eval_loss"] for r in metrics if r["step"] == c.step and "eval_loss" in r)


def test_a_checkpoint_is_evaluated_apart_from_the_final_adapter(trained, home):
    pool, params = ModelPool(), GenerationParams(max_new_tokens=8)
    early = evaluate_run("ckpt-run", checkpoint=2, limit=3, pool=pool, params=params, embedding_model=None)
    assert early["checkpoint"] == 2 and early["adapter"] == str(trained.adapter_path(2))
    assert trained.read_eval(2)["summary"] == early["summary"] and trained.read_eval() is None
    final = evaluate_run("ckpt-run", limit=3, pool=pool, params=params, embedding_model=None)
    assert final["checkpoint"] is None and trained.read_eval()["summary"] == final["summary"]
    assert early["summary"]["base"]["loss"] == pytest.approx(final["summary"]["base"]["loss"])  # the same base
    assert early["summary"]["tuned"]["loss"] != pytest.approx(final["summary"]["tuned"]["loss"])  # other weights


def test_a_checkpoint_answers_in_the_arena(trained, home, tiny_llama):
    listed = {a.name: a for a in list_adapters()}
    assert list(listed) == ["ckpt-run", "ckpt-run · step 4", "ckpt-run · step 2"]  # final, then newest first
    early = listed["ckpt-run · step 2"]
    assert early.path == trained.adapter_path(2) and early.origin == "checkpoint"
    assert (early.base_model, early.template) == (tiny_llama, "qa")  # from the run's config, two levels up
    backends = make_backends(ModelPool(), ArenaSetup(base_model=tiny_llama, adapter=early.path))
    assert backends["tuned"].label == f"{tiny_llama} + ckpt-run · step 2"
    del backends["reference"]
    params = GenerationParams(max_new_tokens=8, stop=())
    columns = list(ask(backends, ArenaSession.start(), "What is item number 3 of the list?", params))[-1]
    assert not columns["tuned"].error and columns["tuned"].tokens == 8 and columns["tuned"].text.strip()


def test_a_checkpoint_is_exported_merged_into_its_base(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    weights = {}
    for step in (2, None):
        out = export_merged(trained.path, tmp_path / f"merged-{step}", step=step)
        weights[step] = AutoModelForCausalLM.from_pretrained(out).model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(weights[2], weights[None])  # the checkpoint's adapter, not the final one
