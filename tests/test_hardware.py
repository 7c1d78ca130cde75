"""The machine and its `auto` decisions: a table over mocked GPUs and CPU probes, the cached probe, and the real
decision of this CPU with its ISA capped to AVX2 (how an AVX2-only laptop computes)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune import hardware
from finetune.config import ModelSpec, TrainConfig
from finetune.hardware import GPU, Machine, Probe, resolve_auto

ROOT = Path(__file__).resolve().parent.parent
FAST_BF16 = Probe(float32=100.0, bfloat16=400.0)  # AMX / AVX512-BF16
SLOW_BF16 = Probe(float32=100.0, bfloat16=3.0)  # AVX2: torch's reference path
T4 = GPU(0, "Tesla T4", 15.0, (7, 5))
L4 = GPU(0, "NVIDIA L4", 22.0, (8, 9))
AVX2 = ("avx2",)
AMX = ("avx2", "amx_bf16")

# machine -> (train dtype, mixed precision, 4-bit compute dtype, inference dtype, train_vocab for 262k tokens)
TABLE = [
    (Machine(gpus=(T4,)), torch.float32, "fp16", torch.float16, torch.float16, "full"),
    (Machine(gpus=(L4,)), torch.bfloat16, "bf16", torch.bfloat16, torch.bfloat16, "full"),
    (Machine(isa=AMX, probe=FAST_BF16), torch.bfloat16, "bf16", torch.bfloat16, torch.bfloat16, "data"),
    (Machine(isa=AVX2, probe=SLOW_BF16), torch.float32, "no", torch.float32, torch.float32, "data"),
    # The flags say bfloat16, the probe says slow (a capped ISA): the probe decides.
    (Machine(isa=("avx2", "avx512_bf16"), probe=SLOW_BF16), torch.float32, "no", torch.float32, torch.float32, "data"),
    (Machine(isa=AVX2, mps=True, probe=SLOW_BF16), torch.float32, "no", torch.float32, torch.float32, "data"),
]


@pytest.mark.parametrize(("m", "train", "mixed", "quant", "infer", "vocab"), TABLE)
def test_decision_table(m, train, mixed, quant, infer, vocab):
    assert m.train_dtype() == train
    assert m.mixed_precision() == mixed
    assert m.quant_compute_dtype() == quant
    assert m.inference_dtype() == infer
    assert m.train_vocab(262_144) == vocab and m.train_vocab(32_000) == "full"


def test_devices_follow_the_machine(monkeypatch):
    monkeypatch.delenv("FINETUNE_APP_DEVICE", raising=False)
    two = Machine(gpus=(GPU(0, "A", 80.0, (9, 0)), GPU(1, "B", 80.0, (9, 0))))
    assert two.training_devices() == ["cuda:0", "cuda:1"] and two.app_device() == "cuda:0"
    assert two.batch_size() == 32 and Machine(gpus=(T4,)).batch_size() == 16 and Machine().batch_size() == 8
    mac = Machine(mps=True, probe=SLOW_BF16)
    assert mac.app_device() == "mps" and mac.train_device() == "cpu" and mac.training_devices() == ["cpu"]
    monkeypatch.setenv("FINETUNE_APP_DEVICE", "cpu")
    assert two.app_device() == "cpu" and two.inference_dtype() == torch.float32


def test_resolve_auto_pins_every_choice_and_says_why():
    cfg = TrainConfig(model=ModelSpec("gemma-3-270m"), batch_size="auto", max_steps="auto", max_minutes=1)
    t4, line = resolve_auto(cfg, 262_144, Machine(gpus=(T4,)))
    assert (t4.model.dtype, t4.mixed_precision, t4.train_vocab, t4.batch_size) == ("float32", "fp16", "full", 16)
    assert "float16 autocast + gradient scaler" in line
    avx2, line = resolve_auto(cfg, 262_144, Machine(isa=AVX2, probe=SLOW_BF16))
    assert (avx2.model.dtype, avx2.mixed_precision, avx2.train_vocab, avx2.batch_size) == ("float32", "no", "data", 8)
    assert avx2.max_steps == "auto" and cfg.model.dtype == "auto"  # timed by the trainer; the input is untouched
    pinned = TrainConfig(model=ModelSpec("x", dtype="bfloat16"), mixed_precision="bf16", train_vocab="full")
    kept, _ = resolve_auto(pinned, 262_144, Machine(isa=AVX2, probe=SLOW_BF16))
    assert (kept.model.dtype, kept.mixed_precision, kept.train_vocab) == ("bfloat16", "bf16", "full")


def test_describe_names_the_class_and_the_choice():
    line = Machine("AMD EPYC", 2, AVX2, probe=SLOW_BF16).describe()
    assert "AMD EPYC, 2 cores, AVX2" in line and "no native bfloat16 (33x slower" in line and "float32" in line
    assert "native bfloat16 (4.0x float32" in Machine("Xeon", 8, ("amx_bf16",), probe=FAST_BF16).describe()
    assert "no native bfloat16 -> float16 with a gradient scaler" in Machine(gpus=(T4,)).describe()


def test_probe_is_measured_once_per_cpu_class(monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path))
    m = Machine("Some CPU", 2, AVX2)
    first = hardware.cached_probe(m)
    assert first.float32 > 0 and first.bfloat16 > 0
    saved = json.loads((tmp_path / "hardware" / "probe.json").read_text())
    assert list(saved) == [hardware._probe_key(m)]
    monkeypatch.setattr(hardware, "measure_probe", lambda: pytest.fail("measured twice"))
    assert hardware.cached_probe(m) == first
    capped = Machine("Some CPU", 2, AVX2, isa_cap="AVX2")  # another class: its own measurement
    monkeypatch.setattr(hardware, "measure_probe", lambda: SLOW_BF16)
    assert hardware.cached_probe(capped) == SLOW_BF16


def test_quantization_compute_dtype_follows_the_machine(monkeypatch):
    pytest.importorskip("bitsandbytes")
    from finetune.models import quantization_config

    monkeypatch.setattr("finetune.models.machine", lambda: Machine(isa=AVX2, probe=SLOW_BF16))
    assert quantization_config("4bit").bnb_4bit_compute_dtype == torch.float32
    monkeypatch.setattr("finetune.models.machine", lambda: Machine(gpus=(T4,)))
    assert quantization_config("4bit").bnb_4bit_compute_dtype == torch.float16


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the AVX2 cap is an x86 ISA cap")
def test_an_avx2_capped_cpu_chooses_float32(tmp_path):
    """This CPU with its instructions capped to AVX2 measures bfloat16 as slow (torch's reference path) and picks
    float32: the decision an AVX2-only laptop must make, whatever the flags of the machine running the test."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "FINETUNE_HOME": str(tmp_path)}
    env.pop("FINETUNE_APP_DEVICE", None)
    code = "from finetune.hardware import machine; m = machine(); print(m.probe.bf16_ratio, m.train_dtype())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ratio, dtype = out.stdout.split()
    assert float(ratio) > hardware.BF16_FAST and dtype == "torch.float32"


def test_a_training_run_refreshes_a_stale_probe(monkeypatch, tmp_path):
    """A probe measured while something else ran underrates the CPU for every later estimate: each training process
    measures again and keeps its own measurement."""
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path))
    hardware.machine.cache_clear()
    try:
        monkeypatch.setattr(hardware, "measure_probe", lambda: SLOW_BF16)
        assert hardware.machine().probe == SLOW_BF16
        monkeypatch.setattr(hardware, "measure_probe", lambda: FAST_BF16)
        assert hardware.machine().probe == SLOW_BF16  # cached
        hardware.refresh_probe()
        assert hardware.machine().probe == FAST_BF16 and hardware.cached_probe(hardware.machine()) == FAST_BF16
    finally:
        hardware.machine.cache_clear()


