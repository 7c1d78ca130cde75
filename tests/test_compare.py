"""Comparing runs: the settings that differ (exactly those), loss curves by step or tokens, results side by side, the
CLI's table and the Train tab's compare_runs endpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from finetune import FinetuneError
from finetune.compare import compare_runs, differing_settings, flatten, format_table, loss_curves
from finetune.config import DataConfig, ModelSpec, TrainConfig
from finetune.runs import RunDir

ROOT = Path(__file__).resolve().parent.parent


def _run(root: Path, run_id: str, cfg: TrainConfig, losses: list[float], tokens_per_step: int | None) -> RunDir:
    run = RunDir(root / "runs" / run_id)
    run.path.mkdir(parents=True)
    run.write_config(cfg)
    rows = [{"step": 0, "eval_loss": losses[0] + 0.5}]
    rows += [{"step": i, "loss": loss} for i, loss in enumerate(losses, 1)]
    rows.append({"step": len(losses), "eval_loss": losses[-1] + 0.25})
    for row in rows:
        if tokens_per_step is not None:
            row["tokens"] = row["step"] * tokens_per_step
        run.append_metrics(row)
    return run


@pytest.fixture
def two_runs(tmp_path) -> tuple[RunDir, RunDir]:
    """Two runs whose configs differ in exactly two settings, one of them nested; only the first is evaluated."""
    base = TrainConfig(model=ModelSpec("tiny", dtype="float32"), data=DataConfig("qa.jsonl"), max_steps=3)
    other = replace(base, model=replace(base.model, dtype="bfloat16"), learning_rate=1e-4)
    first = _run(tmp_path, "run-a", base, [3.0, 2.5, 2.0], tokens_per_step=100)
    second = _run(tmp_path, "run-b", other, [3.1, 2.9, 2.8], tokens_per_step=None)  # from before tokens were kept
    summary = {"base": {"loss": 2.6, "f1": 0.25}, "tuned": {"loss": 2.0, "f1": 0.5}}
    first.write_eval({"questions": 8, "summary": summary, "rows": []})
    return first, second


def test_flatten_dots_nested_keys():
    assert flatten({"model": {"dtype": "auto", "source": "x"}, "lr": 1, "data": {"mapping": None}}) == {
        "model.dtype": "auto", "model.source": "x", "lr": 1, "data.mapping": None
    }  # fmt: skip
    assert differing_settings({"a": {"x": {"y": 1}, "z": [1, 2]}, "b": {"x": {"y": 1}, "z": [1, 3]}}) == [
        {"setting": "z", "a": [1, 2], "b": [1, 3]}
    ]


def test_two_runs_differ_in_exactly_the_two_settings_changed(two_runs):
    first, second = two_runs
    comparison = compare_runs([first, second])
    assert comparison.settings == [
        {"setting": "model.dtype", "run-a": "float32", "run-b": "bfloat16"},
        {"setting": "learning_rate", "run-a": 5e-4, "run-b": 1e-4},
    ]
    results = {row["result"]: row for row in comparison.results}
    assert results["last training loss"] == {"result": "last training loss", "run-a": 2.0, "run-b": 2.8}
    assert results["last held-out loss"]["run-a"] == 2.25 and results["steps"]["run-b"] == 3
    assert results["tokens seen"] == {"result": "tokens seen", "run-a": 300, "run-b": None}
    # Evaluation numbers side by side: the tuned model's first; a run without an evaluation has none.
    assert results["held-out loss (tuned)"] == {"result": "held-out loss (tuned)", "run-a": 2.0, "run-b": None}
    assert results["token F1 (base)"]["run-a"] == 0.25 and results["evaluated questions"]["run-a"] == 8
    with pytest.raises(FinetuneError, match="two or more runs"):
        compare_runs([first])
    with pytest.raises(FinetuneError, match="picked twice"):
        compare_runs([first, first])


def test_a_recipe_run_on_two_cpu_classes_shows_what_each_run_used(tmp_path):
    """The same recipe (`auto` dtype, batch and steps) on a native-bfloat16 CPU and an AVX2 one: the settings that
    differ are the ones each run decided, and the held-out losses the guided path measured are side by side."""
    recipe = TrainConfig(model=ModelSpec("tiny"), data=DataConfig("qa.jsonl"), max_steps="auto", batch_size="auto")
    native, avx2 = (_run(tmp_path, name, recipe, [2.0, 1.8], tokens_per_step=64) for name in ("native", "avx2"))
    native.update_status(decided={"dtype": "bfloat16", "mixed_precision": "no", "batch_size": 8}, planned_steps=269)
    avx2.update_status(decided={"dtype": "float32", "mixed_precision": "no", "batch_size": 4}, planned_steps=164)
    native.write_guided({"loss_before": 2.25, "loss_after": 1.79, "reduction": 0.2})
    comparison = compare_runs([native, avx2])
    assert comparison.settings == [
        {"setting": "model.dtype", "native": "bfloat16", "avx2": "float32"},
        {"setting": "max_steps", "native": 269, "avx2": 164},
        {"setting": "batch_size", "native": 8, "avx2": 4},
    ]
    results = {row["result"]: row for row in comparison.results}
    assert results["held-out loss before (guided path)"] == {"result": "held-out loss before (guided path)",
                                                             "native": 2.25, "avx2": None}  # fmt: skip
    assert results["held-out loss after (guided path)"]["native"] == 1.79


def test_loss_curves_one_line_per_run_and_series_by_step_or_tokens(two_runs):
    by_step = loss_curves(list(two_runs))
    assert {p["line"] for p in by_step} == {"run-a · train", "run-a · held-out", "run-b · train", "run-b · held-out"}
    assert [p["step"] for p in by_step if p["line"] == "run-b · train"] == [1, 2, 3]
    by_tokens = loss_curves(list(two_runs), x="tokens")
    assert [(p["tokens"], p["loss"]) for p in by_tokens if p["line"] == "run-a · train"] == [
        (100, 3.0), (200, 2.5), (300, 2.0)
    ]  # fmt: skip
    assert not [p for p in by_tokens if p["run"] == "run-b"]  # no tokens recorded: not on that axis
    with pytest.raises(FinetuneError, match="x axis is one of step, tokens"):
        loss_curves(list(two_runs), x="epoch")


def test_cli_compare_prints_the_table(two_runs, tmp_path):
    env = {**os.environ, "FINETUNE_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "finetune", "compare", "run-a", str(two_runs[1].path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    settings = done.stdout.split("Results:")[0]
    assert format_table(compare_runs(list(two_runs)).settings) in settings
    lines = [line.split() for line in settings.splitlines() if line.strip()]
    assert ["setting", "run-a", "run-b"] in lines
    assert ["model.dtype", "float32", "bfloat16"] in lines and ["learning_rate", "0.0005", "0.0001"] in lines
    assert len(lines) == 4  # the title, the header, the two settings
    assert ["last", "training", "loss", "2", "2.8"] in [line.split() for line in done.stdout.splitlines()]
    alone = subprocess.run([sys.executable, "-m", "finetune", "compare", "run-a"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert alone.returncode == 2 and "Pick two or more runs" in alone.stderr


def test_the_train_tab_compares_runs_through_its_endpoint(two_runs, tmp_path, tiny_llama, free_port):
    from finetune.runner import Runner
    from finetune.settings import Settings
    from tests.test_workshop import client, running_app

    runner = Runner(tmp_path / "runs", poll_interval=0.1)
    settings = Settings(base_model=tiny_llama, reference_model=tiny_llama)
    try:
        with running_app(settings, free_port, runner=runner) as url:
            _, chart, settings, results = client(url).predict(["run-a", "run-b"], "tokens", api_name="/compare_runs")
            assert [row[0] for row in settings["data"]] == ["model.dtype", "learning_rate"]
            assert settings["headers"] == ["setting", "run-a", "run-b"] and "last held-out loss" in json.dumps(results)
            plot = chart  # the points by tokens seen (the axis title follows the radio in the page)
            assert plot["columns"] == ["x", "loss", "run", "series", "line"] and max(r[0] for r in plot["data"]) == 300
            assert {row[-1] for row in plot["data"]} == {"run-a · train", "run-a · held-out"}  # run-b kept no tokens
            with pytest.raises(Exception, match="not in the list of choices"):  # only listed runs
                client(url).predict(["run-a", "../run-b"], "step", api_name="/compare_runs")
    finally:
        runner.close()
