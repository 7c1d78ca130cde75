"""Runner: runs in subprocesses, one at a time with a FIFO queue, stop/cancel/resume, discovery of dead runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest

from finetune import FinetuneError
from finetune.config import DataConfig, ModelSpec, TrainConfig, load_train_config
from finetune.runner import Runner
from finetune.runs import RunDir, process_fields


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    rows = [{"question": f"What is thing {i}?", "answer": f"Thing {i} is {'red ' * (i % 3)}."} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cfg_for(model: str, data: str, **overrides) -> TrainConfig:
    values = dict(max_length=48, max_steps=3, batch_size=2, save_steps=2, logging_steps=1, eval_rows=0)
    values.update(mixed_precision="no", **overrides)
    return TrainConfig(model=ModelSpec(model), data=DataConfig(data, test_size=0.2), **values)


@pytest.fixture
def runner(tmp_path):
    r = Runner(tmp_path / "runs", poll_interval=0.1)
    yield r
    for info in r.runs():
        if info.state in ("queued", "running"):
            r.stop(info.run_id)
    r.close()


def _wait_for(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_second_run_waits_in_queue_then_both_finish(runner, tiny_llama, qa_file):
    first = runner.submit(cfg_for(tiny_llama, qa_file), owner="ada")
    second = runner.submit(cfg_for(tiny_llama, qa_file, max_steps=2))
    assert runner.status(first)["state"] == "running"
    status = runner.status(second)
    assert status["state"] == "queued" and status["queue_position"] == 1
    assert runner.wait(first)["state"] == "finished"
    assert runner.wait(second)["state"] == "finished"
    infos = {i.run_id: i for i in runner.runs()}
    assert infos[first].owner == "ada" and infos[second].owner is None
    assert [i.run_id for i in runner.runs(owner="ada")] == [first]
    assert infos[second].adapter_dir == RunDir(runner.root / second).adapter_dir
    assert "trainable parameters" in (runner.root / first / "train.log").read_text()


def test_cancel_queued_and_stop_running(runner, tiny_llama, qa_file):
    long = runner.submit(cfg_for(tiny_llama, qa_file, max_steps=100000, save_steps=1000))
    queued = runner.submit(cfg_for(tiny_llama, qa_file))
    assert runner.stop(queued) == "Cancelled."
    assert runner.status(queued)["state"] == "stopped" and runner.status(queued)["queue_position"] is None
    _wait_for(lambda: any("loss" in r for r in RunDir(runner.root / long).read_metrics()))
    runner.stop(long)
    status = runner.wait(long)
    assert status["state"] == "stopped", status
    assert (RunDir(runner.root / long).adapter_dir / "adapter_config.json").is_file()
    stopped_at = status["step"]
    assert RunDir(runner.root / long).latest_checkpoint().path.name == f"checkpoint-{stopped_at}"


def test_resume_from_a_chosen_earlier_checkpoint(runner, tiny_llama, qa_file):
    run_id = runner.submit(cfg_for(tiny_llama, qa_file, max_steps=4, save_steps=1, save_total_limit=0))
    assert runner.wait(run_id)["state"] == "finished"
    run = RunDir(runner.root / run_id)
    first = run.read_metrics()
    assert [c.step for c in run.checkpoints()] == [1, 2, 3, 4]
    with pytest.raises(FinetuneError, match=r"no checkpoint at step 9 \(kept: 1, 2, 3, 4\)"):
        runner.resume(run_id, checkpoint=9)
    runner.resume(run_id, checkpoint=2)
    assert "from step 2" in runner.status(run_id)["message"]
    status = runner.wait(run_id)
    assert status["state"] == "finished" and status["step"] == 4
    again = run.read_metrics()
    assert again[:2] == first[:2]  # the rows up to the checkpoint, as they were
    assert [r["step"] for r in again] == [1, 2, 3, 4]  # the later ones written once more, not twice
    log = run.log_file.read_text()
    assert log.count("step 1/4 ·") == 1 and log.count("step 3/4 ·") == log.count("step 4/4 ·") == 2  # 3, 4 again
    # From the checkpoint's weights, optimizer, data position and random state: the same steps again.
    assert [r["loss"] for r in again[2:]] == pytest.approx([r["loss"] for r in first[2:]], rel=1e-3)
    assert [r["tokens"] for r in again] == [r["tokens"] for r in first]
    assert [c.step for c in run.checkpoints()] == [1, 2, 3, 4]


def test_bad_configs_fail_before_any_process_starts(runner, tiny_llama, qa_file, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = [
        (cfg_for("no-such-model/at/all", qa_file), "neither an embedded model"),
        (cfg_for(tiny_llama, str(tmp_path / "missing.jsonl")), "No data set"),
        (cfg_for(tiny_llama, qa_file, max_length=4), "not above the prompt length"),
    ]
    for cfg, message in bad:
        with pytest.raises(FinetuneError, match=message):
            runner.submit(cfg)
    assert runner.runs() == [] and runner.active() is None


def test_dead_process_is_marked_failed_on_discovery(tmp_path, tiny_llama, qa_file):
    runs = tmp_path / "runs"
    first = Runner(runs, poll_interval=0.1)
    run_id = first.submit(cfg_for(tiny_llama, qa_file))
    first.wait(run_id)
    first.close()
    # Pretend the app died while this run trained: its status says running, with a pid that is gone.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    RunDir(runs / run_id).update_status(state="running", pid=gone.pid)
    second = Runner(runs, poll_interval=0.1)
    try:
        status = second.status(run_id)
        assert status["state"] == "failed" and "Resume" in status["message"]
        second.resume(run_id)  # continues from its last checkpoint (here: nothing left to do)
        assert second.wait(run_id)["state"] == "finished"
    finally:
        second.close()


def _discovered(runs, run_id: str, **status) -> tuple[str | None, str]:
    """(the run a new Runner holds the device for, the run's state) after a status that says it is training."""
    (runs / run_id).mkdir(parents=True, exist_ok=True)
    RunDir(runs / run_id).update_status(state="running", **status)
    runner = Runner(runs, poll_interval=0.1)
    try:
        return runner.active(), RunDir(runs / run_id).read_status()["state"]
    finally:
        runner.close()


def _started(cmd: list[str]) -> subprocess.Popen:
    """A process whose command line can be read: /proc shows an empty one for a moment after exec."""
    proc = subprocess.Popen(cmd)
    _wait_for(lambda: psutil.Process(proc.pid).cmdline(), timeout=10)
    return proc


def test_a_live_unrelated_process_is_not_taken_for_the_trainer(tmp_path):
    sleeper = _started(["sleep", "30"])
    try:  # e.g. the pid was reused after a reboot: alive, but neither a trainer nor this run's
        assert _discovered(tmp_path / "runs", "run-a", **process_fields(sleeper.pid)) == (None, "failed")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_recorded_start_time_tells_a_reused_pid_from_the_trainer(tmp_path):
    # A stand-in trainer: its command line names the run folder, as the runner's `--run-dir` does.
    trainer = _started([sys.executable, "-c", "import time; time.sleep(30)", "--run-dir", "runs/run-a"])
    try:
        fields = process_fields(trainer.pid)
        assert fields["pid_create_time"] is not None
        assert _discovered(tmp_path / "recorded", "run-a", **fields) == ("run-a", "running")
        # Runs from before the start time was recorded: the command line alone decides.
        assert _discovered(tmp_path / "older", "run-a", pid=trainer.pid) == ("run-a", "running")
        # The same pid with another start time: a different process that got the trainer's pid.
        reused = dict(fields, pid_create_time=fields["pid_create_time"] - 3600)
        assert _discovered(tmp_path / "reused", "run-a", **reused) == (None, "failed")
    finally:
        trainer.kill()
        trainer.wait()


def test_killed_process_is_reported_with_the_reason(runner, tiny_llama, qa_file):
    import os
    import signal

    run_id = runner.submit(cfg_for(tiny_llama, qa_file, max_steps=100000, save_steps=1000))
    _wait_for(lambda: RunDir(runner.root / run_id).read_status().get("step", 0) > 0)
    os.kill(RunDir(runner.root / run_id).read_status()["pid"], signal.SIGKILL)
    status = runner.wait(run_id)
    assert status["state"] == "failed" and "SIGKILL" in status["message"]


def test_train_tab_api_starts_a_run_and_reports_it(tmp_path, tiny_llama, qa_file, free_port):
    from gradio_client import Client

    from finetune.settings import Settings
    from finetune.ui import build_app

    runner = Runner(tmp_path / "runs", poll_interval=0.1)
    app = build_app(Settings(base_model=tiny_llama, reference_model=tiny_llama), runner=runner).queue()
    app.launch(server_name="127.0.0.1", server_port=free_port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{free_port}/", verbose=False)
        form = [tiny_llama, qa_file, "qa", "none", 3, 1e-3, 2, 48, 4]  # model, data, template, quant, steps, lr...
        form += [8, 0.0, 1, 0, 0, 2, None, 1, "float32", "all-linear", False, True]  # the advanced ones
        run_id, _ = client.predict(*form, api_name="/train_start")
        assert run_id.startswith("20") and (runner.root / run_id / "config.yaml").is_file()
        assert load_train_config(runner.root / run_id / "config.yaml").gradient_checkpointing  # the last box
        assert runner.wait(run_id)["state"] == "finished"
        status = client.predict(run_id, api_name="/train_status")
        assert status["state"] == "finished" and status["step"] == 3
        runs = client.predict(api_name="/runs")
        assert runs[0]["run_id"] == run_id and runs[0]["adapter"].endswith("adapter")
        assert "not running" in client.predict(run_id, api_name="/train_stop")
        with pytest.raises(Exception, match="max_length"):
            client.predict(*form[:7], 9, *form[8:], api_name="/train_start")
    finally:
        app.close()
        runner.close()


def test_one_training_process_per_gpu(tmp_path, monkeypatch, tiny_llama, qa_file):
    """Two GPUs: two runs train at once, each child seeing only its own GPU; a third waits for a free one."""
    from finetune.hardware import GPU, Machine

    gpus = (GPU(0, "A", 24.0, (8, 9)), GPU(1, "B", 24.0, (8, 9)))
    monkeypatch.setattr("finetune.runner.machine", lambda: Machine(gpus=gpus))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = tmp_path / "trainer"  # stands in for `python -m finetune train --run-dir DIR`: notes what it sees
    fake.write_text('#!/bin/sh\necho "$CUDA_VISIBLE_DEVICES" > "$5/visible"\nsleep 60\n')
    fake.chmod(0o755)
    runner = Runner(tmp_path / "runs", python=str(fake), poll_interval=0.1)
    try:
        ids = [runner.submit(cfg_for(tiny_llama, qa_file)) for _ in range(3)]
        _wait_for(lambda: all((runner.root / i / "visible").is_file() for i in ids[:2]))
        seen = sorted((runner.root / i / "visible").read_text().strip() for i in ids[:2])
        assert seen == ["0", "1"]
        assert {RunDir(runner.root / i).read_status()["device"] for i in ids[:2]} == {"cuda:0", "cuda:1"}
        assert runner.status(ids[2])["queue_position"] == 1 and set(runner.busy_devices()) == {"cuda:0", "cuda:1"}
        runner.stop(ids[0])
        _wait_for(lambda: (runner.root / ids[2] / "visible").is_file())
        assert (
            RunDir(runner.root / ids[2]).read_status()["device"]
            == RunDir(runner.root / ids[0]).read_status()["device"]
        )
    finally:
        for i in ids:
            runner.stop(i)
        runner.close()
