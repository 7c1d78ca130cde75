"""The run folder's one owner: every file name in `runs/<run-id>/`, how each file is read and written, and the list.

    from finetune.runs import RunDir, list_runs, open_run
    run = open_run("20260101-120000-quickstart-1a2b")  # an id under $FINETUNE_HOME/runs (checked: ids come from users)
    run.update_status(state="running", step=3)      # merged into status.json, written atomically
    run.read_metrics(), run.latest_checkpoint(), run.has_adapter, run.read_eval()
    run.checkpoint_infos()                          # each checkpoint with its step, train and held-out loss
    run.adapter_path(40), run.read_eval(step=40)    # a checkpoint's adapter, and its evaluation
    [(i.run_id, i.state) for i in list_runs(owner="ada")]  # newest first

An adapter of a run is named by its id (the final adapter) or `<run-id>@<step>` (a checkpoint's): `adapter_ref`,
`parse_adapter_ref`; `run_of_adapter` goes back from an adapter folder to its run.

A run folder holds config.yaml (the TrainConfig), status.json (state, step, ETA, owner, pid; written atomically
so readers never see half of it), metrics.jsonl (one row per logging step, append-only), train.log, STOP (asks
the trainer to stop), checkpoints/ (Trainer checkpoints: for resume, and each holds a usable adapter), adapter/ (the
final LoRA adapter), eval.json with the per-question table as CSV and JSONL (eval-step-N.json... for a checkpoint's),
tensorboard/ (events, with `report_to: tensorboard`) and guided.json (the guided path's measured losses).
No torch here: the UI and the runner read runs without importing the trainer.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import psutil
from filelock import FileLock

from finetune import FinetuneError, home
from finetune.config import TrainConfig, dump_train_config, load_train_config, with_decided

CONFIG_FILE, STATUS_FILE, METRICS_FILE, LOG_FILE, STOP_FILE = (
    "config.yaml", "status.json", "metrics.jsonl", "train.log", "STOP"
)  # fmt: skip
ADAPTER_DIR, CHECKPOINTS_DIR, TENSORBOARD_DIR = "adapter", "checkpoints", "tensorboard"
CHECKPOINT_PREFIX = "checkpoint-"  # the Trainer's checkpoint folders: checkpoint-<step>
EVAL_FILE, EVAL_EXPORTS = "eval.json", ("eval_questions.csv", "eval_questions.jsonl")
GUIDED_FILE = "guided.json"
ACTIVE_STATES = ("queued", "running", "stopping")
LOG_TAIL_LINES = 40


# --- atomic writes -------------------------------------------------------------------------------


@contextlib.contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """A temp path beside `path` to write, moved over `path` (`os.replace`) once the block ends, deleted if it fails:
    readers (the UI, the runner) never see a half-written file."""
    # Named per process and thread: two writers of one file never share a temp file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with replaced_atomically(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")  # newline="": CSV rows keep their \r\n


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, ensure_ascii=False))


def _read_json(path: Path) -> dict | None:
    """The file's JSON object; None when it is missing or unreadable (a crash can leave no file, never half of one)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def export_rows(rows: list[dict], path: Path) -> Path:
    """Write a table (a list of flat dicts) as .csv or .jsonl, by the file's suffix; returns `path`."""
    path = Path(path)
    if path.suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif path.suffix == ".csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["question"])
        writer.writeheader()
        writer.writerows(rows)
        text = out.getvalue()
    else:
        raise FinetuneError(f"Cannot export to {path.name}: use a .csv or .jsonl file name.")
    write_text_atomic(path, text)
    return path


# --- the run folder ------------------------------------------------------------------------------


class Checkpoint(NamedTuple):
    step: int
    path: Path


class CheckpointInfo(NamedTuple):
    """A checkpoint as a run lists it: the last training loss logged at or before its step, and the held-out loss
    measured at its step (None: no evaluation then)."""

    step: int
    path: Path
    loss: float | None
    eval_loss: float | None


