"""Job manager: each training run in its own process, one at a time per device, the others queued (FIFO).

Devices are `Machine.training_devices()`: each GPU (a run's process sees only its own, `CUDA_VISIBLE_DEVICES`), or
the CPU. The next queued run starts on the first device that is free.

    from finetune.runner import Runner
    runner = Runner()                      # finds the runs already on disk (past ones, queued ones, dead ones)
    run_id = runner.submit(cfg)            # checks the config first: a bad one raises FinetuneError, starts nothing
    runner.status(run_id)                  # the run's status + queue position
    runner.stop(run_id)                    # running: save the adapter at this step and stop; queued: cancel
    runner.resume(run_id)                  # continue from the latest checkpoint (also after a crash or kill -9)
    runner.resume(run_id, checkpoint=40)   # ...or from an earlier one (what came after it is dropped)
    runner.wait_s(run_id)                  # a queued run's estimated wait: the runs ahead's ETA and steps

The web server never trains in its own process: a run is `python -m finetune train --run-dir DIR`, whose output
goes to the run's log. The run keeps going when the app restarts; a new Runner finds it by its pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import psutil

from finetune import FinetuneError
from finetune.config import TrainConfig
from finetune.hardware import machine
from finetune.runs import (
    ACTIVE_STATES,
    RunDir,
    RunInfo,
    check_run_id,
    list_runs,
    new_run_id,
    open_run,
    process_fields,
    run_dirs,
    runs_root,
)
from finetune.security import is_admin, saving
from finetune.settings import Settings

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def _pid_runs(pid: int | None, run_dir: Path, create_time: float | None = None) -> bool:
    """True when `pid` is alive and is the trainer of `run_dir`, not another process that got the pid since.

    `create_time`: the trainer's start time recorded with its pid (`pid_create_time`); runs from before it was
    recorded have none, and the command line alone decides.
    """
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # it exited; its parent has not collected it yet
            return False
        # A reused pid belongs to a process started after ours ended. 1 s of slack: the time is counted from a boot
        # time that a clock step can shift, and any trainer lives longer than that (importing torch alone does).
        if create_time is not None and abs(proc.create_time() - create_time) > 1.0:
            return False
        args = proc.cmdline()
    except psutil.Error:  # gone, or another user's process: not our trainer either way
        return False
    # Started by a runner: the run folder is on the command line; by hand (`python -m finetune train --config`): not.
    return any(run_dir.name in arg for arg in args) or ("train" in args and any("finetune" in a for a in args))


def _expected_s(run: RunDir, pace: float | None) -> float | None:
    """How long a queued run will train: its steps at `pace` seconds each, at most its time budget (max_minutes)."""
    try:
        cfg = run.read_config()
    except (FinetuneError, OSError):
        return None
    guesses = [cfg.max_minutes * 60] if cfg.max_minutes > 0 else []
    if isinstance(cfg.max_steps, int) and cfg.max_steps > 0 and pace is not None:
        guesses.append(cfg.max_steps * pace)
    return min(guesses, default=None)


def visible_device(device: str) -> str:
    """`CUDA_VISIBLE_DEVICES` for a child that must see only `device` (cuda:N as this process numbers it)."""
    index = int(device.split(":", 1)[1])
    ours = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return ours[index] if index < len(ours) else str(index)


def _exit_reason(code: int, run: RunDir) -> str:
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        why = " (out of memory?)" if code == -signal.SIGKILL else ""
        head = f"The training process was killed by {name}{why}"
    else:
        head = f"The training process exited with code {code}"
    last = ""
    try:
        lines = [line for line in run.log_file.read_text(errors="replace").splitlines() if line.strip()]
        last = next((line for line in reversed(lines) if "Error" in line or "error:" in line), "")
    except OSError:
        pass
    return f"{head}{': ' + last.strip()[:200] if last else ''}. Press Resume to continue from the last checkpoint."


class Runner:
    """Queue and processes of training runs under `root` (default `$FINETUNE_HOME/runs`). Thread-safe."""

    def __init__(
        self,
        root: str | Path | None = None,
        python: str = sys.executable,
        poll_interval: float = 1.0,
        on_finished: Callable[[RunDir], str | None] | None = None,
    ):
        """`on_finished(run)`: called in its own thread when a run's process ends with an adapter saved (finished or
        stopped); the sentence it returns is kept as the run's `notice` (the Train tab shows it)."""
        self.root = Path(root) if root else runs_root()
        self.on_finished = on_finished
        self.root.mkdir(parents=True, exist_ok=True)
        self.python = python
        self.poll_interval = poll_interval
        self.devices = machine().training_devices()
        self._lock = threading.RLock()
        self._queue: list[tuple[str, bool, int | None]] = []  # (run id, resume, checkpoint step: None = latest)
        self._procs: dict[str, subprocess.Popen] = {}
        # Runs started by an earlier app process, still training: id -> (pid, its create time if recorded).
        self._adopted: dict[str, tuple[int, float | None]] = {}
        self._device_of: dict[str, str] = {}  # runs holding a device (started or adopted) -> that device
        self._closed = threading.Event()
        self._discover()
        self._thread = threading.Thread(target=self._loop, name="finetune-runner", daemon=True)
        self._thread.start()

    # --- public API ---

    def submit(self, cfg: TrainConfig, owner: str | None = None, limits: Settings | None = None) -> str:
        """Check the config, create the run folder and queue the run; returns its id.

        `owner`: the logged-in user (None without login). `limits` (the UI passes `Settings.current()`): steps per
        run, and runs queued or training per logged-in user.
        """
        from finetune.train import check_config  # imports transformers' Trainer: not at app start

        check_config(cfg)
        if limits is not None:
            self._check_limits(cfg, owner, limits)
        run_id = new_run_id(cfg)
        run = RunDir(self.root / run_id)
        name = cfg.name or f"{Path(cfg.model.source).name} · {Path(cfg.data.source).stem}"
        with saving("the new run"):
            run.path.mkdir(parents=True)
            run.write_config(cfg)
            run.update_status(state="queued", owner=owner, created=time.time(), name=name, message="Queued")
        with self._lock:
            self._queue.append((run_id, False, None))
            self._schedule()
        return run_id

    def resume(self, run_id: str, user: str | None = None, checkpoint: int | None = None) -> None:
        """Queue a stopped, failed or finished run again; it continues from its latest checkpoint, or from the one at
        step `checkpoint` (the metrics and checkpoints after it are then dropped, and those steps trained again)."""
        from finetune.train import check_config  # imports transformers' Trainer: not at app start

        run = self.open(run_id)
        self._check_owner(run, user, "resume")
        with self._lock:
            state = run.read_status().get("state")
            if state in ACTIVE_STATES:
                raise FinetuneError(f"Run {run_id} is {state}: stop it before resuming.")
            check_config(run.read_config())
            if checkpoint is not None:
                run.adapter_path(checkpoint)  # raises, naming the kept steps, when there is no such checkpoint
                message = f"Queued to resume from step {checkpoint} (what came after it is dropped)"
            elif run.latest_checkpoint():
                message = f"Queued to resume from step {run.latest_checkpoint().step}"
            else:
                message = "Queued (no checkpoint yet: starts over)"
            run.update_status(state="queued", message=message, resume=True, resume_checkpoint=checkpoint)
            self._queue.append((run_id, True, checkpoint))
            self._schedule()

    def stop(self, run_id: str, user: str | None = None) -> str:
        """Stop a running run (it saves its adapter at the current step) or cancel a queued one; returns a message.

        With login on, `user` (the logged-in name) must own the run or be an admin (`FINETUNE_ADMINS`).
        """
        run = self.open(run_id)
        self._check_owner(run, user, "stop")
        with self._lock:
            queued = [item for item in self._queue if item[0] == run_id]
            if queued:
                self._queue = [item for item in self._queue if item[0] != run_id]
                run.update_status(state="stopped", message="Cancelled before it started.")
                return "Cancelled."
            pid = self._pid(run_id)
            state = run.read_status().get("state")
            if pid is None or state not in ACTIVE_STATES:
                return f"Run {run_id} is not running ({state})."
            run.request_stop()
            with contextlib.suppress(OSError):  # already gone: the reaper will say how it ended
                os.kill(pid, signal.SIGTERM)
            run.update_status(state="stopping", message="Stopping: saving the adapter at the current step")
            return "Stopping after the current step."

    def status(self, run_id: str) -> dict:
        """The run's status.json, with its queue position and, while queued, its estimated wait (`wait_s`)."""
        with self._lock:
            self._schedule()
            status = self.open(run_id).read_status()
            status["queue_position"] = self._position(run_id)
            status["wait_s"] = self.wait_s(run_id)
        return status

    def wait_s(self, run_id: str) -> float | None:
        """Seconds until a queued run starts, about: what the training runs have left (their ETA) plus the runs
        queued ahead of it (their steps at the running runs' pace, or their time budget), shared by the devices.
        None when the run is not queued, or a pace is not known yet (a run that has not timed its steps)."""
        with self._lock:
            position = self._position(run_id)
            if position is None:
                return None
            if position <= len(self.devices) - len(self._device_of):
                return 0.0  # a device is free: it starts at the next scheduling tick
            running = [RunDir(self.root / rid).read_status() for rid in self._device_of]
            ahead = [RunDir(self.root / item[0]) for item in self._queue[: position - 1]]
        left, paces = 0.0, []
        for s in running:
            steps_left = (s.get("total") or 0) - (s.get("step") or 0)
            if s.get("total") and steps_left <= 0:
                continue  # all steps done: evaluating or saving, about to free its device
            if s.get("eta_s") is None or steps_left <= 0:
                return None  # still starting: no pace yet
            left += s["eta_s"]
            paces.append(s["eta_s"] / steps_left)
        durations = [_expected_s(run, max(paces, default=None)) for run in ahead]
        return None if None in durations else (left + sum(durations)) / len(self.devices)

    def runs(self, owner: str | None = None) -> list[RunInfo]:
        """All runs on disk, newest first (only `owner`'s when given), with their queue positions."""
        with self._lock:
            self._schedule()
            return [replace(i, queue_position=self._position(i.run_id)) for i in list_runs(owner, self.root)]

    def open(self, run_id: str) -> RunDir:
        """The run `run_id` (an id only, never a path: ids come from browsers); FinetuneError when there is none."""
        return open_run(check_run_id(run_id), self.root)

    def active(self) -> str | None:
        """Id of a run holding a device, if any (the first device's first)."""
        with self._lock:
            return next(iter(self._device_of), None)

    def busy_devices(self) -> dict[str, str]:
        """Device -> id of the run training there."""
        with self._lock:
            return {device: run_id for run_id, device in self._device_of.items()}

    def wait(self, run_id: str, timeout: float = 600.0) -> dict:
        """Block until the run is no longer queued/running/stopping (tests, scripts); returns its status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(run_id)
            if status.get("state") not in ACTIVE_STATES:
                return status
            time.sleep(0.1)
        raise TimeoutError(f"Run {run_id} still {self.status(run_id).get('state')} after {timeout:.0f} s.")

    def close(self) -> None:
        """Stop the scheduling thread (runs already started keep training)."""
        self._closed.set()
        self._thread.join(timeout=5)

    # --- internals ---

    def _check_limits(self, cfg: TrainConfig, owner: str | None, limits: Settings) -> None:
        # `auto` steps are what fits in max_minutes: bounded by time, not by a count
        if cfg.max_steps != "auto" and cfg.max_steps > limits.max_train_steps:
            raise FinetuneError(
                f"{cfg.max_steps} steps is above this box's limit of {limits.max_train_steps} per run "
                "(FINETUNE_MAX_TRAIN_STEPS): ask for fewer steps."
            )
        if owner is not None:
            mine = [i for i in self.runs(owner=owner) if i.state in ACTIVE_STATES]
            if len(mine) >= limits.max_queued_runs:
                raise FinetuneError(
                    f"You have {len(mine)} runs queued or training (the limit is {limits.max_queued_runs}): "
                    "wait for one to finish, or stop one."
                )

    @staticmethod
    def _check_owner(run: RunDir, user: str | None, action: str) -> None:
        owner = run.read_status().get("owner")
        if user is not None and owner not in (None, user) and not is_admin(user):
            raise FinetuneError(f"Run {run.run_id} belongs to {owner}: only its owner or an admin can {action} it.")

    def _position(self, run_id: str) -> int | None:
        ids = [item[0] for item in self._queue]
        return ids.index(run_id) + 1 if run_id in ids else None

    def _pid(self, run_id: str) -> int | None:
        if run_id in self._procs:
            return self._procs[run_id].pid
        return self._adopted[run_id][0] if run_id in self._adopted else None

    def _discover(self) -> None:
        """Adopt runs still training from an earlier app process, re-queue queued ones, fail the dead ones."""
        queued = []
        for run in run_dirs(self.root):
            status = run.read_status()
            state = status.get("state")
            if state == "queued":
                resume = (bool(status.get("resume")), status.get("resume_checkpoint"))
                queued.append((status.get("created", 0.0), run.run_id, resume))
            elif state in ("running", "stopping"):
                if _pid_runs(status.get("pid"), run.path, status.get("pid_create_time")):
                    self._adopted[run.run_id] = (status["pid"], status.get("pid_create_time"))
                    device = status.get("device")
                    self._device_of[run.run_id] = device if device in self.devices else self.devices[0]
                else:
                    run.update_status(
                        state="failed",
                        eta_s=None,
                        message="The training process is gone (the app or the machine restarted?). "
                        "Press Resume to continue from the last checkpoint.",
                    )
        self._queue.extend((run_id, *resume) for _, run_id, resume in sorted(queued))

    def _reap(self) -> None:
        for run_id, proc in list(self._procs.items()):
            code = proc.poll()
            if code is None:
                continue
            del self._procs[run_id]
            self._device_of.pop(run_id, None)
            run = RunDir(self.root / run_id)
            if run.read_status().get("state") not in ACTIVE_STATES:
                self._finished(run)
                continue
            if run.stop_requested:  # stopped while starting up, before it could save anything
                run.update_status(state="stopped", eta_s=None, message="Stopped before the first step.")
            else:  # it died without saying why
                run.update_status(state="failed", eta_s=None, message=_exit_reason(code, run))
        for run_id, (pid, create_time) in list(self._adopted.items()):
            run = RunDir(self.root / run_id)
            if not _pid_runs(pid, run.path, create_time):
                del self._adopted[run_id]
                self._device_of.pop(run_id, None)
                if run.read_status().get("state") in ACTIVE_STATES:
                    run.update_status(state="failed", eta_s=None, message=_exit_reason(-signal.SIGKILL, run))
                else:
                    self._finished(run)

    def _finished(self, run: RunDir) -> None:
        """Hand a run that ended with an adapter to `on_finished`, in its own thread (it may talk to a server)."""
        if self.on_finished is None or not run.has_adapter:
            return

        def call() -> None:
            try:
                notice = self.on_finished(run)
            except Exception as e:  # noqa: BLE001 (the run itself is done: say what failed next to it)
                notice = f"After the run: {type(e).__name__}: {e}"
            if notice:
                run.update_status(notice=notice)

        threading.Thread(target=call, name=f"finished-{run.run_id}", daemon=True).start()

    def _schedule(self) -> None:
        with self._lock:
            self._reap()
            free = [d for d in self.devices if d not in self._device_of.values()]
            while free and self._queue:
                run_id, resume, checkpoint = self._queue.pop(0)
                self._start(run_id, resume, checkpoint, free.pop(0))

    def _start(self, run_id: str, resume: bool, checkpoint: int | None, device: str) -> None:
        run = RunDir(self.root / run_id)
        run.clear_stop()
        cmd = [self.python, "-m", "finetune", "train", "--run-dir", str(run.path)] + (["--resume"] if resume else [])
        cmd += ["--checkpoint", str(checkpoint)] if checkpoint is not None else []
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if device.startswith("cuda:"):  # the child sees its GPU alone, as cuda:0; two runs never share one
            env["CUDA_VISIBLE_DEVICES"] = visible_device(device)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH")) if p)
        run.update_status(device=device)  # before the child starts: its status says where it runs from the start
        with open(run.log_file, "ab") as log_file:
            # Own session: a Ctrl-C of the app does not reach the trainer; the run goes on without the UI.
            proc = subprocess.Popen(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=PACKAGE_ROOT, start_new_session=True
            )
        self._procs[run_id] = proc
        self._device_of[run_id] = device
        message = "Starting the training process"
        run.update_status(state="running", **process_fields(proc.pid), message=message)

    def _loop(self) -> None:
        while not self._closed.wait(self.poll_interval):
            try:
                self._schedule()
            except Exception:  # keep scheduling whatever one run's folder looks like
                import logging

                logging.getLogger(__name__).exception("runner loop")
