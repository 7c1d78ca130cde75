"""Helpers shared by the benchmarks: tables, timing, memory and bandwidth measurements."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


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