# --- GPUs and Spaces the code has not run on (issue 23): each decision pinned on a machine built here ----------

ZERO = GPU(0, "ZeroGPU", 70.0, (9, 0))


def test_a_t4_never_computes_gemma3_in_float16():
    """Compute capability 7.5: float16 (+ scaler) for a model within its range, float32 for Gemma-2/3, whose
    activations overflow it (test_models.py shows the NaNs); the machine line says why."""
    t4 = Machine(gpus=(T4,))
    assert (t4.mixed_precision(), t4.inference_dtype(), t4.quant_compute_dtype()) == ("fp16", torch.float16,
                                                                                       torch.float16)  # fmt: skip
    gemma = (t4.mixed_precision(fp16_ok=False), t4.inference_dtype(fp16_ok=False))
    assert gemma == ("no", torch.float32) and t4.quant_compute_dtype(fp16_ok=False) == torch.float32
    assert t4.train_dtype() == torch.float32
    assert "Gemma-2/3 in float32" in t4.describe()
    cfg = TrainConfig(model=ModelSpec("gemma-3-270m"), batch_size="auto")
    assert resolve_auto(cfg, 262_144, t4, fp16_ok=False)[0].mixed_precision == "no"
    assert resolve_auto(cfg, 262_144, t4)[0].mixed_precision == "fp16"
    l4 = Machine(gpus=(L4,))  # bfloat16 is native from compute capability 8: Gemma computes in it there
    assert l4.inference_dtype(fp16_ok=False) == torch.bfloat16 and l4.mixed_precision(fp16_ok=False) == "bf16"