def _finite(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def losses_at(rows: list[dict], step: int) -> tuple[float | None, float | None]:
    """(last training loss logged at or before `step`, held-out loss logged at `step`) from metric rows."""
    loss = eval_loss = None
    for row in rows:
        at = row.get("step")
        if not isinstance(at, int) or at > step:
            continue
        train, held_out = _finite(row.get("loss")), _finite(row.get("eval_loss"))
        loss = train if train is not None else loss
        eval_loss = held_out if at == step and held_out is not None else eval_loss
    return loss, eval_loss


def adapter_ref(run_id: str, step: int | None = None) -> str:
    """How a choice names one adapter of a run: the run id for the final adapter, `<run-id>@<step>` for a checkpoint's
    (run ids never hold an @: `new_run_id`)."""
    return run_id if step is None else f"{run_id}@{step}"


def parse_adapter_ref(ref: object) -> tuple[str, int | None]:
    """(run id, checkpoint step or None) of an `adapter_ref`; the id is checked (`check_run_id`): browsers send it."""
    run_id, sep, step = ref.rpartition("@") if isinstance(ref, str) else ("", "", "")
    if sep and step.isdigit():
        return check_run_id(run_id), int(step)
    return check_run_id(ref), None


def adapter_label(run_id: str, step: int | None = None) -> str:
    return f"{run_id} · {'final' if step is None else f'step {step}'}"


def process_fields(pid: int) -> dict:
    """Status fields naming the process `pid`: its id and its start time, which a later process given the same
    (reused) pid does not share (see `runner._pid_runs`)."""
    try:
        created = psutil.Process(pid).create_time()
    except psutil.Error:  # already gone: the command line alone will decide, as for runs older than this field
        created = None
    return {"pid": pid, "pid_create_time": created}


@dataclass(frozen=True)
class RunDir:
    """One run folder; every file of it is named and read or written here."""

    path: Path

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def status_file(self) -> Path:
        return self.path / STATUS_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def log_file(self) -> Path:
        return self.path / LOG_FILE

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER_DIR

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def eval_file(self) -> Path:
        return self.eval_file_of()

    @property
    def eval_exports(self) -> tuple[Path, ...]:
        return self.eval_exports_of()

    def eval_file_of(self, step: int | None = None) -> Path:
        """eval.json: the last evaluation of the final adapter; eval-step-<step>.json: of that checkpoint's."""
        return self.path / _at_step(EVAL_FILE, step)

    def eval_exports_of(self, step: int | None = None) -> tuple[Path, ...]:
        """The per-question table of the last evaluation, as CSV and JSONL (for downloads)."""
        return tuple(self.path / _at_step(name, step) for name in EVAL_EXPORTS)

    @property
    def is_run(self) -> bool:
        # A config (a run the runner queued, or one a test built) or a status (a trainer started it) makes a run.
        return self.config_file.is_file() or self.status_file.is_file()

    # --- config and status ---

    def read_config(self, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
        return load_train_config(self.config_file, overrides)

    def read_decided_config(self) -> TrainConfig:
        """The config with each `auto` setting as this run decided it on its machine (kept in its status by the
        trainer: `decided`, `planned_steps`); still `auto` where it has not decided yet."""
        status = self.read_status()
        decided = {**(status.get("decided") or {}), "max_steps": status.get("planned_steps")}
        return with_decided(self.read_config(), decided)

    def write_config(self, cfg: TrainConfig) -> None:
        write_text_atomic(self.config_file, dump_train_config(cfg))

    def read_status(self) -> dict:
        return _read_json(self.status_file) or {}

    def update_status(self, **fields) -> dict:
        """Merge `fields` into status.json (keys other writers set, like `owner`, are kept); returns the status.

        The app's runner and the training process both write it: the read-merge-write holds a file lock, so neither
        loses the other's keys."""
        with FileLock(self.path / ".status.lock", timeout=60):
            status = self.read_status()
            status.update(fields, updated=time.time())
            write_json_atomic(self.status_file, status)
        return status

    # --- metrics ---

    def read_metrics(self) -> list[dict]:
        """Rows of metrics.jsonl; a line cut by a crash (or being written while we read) is skipped."""
        try:
            lines = self.metrics_file.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        rows = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def clear_metrics(self) -> None:
        self.metrics_file.unlink(missing_ok=True)

    def truncate_metrics(self, step: int) -> float:
        """Drop the rows past `step` (written after the checkpoint a resume starts from); returns elapsed at `step`."""
        rows = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        write_text_atomic(self.metrics_file, "".join(json.dumps(r) + "\n" for r in rows))
        return max((r.get("elapsed", 0.0) for r in rows), default=0.0)

    def loss_curve(self) -> list[dict]:
        """Training and held-out loss against step as long rows {step, loss, series}, for one line per series; with
        `tokens` (training tokens seen by then) where the trainer recorded it."""
        points = []
        for row in self.read_metrics():
            for key, series in (("loss", "train"), ("eval_loss", "held-out")):
                value = _finite(row.get(key))
                if "step" in row and value is not None:
                    tokens = {"tokens": row["tokens"]} if isinstance(row.get("tokens"), int) else {}
                    points.append({"step": row["step"], "loss": value, "series": series, **tokens})
        return points

    # --- adapter and checkpoints ---

    @property
    def has_adapter(self) -> bool:
        return is_adapter(self.adapter_dir)

    def adapter_path(self, step: int | None = None) -> Path:
        """The final adapter's folder, or the checkpoint's at `step` (it holds the adapter's two files as well)."""
        if step is None:
            return self.adapter_dir
        found = {c.step: c.path for c in self.checkpoints()}
        if step not in found:
            kept = ", ".join(map(str, found)) or "none"
            raise FinetuneError(
                f"Run {self.run_id} has no checkpoint at step {step} (kept: {kept}): pick one from the list."
            )
        return found[step]

    def adapter_zip(self, step: int | None = None) -> Path | None:
        """<run-id>-adapter.zip, or <run-id>-step-<step>-adapter.zip of a checkpoint: the adapter's files only, not
        the optimizer state beside them (rebuilt when the adapter is newer); None while there is no adapter."""
        folder = self.adapter_path(step)
        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():
            return None
        target = self.path / f"{self.run_id}{'' if step is None else f'-step-{step}'}-adapter.zip"
        if not target.is_file() or target.stat().st_mtime < weights.stat().st_mtime:
            with replaced_atomically(target) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
                for f in sorted(folder.iterdir()):
                    if f.name.startswith("adapter_") or f.name == "README.md":
                        archive.write(f, f.name)
        return target

    def checkpoints(self) -> list[Checkpoint]:
        """The complete checkpoints, oldest first: the Trainer writes trainer_state.json last, so a kill -9 in the
        middle of a save leaves a checkpoint without it, or with half of it (not atomic: seen empty), which a resume
        must not start from."""
        found = []
        for path in self.checkpoints_dir.glob(f"{CHECKPOINT_PREFIX}*"):
            step = path.name.removeprefix(CHECKPOINT_PREFIX)
            if step.isdigit() and _read_json(path / "trainer_state.json") is not None:
                found.append(Checkpoint(int(step), path))
        return sorted(found)

    def latest_checkpoint(self) -> Checkpoint | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def checkpoint_infos(self) -> list[CheckpointInfo]:
        """Each complete checkpoint, oldest first, with its losses: from metrics.jsonl, or from the checkpoint's own
        trainer_state.json (its log history) for a run folder without metrics."""
        metrics = self.read_metrics()
        infos = []
        for c in self.checkpoints():
            rows = metrics or (_read_json(c.path / "trainer_state.json") or {}).get("log_history") or []
            infos.append(CheckpointInfo(c.step, c.path, *losses_at(rows, c.step)))
        return infos

    def prune_checkpoints(self, newest: int, keep_best: bool) -> list[int]:
        """Delete the checkpoints other than the `newest` last ones (0: keep all) and, with `keep_best`, the one with
        the lowest held-out loss; returns the steps deleted. The Trainer's own `save_total_limit` would delete the
        best once it is old: it keeps a best only when it loads it at the end."""
        infos = self.checkpoint_infos()
        if newest <= 0 or len(infos) <= newest:
            return []
        keep = {c.step for c in infos[-newest:]}
        scored = [c for c in infos if c.eval_loss is not None]
        if keep_best and scored:
            keep.add(min(scored, key=lambda c: c.eval_loss).step)
        dropped = [c for c in infos if c.step not in keep]
        for c in dropped:
            shutil.rmtree(c.path, ignore_errors=True)
        return [c.step for c in dropped]

    def drop_checkpoints_after(self, step: int) -> list[int]:
        """Delete the checkpoints past `step`: a resume from `step` trains those steps again (their metrics are
        truncated too), so the old ones would mix two histories. Returns the steps deleted."""
        later = [c for c in self.checkpoints() if c.step > step]
        for c in later:
            shutil.rmtree(c.path, ignore_errors=True)
        return [c.step for c in later]

    # --- stop request ---

    def request_stop(self) -> None:
        """Ask the trainer to stop after this step (it checks the file even when a signal is lost)."""
        (self.path / STOP_FILE).touch()

    def clear_stop(self) -> None:
        (self.path / STOP_FILE).unlink(missing_ok=True)

    @property
    def stop_requested(self) -> bool:
        return (self.path / STOP_FILE).exists()

    # --- results ---

    def read_eval(self, step: int | None = None) -> dict | None:
        """The last evaluation of the final adapter, or of the checkpoint at `step`."""
        return _read_json(self.eval_file_of(step))

    def write_eval(self, result: dict, step: int | None = None) -> None:
        """eval.json (eval-step-<step>.json for a checkpoint), and its per-question table (`result["rows"]`) as CSV
        and JSONL."""
        write_json_atomic(self.eval_file_of(step), result)
        for path in self.eval_exports_of(step):
            export_rows(result["rows"], path)

    def read_guided(self) -> dict | None:
        return _read_json(self.path / GUIDED_FILE)

    def write_guided(self, result: dict) -> None:
        write_json_atomic(self.path / GUIDED_FILE, result)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of train.log (its last 16 KiB only: the log of a long run grows)."""
        try:
            with open(self.log_file, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        # Progress bars redraw with carriage returns: keep what each line finally showed (splitlines() would split
        # at each \r and keep every redraw).
        shown = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
        return "\n".join([line for line in shown if line.strip()][-lines:])


def _at_step(name: str, step: int | None) -> str:
    """eval.json -> eval-step-40.json: the file of a checkpoint's evaluation beside the final adapter's."""
    if step is None:
        return name
    stem, dot, suffix = name.partition(".")
    return f"{stem}-step-{step}{dot}{suffix}"


def run_of_adapter(path: str | Path) -> tuple[RunDir, int | None] | None:
    """(its run, its checkpoint step or None) for an adapter folder inside a run (adapter/ or
    checkpoints/checkpoint-<step>/); None for any other folder (an upload)."""
    path = Path(path)
    if path.name == ADAPTER_DIR:
        run, step = RunDir(path.parent), None
    elif path.parent.name == CHECKPOINTS_DIR and path.name.removeprefix(CHECKPOINT_PREFIX).isdigit():
        run, step = RunDir(path.parent.parent), int(path.name.removeprefix(CHECKPOINT_PREFIX))
    else:
        return None
    return (run, step) if run.config_file.is_file() else None


# --- ids and the list of runs --------------------------------------------------------------------


ADAPTER_CONFIG = "adapter_config.json"  # what makes a folder a PEFT adapter


def is_adapter(folder: str | Path) -> bool:
    """A PEFT LoRA adapter is there (its `adapter_config.json`): a run's final adapter, a checkpoint, an upload."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def exports_dir() -> Path:
    """Where data splits and preference pairs are exported: `home()/exports`."""
    return home() / "exports"


def runs_root() -> Path:
    """Where runs live: `$FINETUNE_HOME/runs`."""
    path = home() / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def new_run_id(cfg: TrainConfig) -> str:
    """Sortable and readable: 20260101-120000-gemma-3-270m-lamini_docs-1a2b."""
    model = Path(cfg.model.source.rstrip("/")).name
    data = Path(cfg.data.source).stem
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in f"{cfg.name or model + '-' + data}")[:60]
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}-{os.urandom(2).hex()}"


