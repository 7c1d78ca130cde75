"""What this machine is, and every `auto` decision that depends on it: dtypes, mixed precision, devices, ETA.

    from finetune.hardware import machine
    m = machine()          # GPUs (name, memory, compute capability), MPS, CPU model, cores, ISA flags, CPU probe
    print(m.describe())    # "CPU AMD EPYC, 2 cores, AVX2 · bfloat16 38x slower than float32 (measured) -> float32"
    m.train_dtype(), m.mixed_precision(), m.inference_dtype(), m.quant_compute_dtype()

    python -m finetune.hardware      # the same, from the shell

Flags do not say what is fast. A CPU with AVX512-BF16 whose ISA is capped (`ONEDNN_MAX_CPU_ISA=AVX2`, as in a VM
that hides the flag's instructions) runs bfloat16 matrix products on torch's reference path: measured 38x slower
than float32 (one Gemma-270M training step: 235 s instead of 2.7 s). So the CPU's choice comes from a probe: a
small Linear forward+backward timed in float32 and in bfloat16 (well under a second), cached under
`$FINETUNE_HOME/hardware/` per CPU model, flags, ISA caps, torch version and thread count. On a GPU, bfloat16 only
at compute capability >= 8 (a T4 or V100 "supports" it by emulation, at float32 speed): float16 with a gradient
scaler below that, except for models whose activations overflow float16 (Gemma-2/3: `FP16_OVERFLOWS`), which
then compute in float32. On a ZeroGPU Space the GPU exists only inside `spaces.GPU` calls of the app's process, so
the app's models use it there and training runs on the CPU.

Machines are plain dataclasses, so tests build the ones they need (a T4, two GPUs, a CPU without bfloat16).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from finetune.settings import Settings
from finetune.spaces import zero_gpu

if TYPE_CHECKING:
    from finetune.config import TrainConfig

log = logging.getLogger(__name__)

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")  # env variables that cap the instructions torch uses
PROBE_SHAPE = (256, 640, 1024)  # rows x in x out: a Gemma-270M-sized projection
BF16_FAST = 1.15  # bfloat16 must beat float32 by this much to be chosen (casts cost something too)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}  # mixed_precision -> compute dtype
# Model types whose activations exceed float16's range (65504): the embedded Gemma-3-270M's residual stream reaches
# 1e5 by its 9th layer, so in float16 every logit is NaN (tests/test_hardware.py; transformers issue 36822; vLLM
# refuses float16 for gemma3). They compute in float32 where bfloat16 is not native.
FP16_OVERFLOWS = frozenset({"gemma2", "gemma3", "gemma3_text"})


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    memory_gb: float
    capability: tuple[int, int]

    @property
    def bf16(self) -> bool:
        """Native bfloat16 (Ampere and later); a T4/V100 emulates it at float32 speed."""
        return tuple(self.capability) >= (8, 0)


@dataclass(frozen=True)
class Probe:
    """Measured on this CPU: GFLOP/s of a Linear forward+backward in each dtype (training, prefill), and GB/s of
    weights read by a two-row product with a big weight (decoding, memory-bound) in each dtype."""

    float32: float
    bfloat16: float
    gemv_float32: float = 0.0
    gemv_bfloat16: float = 0.0

    @property
    def bf16_gemv_fast(self) -> bool:
        """Decoding reads weights faster in bfloat16, even where bfloat16 products of many rows are slow: an AVX2
        CPU multiplies 2 rows by Gemma's 262k x 640 output layer in 27 ms in bfloat16, 90 ms in float32."""
        if not (self.gemv_float32 and self.gemv_bfloat16):
            return False
        return BF16_FAST * 2 / self.gemv_bfloat16 <= 4 / self.gemv_float32  # seconds per weight: bytes over GB/s

    @property
    def bf16_fast(self) -> bool:
        return self.bfloat16 >= BF16_FAST * self.float32

    @property
    def bf16_ratio(self) -> float:
        """Time of bfloat16 over float32 (> 1: bfloat16 is slower)."""
        return self.float32 / self.bfloat16 if self.bfloat16 else math.inf


