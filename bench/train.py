"""Training benchmark: the project's trainer vs the plain recipe most tutorials use, and vs TRL's SFTTrainer, on
lamini_docs.

    python bench/train.py [--quick] [--steps 12] [--quant none,4bit] [--sides plain,trl-sft,project]

Every side trains the embedded Gemma-3-270M with the same LoRA (`finetune.train.lora_config`: r=16 on all linear
layers) on the same rows with answer-only loss, the same batch size, learning rate schedule, steps and precision.
They differ in how a step is computed:

- project (`finetune.train`): rows grouped by length and padded per batch, vocabulary projection only at answer
  positions, in chunks (`answer_loss_sum`);
- plain: HF `Trainer` + PEFT, rows encoded as the project encodes them, in random order padded to the longest row
  of each batch (`DataCollatorForSeq2Seq`), `model(**batch, labels=...)`, i.e. logits over the full vocabulary at
  every position;
- trl-sft: TRL's `SFTTrainer` with `peft_config` as its docs use it: the rows as prompt/completion text (rendered
  with the same template) and `completion_only_loss`, TRL's own tokenization, collator (random order, padding per
  batch) and fused LM head (log-probabilities at answer positions only, in tiles).

Each config runs in its own process (honest peak RSS). Reports real (non-padding) training tokens/s and seconds
per step (after the first step), the held-out loss after training (same 32 test rows, same code for both) and the
mean training loss of the last steps, and peak RSS, for no quantization and 4-bit.
Target (issue 9): >= 1.5x real tokens/s over the plain recipe at equal loss.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, load_note, machine, peak_rss_gb, per_cpu_class, run_python, table

EVAL_ROWS = 32

WORKER = """
import sys
sys.path.insert(0, {bench!r})
from train import worker
worker({side!r}, {quant!r}, {steps}, {out!r})
"""


def config(quant: str, steps: int):
    from finetune.config import RECIPES, load_train_config

    cfg = load_train_config(RECIPES / "cpu_quick.yaml")  # Gemma-3-270M, LoRA r=16, batch 4, max_length 160
    cfg.model.quantization = None if quant == "none" else quant
    cfg.max_steps, cfg.logging_steps, cfg.save_steps, cfg.eval_rows = steps, 1, 10**6, 0
    return cfg


MARKS: list[tuple[float, int]] = []  # (time, real tokens seen) at the end of every step of this process's run


def mark(state) -> None:
    MARKS.append((time.perf_counter(), int(state.num_input_tokens_seen)))


def heldout_loss(model, tokenizer, cfg) -> float:
    """Mean answer-token cross-entropy on the first test rows: the same code and rows for both sides."""
    import torch

    from finetune.loss import answer_loss_sum
    from finetune.templates import pad_id
    from finetune.train import encode_splits, pad_batch

    test = encode_splits(cfg, tokenizer).test.select(range(EVAL_ROWS))
    pad = pad_id(tokenizer)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(test), 8):
            batch = pad_batch([test[i] for i in range(start, min(start + 8, len(test)))], pad)
            s, n = answer_loss_sum(model, batch)
            total, count = total + float(s), count + n
    return total / count


def worker(side: str, quant: str, steps: int, out: str) -> None:
    """Train one config in this process and print a JSON line with its measurements."""
    import torch

    from finetune import train as ft
    from finetune.runs import RunDir

    cfg = config(quant, steps)
    with tempfile.TemporaryDirectory() as run_dir:
        if side == "project":

            class Timed(ft.RunCallback):  # the project's own callback, plus the step timer
                def on_step_end(self, args, state, control, **kwargs):
                    mark(state)
                    return super().on_step_end(args, state, control, **kwargs)

            ft.RunCallback = Timed  # _train builds its callback from this name
            adapter = ft.train(cfg, run_dir)
            rss = peak_rss_gb()
            losses = [r["loss"] for r in RunDir(Path(run_dir)).read_metrics() if "loss" in r]
            from peft import PeftModel

            from finetune.models import load_model

            base, tokenizer = load_model(cfg.model)
            model = PeftModel.from_pretrained(base, str(adapter))
        else:
            model, tokenizer, losses = BASELINES[side](cfg, run_dir)
            rss = peak_rss_gb()
        loss = heldout_loss(model, tokenizer, cfg)
    (t0, n0), (t1, n1) = MARKS[0], MARKS[-1]
    result = {
        "side": side,
        "quant": quant,
        "steps": len(MARKS),
        "tokens/s": (n1 - n0) / (t1 - t0),
        "s/step": (t1 - t0) / (len(MARKS) - 1),
        "real tokens": n1,
        "held-out loss": loss,
        "train loss (last 3)": sum(losses[-3:]) / len(losses[-3:]),
        "peak RSS GiB": rss,
        "threads": torch.get_num_threads(),
    }
    Path(out).write_text(json.dumps(result))


def baseline_model(cfg):
    """(the config with `auto` decided as the project's trainer decides it, the model, its tokenizer)."""
    from peft import prepare_model_for_kbit_training
    from transformers import set_seed

    from finetune.hardware import resolve_auto
    from finetune.models import load_model, load_tokenizer

    set_seed(cfg.seed)
    cfg, _ = resolve_auto(cfg, len(load_tokenizer(cfg.model)))  # the precision the project's trainer chooses
    model, tokenizer = load_model(cfg.model)
    if cfg.model.quantization:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return cfg, model, tokenizer


def baseline_fit(trainer_cls, cfg, run_dir: str, args_cls=None, more_args: dict | None = None, **trainer):
    """Train with `trainer_cls(**trainer)` and the arguments every side shares (batch, schedule, steps, precision,
    seed), of class `args_cls` with `more_args`, timing each step; returns (the trained model, the logged losses)."""
    from transformers import TrainerCallback, TrainingArguments

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            mark(state)

    args = (args_cls or TrainingArguments)(
        output_dir=str(Path(run_dir) / "baseline"),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_steps=cfg.max_steps,
        logging_steps=1,
        save_strategy="no",
        seed=cfg.seed,
        bf16=cfg.mixed_precision == "bf16",
        activation_checkpointing=False,  # TRL turns it on by default; the project's run and plain have it off
        use_cpu=True,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        **(more_args or {}),
    )
    fitted = trainer_cls(args=args, callbacks=[StepTimer()], **trainer)
    fitted.train()
    return fitted.model, [r["loss"] for r in fitted.state.log_history if "loss" in r]


def plain_train(cfg, run_dir: str):
    """The tutorial recipe: Trainer + PEFT, random order, padding to the longest row, full-vocabulary logits."""
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer

    from finetune.train import encode_splits, lora_config

    cfg, model, tokenizer = baseline_model(cfg)
    model = get_peft_model(model, lora_config(cfg, model))
    train = encode_splits(cfg, tokenizer).train.remove_columns(["length"])
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    model, losses = baseline_fit(Trainer, cfg, run_dir, model=model, train_dataset=train, data_collator=collator)
    return model, tokenizer, losses


def trl_train(cfg, run_dir: str):
    """TRL's SFTTrainer + PEFT: the same rows as prompt/completion text, answer-only loss (`completion_only_loss`)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from finetune.data import load_splits
    from finetune.templates import get_template, render
    from finetune.train import lora_config

    cfg, model, tokenizer = baseline_model(cfg)
    template = get_template(cfg.data.template)
    prompts, answers = zip(*(render(template, row) for row in load_splits(cfg.data)["train"]))
    train = Dataset.from_dict({"prompt": list(prompts), "completion": list(answers)})
    sft = {"max_length": cfg.max_length, "completion_only_loss": True}
    model, losses = baseline_fit(
        SFTTrainer, cfg, run_dir, SFTConfig, sft, model=model, train_dataset=train, processing_class=tokenizer,
        peft_config=lora_config(cfg, model),
    )  # fmt: skip
    return model, tokenizer, losses


BASELINES = {"plain": plain_train, "trl-sft": trl_train}


def main() -> None:
    if not per_cpu_class():  # ran once per CPU class, each in its own child (--cpu-class native,avx2)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 steps per config (the rate is over steps 2-3).")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--quant", default="none,4bit", help="Comma-separated: none, 4bit.")
    parser.add_argument("--sides", default="plain,trl-sft,project", help="Comma-separated; plain is the base.")
    args = parser.parse_args()
    steps = 3 if args.quick else args.steps
    print(f"machine: {machine()}; {load_note()} at start")
    rows, ratios = [], {}  # ratios: side -> quant -> tokens/s over plain's
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.quant.split(","):
            results = {}
            for side in args.sides.split(","):
                out = Path(tmp) / f"{side}-{quant}.json"
                code = WORKER.format(bench=str(ROOT / "bench"), side=side, quant=quant, steps=steps, out=str(out))
                run_python(code, timeout=3600)
                result = results[side] = json.loads(out.read_text())
                rows.append(result)
                print(f"  {side} {quant}: {result['tokens/s']:.0f} tokens/s", file=sys.stderr)
                if side != "plain" and "plain" in results:
                    ratios.setdefault(side, {})[quant] = result["tokens/s"] / results["plain"]["tokens/s"]
                    result["speed-up"] = f"{ratios[side][quant]:.2f}x"
    for r in rows:
        r.setdefault("speed-up", "1.00x (baseline)" if r["side"] == "plain" else "")
    cfg = config("none", steps)
    print(
        f"{cfg.model.source} ({cfg.model.dtype}), LoRA r={cfg.lora_r} all linear, batch {cfg.batch_size} x "
        f"grad_accum {cfg.grad_accum}, max_length {cfg.max_length}, lr {cfg.learning_rate}, {steps} steps; "
        f"tokens/s and s/step after the first step; held-out loss on {EVAL_ROWS} test rows"
    )
    print(table(rows, "Training: project vs plain Trainer + PEFT vs TRL SFTTrainer + PEFT (lamini_docs)"))
    print(f"{load_note()} at end")
    names = {"project": "project trainer", "trl-sft": "TRL SFTTrainer (completion_only_loss)"}
    print(
        "headline: " + "; ".join(f"{names[side]} " + ", ".join(f"{v:.2f}x ({k})" for k, v in by_quant.items())
                                 for side, by_quant in ratios.items())
        + " real tokens/s over the plain Trainer + PEFT recipe (target for the project >= 1.5x at equal loss)"
    )  # fmt: skip


if __name__ == "__main__":
    main()