def test_zero_gpu_serves_the_app_on_its_gpu_and_trains_on_the_cpu(monkeypatch):
    monkeypatch.delenv("FINETUNE_APP_DEVICE", raising=False)
    zero = Machine(isa=AVX2, gpus=(ZERO,), zero_gpu=True, probe=SLOW_BF16)
    assert zero.app_device() == "cuda:0" and zero.inference_dtype() == torch.bfloat16
    assert zero.train_device() == "cpu" and zero.training_devices() == ["cpu"]
    assert (zero.train_dtype(), zero.mixed_precision(), zero.train_vocab(262_144), zero.batch_size()) == (
        torch.float32, "no", "data", 8)  # fmt: skip
    line = "ZeroGPU (ZeroGPU (70 GB, compute 9.0)) for the Arena and Evaluate · training on the CPU: CPU CPU, 1 core"
    assert zero.describe().startswith(line + ", AVX2 · no native bfloat16")
    cfg = TrainConfig(model=ModelSpec("gemma-3-270m"), batch_size="auto")
    assert resolve_auto(cfg, 262_144, zero)[1].startswith("cpu: float32 weights, no autocast")


def test_zero_gpu_is_read_from_the_spaces_variables(monkeypatch, tmp_path):
    """A process on a ZeroGPU Space (the app, or the training child that inherits its variables) reads the machine
    without touching CUDA, and probes its CPU: that is where it trains."""
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path))
    monkeypatch.setenv("SPACE_ID", "someone/workbench")
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setattr(hardware, "measure_probe", lambda: SLOW_BF16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("CUDA asked on ZeroGPU"))
    hardware.machine.cache_clear()
    try:
        m = hardware.machine()
        assert m.zero_gpu and m.gpus and m.train_device() == "cpu" and m.probe == SLOW_BF16
    finally:
        hardware.machine.cache_clear()


@pytest.mark.parametrize(
    ("env", "visible"),
    [({}, "0"), ({"CUDA_VISIBLE_DEVICES": "2,3"}, "2"), ({"CUDA_VISIBLE_DEVICES": ""}, ""),
     ({"CUDA_VISIBLE_DEVICES": "1,2", "WORLD_SIZE": "2"}, "1,2")],  # fmt: skip
)
def test_a_training_process_sees_one_gpu_unless_accelerate_launched_it(env, visible):
    environ = dict(env)
    hardware.pin_one_gpu(environ)
    assert environ["CUDA_VISIBLE_DEVICES"] == visible


def test_one_sample_of_the_cpu_load_answers_every_page_for_a_few_seconds(monkeypatch):
    """A room opening the app at once: each page load asks how busy the CPU is; one 0.2 s sample answers them all."""
    import psutil

    from finetune import hardware

    samples, clock = [], [100.0]
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval: samples.append(interval) or 25.0 * len(samples))
    monkeypatch.setattr(hardware.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(hardware, "_BUSY_SAMPLE", [])
    assert [hardware.cpu_busy() for _ in range(3)] == [0.25] * 3 and samples == [0.2]
    clock[0] += hardware.BUSY_FRESH_S
    assert hardware.cpu_busy() == 0.5 and len(samples) == 2  # an old sample is taken again