@dataclass(frozen=True)
class Machine:
    cpu_model: str = "CPU"
    cores: int = 1  # torch intra-op threads: the cores a step can use
    isa: tuple[str, ...] = ()  # of ISA_FLAGS, as /proc/cpuinfo says
    isa_cap: str | None = None  # e.g. "AVX2" when ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY cap the instructions
    gpus: tuple[GPU, ...] = ()
    mps: bool = False
    zero_gpu: bool = False  # a ZeroGPU Space: `gpus` serve the app's models under spaces.GPU; training is on the CPU
    probe: Probe | None = field(default=None, compare=False)  # None: not measured (GPU-trained machines skip it)

    # --- what runs where ---

    @property
    def cpu_bf16(self) -> bool:
        """bfloat16 is faster than float32 on this CPU, as measured (the flags are only a hint)."""
        return self.probe.bf16_fast if self.probe is not None else False

    def train_device(self) -> str:
        """Where a training process computes: its GPU (one per process, `LOCAL_RANK` under accelerate) or the CPU.
        Apple's MPS backend is used for inference only: PEFT training on it is not what we test. On ZeroGPU the CPU:
        a training process is a plain subprocess there, which gets no GPU."""
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if self.gpus and not self.zero_gpu else "cpu"

    def app_device(self) -> str:
        """Where the app's own models (Arena, Evaluate) run: `FINETUNE_APP_DEVICE`, else the first GPU, MPS or CPU."""
        chosen = Settings.current().app_device
        if chosen != "auto":
            return chosen
        return "cuda:0" if self.gpus else "mps" if self.mps else "cpu"

    def training_devices(self) -> list[str]:
        """One training process per GPU (the runner hands each its own `CUDA_VISIBLE_DEVICES`), else the CPU."""
        return [f"cuda:{g.index}" for g in self.gpus if not self.zero_gpu] or ["cpu"]

    def gpu_for(self, device: str | None) -> GPU | None:
        if not self.gpus or (device and not device.startswith("cuda")):
            return None
        index = int(device.split(":")[1]) if device and ":" in device else 0
        return next((g for g in self.gpus if g.index == index), self.gpus[0])

    # --- dtype decisions ---

    def train_dtype(self, device: str | None = None) -> torch.dtype:
        """Weights of a model loaded to train (or merge) on `device` (default: the training device)."""
        device = device or self.train_device()
        gpu = self.gpu_for(device)
        if gpu is not None:
            # Below compute capability 8 the classic AMP recipe: float32 master weights, float16 autocast + scaler.
            return torch.bfloat16 if gpu.bf16 else torch.float32
        if device.startswith("mps"):
            return torch.float32
        return torch.bfloat16 if self.cpu_bf16 else torch.float32

    def mixed_precision(self, device: str | None = None, fp16_ok: bool = True) -> str:
        """Autocast of the Trainer: bf16, fp16 (GPUs without native bfloat16, with a gradient scaler) or no.
        `fp16_ok`: the model computes within float16's range (not one of FP16_OVERFLOWS)."""
        device = device or self.train_device()
        gpu = self.gpu_for(device)
        if gpu is not None:
            return "bf16" if gpu.bf16 else "fp16" if fp16_ok else "no"
        return "bf16" if device == "cpu" and self.cpu_bf16 else "no"

    def quant_compute_dtype(self, device: str | None = None, fp16_ok: bool = True) -> torch.dtype:
        """bitsandbytes' 4-bit compute dtype."""
        return AUTOCAST[self.mixed_precision(device, fp16_ok)]

    def inference_dtype(self, device: str | None = None, fp16_ok: bool = True) -> torch.dtype:
        """Weights of the app's models: the fastest exact-enough dtype where they run."""
        device = device or self.app_device()
        gpu = self.gpu_for(device)
        if gpu is not None:
            return torch.bfloat16 if gpu.bf16 else torch.float16 if fp16_ok else torch.float32
        if device.startswith("mps"):
            return torch.float32  # Gemma-3's activations overflow float16; bfloat16 on MPS needs macOS 14
        return torch.bfloat16 if self.cpu_bf16 else torch.float32

    def train_vocab(self, vocab_size: int) -> str:
        """`train_vocab: auto`: the data's tokens only where a big vocabulary's softmax dominates a CPU step
        (Gemma's 262k: 2x the steps per minute); the exact full softmax on a GPU."""
        return "data" if self.train_device() == "cpu" and vocab_size >= 65536 else "full"

    def batch_size(self) -> int:
        """`batch_size: auto`: 8 rows on a CPU (4 reached less in the same minutes, measured), more on a big GPU."""
        gpu = self.gpu_for(self.train_device())
        if gpu is None:
            return 8
        return 32 if gpu.memory_gb >= 40 else 16 if gpu.memory_gb >= 14 else 8

    # --- for people ---

    def describe(self) -> str:
        """One line: what this machine is and what the `auto` settings chose, and why."""
        if self.gpus:
            names = ", ".join(f"{g.name} ({g.memory_gb:.0f} GB, compute {g.capability[0]}.{g.capability[1]})"
                              for g in self.gpus)  # fmt: skip
            if self.gpus[0].bf16:
                why = "native bfloat16"
            else:
                why = ("no native bfloat16 -> float16 with a gradient scaler; Gemma-2/3 in float32 (their activations "
                       "overflow float16)")  # fmt: skip
            gpus = f"{len(self.gpus)} GPU{'s' if len(self.gpus) > 1 else ''}: {names} · {why}"
            if not self.zero_gpu:
                return gpus
            return f"ZeroGPU ({names}) for the Arena and Evaluate · training on the CPU: {self._describe_cpu()}"
        return self._describe_cpu()

    def _describe_cpu(self) -> str:
        isa = self.isa_cap or next((f.upper() for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2")
                                    if f in self.isa), "no AVX2")  # fmt: skip
        parts = [f"CPU {self.cpu_model}, {self.cores} core{'s' if self.cores != 1 else ''}, {isa}"]
        if self.isa_cap:
            parts[0] += " (capped)"
        if self.probe is not None:
            p = self.probe
            if p.bf16_fast:
                parts.append(f"native bfloat16 ({1 / p.bf16_ratio:.1f}x float32, measured) -> bfloat16")
            else:
                parts.append(f"no native bfloat16 ({p.bf16_ratio:.0f}x slower than float32, measured) -> float32")
        if self.mps:
            parts.append("Apple GPU (MPS) for the app's models")
        return " · ".join(parts)


