"""DPO: preference tuning of an SFT run's adapter on (prompt, chosen, rejected) pairs, with TRL's `DPOTrainer`.

    python -m finetune train --config recipes/dpo_votes.yaml                  # the Arena's votes, newest SFT run
    python -m finetune train --config recipes/dpo_votes.yaml --set base_adapter=<run id> --set data.source=p.jsonl

This is `method: dpo` of `finetune.train`: the same runner, queue, run folder, live chart and resume as SFT. The run
loads the SFT adapter (`base_adapter`) and trains it on; TRL keeps a frozen copy of it as the reference, so each
pair nudges the adapter to make the chosen answer likelier than the rejected one *compared with where it started*
(`beta`: how far it may move). metrics.jsonl gets the DPO loss and the reward margins (`callbacks.PREFERENCE_METRICS`:
log-likelihood gain of chosen minus that of rejected, times beta); the result is a plain PEFT adapter in the run
folder, which the Arena lists like any run's.
"""

from __future__ import annotations

import functools
import os
from dataclasses import replace
from pathlib import Path

import torch
from datasets import Dataset
from transformers.trainer import TRAINING_ARGS_NAME
from trl import DPOConfig, DPOTrainer

from finetune import FinetuneError
from finetune.callbacks import RunCallback
from finetune.config import TrainConfig
from finetune.runs import RunDir, is_adapter, list_runs, open_run
from finetune.templates import chat_messages, get_template, render
from finetune.train import (
    Announce,
    build_model,
    held_out,
    step_seconds,
    steps_in_budget,
    training_arguments,
)

LATEST = "latest"  # base_adapter: the newest SFT run with an adapter on the same base model


def resolve_base_adapter(cfg: TrainConfig) -> Path:
    """The adapter folder a DPO run starts from: `base_adapter` is a run id, a run or adapter folder, or `latest`."""
    name = (cfg.base_adapter or "").strip()
    if not name:
        raise FinetuneError("A dpo run starts from an SFT adapter: set base_adapter to a run id, or latest.")
    if name == LATEST:
        for info in list_runs():
            config = info.run.read_config() if info.has_adapter and info.run.config_file.is_file() else None
            if config and config.method == "sft" and config.model.source == cfg.model.source:
                return info.run.adapter_dir
        raise FinetuneError(f"No SFT run on {cfg.model.source} has an adapter yet: train one first (method sft).")
    path = Path(name).expanduser()
    if is_adapter(path):  # an adapter folder; in a run folder, its config is checked below
        run, adapter = RunDir(path.parent), path
    else:
        run = open_run(path)  # a run id or a run folder; raises with what to give instead
        adapter = run.adapter_dir
        if not run.has_adapter:
            raise FinetuneError(f"Run {run.run_id} has no adapter yet: let it finish, or pick another run.")
    if run.config_file.is_file() and (source := run.read_config().model.source) != cfg.model.source:
        raise FinetuneError(
            f"base_adapter {name} was trained on {source}, not on {cfg.model.source}: set model.source to {source}."
        )
    return adapter


def check_dpo(cfg: TrainConfig, rows: Dataset) -> None:
    """Fail fast with a sentence on a dpo config that cannot train (`train.check_config` calls this)."""
    from finetune.data import is_preference

    if not is_preference(rows):
        raise FinetuneError(
            "method dpo learns from preference pairs: choose a data set with prompt/chosen/rejected columns "
            "(arena_votes: the Arena's blind votes)."
        )
    if cfg.beta <= 0:
        raise FinetuneError(f"beta must be positive (got {cfg.beta}).")
    if cfg.eval_at_end:
        raise FinetuneError("eval_at_end scores answers of sft runs: turn it off for dpo (it reports held-out pairs).")
    resolve_base_adapter(cfg)


def preference_rows(ds: Dataset, template_name: str) -> Dataset:
    """Canonical preference rows in TRL's preference format, the prompt rendered with the run's template (the SFT
    adapter's): text for the text templates, conversations for the chat template (TRL applies the model's)."""
    template = get_template(template_name)

    def convert(row: dict) -> dict:
        if template.chat:
            return {
                "prompt": chat_messages(row)[0],
                "chosen": [{"role": "assistant", "content": row["chosen"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]}],
            }
        return {"prompt": render(template, row)[0], "chosen": row["chosen"], "rejected": row["rejected"]}

    return ds.map(convert, remove_columns=ds.column_names)


