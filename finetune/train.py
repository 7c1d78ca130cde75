"""One training run: LoRA / QLoRA fine-tuning with the Hugging Face `Trainer` + PEFT, driven by a `TrainConfig`.

    python -m finetune train --config recipes/lamini_docs_qlora.yaml               # one process: CPU or one GPU
    python -m finetune train --config recipes/cpu_quick.yaml --set max_steps=40    # any key can be overridden
    python -m finetune train --run-dir RUN_DIR --resume                            # continue after a stop or a crash
    python -m finetune train --run-dir RUN_DIR --checkpoint 40                     # ...or from an earlier checkpoint
    accelerate launch --num_processes 2 -m finetune train --config ...             # DDP (CPU: torchrun instead)

`method: dpo` trains the same way on preference pairs, from an SFT run's adapter (`finetune.dpo`, with TRL's
`DPOTrainer`): `python -m finetune train --config recipes/dpo_votes.yaml` learns from the Arena's blind votes.

From Python: `train(cfg, run_dir)`. A run lives in `runs/<run-id>/` (see `finetune.runner`, which starts each run
in its own process, and `finetune.runs`, which names its files): the config, status (atomic), metrics
(append-only), log, checkpoints (the newest `save_total_limit` and the best by held-out loss) and the final LoRA
adapter (`PeftModel.from_pretrained` loads it, and a checkpoint's folder too); `finetune.callbacks` writes them as the
run trains, `finetune.export` takes the adapter elsewhere.

Speed: the loss projects to the vocabulary only at answer tokens, in chunks (`finetune.loss`). Rows are grouped
by length and padded per batch, and matmuls run in bfloat16 where the CPU or GPU computes it natively.
"""

from __future__ import annotations

import functools
import gc
import logging
import math
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PrinterCallback, Trainer, TrainingArguments

from finetune import FinetuneError
from finetune.callbacks import KeepCheckpoints, RunCallback, check_tracker, tracker_callbacks
from finetune.config import TrainConfig, check_choices, decided_settings
from finetune.export import push_adapter
from finetune.hardware import AUTOCAST, machine, refresh_probe, resolve_auto
from finetune.loss import answer_hidden, answer_loss_sum, causal_lm
from finetune.runs import Checkpoint, RunDir, process_fields
from finetune.serving import serving_chat_template, write_chat_template
from finetune.templates import IGNORE_INDEX, encode_row, get_template, pad_batch, pad_id, validate

log = logging.getLogger(__name__)
# `evaluate(run_dir, progress=..., device=...)`: the evaluation at the end of a run (`finetune.evaluate.evaluate_run`)
Evaluate = Callable[..., object]



# --- data --------------------------------------------------------------------------------------


@dataclass
class EncodedData:
    train: object  # datasets.Dataset with input_ids, attention_mask, labels, length
    test: object
    skipped: int  # rows whose prompt fills max_length: nothing left to learn from them


def encode_splits(cfg: TrainConfig, tokenizer) -> EncodedData:
    """Load the data set, render it with the template and tokenize it with the answer-only label mask."""
    from finetune.data import load_splits

    splits = load_splits(cfg.data)
    template = get_template(cfg.data.template)
    validate(template, splits["train"].column_names)

    def encode(row: dict) -> dict:
        enc = encode_row(tokenizer, template, row, cfg.max_length)
        return {**{k: enc[k] for k in ("input_ids", "attention_mask", "labels")}, "length": len(enc["input_ids"])}

    out = {}
    skipped = 0
    for name, ds in splits.items():
        encoded = ds.map(encode, remove_columns=ds.column_names)
        useful = encoded.filter(lambda row: any(t != IGNORE_INDEX for t in row["labels"][1:]))
        skipped += len(encoded) - len(useful) if name == "train" else 0
        out[name] = useful
    if len(out["train"]) == 0:
        raise FinetuneError(
            f"No training row has an answer token within max_length={cfg.max_length}: raise max_length above "
            "the prompt length, or choose a data set with answers."
        )
    return EncodedData(out["train"], out["test"], skipped)


COMPETITOR_ROWS, COMPETITORS = 32, 64  # rows and top tokens per answer position: +6k tokens for the quick start
TIMED_RUNS = 3  # forward+backward runs of the step `max_steps: auto` times (the first pays one-time allocations)