# --- reading the machine ---------------------------------------------------------------------------------


def _cpuinfo() -> tuple[str, tuple[str, ...]]:
    model, flags = platform.processor() or platform.machine() or "CPU", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, ()
    if found := re.search(r"^model name\s*:\s*(.+)$", text, re.M):
        model = " ".join(found.group(1).split())
    if found := re.search(r"^flags\s*:\s*(.+)$", text, re.M):
        flags = set(found.group(1).split())
    return model, tuple(f for f in ISA_FLAGS if f in flags)


def _isa_cap() -> str | None:
    caps = [os.environ.get(name, "").strip() for name in ISA_CAPS]
    return next((c.upper() for c in caps if c), None)


def _gpus() -> tuple[GPU, ...]:
    if zero_gpu():
        # CUDA may not be initialised in a ZeroGPU Space's main process; its GPUs are H200-class slices.
        return (GPU(0, "ZeroGPU", 70.0, (9, 0)),)
    if not torch.cuda.is_available():
        return ()
    found = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        found.append(GPU(i, p.name, p.total_memory / 2**30, (p.major, p.minor)))
    return tuple(found)


def pin_one_gpu(environ=os.environ) -> None:
    """Show a training process one GPU unless `accelerate launch` started it (WORLD_SIZE > 1): with two or more, the
    HF Trainer wraps the model in `nn.DataParallel`, whose replicas each see part of the batch, and the answer-only
    loss (one decoder hook, one batch's labels) no longer lines up. Call it before CUDA is initialised."""
    if int(environ.get("WORLD_SIZE", 1)) > 1:
        return
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    environ["CUDA_VISIBLE_DEVICES"] = "0" if visible is None else visible.split(",")[0].strip()