def score_answer_positions_only() -> None:
    """Make TRL's fused LM head project only the labelled (answer) positions on every device but Neuron.

    It does so ("compact") on CUDA and XPU only, and projects every position elsewhere, which keeps tile shapes fixed
    for Neuron's compiler but costs a CPU the prompt's and the padding's projections to the whole vocabulary: a DPO
    step of Gemma-3-270M (batch 4 pairs, bfloat16, 2 cores) took 22 s and 3.2 GB, and 6.0 s and 2.4 GB compact.
    The choice is one module-level name in TRL 1.16; when a later TRL has none, nothing changes.
    """
    import trl.trainer.utils as trl_utils

    if hasattr(trl_utils, "_use_triton"):
        trl_utils._use_triton = lambda device: device.type != "neuron"


class PreferenceTrainer(DPOTrainer):
    """TRL's `DPOTrainer`, saving what the project's own trainer saves: the trained adapter alone.

    TRL would also save its frozen reference copy of the starting adapter (a second adapter) and the tokenizer files:
    the run's adapter would double, and its zip carry Gemma's 33 MB tokenizer. A resume rebuilds the reference from
    base_adapter, as a fresh start does.
    """

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir, selected_adapters=["default"])
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))


def dpo_trainer(
    cfg: TrainConfig, decided: str, run: RunDir, rank0: bool, callback: RunCallback, announce: Announce
) -> tuple[PreferenceTrainer, bool]:
    """The trainer of a `method: dpo` run (its `auto` settings decided), and whether it has held-out pairs."""
    from finetune.data import load_splits

    adapter = resolve_base_adapter(cfg)
    score_answer_positions_only()
    model, tokenizer, summary = build_model(cfg, adapter)
    summary = f"{summary} · DPO from {adapter.parent.name} (beta {cfg.beta:g}) · {decided}"
    splits = load_splits(cfg.data)
    test, has_eval = held_out(splits["test"], cfg)
    train = preference_rows(splits["train"], cfg.data.template)
    announce(summary, f"{len(train)} preference pairs to train on, {len(test) if has_eval else 0} held out")
    args = training_arguments(
        cfg if cfg.max_steps != "auto" else replace(cfg, max_steps=1),  # planned below, once TRL tokenized the pairs
        run.path,
        has_eval,
        DPOConfig,
        beta=cfg.beta,
        max_length=cfg.max_length,
        # TRL's own batches (prompt + chosen, prompt + rejected): no `length` column to group by, no `labels`
        train_sampling_strategy="random",
        remove_unused_columns=True,
        label_names=None,
    )
    trainer = PreferenceTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=preference_rows(test, cfg.data.template) if has_eval else None,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    if len(trainer.train_dataset) == 0:
        raise FinetuneError(f"Every pair's prompt fills max_length={cfg.max_length}: raise max_length.")
    if cfg.max_steps == "auto":
        timed = functools.partial(dpo_step_seconds, trainer, cfg)
        rows = len(trainer.train_dataset)
        trainer.args.max_steps = steps_in_budget(cfg, rows, run, rank0, timed, callback.remaining)
    return trainer, has_eval


def dpo_step_seconds(trainer: DPOTrainer, cfg: TrainConfig) -> float:
    """Seconds of one DPO step here: the loss of the first batch (the adapter's and the reference's forwards of
    chosen and rejected) and its backward. Done at the starting weights, so the metrics it adds to step 1's mean are
    step 1's own."""
    rows = [trainer.train_dataset[i] for i in range(min(cfg.batch_size, len(trainer.train_dataset)))]
    device = next(trainer.model.parameters()).device
    batch = {k: v.to(device) for k, v in trainer.data_collator(rows).items()}
    return step_seconds(cfg, trainer.model, lambda: trainer.compute_loss(trainer.model, batch))