def data_vocab(train, model=None, pad: int = 0, rows: int = COMPETITOR_ROWS, top: int = COMPETITORS) -> torch.Tensor:
    """Sorted ids of every token in the training rows (the `train_vocab: data` softmax) and, given the model, of its
    `top` likeliest next tokens at the answer positions of the first `rows` rows: the competitors that a softmax over
    the data's tokens alone would never push down, so the full-vocabulary loss would fall less than the trained one."""
    found = {t for ids in train["input_ids"] for t in ids}
    if model is not None and rows > 0:
        head = causal_lm(model).get_output_embeddings()
        with torch.no_grad():
            for i in range(min(rows, len(train))):  # one row at a time: its answer positions x vocabulary stay small
                batch = pad_batch([train[i]], pad)
                inputs = {k: batch[k].to(head.weight.device) for k in ("input_ids", "attention_mask")}
                _, hidden, _ = answer_hidden(model, {**inputs, "labels": batch["labels"]})
                logits = head(hidden)
                found.update(logits.topk(min(top, logits.shape[-1]), dim=-1).indices.flatten().tolist())
    return torch.tensor(sorted(found))


def check_config(cfg: TrainConfig) -> str:
    """Fail fast, with a sentence saying what to fix, on configs that cannot train; returns a one-line summary.

    The runner calls this before it starts a training process. It loads the tokenizer and the data, not the model.
    """
    from finetune.models import load_tokenizer, quantization_config

    for key in ("max_steps", "batch_size"):
        if isinstance(getattr(cfg, key), str) and getattr(cfg, key) != "auto":
            raise FinetuneError(f"{key} must be a number or auto (got {getattr(cfg, key)!r}).")
    numbers = {"max_length": cfg.max_length, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum}
    numbers.update(lora_r=cfg.lora_r)
    for key, value in numbers.items():
        if value != "auto" and value < 1:
            raise FinetuneError(f"{key} must be at least 1 (got {value}).")
    if cfg.learning_rate <= 0:
        raise FinetuneError(f"learning_rate must be positive (got {cfg.learning_rate}).")
    if cfg.max_steps == "auto" and cfg.max_minutes <= 0:
        raise FinetuneError("max_steps auto fits the steps to max_minutes: set max_minutes above 0 too.")
    if cfg.max_steps != "auto" and cfg.max_steps <= 0 and cfg.num_epochs <= 0:
        raise FinetuneError("Set max_steps or num_epochs above 0.")
    check_choices(cfg)  # method, mixed_precision, train_vocab, report_to: the words their types allow
    check_tracker(cfg.report_to)
    quantization_config(cfg.model.quantization)  # raises on an unknown kind or a missing bitsandbytes
    tokenizer = load_tokenizer(cfg.model)  # raises on an unknown model
    from finetune.data import load_rows

    rows = load_rows(cfg.data)  # raises on a missing file or zero rows
    if len(rows) < 2 and cfg.data.test_size > 0:
        raise FinetuneError("The data set needs at least 2 rows (one to train on, one held out).")
    if cfg.method == "dpo":
        from finetune.dpo import check_dpo

        check_dpo(cfg, rows)
    template = get_template(cfg.data.template)
    validate(template, rows.column_names)
    sample = rows.select(range(min(64, len(rows))))
    prompts = sorted(encode_row(tokenizer, template, row)["prompt_length"] for row in sample)
    typical = prompts[len(prompts) // 2]
    if typical >= cfg.max_length:
        raise FinetuneError(
            f"max_length={cfg.max_length} is not above the prompt length (typically {typical} tokens here), so "
            f"most rows would have no answer to learn: raise max_length to at least {typical + 64}."
        )
    return f"{cfg.model.source} on {cfg.data.source}: {len(rows)} rows, prompts ~{typical} tokens"


class AnswerOnlyTrainer(Trainer):
    """`Trainer` whose loss projects to the vocabulary only at answer positions (see `answer_loss_sum`)."""

    vocab: torch.Tensor | None = None  # train on the softmax over these tokens only (`TrainConfig.train_vocab`)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        total, count = answer_loss_sum(model, inputs, self.vocab if model.training else None)
        if num_items_in_batch is not None:
            # Same normalisation as the Trainer's built-in path: by the answer tokens of the whole accumulated
            # batch (all processes), times the process count because DDP averages gradients.
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.args.world_size
        else:
            loss = total / max(count, 1)
        return (loss, {"loss": loss}) if return_outputs else loss


# --- the run -----------------------------------------------------------------------------------


def lora_config(cfg: TrainConfig, model=None):
    """The PEFT `LoraConfig` of a run (the project trainer and the plain baseline in bench/ share it). With
    `lora_layers`, the adapted modules of the model's last layers only (PEFT wants their names then)."""
    from peft import LoraConfig

    targets, layers = cfg.target_modules, None
    if cfg.lora_layers > 0 and model is not None:
        count = model.config.get_text_config().num_hidden_layers
        layers = list(range(max(0, count - cfg.lora_layers), count))
        if targets == "all-linear":  # PEFT's meaning: every linear layer but the output layer
            head = model.get_output_embeddings()
            targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                              if isinstance(module, torch.nn.Linear) and module is not head})  # fmt: skip
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )


def build_model(cfg: TrainConfig, adapter: Path | None = None):
    """(PEFT model ready to train, tokenizer, summary line with trainable parameters and memory). `adapter`: go on
    training that LoRA adapter (its shape) instead of a new one."""
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    from finetune.models import load_model

    model, tokenizer = load_model(cfg.model, device=machine().train_device())
    footprint = model.get_memory_footprint()
    if cfg.model.quantization in ("4bit", "8bit"):
        dtype = model.get_input_embeddings().weight.dtype
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        # It casts every unquantized weight to float32, the frozen vocabulary-sized embedding too: twice its memory,
        # and autocast then re-casts the whole output layer at every projection. Norms may stay float32.
        for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):
            embedding.to(dtype)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    else:
        model = get_peft_model(model, lora_config(cfg, model))
    trainable, total = model.get_nb_trainable_parameters()
    summary = (
        f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%) · "
        f"model memory: {footprint / 2**20:,.0f} MB ({cfg.model.quantization or 'no quantization'}, "
        f"{next(model.parameters()).dtype})"
    )
    return model, tokenizer, summary


def training_arguments(
    cfg: TrainConfig, run_dir: Path, has_eval: bool, kind: type[TrainingArguments] = TrainingArguments, **more
) -> TrainingArguments:
    """The Trainer's arguments for a config whose `auto` settings are decided (`hardware.resolve_auto`); `kind`: a
    subclass (TRL's `DPOConfig`), whose own settings and overrides come in `more`."""
    precision = cfg.mixed_precision
    settings = dict(
        output_dir=str(RunDir(run_dir).checkpoints_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        eval_strategy="steps" if has_eval and cfg.eval_steps > 0 else "no",
        eval_steps=cfg.eval_steps or None,
        eval_on_start=has_eval,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=None,  # `KeepCheckpoints` deletes old checkpoints: it also keeps the best
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        seed=cfg.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=machine().train_device() == "cpu",  # a ZeroGPU Space's CUDA is not this process's
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        train_sampling_strategy="group_by_length",
        include_num_input_tokens_seen="non_padding",
        prediction_loss_only=True,
        label_names=["labels"],
        remove_unused_columns=False,  # keep `length` for length grouping; the collator picks what the model needs
        ddp_find_unused_parameters=False,
        report_to="none",  # trackers come as callbacks (`tracker_callbacks`), which know the run folder
        project="finetune-workbench",  # trackio's project and run name
        run_name=Path(run_dir).name,
        disable_tqdm=True,  # train.log gets one readable line per logging step instead of progress bars
        dataloader_num_workers=0,
    )
    args = kind(**{**settings, **more})
    if args.n_gpu > 1:  # the Trainer would wrap the model in nn.DataParallel (see `hardware.pin_one_gpu`)
        raise FinetuneError(
            f"This process sees {args.n_gpu} GPUs: train on several with `accelerate launch --num_processes "
            f"{args.n_gpu} -m finetune train ...`, or show it one (CUDA_VISIBLE_DEVICES=0)."
        )
    return args


def train(
    cfg: TrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    checkpoint: int | None = None,
    evaluate: Evaluate | None = None,
) -> Path:
    """Train one run into `run_dir`; returns the adapter folder. `resume`: continue from the latest checkpoint, or
    from the one at step `checkpoint` (the metrics and checkpoints after it are dropped). `evaluate`: what
    `eval_at_end` runs on the saved adapter (the CLI passes `finetune.evaluate.evaluate_run`, a layer above this one);
    None: no evaluation at the end."""
    run = RunDir(Path(run_dir))
    run.path.mkdir(parents=True, exist_ok=True)
    rank0 = int(os.environ.get("RANK", 0)) == 0
    stop_signal = threading.Event()
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop_signal.set()) if on_main_thread else None
    if rank0:
        run.write_config(cfg)
        if run.read_status().get("state") != "stopping":  # a stop asked while we started up still counts
            run.clear_stop()
        run.update_status(
            state="running", **process_fields(os.getpid()), host=socket.gethostname(), message="Loading model"
        )
    try:
        return _train(cfg, run, resume or checkpoint is not None, checkpoint, rank0, stop_signal, evaluate)
    except BaseException as e:
        if rank0:
            reason = "Interrupted." if isinstance(e, KeyboardInterrupt) else _failure_message(e)
            run.update_status(state="failed", message=reason, eta_s=None)
        raise
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _failure_message(e: BaseException) -> str:
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
        return "Out of memory: lower batch_size or max_length, or use 4bit quantization."
    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return text if isinstance(e, FinetuneError) else f"{type(e).__name__}: {text}"


