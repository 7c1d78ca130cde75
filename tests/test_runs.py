"""The run folder: status merged and written atomically, metrics that survive a cut line, the checkpoint a resume
starts from, run ids that are never paths, and the one list of runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from finetune import FinetuneError
from finetune.runs import (
    RunDir,
    adapter_ref,
    check_run_id,
    list_runs,
    open_run,
    parse_adapter_ref,
    run_of_adapter,
    write_json_atomic,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def run(tmp_path) -> RunDir:
    path = tmp_path / "runs" / "run-1"
    path.mkdir(parents=True)
    return RunDir(path)


def test_status_updates_merge_and_leave_no_temp_file(run, monkeypatch):
    run.update_status(state="queued", owner="ada")
    status = run.update_status(state="running", step=3)
    assert status["owner"] == "ada" and status["state"] == "running" and status["step"] == 3
    assert run.read_status() == status
    assert sorted(p.name for p in run.path.iterdir()) == [".status.lock", run.status_file.name]

    def no_space(*_):
        raise OSError("No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError):
        run.update_status(step=4)
    assert run.read_status() == status  # the last complete status, never half of one
    assert sorted(p.name for p in run.path.iterdir()) == [".status.lock", run.status_file.name]  # no temp file


def test_write_json_atomic_replaces_the_whole_file(tmp_path):
    path = tmp_path / "x.json"
    write_json_atomic(path, {"a": "é" * 1000})
    write_json_atomic(path, {"b": 1})
    assert json.loads(path.read_text()) == {"b": 1} and sorted(os.listdir(tmp_path)) == ["x.json"]


def test_metrics_skip_a_cut_line_and_truncate_after_a_step(run):
    for step in (1, 2, 3, 4):
        run.append_metrics({"step": step, "loss": 5.0 - step, "elapsed": 10.0 * step})
    with open(run.metrics_file, "a") as f:
        f.write('{"step": 5, "lo')  # the trainer was killed in the middle of a line
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3, 4]
    assert run.truncate_metrics(2) == 20.0  # the time trained up to the checkpoint a resume starts from
    assert [r["step"] for r in run.read_metrics()] == [1, 2]
    run.clear_metrics()
    assert run.read_metrics() == [] and run.truncate_metrics(0) == 0.0


def test_loss_curve_names_its_series_train_and_held_out(run):
    rows = [{"step": 0, "eval_loss": 3.0}, {"step": 1, "loss": 2.5}, {"step": 2, "loss": float("nan")}]
    run.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run.loss_curve() == [
        {"step": 0, "loss": 3.0, "series": "held-out"},
        {"step": 1, "loss": 2.5, "series": "train"},
    ]


def test_the_latest_checkpoint_is_the_newest_complete_one(run):
    assert run.latest_checkpoint() is None
    for step in (2, 10, 12, 14):
        (run.checkpoints_dir / f"checkpoint-{step}").mkdir(parents=True)
    for step in (2, 10):  # checkpoint-12: killed while saving, trainer_state.json (written last) missing
        (run.checkpoints_dir / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (run.checkpoints_dir / "checkpoint-14" / "trainer_state.json").write_text('{"log_hi')  # killed while writing it
    assert [c.step for c in run.checkpoints()] == [2, 10]  # by number, not by name (10 sorts before 2)
    assert run.latest_checkpoint() == (10, run.checkpoints_dir / "checkpoint-10")


def test_stop_request_eval_result_and_log_tail(run):
    assert not run.stop_requested
    run.request_stop()
    assert run.stop_requested
    run.clear_stop()
    assert not run.stop_requested
    rows = [{"question": "q, with comma", "delta_f1": 0.5}]
    run.write_eval({"questions": 1, "rows": rows})
    assert run.read_eval() == {"questions": 1, "rows": rows}
    csv, jsonl = run.eval_exports
    assert '"q, with comma",0.5' in csv.read_text() and json.loads(jsonl.read_text()) == rows[0]
    run.log_file.write_text("one\nprogress 10%\rprogress 100%\n\ntwo\n")
    assert run.log_tail() == "one\nprogress 100%\ntwo" and run.log_tail(1) == "two"


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "", ".", "a\\b", "a\0b", None])
def test_run_ids_are_never_paths(bad, tmp_path):
    with pytest.raises(FinetuneError, match="is not a run id .*: pick a run from the list"):
        check_run_id(bad)
    with pytest.raises(FinetuneError, match="is not a run id"):
        open_run(bad, tmp_path)


def test_open_run_by_id_or_by_folder(run, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path))
    with pytest.raises(FinetuneError, match="No training run"):
        open_run("run-1")  # no config yet
    run.config_file.write_text("max_steps: 3\n")
    assert open_run("run-1") == open_run(run.path) == open_run(Path("runs/run-1")) == RunDir(run.path.resolve())
    assert open_run("run-1").read_config().max_steps == 3
    with pytest.raises(FinetuneError, match="is not a run id"):
        open_run("runs/run-1")  # a str is an id: what a browser sends is never taken as a path


def test_list_runs_newest_first_and_by_owner(tmp_path):
    root = tmp_path / "runs"
    for run_id, created, owner in (("b", 30.0, "ada"), ("a", 10.0, "bob"), ("c", 20.0, "ada")):
        (root / run_id).mkdir(parents=True)
        RunDir(root / run_id).update_status(state="finished", created=created, owner=owner)
    (root / "c" / "adapter").mkdir()
    (root / "c" / "adapter" / "adapter_config.json").write_text("{}")
    (root / "not-a-run").mkdir()  # no config, no status
    infos = list_runs(root=root)
    assert [i.run_id for i in infos] == ["b", "c", "a"]
    assert [i.run_id for i in list_runs("ada", root)] == ["b", "c"]
    assert [i.run_id for i in infos if i.has_adapter] == ["c"] and infos[1].adapter_dir == root / "c" / "adapter"
    assert infos[0].state == "finished" and infos[0].queue_position is None


def test_the_run_folder_and_the_runner_need_no_trainer():
    code = (
        "import sys, finetune.runs, finetune.runner;"
        "heavy = [m for m in ('finetune.train', 'transformers', 'gradio') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    code = "import sys, finetune.runs; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def _checkpoint(run: RunDir, step: int, log_history: list[dict] | None = None) -> Path:
    path = run.checkpoints_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"log_history": log_history or []}))
    for name in ("adapter_config.json", "adapter_model.safetensors", "optimizer.pt"):
        (path / name).write_text(name)
    return path


def test_checkpoints_list_their_train_and_held_out_loss(run):
    rows = [{"step": 0, "eval_loss": 3.0}, {"step": 1, "loss": 2.8}, {"step": 2, "loss": 2.5, "eval_loss": 2.6}]
    rows += [{"step": 3, "loss": float("nan")}, {"step": 4, "loss": 2.2}, {"step": 5, "eval_loss": 2.4}]
    run.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for step in (2, 3, 5):
        _checkpoint(run, step)
    # The last finite training loss at or before the step; the held-out loss measured at the step itself only.
    infos = [(c.step, c.loss, c.eval_loss) for c in run.checkpoint_infos()]
    assert infos == [(2, 2.5, 2.6), (3, 2.5, None), (5, 2.2, 2.4)]
    run.clear_metrics()  # a folder without metrics: each checkpoint's own log history says
    assert run.checkpoint_infos()[0][2:] == (None, None)
    other = RunDir(run.path.parent / "run-2")
    _checkpoint(other, 4, [{"step": 2, "loss": 1.5}, {"step": 4, "loss": 1.25}, {"step": 4, "eval_loss": 1.75}])
    assert other.checkpoint_infos()[0][2:] == (1.25, 1.75)


def test_pruning_keeps_the_newest_and_the_best_by_held_out_loss(run):
    held_out = {2: 1.0, 4: 0.8, 6: 0.9, 8: 1.1, 10: None}  # step 4 is the best; 10: stopped, not measured
    run.metrics_file.write_text("".join(json.dumps({"step": s, "eval_loss": v}) + "\n" for s, v in held_out.items()))
    for step in held_out:
        _checkpoint(run, step)
    assert run.prune_checkpoints(newest=5, keep_best=True) == []
    assert run.prune_checkpoints(newest=2, keep_best=True) == [2, 6]
    assert [c.step for c in run.checkpoints()] == [4, 8, 10]  # the old best survives the newest two
    assert run.prune_checkpoints(newest=1, keep_best=False) == [4, 8]
    assert [c.step for c in run.checkpoints()] == [10]
    assert run.prune_checkpoints(newest=0, keep_best=False) == []  # 0: keep all


def test_a_checkpoint_is_an_adapter_named_by_run_id_and_step(run, monkeypatch):
    run.config_file.write_text("max_steps: 4\n")
    for step in (2, 4):
        _checkpoint(run, step)
    assert adapter_ref("run-1") == "run-1" and adapter_ref("run-1", 4) == "run-1@4"
    assert parse_adapter_ref("run-1@4") == ("run-1", 4) and parse_adapter_ref("run-1") == ("run-1", None)
    with pytest.raises(FinetuneError, match="is not a run id"):
        parse_adapter_ref("../run-1@4")
    assert run.adapter_path(2) == run.checkpoints_dir / "checkpoint-2" and run.adapter_path() == run.adapter_dir
    with pytest.raises(FinetuneError, match=r"no checkpoint at step 3 \(kept: 2, 4\): pick one"):
        run.adapter_path(3)
    assert run_of_adapter(run.adapter_path(4)) == (run, 4) and run_of_adapter(run.adapter_dir) == (run, None)
    assert run_of_adapter(run.path) is None
    with zipfile.ZipFile(run.adapter_zip(4)) as archive:  # the adapter's files, not the optimizer state
        assert sorted(archive.namelist()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert run.drop_checkpoints_after(2) == [4] and [c.step for c in run.checkpoints()] == [2]
    run.write_eval({"questions": 1, "rows": [{"q": 1}]}, step=2)
    assert run.read_eval(2)["questions"] == 1 and run.read_eval() is None  # kept apart from the final adapter's
    assert [p.name for p in run.eval_exports_of(2)] == ["eval_questions-step-2.csv", "eval_questions-step-2.jsonl"]


def test_two_writers_of_one_file_never_share_a_temp_file(tmp_path):
    """Two exports of one data config at once wrote the same `.tmp` and one moved the other's half-written file."""
    import threading

    from finetune.runs import replaced_atomically

    target, temps, ready = tmp_path / "train.jsonl", [], threading.Barrier(2)

    def write(text: str) -> None:
        with replaced_atomically(target) as tmp:
            temps.append(tmp)
            tmp.write_text(text)
            ready.wait(10)  # both temp files exist before either is moved over the target

    threads = [threading.Thread(target=write, args=(text,)) for text in ("a" * 1000, "b" * 1000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(temps)) == 2 and target.read_text() in ("a" * 1000, "b" * 1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]
    with pytest.raises(OSError, match="disk full"), replaced_atomically(target) as tmp:
        tmp.write_text("half")
        raise OSError("disk full")
    assert target.read_text() in ("a" * 1000, "b" * 1000) and not tmp.exists()


def test_two_writers_of_a_status_keep_each_others_keys(tmp_path):
    """The app's runner and the trainer both read-merge-write status.json: under its file lock no update is lost."""
    import multiprocessing

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    ctx = multiprocessing.get_context("spawn")  # two processes, as the runner and its trainer are
    start = ctx.Barrier(2)  # writing at the same time, not one after the other
    writers = [ctx.Process(target=_write_keys, args=(str(run.path), name, start)) for name in ("runner", "trainer")]
    for w in writers:
        w.start()
    for w in writers:
        w.join(120)
    status = run.read_status()
    assert all(w.exitcode == 0 for w in writers)
    assert [k for k in status if k.startswith(("runner", "trainer"))] and all(
        status.get(f"{name}{i}") == i for name in ("runner", "trainer") for i in range(WRITES)
    ), sorted(status)


WRITES = 300


def _write_keys(path: str, name: str, start) -> None:
    run = RunDir(Path(path))
    start.wait(60)
    for i in range(WRITES):
        run.update_status(**{f"{name}{i}": i})