def check_run_id(run_id: object) -> str:
    """`run_id` when it names one folder under the runs folder; a browser sends it, so it must not be a path."""
    if not isinstance(run_id, str) or run_id in ("", ".", "..") or any(c in run_id for c in "/\\\0"):
        raise FinetuneError(f"{run_id!r} is not a run id (a folder name, not a path): pick a run from the list.")
    return run_id


def open_run(run: str | Path, root: Path | None = None) -> RunDir:
    """An existing run. A str is a run id under `root` (default `runs_root()`), checked by `check_run_id`: browsers
    send ids. A Path is a folder given by code or on the command line (`--run runs/<id>`): as given, under
    `home()`, or under the runs folder."""
    root = root or runs_root()
    if isinstance(run, Path):
        path = run.expanduser()
        candidates = [path, home() / path, root / path]
    else:
        candidates = [root / check_run_id(run)]
    for candidate in candidates:
        if (candidate / CONFIG_FILE).is_file():
            return RunDir(candidate.resolve())
    raise FinetuneError(f"No training run at {run}: pick one from the list of runs, or give a run folder.")


@dataclass
class RunInfo:
    """A run as the lists show it: its folder and the fields of its status.json."""

    run_id: str
    run_dir: Path
    state: str
    step: int = 0
    total: int | None = None
    eta_s: float | None = None
    message: str = ""
    owner: str | None = None
    queue_position: int | None = None  # 1 = next to start; only the Runner knows it
    created: float = 0.0
    name: str = ""
    tokens_per_s: float | None = None
    loss: float | None = None

    @classmethod
    def read(cls, run: RunDir) -> RunInfo:
        status = run.read_status()
        return cls(
            run_id=run.run_id,
            run_dir=run.path,
            state=status.get("state", "unknown"),
            step=status.get("step") or 0,
            total=status.get("total"),
            eta_s=status.get("eta_s"),
            message=status.get("message", ""),
            owner=status.get("owner"),
            created=status.get("created") or run.path.stat().st_mtime,
            name=status.get("name") or run.run_id,
            tokens_per_s=status.get("tokens_per_s"),
            loss=status.get("loss"),
        )

    @property
    def run(self) -> RunDir:
        return RunDir(self.run_dir)

    @property
    def has_adapter(self) -> bool:
        return self.run.has_adapter

    @property
    def adapter_dir(self) -> Path | None:
        return self.run.adapter_dir if self.has_adapter else None


def run_dirs(root: Path | None = None) -> list[RunDir]:
    """Every run folder under `root` (default `runs_root()`), in name order (oldest id first)."""
    root = root or runs_root()
    found = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return [run for run in map(RunDir, found) if run.is_run]


def list_runs(owner: str | None = None, root: Path | None = None) -> list[RunInfo]:
    """All runs under `root` (default `runs_root()`), newest first; only `owner`'s when given."""
    infos = [RunInfo.read(run) for run in run_dirs(root)]
    mine = [i for i in infos if owner is None or i.owner == owner]
    return sorted(mine, key=lambda i: (i.created, i.run_id), reverse=True)