def _train(
    cfg: TrainConfig,
    run: RunDir,
    resume: bool,
    step: int | None,
    rank0: bool,
    stop_signal: threading.Event,
    evaluate: Evaluate | None,
) -> Path:
    from transformers import set_seed

    from finetune.models import fp16_ok, load_tokenizer

    set_seed(cfg.seed)
    refresh_probe()  # the machine as this run finds it: its decisions and every later estimate
    cfg, decided = resolve_auto(cfg, len(load_tokenizer(cfg.model)), fp16_ok=fp16_ok(cfg.model))
    if rank0:  # what `auto` became on this machine, read back by `finetune.runcode`
        run.update_status(decided=decided_settings(cfg))
    # Saved with the adapter: the chat template that prompts it as trained (`finetune.serving`).
    chat_template = serving_chat_template(get_template(cfg.data.template), load_tokenizer(cfg.model))
    if step is not None:
        checkpoint = Checkpoint(step, run.adapter_path(step))  # raises, naming the kept steps, when there is none
    else:
        checkpoint = run.latest_checkpoint() if resume else None
    elapsed_before = 0.0
    if rank0:
        if checkpoint is not None:
            elapsed_before = run.truncate_metrics(checkpoint.step)
            run.drop_checkpoints_after(checkpoint.step)
        elif not resume:
            run.clear_metrics()

    def announce(summary: str, rows: str) -> None:
        """Say what trains on what, once the model and the data are ready."""
        log.info("%s", summary)
        if rank0:
            log.info("rows: %s", rows)
            where = f"Resuming from step {checkpoint.step}" if checkpoint else "Starting"
            run.update_status(message=f"{where}: {summary}", summary=summary)

    callback = RunCallback(run, elapsed_before, stop_signal, cfg.max_minutes * 60)
    if cfg.method == "dpo":
        from finetune.dpo import dpo_trainer

        trainer, has_eval = dpo_trainer(cfg, decided, run, rank0, callback, announce)
    else:
        trainer, has_eval = _sft_trainer(cfg, decided, run, rank0, callback, announce)
    trainer.add_callback(KeepCheckpoints(run, cfg.save_total_limit, cfg.keep_best and has_eval))
    for tracker in tracker_callbacks(cfg, run, checkpoint.step if checkpoint else None, rank0):
        trainer.add_callback(tracker)
    trainer.remove_callback(PrinterCallback)  # RunCallback logs one readable line per logging step instead
    trainer.train(resume_from_checkpoint=str(checkpoint.path) if checkpoint else None)
    final_eval = has_eval and not callback.stopped and callback.last_eval_step != trainer.state.global_step
    log.info("final evaluation: %s (process %d)", "yes" if final_eval else "no, done at the last step",
             trainer.args.process_index)  # fmt: skip
    if final_eval:
        trainer.evaluate()  # the held-out loss after training, next to the one at step 0
    adapter = run.adapter_dir
    _save_adapter(trainer, adapter, chat_template)
    step, total = trainer.state.global_step, trainer.state.max_steps
    del trainer
    gc.collect()
    if not rank0:
        return adapter
    run.update_status(peak_memory_gb=round(peak_memory_gb(), 2))
    if callback.stopped:
        run.update_status(state="stopped", step=step, eta_s=None, message=f"Stopped at step {step}; adapter saved.")
        return adapter
    if cfg.eval_at_end and evaluate is not None:
        run.update_status(message="Evaluating the adapter on held-out data")

        def progress(done: int, total: int, what: str) -> None:
            run.update_status(message=f"{what} ({done}/{total})")

        # On this process's own device: the app's (FINETUNE_APP_DEVICE, a ZeroGPU's GPU) is not this process's.
        evaluate(run.path, progress=progress, device=machine().train_device())
    if cfg.push_to_hub:
        run.update_status(message=f"Pushing the adapter to {cfg.push_to_hub}")
        push_adapter(run.path, cfg.push_to_hub)
    final = next((r for r in reversed(run.read_metrics()) if "eval_loss" in r), {})
    note = f", held-out loss {final['eval_loss']:.3f}" if final else ""
    if "eval_reward_margin" in final:
        note += (f", reward margin {final['eval_reward_margin']:.3f} (chosen preferred in "
                 f"{100 * final['eval_reward_accuracy']:.0f}% of held-out pairs)")  # fmt: skip
    run.update_status(state="finished", step=step, total=total, eta_s=0, message=f"Finished {step} steps{note}.")
    return adapter


