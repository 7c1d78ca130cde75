"""What a run will take on this machine, before anything trains: seconds per step, steps in a time budget, ETA.

    from finetune.plan import estimate_run
    estimate = estimate_run(cfg)     # reads the CPU probe (finetune.hardware), the model's shape and the data
    estimate.step_s, estimate.steps, estimate.line   # the line the Start and Train tabs show

It sits above the trainer (it counts the trainer's own set-up: `COMPETITOR_ROWS`, `TIMED_RUNS`) and below the
runner and the guided path, which use it. `python bench/eta.py` checks it against real steps on both CPU classes.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass

import torch

from finetune.config import DataConfig, TrainConfig
from finetune.data import load_splits
from finetune.hardware import Machine, machine, resolve_auto, torch_dtype
from finetune.models import ModelShape, fp16_ok, load_tokenizer, model_shape
from finetune.templates import IGNORE_INDEX, encode_row, get_template
from finetune.train import COMPETITOR_ROWS, TIMED_RUNS, epoch_steps, planned_steps

# A LoRA step on a CPU, in three parts fitted to steady-state steps of three forms (the quick start, the quick CPU run
# with the data's and with the full vocabulary) on both CPU classes, each within 10% (bench/README.md, "ETA"):
# - matrix products at the probe's rate of the compute dtype: forward and input gradients through the frozen body
#   (4 FLOPs per body parameter and token) and the softmax projection at answer positions;
# - the float32 softmax itself (exp, sums, gradient) over answer positions x trained vocabulary;
# - a fixed cost per layer and step (LoRA's small operators, autograd, the optimizer): ~0.5 s for Gemma's 18 layers.
# The last two scale with the float32 rate, as a proxy for the speed of the cores.
MATMUL_FACTOR = 0.95
SOFTMAX_FLOPS = 1.2e3  # float32 FLOP-equivalents per answer token and vocabulary entry
LAYER_FLOPS = 4.9e9  # per layer and step
QUANT_FACTOR = 1.1  # 4-bit weights: de-quantized at each projection


@dataclass(frozen=True)
class Estimate:
    step_s: float | None  # None: no probe (a GPU: timed when training starts)
    steps: int | None
    line: str  # the machine and what the run will take here, for people
    cfg: TrainConfig | None = None  # the config with its `auto` settings decided here
    shape: ModelShape | None = None
    row_tokens: float = 0.0  # mean tokens of a training row (at most max_length) and of its answer
    row_answers: float = 0.0
    setup_s: float = 0.0  # the run's own set-up inside its max_minutes: the competitor tokens and the timed step

    @property
    def minutes(self) -> float | None:
        return self.step_s * self.steps / 60 if self.step_s is not None and self.steps is not None else None


def step_seconds(m: Machine, shape: ModelShape, tokens: float, answers: float, softmax: int, mixed: str,
                 quantized: bool, lora_layers: int = 0) -> float | None:  # fmt: skip
    """Estimated seconds of a LoRA step over `tokens` (of which `answers` are trained) on this CPU; None on a GPU.
    `lora_layers`: adapters on the last N layers only, so the backward pass stops at the first of them."""
    if m.probe is None or m.train_device() != "cpu":
        return None
    rate, rate32 = (m.probe.bfloat16 if mixed == "bf16" else m.probe.float32) * 1e9, m.probe.float32 * 1e9
    adapted = min(lora_layers, shape.layers) / shape.layers if lora_layers > 0 else 1.0
    body = 2 * shape.body_params * tokens * (1 + adapted)  # forward everywhere, input gradients where adapted
    matmuls = MATMUL_FACTOR * (body + 4 * answers * softmax * shape.hidden) / rate
    rest = (SOFTMAX_FLOPS * answers * softmax + LAYER_FLOPS * shape.layers * (1 + adapted) / 2) / rate32
    return matmuls * (QUANT_FACTOR if quantized else 1.0) + rest


BUSY_FROM = 0.1  # the share of the CPU in use by others from which the line gives the busy machine's numbers too


def estimate_run(cfg: TrainConfig, m: Machine | None = None, busy: float = 0.0) -> Estimate:
    """Seconds per step and steps of `cfg` on this machine, before anything is loaded but the tokenizer and data.

    The run itself times a real step at its start (`max_steps: auto` plans with that) and its status shows the ETA
    from the steps done; this is what the Start and Train tabs show before the button is pressed. `busy`: the share
    of the CPU others use now (`hardware.cpu_busy`); a run started now gets the rest, so the line gives both numbers
    (measured: a browser on the same 2 cores took 25% and stretched a 0.9 s step to 1.21 s).
    """
    m = m or machine()
    tokenizer = load_tokenizer(cfg.model)
    cfg, _ = resolve_auto(cfg, len(tokenizer), m, fp16_ok(cfg.model))  # as the trainer will decide
    rows, tokens, answers, data_vocab = _data_sizes(cfg, tokenizer)
    shape = model_shape(cfg.model)
    softmax = data_vocab if cfg.train_vocab == "data" else shape.vocab if shape else 0
    step_s = None
    if shape is not None:
        batch = cfg.batch_size * cfg.grad_accum
        quantized = bool(cfg.model.quantization)
        step_s = step_seconds(m, shape, tokens * batch, answers * batch, softmax, cfg.mixed_precision, quantized,
                              cfg.lora_layers)  # fmt: skip
    epochs = epoch_steps(rows, cfg)
    setup_s = 0.0
    if step_s is not None:
        competitors = COMPETITOR_ROWS if cfg.train_vocab == "data" else 0
        forward = forward_seconds(m, shape, competitors * tokens, competitors * answers, shape.vocab,
                                  torch_dtype(cfg.model.dtype, "cpu"))  # fmt: skip
        setup_s = (forward or 0.0) + TIMED_RUNS * step_s
    if cfg.max_steps == "auto":
        steps = planned_steps(cfg.max_minutes * 60 - setup_s, step_s, epochs) if step_s else epochs
    else:
        steps = cfg.max_steps if cfg.max_steps > 0 else epochs
    parts = [m.describe()]
    shared = step_s is not None and busy >= BUSY_FROM and m.train_device() == "cpu"  # a GPU's step hardly changes
    busy_s = step_s / (1 - min(busy, 0.75)) if shared else None
    if step_s is None:
        parts.append("the step time is measured when training starts")
    else:  # each number, and beside it the busy machine's while others use the CPU
        slower = f"-{busy_s:.1f}" if busy_s else ""
        now = f" (the CPU is {busy:.0%} busy now)" if busy_s else ""
        parts.append(f"about {step_s:.1f}{slower} s per step for this form{now}")
        if cfg.max_steps == "auto":
            budget_s = cfg.max_minutes * 60
            fewer = f"{planned_steps(budget_s - setup_s * busy_s / step_s, busy_s, epochs)}-" if busy_s else ""
            parts.append(f"{fewer}{steps} steps fit in the {cfg.max_minutes:g}-minute budget")
        elif steps:
            longer = f"-{_minutes(busy_s * steps)}" if busy_s else ""
            parts.append(f"{steps} steps: about {_minutes(step_s * steps)}{longer}")
    return Estimate(step_s, steps, " · ".join(parts), cfg, shape, tokens, answers, setup_s)


def forward_seconds(m: Machine, shape: ModelShape, tokens: float, answers: float, vocab: int, dtype: torch.dtype
                    ) -> float | None:  # fmt: skip
    """Estimated seconds of a no-gradient forward over `tokens` with logits over `vocab` at `answers` positions (a
    held-out loss): the step model's matrix products, forward only, at the probe's rate of `dtype` (None: no CPU
    probe, a GPU machine)."""
    if m.probe is None:
        return None
    rate = (m.probe.bfloat16 if dtype == torch.bfloat16 else m.probe.float32) * 1e9
    matmuls = MATMUL_FACTOR * (2 * shape.body_params * tokens + 2 * answers * vocab * shape.hidden) / rate
    return matmuls + SOFTMAX_FLOPS / 2 * answers * vocab / (m.probe.float32 * 1e9)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


@functools.lru_cache(maxsize=16)
def _data_sizes_cached(key: str, cfg_json: str, tokenizer) -> tuple[int, float, float, int]:
    values = json.loads(cfg_json)
    data, max_length = DataConfig(**values["data"]), values["max_length"]
    train = load_splits(data)["train"]
    template = get_template(data.template)
    sample = train.select(range(min(256, len(train))))  # the split is shuffled: a fair sample
    encoded = [encode_row(tokenizer, template, row, max_length) for row in sample]
    tokens = sum(len(e["input_ids"]) for e in encoded) / max(1, len(encoded))
    answers = sum(sum(t != IGNORE_INDEX for t in e["labels"][1:]) for e in encoded) / max(1, len(encoded))
    rows = train if len(train) <= 5000 else sample  # the data vocabulary: every row where that is quick
    vocab = {t for row in rows for t in encode_row(tokenizer, template, row, max_length)["input_ids"]}
    return len(train), tokens, answers, len(vocab)


def _data_sizes(cfg: TrainConfig, tokenizer) -> tuple[int, float, float, int]:
    """(training rows, mean tokens per row, mean answer tokens per row, distinct tokens in the data)."""
    values = {"data": asdict(cfg.data), "max_length": cfg.max_length}
    return _data_sizes_cached(cfg.model.source, json.dumps(values, sort_keys=True, default=str), tokenizer)
