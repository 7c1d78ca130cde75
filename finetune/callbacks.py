"""What a training run reports and keeps while it trains, as `TrainerCallback`s (the SFT and DPO trainers share them):
metrics.jsonl and status.json (`RunCallback`, process 0), a stop asked by SIGTERM or the STOP file, the time budget
agreed by every process, the checkpoints kept (`KeepCheckpoints`), and the trackers (`tracker_callbacks`).
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time

import torch
from transformers import TrainerCallback

from finetune import FinetuneError
from finetune.config import TrainConfig
from finetune.runs import RunDir

log = logging.getLogger(__name__)

# DPO's logged metrics (TRL's names) -> metrics.jsonl keys: how much more the adapter prefers the chosen answer than
# the model it started from did (margin), and how often it does (accuracy); eval_ on held-out pairs.
PREFERENCE_METRICS = {
    f"{prefix}rewards/{name}": f"{prefix}reward_{short}"
    for prefix in ("", "eval_")
    for name, short in (("margins", "margin"), ("accuracies", "accuracy"))
}


class RunCallback(TrainerCallback):
    """Writes metrics.jsonl and status.json (process 0), logs a line per logging step, and stops on request."""

    def __init__(self, run: RunDir, elapsed_before: float, stop_signal: threading.Event, time_limit_s: float = 0):
        self.run = run
        self.time_limit_s = time_limit_s  # TrainConfig.max_minutes: end like a finished run, not a stopped one
        self.elapsed_before = elapsed_before  # seconds trained before a resume
        self.stop_signal = stop_signal  # set by SIGTERM
        self.stopped = False
        self.t0 = time.time()
        self.last_status = 0.0
        self.start_step = 0
        self.last_tokens = (self.t0, 0)
        self.tokens_per_s: float | None = None
        self.last_loss: float | None = None
        self.last_eval_step: int | None = None

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.t0

    def remaining(self) -> float:
        """Seconds of the time budget left: the run's set-up (model, data, competitors, the timed step) spent some."""
        return self.time_limit_s - self.elapsed()

    def _agreed(self, args) -> tuple[bool, bool]:
        """(stop asked, time budget spent), the same on every process."""
        wanted = self.stop_signal.is_set() or self.run.stop_requested
        spent = bool(self.time_limit_s) and self.elapsed() >= self.time_limit_s
        if args.world_size > 1 and torch.distributed.is_initialized():
            # Every process must stop at the same step, or the others wait forever in the next all-reduce; their
            # clocks differ (each started its own), so one that is done ends them all.
            flags = torch.tensor([float(wanted), float(spent)], device=args.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            wanted, spent = (bool(f) for f in flags.tolist())
        return wanted, spent

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step = state.global_step
        self.last_tokens = (time.time(), state.num_input_tokens_seen)
        if state.is_world_process_zero:
            self.run.update_status(state="running", step=state.global_step, total=state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        wanted, spent = self._agreed(args)
        if wanted:
            self.stopped = True
            control.should_training_stop = True
            control.should_save = True  # a checkpoint at this step, so Resume continues from here
        if spent and not control.should_training_stop:
            log.info("time budget of %.1f min reached at step %d", self.time_limit_s / 60, state.global_step)
            control.should_training_stop = True
        if control.should_training_stop or state.global_step >= state.max_steps:
            control.should_log = True  # the chart and the log end at the last step, not the last multiple
        if state.is_world_process_zero and (time.time() - self.last_status > 1.0 or control.should_training_stop):
            self.last_status = time.time()
            done = state.global_step - self.start_step
            eta = (time.time() - self.t0) / done * (state.max_steps - state.global_step) if done else None
            self.run.update_status(
                state="stopping" if self.stopped or self.run.stop_requested else "running",
                step=state.global_step,
                total=state.max_steps,
                eta_s=eta,
                tokens_per_s=self.tokens_per_s,
                loss=self.last_loss,
                elapsed=self.elapsed(),
            )

    def on_evaluate(self, args, state, control, **kwargs):
        # On every process (on_log below writes on process 0 only): whether training ended on an evaluation decides
        # the final `trainer.evaluate()`, a collective all processes must enter together or none.
        self.last_eval_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "elapsed": round(self.elapsed(), 2)}
        if "loss" in logs:
            now, tokens = time.time(), state.num_input_tokens_seen
            if now > self.last_tokens[0] and tokens > self.last_tokens[1]:
                self.tokens_per_s = (tokens - self.last_tokens[1]) / (now - self.last_tokens[0])
            self.last_tokens = (now, tokens)
            self.last_loss = logs["loss"]
            row.update(loss=logs["loss"], learning_rate=logs.get("learning_rate"), tokens_per_s=self.tokens_per_s)
        if "eval_loss" in logs:
            row["eval_loss"] = logs["eval_loss"]
        row.update({name: logs[key] for key, name in PREFERENCE_METRICS.items() if key in logs})
        if len(row) == 2:
            return  # the final summary (train_runtime, ...) is in train.log already
        row["tokens"] = int(state.num_input_tokens_seen)  # compare runs by tokens seen, not steps of any size
        self.run.append_metrics(row)
        if "loss" in logs:  # the status written at this step's end did not have this loss yet
            self.run.update_status(loss=self.last_loss, tokens_per_s=self.tokens_per_s)
        parts = [f"step {state.global_step}/{state.max_steps}"]
        shown = ("loss", "eval_loss", "reward_margin", "eval_reward_margin", "learning_rate")
        parts += [f"{k} {row[k]:.4g}" for k in shown if row.get(k) is not None]
        if row.get("tokens_per_s"):
            parts.append(f"{row['tokens_per_s']:.0f} tokens/s")
        log.info(" · ".join(parts))


class KeepCheckpoints(TrainerCallback):
    """Keeps the newest `newest` checkpoints (0: all) and, with `best`, the one with the lowest held-out loss.

    With `best`, the held-out loss is measured at every save (not at a stop: that must be quick), so that each
    checkpoint has one; the Trainer's `save_total_limit` is off: it would delete an old best.
    """

    def __init__(self, run: RunDir, newest: int, best: bool):
        self.run, self.newest, self.best = run, newest, best

    def on_step_end(self, args, state, control, **kwargs):
        ending_early = control.should_training_stop and state.global_step < state.max_steps  # stop, time budget
        if self.best and control.should_save and not ending_early:
            control.should_evaluate = True  # the Trainer evaluates before it saves

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            dropped = self.run.prune_checkpoints(self.newest, self.best)
            if dropped:
                log.info("deleted checkpoints of steps %s", ", ".join(map(str, dropped)))


def check_tracker(report_to: str) -> None:
    """A FinetuneError saying what to install when the tracker `report_to` names cannot be imported (the word itself
    is checked with the config's other choices: `config.check_choices`)."""
    if report_to != "none" and importlib.util.find_spec(report_to) is None:
        raise FinetuneError(
            f"report_to: {report_to} needs the {report_to} package: pip install {report_to} (or choose none)."
        )


def tracker_callbacks(cfg: TrainConfig, run: RunDir, resumed_at: int | None, rank0: bool) -> list[TrainerCallback]:
    """The callbacks that also send the run's logs to `cfg.report_to` (tensorboard or trackio)."""
    check_tracker(cfg.report_to)
    if cfg.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        # In the run folder, not the Trainer's default under checkpoints/. A resume drops the events past its
        # checkpoint, as metrics.jsonl drops its rows.
        purge = resumed_at + 1 if resumed_at is not None else None
        writer = SummaryWriter(str(run.tensorboard_dir), purge_step=purge) if rank0 else None
        callback = TensorBoardCallback(writer)
        callback.logging_dir = str(run.tensorboard_dir)  # where it reopens a writer for the evaluation after training
        return [callback]
    if cfg.report_to == "trackio":
        from transformers.integrations import TrackioCallback

        return [TrackioCallback()]  # project and run name: `training_arguments`
    return []