Announce = Callable[[str, str], None]  # (summary, rows): what trains on what, said once model and data are ready


def held_out(test, cfg: TrainConfig) -> tuple[object, bool]:
    """The held-out rows a run measures its loss on (the first eval_rows), and whether there are any."""
    if cfg.eval_rows is not None and len(test) > cfg.eval_rows:
        test = test.select(range(cfg.eval_rows))
    return test, len(test) > 0 and cfg.eval_rows != 0


def _sft_trainer(
    cfg: TrainConfig, decided: str, run: RunDir, rank0: bool, callback: RunCallback, announce: Announce
) -> tuple[Trainer, bool]:
    """The project's answer-only Trainer for a new LoRA adapter (`method: sft`), and whether it has held-out rows."""
    from finetune.models import forget_tokenizers

    model, tokenizer, summary = build_model(cfg)
    summary = f"{summary} · {decided}"
    data = encode_splits(cfg, tokenizer)
    pad, vocab_size = pad_id(tokenizer), len(tokenizer)
    del tokenizer
    forget_tokenizers()  # Gemma's takes 0.1 GB that training does not need
    test, has_eval = held_out(data.test, cfg)
    skipped = f", {data.skipped} skipped (prompt longer than max_length)" if data.skipped else ""
    announce(summary, f"{len(data.train)} train{skipped}, {len(test)} held out for the loss")
    vocab = data_vocab(data.train, model, pad) if cfg.train_vocab == "data" and cfg.answer_only_logits else None
    if cfg.max_steps == "auto":
        timed = functools.partial(sft_step_seconds, cfg, model, data.train, pad, vocab)
        cfg.max_steps = steps_in_budget(cfg, len(data.train), run, rank0, timed, callback.remaining)
    trainer_cls = AnswerOnlyTrainer if cfg.answer_only_logits else Trainer
    trainer = trainer_cls(
        model=model,
        args=training_arguments(cfg, run.path, has_eval),
        data_collator=lambda features: pad_batch(features, pad),
        train_dataset=data.train,
        eval_dataset=test if has_eval else None,
        callbacks=[callback],
    )
    if vocab is not None:
        trainer.vocab = vocab
        note = (f"training softmax over {len(vocab):,} of {vocab_size:,} tokens: the data's and the model's likeliest "
                "competitors (held-out loss: all)")  # fmt: skip
        log.info("%s", note)
        if rank0:
            run.update_status(summary=f"{summary} · {note}")
    return trainer, has_eval