def _mps() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def _unprobed() -> Machine:
    model, isa = _cpuinfo()
    return Machine(model, torch.get_num_threads(), isa, _isa_cap(), _gpus(), _mps(), zero_gpu())


@functools.lru_cache(maxsize=1)
def machine() -> Machine:
    """This machine, read once per process; the CPU probe is measured once per machine and cached on disk."""
    m = _unprobed()
    if m.train_device() != "cpu":
        return m  # the CPU's dtypes decide nothing there
    return replace(m, probe=cached_probe(m))


# --- the CPU probe ---------------------------------------------------------------------------------------


def _gflops(dtype: torch.dtype, budget_s: float) -> float:
    """GFLOP/s of a Linear forward + backward (input and weight gradients) in `dtype`, timed for about `budget_s`.

    One warm-up on a few rows first: cheap even on a slow path, which then costs one timed pass (0.25 s at 38x).
    The fastest pass counts: the first at full size may still pay a kernel's one-time set-up.
    """
    rows, d_in, d_out = PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(d_in, d_out, bias=False).to(dtype)
    x = torch.randn(rows, d_in, generator=gen).to(dtype).requires_grad_()
    grad = torch.randn(rows, d_out, generator=gen).to(dtype)
    layer(x[:16]).backward(grad[:16])
    best, start = math.inf, time.perf_counter()
    for _ in range(20):
        t0 = time.perf_counter()
        layer(x).backward(grad)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return 3 * 2 * rows * d_in * d_out / best / 1e9


GEMV_SHAPE = (2, 640, 32768)  # rows x in x out: base and tuned decoding through a slice of an output layer (84 MB)


def _gemv_gbs(dtype: torch.dtype) -> float:
    """GB/s of weights read by a `GEMV_SHAPE` product in `dtype` (the best of 3, after one warm-up)."""
    rows, d_in, d_out = GEMV_SHAPE
    weight = torch.full((d_out, d_in), 0.01, dtype=dtype)  # the values do not matter to the time; random ones cost
    x = torch.full((rows, d_in), 0.5, dtype=dtype)
    torch.nn.functional.linear(x, weight)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, weight)
        best = min(best, time.perf_counter() - t0)
    return weight.numel() * weight.element_size() / best / 1e9


def measure_probe(budget_s: float = 0.1) -> Probe:
    dtypes = (torch.float32, torch.bfloat16)
    flops = (round(_gflops(dtype, budget_s), 1) for dtype in dtypes)
    return Probe(*flops, *(round(_gemv_gbs(dtype), 1) for dtype in dtypes))


def _probe_key(m: Machine) -> str:
    return "|".join([m.cpu_model, ",".join(m.isa), m.isa_cap or "-", torch.__version__, str(m.cores)])


def probe_file() -> Path:
    from finetune import home

    return home() / "hardware" / "probe.json"


def cached_probe(m: Machine, fresh: bool = False) -> Probe:
    """The probe of this CPU class, measured the first time (or when `fresh`) and read from `probe_file()` after."""
    path, key = probe_file(), _probe_key(m)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), dict) and not fresh:
        try:
            return Probe(**known[key])
        except TypeError:
            pass  # written by another version: measure again
    t0 = time.perf_counter()
    probe = measure_probe()
    log.info("CPU probe (%.2f s): %s", time.perf_counter() - t0, probe)
    known[key] = asdict(probe)
    from finetune.runs import write_json_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, known)
    except OSError:
        pass  # a read-only data dir: measure again next time
    return probe


