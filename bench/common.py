"""Helpers shared by the benchmarks: tables, timing, memory and bandwidth measurements."""

from __future__ import annotations

import contextlib
import copy
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# CPU classes a benchmark runs under. An AVX2-only CPU is reproduced on a newer one by capping oneDNN and ATen:
# bfloat16 then takes torch's reference path, 20-38x slower than float32 (checked against an AVX2-only EPYC).
CPU_CLASSES = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}


def per_cpu_class(default: str = "native,avx2") -> str:
    """Run this benchmark once per CPU class: with `--cpu-class a,b` (default: both) the script runs itself in a child
    per class, with that class's environment, and this returns "" (the caller exits); in such a child (one class
    named) it returns the class name and the benchmark runs here. Other arguments are passed on."""
    argv = sys.argv[1:]
    chosen = default
    if "--cpu-class" in argv:
        i = argv.index("--cpu-class")
        chosen, argv = argv[i + 1], argv[:i] + argv[i + 2 :]
    names = [c.strip() for c in chosen.split(",") if c.strip()]
    unknown = [c for c in names if c not in CPU_CLASSES]
    if unknown:
        sys.exit(f"unknown CPU class {unknown[0]!r}: use {', '.join(CPU_CLASSES)}")
    in_class = len(names) == 1 and all(os.environ.get(k) == v for k, v in CPU_CLASSES[names[0]].items())
    if in_class:
        sys.argv = [sys.argv[0], *argv]
        return names[0]
    for name in names:
        caps = " ".join(f"{k}={v}" for k, v in CPU_CLASSES[name].items()) or "no ISA caps"
        print(f"\n## CPU class: {name} ({caps})\n", flush=True)
        env = {**os.environ, **CPU_CLASSES[name]}
        subprocess.run([sys.executable, sys.argv[0], *argv, "--cpu-class", name], env=env, check=True)
    return ""


def table(rows: list[dict], title: str = "") -> str:
    """A markdown table of dict rows (same keys), numbers rounded for reading."""
    if not rows:
        return ""
    keys = list(rows[0])

    def fmt(v) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = [f"| {' | '.join(keys)} |", f"|{'---|' * len(keys)}"]
    lines += [f"| {' | '.join(fmt(r.get(k, '')) for k in keys)} |" for r in rows]
    return (f"### {title}\n" if title else "") + "\n".join(lines)


def peak_rss_gb(children: bool = False) -> float:
    """Peak resident memory of this process (or of its finished children), in GiB."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 2**20  # Linux reports KiB


def memory_bandwidth_gbs(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Measured copy bandwidth (read + write bytes per second), the bound for memory-bound decoding."""
    import numpy as np

    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def run_python(code: str, env: dict | None = None, timeout: float = 900) -> str:
    """Run code in a fresh Python process (honest cold/warm timings); returns its stdout."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return out.stdout


def p50(values: list[float]) -> float:
    import statistics

    return statistics.median(values) if values else float("nan")


def machine() -> str:
    """One line naming the machine: CPU, cores, RAM, torch version, UTC date."""
    import platform

    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    ram = psutil.virtual_memory().total / 2**30
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM, torch {torch.__version__}, {date}"


def load_note() -> str:
    """The load average: other work on the machine makes every absolute number here slower."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


class RssSampler:
    """Peaks of the summed resident memory of some processes and all their children, sampled in a thread.

    RSS counts a page shared by two processes (the same memory-mapped model file) in both; PSS (proportional
    set size) splits it between them, so the PSS sum is the physical memory they take together.

    with RssSampler([os.getpid()]) as rss:
        ...
    rss.peak_gb, rss.peak_pss_gb
    """

    def __init__(self, pids: list[int] | None = None, interval_s: float = 0.05):
        import threading

        self.pids = [os.getpid()] if pids is None else pids  # may be set later, while sampling
        self.interval_s = interval_s
        self.peak_bytes = self.peak_pss_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def peak_gb(self) -> float:
        return self.peak_bytes / 2**30

    @property
    def peak_pss_gb(self) -> float:
        return self.peak_pss_bytes / 2**30

    def sample(self) -> int:
        import psutil

        procs = {}
        for pid in self.pids:
            try:
                root = psutil.Process(pid)
                procs.update({p.pid: p for p in [root, *root.children(recursive=True)]})
            except psutil.NoSuchProcess:
                continue
        rss = pss = 0
        for p in procs.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                info = p.memory_full_info()
                rss, pss = rss + info.rss, pss + info.pss
        self.peak_bytes = max(self.peak_bytes, rss)
        self.peak_pss_bytes = max(self.peak_pss_bytes, pss)
        return rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def random_adapter(model, out_dir: Path, r: int = 16, seed: int = 0) -> Path:
    """A LoRA adapter on all linear layers with random, small, non-zero B (so it changes the answers)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 1e-3)  # large enough to change greedy answers, small enough to keep them readable
    peft_model.save_pretrained(out_dir)
    return out_dir


def pick_adapter(base_model: str, load_base, tmp: str, path: str | None = None):
    """(AdapterInfo, a note saying which) for the tuned column: `path`, else the newest run trained on `base_model`,
    else a random LoRA made in `tmp` on `load_base()`."""
    from finetune.arena import adapter_info, list_adapters

    if path:
        return adapter_info(path), f"given adapter {path}"
    runs = [a for a in list_adapters() if a.origin == "run" and a.base_model == base_model]
    if runs:
        return runs[0], f"trained run {runs[0].name}"
    folder = random_adapter(load_base(), Path(tmp) / "random-lora")
    return adapter_info(folder), "random LoRA (r=16, all linear, B ~ N(0, 1e-3)): no trained run found"


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank `q` quantile (0..1) of `values`; nan for none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


class FirstToken:
    """A streamer that notes when `generate` hands over its first new token."""

    def __init__(self):
        self.prompt_seen, self.at = False, None

    def put(self, value) -> None:
        if self.prompt_seen and self.at is None:
            self.at = time.perf_counter()
        self.prompt_seen = True

    def end(self) -> None:
        pass
