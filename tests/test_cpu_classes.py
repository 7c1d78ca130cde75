"""The AVX2 class, reproduced on whatever CPU runs the tests: oneDNN and ATen capped to AVX2 compute bfloat16 on
torch's reference path, as an AVX2-only laptop does (measured 20-38x slower than float32). The quick start and the
Arena must pick float32 there and get going: a regression to bfloat16 would do one step in minutes, not several."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.runs import RunDir

ROOT = Path(__file__).resolve().parent.parent
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}

ARENA = """
import json
from finetune.arena import ArenaSession, ArenaSetup, ask, make_backends
from finetune.config import GenerationParams
from finetune.hardware import inference_dtype_name
from finetune.models import ModelPool
backends = make_backends(ModelPool(), ArenaSetup(adapter={adapter!r}))
for columns in ask(backends, ArenaSession.start(), "What is Lamini?", GenerationParams(max_new_tokens=12)):
    pass
print(json.dumps({{"dtype": inference_dtype_name(), "columns": {{r: [c.text, c.error] for r, c in columns.items()}}}}))
"""


@pytest.mark.slow
def test_quick_start_and_arena_on_the_avx2_class(tmp_path):
    env = {**os.environ, **AVX2, "FINETUNE_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("FINETUNE_APP_DEVICE", None)
    run_dir = tmp_path / "runs" / "quick"
    # The quick start's own recipe, 3 steps and no time budget: how many steps a budget fits depends on how busy the
    # machine is (a 3-minute budget planned 1 step of 10 s with the suite beside it), which is no verdict on the
    # class; the plan itself is pinned with an injected step time (test_train.py). What the class decides is the test.
    cmd = [sys.executable, "-m", "finetune", "train", "--config", "quickstart_cpu", "--run-dir", str(run_dir)]
    cmd += ["--set", "max_steps=3", "--set", "max_minutes=0", "--set", "logging_steps=1", "--set", "data.max_rows=40"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    status = RunDir(run_dir).read_status()
    assert "cpu: float32 weights, no autocast" in status["summary"]
    assert status["state"] == "finished" and status["step"] == 3
    assert all(r["loss"] > 0 for r in RunDir(run_dir).read_metrics() if "loss" in r)

    arena = subprocess.run(
        [sys.executable, "-c", ARENA.format(adapter=str(run_dir / "adapter"))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert arena.returncode == 0, arena.stderr[-3000:]
    out = json.loads(arena.stdout.strip().splitlines()[-1])
    assert out["dtype"] == "float32"
    for role, (text, error) in out["columns"].items():
        assert error is None and text.strip(), role