def refresh_probe() -> None:
    """Measure this CPU again and keep it: a probe taken while something else ran (an app starting up, a test
    suite) underrates the CPU for every later estimate (seen: 4x). A training process calls it as it starts, so the
    cache follows the machine as runs see it; half a second of a run of minutes."""
    m = _unprobed()
    if m.train_device() == "cpu":
        cached_probe(m, fresh=True)
    machine.cache_clear()


def resolve_auto(
    cfg: TrainConfig, vocab_size: int, m: Machine | None = None, fp16_ok: bool = True
) -> tuple[TrainConfig, str]:
    """A copy of a run's config with each `auto` (but max_steps, timed by the trainer) decided for this machine,
    and a line that says what was chosen (the run's status shows it). `fp16_ok`: the model computes within float16's
    range (`models.fp16_ok`)."""
    m = m or machine()
    device = m.train_device()
    out = copy.deepcopy(cfg)
    if out.model.dtype == "auto":
        out.model.dtype = dtype_name(m.train_dtype(device))
    if out.mixed_precision == "auto":
        out.mixed_precision = m.mixed_precision(device, fp16_ok)
    if out.train_vocab == "auto":
        out.train_vocab = m.train_vocab(vocab_size)
    if out.batch_size == "auto":
        out.batch_size = m.batch_size()
    autocast = {"bf16": "bfloat16 autocast", "fp16": "float16 autocast + gradient scaler", "no": "no autocast"}
    line = (
        f"{device}: {out.model.dtype} weights, {autocast.get(out.mixed_precision, out.mixed_precision)}, "
        f"batch {out.batch_size}"
    )
    return out, line


def torch_dtype(name: str, device: str, m: Machine | None = None) -> torch.dtype:
    """A ModelSpec's dtype: a name, or `auto` (what `train_dtype` chooses for `device`)."""
    if name == "auto":
        return (m or machine()).train_dtype(device)
    try:
        return DTYPES[name]
    except KeyError:
        from finetune import FinetuneError

        raise FinetuneError(f"Unknown dtype {name!r}: use auto, float32, bfloat16 or float16.") from None


BUSY_FRESH_S = 5.0  # how long one sample of the CPU's load answers every page that asks
_BUSY_SAMPLE: list[tuple[float, float]] = []  # [(when, share)]: the last sample


def cpu_busy(seconds: float = 0.2) -> float:
    """The share of this machine's CPU in use right now (0-1), sampled over `seconds`: what a run started now will
    not get (a browser, another run, another participant's Arena). Page loads and form changes ask for it: a sample
    younger than BUSY_FRESH_S answers them all, so a room opening the app at once waits for one sample, not each."""
    import psutil

    now = time.monotonic()
    if _BUSY_SAMPLE and now - _BUSY_SAMPLE[-1][0] < BUSY_FRESH_S:
        return _BUSY_SAMPLE[-1][1]
    share = psutil.cpu_percent(interval=seconds) / 100
    _BUSY_SAMPLE[:] = [(time.monotonic(), share)]
    return share


def compute_dtype(weights: torch.dtype, mixed_precision: str) -> torch.dtype:
    """What a layer computes in: its weights' dtype, or the autocast's for float32 weights (a 4-bit model's
    `bnb_4bit_compute_dtype` follows the same rule)."""
    return AUTOCAST.get(mixed_precision, torch.float32) if weights == torch.float32 else weights


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def inference_dtype_name(device: str | None = None) -> str:
    """The ModelSpec dtype of the app's models here, or of models run on `device` (`Machine.inference_dtype`)."""
    return dtype_name(machine().inference_dtype(device))


if __name__ == "__main__":
    m = machine()
    print(m.describe())
    print(json.dumps({"probe_gflops": asdict(m.probe) if m.probe else None, "train_dtype": dtype_name(m.train_dtype()),
                      "mixed_precision": m.mixed_precision(), "inference_dtype": dtype_name(m.inference_dtype()),
                      "app_device": m.app_device(), "training_devices": m.training_devices()}, indent=1))  # fmt: skip
