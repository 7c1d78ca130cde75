"""Memory benchmark: peak RSS of the app with the three Arena columns loaded and one training run going.

    python bench/memory.py [--quick] [--recipe recipes/cpu_quick.yaml]

This process is the app: the Gradio UI built (not served), the shared model pool holding the base model (with a
LoRA adapter attached: the tuned column) and the reference model, in the app's inference dtype. A training run
is submitted through `finetune.runner`, so it trains in its own subprocess as in the app; while it trains, the
Arena answers a question in all three columns. The resident memory of the app and of all its child processes
is summed every 50 ms (psutil). Target (issue 9): <= 3 GB on CPU with the embedded models.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import ROOT, RssSampler, load_note, machine, per_cpu_class, run_python, table

ADAPTER = """
import sys
from pathlib import Path
sys.path.insert(0, {bench!r})
from common import random_adapter
from finetune.config import ModelSpec
from finetune.hardware import inference_dtype_name
from finetune.models import BASE_MODEL, load_model
random_adapter(load_model(ModelSpec(BASE_MODEL, dtype=inference_dtype_name()))[0], Path({out!r}))
"""


def mem(pid: int) -> dict:
    """RSS and PSS of one process now, GiB."""
    import psutil

    info = psutil.Process(pid).memory_full_info()
    return {"GiB": info.rss / 2**30, "PSS GiB": info.pss / 2**30}


def main() -> None:
    if not per_cpu_class():  # ran once per CPU class, each in its own child (--cpu-class native,avx2)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Train 4 steps instead of 12.")
    parser.add_argument("--recipe", default="recipes/cpu_quick.yaml", help="Training recipe (YAML or bundled name).")
    args = parser.parse_args()

    from finetune.models import model_cache

    # Runs and votes go to a scratch home; the converted models stay where they are.
    os.environ.setdefault("FINETUNE_MODEL_CACHE", str(model_cache()))
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FINETUNE_HOME"] = tmp
        measure(args, Path(tmp))


def measure(args, tmp: Path) -> None:
    from app import create_app
    from finetune.arena import ArenaSession, ArenaSetup, ask, make_backends
    from finetune.config import GenerationParams, load_train_config
    from finetune.hardware import inference_dtype_name
    from finetune.models import BASE_MODEL, ModelPool
    from finetune.runner import Runner

    print(f"machine: {machine()}; {load_note()} at start")
    app_pid = os.getpid()
    rows = [{"what": "Python + torch + transformers imported", **mem(app_pid)}]
    pool, runner = ModelPool(), Runner()
    create_app(pool=pool, runner=runner)
    rows.append({"what": "+ Gradio app built", **mem(app_pid)})

    adapter = tmp / "adapter"
    run_python(ADAPTER.format(bench=str(ROOT / "bench"), out=str(adapter)))  # elsewhere: copying a model costs RSS
    backends = make_backends(pool, ArenaSetup(BASE_MODEL, adapter))
    params = GenerationParams(max_new_tokens=16, stop=())
    for _ in ask(backends, ArenaSession.start(), "What is Lamini?", params):
        pass  # loads the three columns and runs them once
    rows.append({"what": "+ three Arena columns loaded and answered (app)", **mem(app_pid)})

    cfg = load_train_config(args.recipe)
    cfg.max_steps, cfg.save_steps, cfg.eval_rows = (4 if args.quick else 12), 1000, 8
    with RssSampler([app_pid]) as total, RssSampler([]) as trainer_only:  # trainer: once the runner started it
        run_id = runner.submit(cfg)
        deadline = time.monotonic() + 1800
        while (pid := runner.status(run_id).get("pid")) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        trainer_only.pids = [pid] if pid else []
        while runner.status(run_id).get("state") != "running" or runner.status(run_id).get("step", 0) < 1:
            if runner.status(run_id).get("state") in ("failed", "finished", "stopped"):
                break
            time.sleep(0.2)
        for _ in ask(backends, ArenaSession.start(), "How do I fine-tune a model with Lamini?", params):
            pass  # an Arena round while the trainer trains
        status = runner.wait(run_id, timeout=1800)
    runner.close()
    if status.get("state") != "finished":
        raise SystemExit(f"the training run ended {status.get('state')}: {status.get('message')}")
    rows.append(
        {"what": "training process (peak, sampled)", "GiB": trainer_only.peak_gb, "PSS GiB": trainer_only.peak_pss_gb}
    )
    rows.append(
        {"what": "app + training process (peak of the sum)", "GiB": total.peak_gb, "PSS GiB": total.peak_pss_gb}
    )
    model = f"{cfg.model.source} ({cfg.model.quantization or 'no quantization'}, {cfg.model.dtype})"
    print(
        f"training: {Path(args.recipe).name}: {model}, batch {cfg.batch_size}, max_length {cfg.max_length}, "
        f"{status.get('step')} steps; Arena: {inference_dtype_name()}, base + random LoRA r=16, reference"
    )
    print(table(rows, "Resident memory (RSS and PSS, GiB)"))
    print(f"{load_note()} at end")
    verdict = "meets" if total.peak_pss_bytes <= 3e9 else "misses"
    print(
        f"headline: peak memory app + trainer {total.peak_pss_bytes / 1e9:.2f} GB (PSS: the shared model file counted "
        f"once; RSS sum {total.peak_bytes / 1e9:.2f} GB), {verdict} the <= 3 GB target"
    )


if __name__ == "__main__":
    main()