def peak_memory_gb() -> float:
    """Peak memory of this training process: the GPU's allocations on CUDA, else the resident set (GiB)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def sft_step_seconds(cfg: TrainConfig, model, train, pad: int, vocab: torch.Tensor | None = None) -> float:
    """Seconds of one optimizer step on this machine: forward + backward of a batch of rows of about the mean length
    (as length-grouped batches are), timed by `step_seconds`."""
    lengths = train["length"]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    mean = sum(lengths) / len(lengths)
    at = next(i for i, k in enumerate(order) if lengths[k] >= mean)
    size = min(cfg.batch_size, len(order))
    start = max(0, min(at - size // 2, len(order) - size))
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in pad_batch([train[k] for k in order[start : start + size]], pad).items()}
    if cfg.gradient_checkpointing:  # as the Trainer will run it
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def loss() -> torch.Tensor:
        if cfg.answer_only_logits:
            total, count = answer_loss_sum(model, batch, vocab)
            return total / max(count, 1)
        return model(**batch).loss

    return step_seconds(cfg, model, loss)


def step_seconds(cfg: TrainConfig, model, loss) -> float:
    """Seconds of one optimizer step: `loss()` (a batch's forward) and its backward under the run's autocast, the
    mean of the runs after the first (which pays one-time allocations), times grad_accum. Gradients are dropped after
    each run: a backward that adds into kept gradients took 25% longer (2-core AVX2), and planned too few steps."""
    device = next(model.parameters()).device
    autocast = AUTOCAST.get(cfg.mixed_precision, torch.float32)
    model.train()
    seconds = []
    for _ in range(TIMED_RUNS):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast, enabled=autocast != torch.float32):
            value = loss()
        value.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return sum(seconds[1:]) / (TIMED_RUNS - 1) * cfg.grad_accum


def join_process_group() -> None:
    """Join the process group the Trainer would start (under `accelerate launch` / torchrun), as it will: on the CPU
    with gloo where this process trains on the CPU. Accelerate's state is shared and set once: a bare `PartialState()`
    on a CPU decides "not distributed" for the Trainer too, and the processes then train apart."""
    from accelerate import PartialState

    PartialState(cpu=machine().train_device() == "cpu")


def planned_steps(budget_s: float, step_s: float, cap: int | None = None) -> int:
    """`max_steps: auto`: the steps of `step_s` that fit in `budget_s`. The first steps are slower (new shapes,
    allocations: about 3 steps' worth) and a timed batch is a typical one, not each: 5% to spare (measured 2-5% on
    the quick start on both CPU classes)."""
    fit = max(1, int((budget_s - 3 * step_s) * 0.95 / step_s))
    return min(fit, cap) if cap else fit



def epoch_steps(rows: int, cfg: TrainConfig, world: int = 1) -> int | None:
    """Optimizer steps of `num_epochs` over `rows` training rows (None without an epoch count)."""
    if cfg.num_epochs <= 0:
        return None
    per_epoch = math.ceil(rows / (cfg.batch_size * cfg.grad_accum * world))
    return max(1, math.floor(per_epoch * cfg.num_epochs))


def steps_in_budget(cfg: TrainConfig, rows: int, run: RunDir, rank0: bool, step_seconds: Callable[[], float],
                    remaining_s: Callable[[], float]) -> int:  # fmt: skip
    """`max_steps: auto`: the steps whose cost (`step_seconds()`, timed here) fit in what is left of max_minutes
    (`remaining_s()`, once the step is timed; at most num_epochs over the `rows` training rows), so the learning-rate
    schedule ends when the budget does, on whatever machine this is. Kept in status.json for resume; under
    accelerate, process 0's count for all."""
    planned = run.read_status().get("planned_steps")
    if not planned:
        step_s = step_seconds()
        world = int(os.environ.get("WORLD_SIZE", 1))
        planned = planned_steps(remaining_s(), step_s, epoch_steps(rows, cfg, world))
        if world > 1:
            from accelerate.utils import broadcast_object_list

            join_process_group()
            planned = broadcast_object_list([planned])[0]
        log.info("one step takes %.2f s here: %d steps fit in the %.1f of %g min left", step_s, planned,
                 remaining_s() / 60, cfg.max_minutes)  # fmt: skip
        if rank0:
            run.update_status(planned_steps=planned, step_s=round(step_s, 3))
    return int(planned)


def _save_adapter(trainer: Trainer, adapter: Path, chat_template: str | None = None) -> None:
    """Save the LoRA adapter, with the chat template that prompts it as trained (`finetune.serving`), next to the old
    one, then swap, so a crash never leaves half an adapter."""
    tmp = adapter.with_name(f".{adapter.name}-tmp")
    trainer.save_model(str(tmp))  # only process 0 writes; PEFT models save just the adapter
    if trainer.is_world_process_zero():
        write_chat_template(tmp, chat_template)
        shutil.rmtree(adapter, ignore_errors=True)
        os.replace(tmp, adapter)
