"""GPU smoke test: one command for a GPU owner, checking that the GPU path is correct and fast.

    python bench/gpu_smoke.py                  # on a machine with CUDA: about 5 minutes on one modern GPU
    python bench/gpu_smoke.py --allow-cpu      # the same checks on a CPU, fewer steps (tests the script itself)

It prints, as markdown tables (and writes artifacts/gpu_smoke.json):
1. what each `auto` decision picked on this machine (finetune.hardware);
2. three short trainings, each in its own process: the 4-bit QLoRA recipe, the quick-start recipe, and float32
   weights with float16 autocast + gradient scaler + gradient checkpointing (the path of GPUs below compute
   capability 8): loss finite and falling, the adapter reloads and answers, seconds per step, peak memory;
3. mixed-adapter batched generation (base and tuned rows in one `generate`) equals separate runs, greedy;
4. the Arena's three columns streamed at once;
5. 16 held-out questions evaluated (base vs tuned);
6. a training run while the Arena holds its models on the same device (both peaks).
Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, table

CHECKS: list[dict] = []


def check(name: str, ok: bool, detail: str = "") -> bool:
    CHECKS.append({"check": name, "ok": "yes" if ok else "**NO**", "detail": detail})
    print(f"[{'ok' if ok else 'FAIL'}] {name} {detail}", file=sys.stderr, flush=True)
    return ok


def decisions() -> dict:
    from finetune.hardware import dtype_name
    from finetune.hardware import machine as this_machine

    m = this_machine()
    return {
        "machine": m.describe(),
        "train dtype": dtype_name(m.train_dtype()),
        "mixed precision": m.mixed_precision(),
        "4-bit compute dtype": dtype_name(m.quant_compute_dtype()),
        "inference dtype": dtype_name(m.inference_dtype()),
        "batch size (auto)": m.batch_size(),
        "training devices": ", ".join(m.training_devices()),
        "app device": m.app_device(),
    }


def train_run(name: str, recipe: str, sets: list[str], home: Path) -> dict:
    """Train in a child process as the app's runner does (`python -m finetune train`); read its files."""
    from finetune.runs import RunDir, runs_root

    run = RunDir(runs_root() / name)  # main() set FINETUNE_HOME=home, as for the child
    cmd = [sys.executable, "-m", "finetune", "train", "--config", recipe, "--run-dir", str(run.path)]
    cmd += [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    env = {**os.environ, "FINETUNE_HOME": str(home)}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    status, metrics = run.read_status(), run.read_metrics()
    losses = [r["loss"] for r in metrics if "loss" in r]
    elapsed = [r["elapsed"] for r in metrics if "loss" in r]
    steps = status.get("step") or 0
    step_s = (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1) if len(elapsed) > 1 else None
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    k = max(1, len(losses) // 4)
    falling = finite and sum(losses[-k:]) / k < sum(losses[:k]) / k
    trained = done.returncode == 0 and status.get("state") == "finished"
    check(f"{name}: trains", trained, "" if trained else done.stderr[-300:])
    check(f"{name}: loss finite and falling", falling, f"{losses[:1]} -> {losses[-1:]}")
    return {
        "run": name,
        "summary": status.get("summary", "")[-120:],
        "steps": steps,
        "s/step": round(step_s, 3) if step_s else None,
        "first loss": round(losses[0], 3) if losses else None,
        "last loss": round(losses[-1], 3) if losses else None,
        "peak GiB": status.get("peak_memory_gb"),
        "wall s": round(seconds, 1),
        "run_dir": str(run.path),
    }


def reloads_and_answers(run_dir: str) -> bool:
    from finetune.config import GenerationParams
    from finetune.evaluate import eval_spec, eval_target
    from finetune.generate import generate_batch
    from finetune.models import ModelPool

    target = eval_target(Path(run_dir))
    entry, adapter = ModelPool().get_with_adapter(eval_spec(target.spec), target.run.adapter_dir)
    text = generate_batch(entry.model, entry.tokenizer, ["### Question:\nWhat is Lamini?\n\n### Answer:\n"],
                          GenerationParams(max_new_tokens=16), [adapter])[0]  # fmt: skip
    return check(f"{Path(run_dir).name}: adapter reloads and answers", bool(text.strip()), repr(text[:60]))


def batched_equals_separate(pool, run_dir: str) -> None:
    """In float32: lower precisions round differently for different batch shapes, so greedy answers may part."""
    from dataclasses import replace

    from finetune.config import GenerationParams
    from finetune.evaluate import eval_spec, eval_target
    from finetune.generate import BASE_ADAPTER, generate_batch

    target = eval_target(Path(run_dir))
    spec = replace(eval_spec(target.spec), dtype="float32")
    entry, adapter = pool.get_with_adapter(spec, target.run.adapter_dir)
    prompts = [f"### Question:\n{q}\n\n### Answer:\n" for q in ("What is Lamini?", "How do I fine-tune a model?")]
    params = GenerationParams(max_new_tokens=24)
    with entry.lock:
        mixed = generate_batch(entry.model, entry.tokenizer, prompts * 2, params, [BASE_ADAPTER] * 2 + [adapter] * 2)
        alone = [generate_batch(entry.model, entry.tokenizer, [p], params, [name])[0]
                 for name in (BASE_ADAPTER, adapter) for p in prompts]  # fmt: skip
    device = next(entry.model.parameters()).device
    check(f"mixed-adapter batch equals separate runs ({device})", mixed == alone, f"{mixed[0][:40]!r}")
    check("the adapter changes the answers", mixed[:2] != mixed[2:])


def arena_streams(pool, run_dir: str) -> dict:
    from finetune.arena import ArenaSession, ArenaSetup, ask, make_backends
    from finetune.config import GenerationParams
    from finetune.models import BASE_MODEL
    from finetune.runs import RunDir

    backends = make_backends(pool, ArenaSetup(base_model=BASE_MODEL, adapter=RunDir(Path(run_dir)).adapter_dir))
    t0, first = time.perf_counter(), None
    for columns in ask(backends, ArenaSession.start(), "What is Lamini?", GenerationParams(max_new_tokens=48)):
        if first is None and any(c.text for c in columns.values()):
            first = time.perf_counter() - t0
    ok = all(c.text.strip() and not c.error for c in columns.values())
    said = "; ".join(f"{role}: {c.error or c.text[:30]!r}" for role, c in columns.items())
    check("arena: three columns stream", ok, said)
    rates = {r: round(c.tokens_per_s or 0, 1) for r, c in columns.items()}
    return {"first token s": round(first or math.nan, 2), "total s": round(time.perf_counter() - t0, 2), **rates}


def evaluate_16(pool, run_dir: str) -> dict:
    from finetune.config import GenerationParams
    from finetune.evaluate import evaluate_run

    t0 = time.perf_counter()
    result = evaluate_run(Path(run_dir), limit=16, pool=pool, params=GenerationParams(max_new_tokens=64))
    s = result["summary"]
    ok = result["questions"] == 16 and all(math.isfinite(s[c]["loss"]) for c in ("base", "tuned"))
    check("evaluate: 16 held-out questions", ok, f"loss {s['base']['loss']:.3f} -> {s['tuned']['loss']:.3f}")
    return {"seconds": round(time.perf_counter() - t0, 1), "base loss": s["base"]["loss"],
            "tuned loss": s["tuned"]["loss"], "tuned F1": s["tuned"]["f1"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allow-cpu", action="store_true", help="Run on a CPU (fewer steps): tests this script.")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", default=str(ROOT / "artifacts" / "gpu_smoke.json"))
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        sys.exit("No CUDA device here: run on a GPU machine, or pass --allow-cpu to test the script on a CPU.")
    steps = args.steps if torch.cuda.is_available() else min(args.steps, 3)
    os.environ.setdefault("FINETUNE_MODEL_CACHE", str(Path.home() / ".cache" / "finetune-workbench" / "models"))
    home = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    os.environ["FINETUNE_HOME"] = str(home)
    print(f"machine: {machine()}")
    picked = decisions()
    print(table([{"decision": k, "picked": v} for k, v in picked.items()], "1. What auto picked here") + "\n")

    common = [f"max_steps={steps}", "logging_steps=1", "save_steps=100000", "eval_at_end=false", "eval_steps=0"]
    runs = [
        ("qlora-4bit", "lamini_docs_qlora", ["eval_rows=16", "max_length=256"]),
        ("quickstart", "quickstart_cpu", ["max_minutes=0"]),
        ("fp16-checkpointing", "cpu_quick", ["model.dtype=float32", "mixed_precision=fp16", "eval_rows=16",
                                             "gradient_checkpointing=true"]),  # fmt: skip
    ]
    if not torch.cuda.is_available():
        runs = [r for r in runs if "fp16" not in r[0] and "4bit" not in r[0]]  # CPUs: float16 autocast is slow there
    trained = [train_run(name, recipe, common + sets, home) for name, recipe, sets in runs]
    print(table([{k: v for k, v in r.items() if k != "run_dir"} for r in trained], "2. Training") + "\n")
    for r in trained:
        if r["steps"]:
            reloads_and_answers(r["run_dir"])

    from finetune.models import ModelPool

    pool = ModelPool()
    quick = next(r["run_dir"] for r in trained if r["run"] == "quickstart")
    batched_equals_separate(pool, quick)
    arena = arena_streams(pool, quick)
    print(table([arena], "4. Arena: three columns at once (tokens/s per column)") + "\n")
    evaluation = evaluate_16(pool, quick)
    print(table([evaluation], "5. Evaluate: 16 held-out questions") + "\n")

    # 6. The Arena holds its models (the pool above) while a run trains on the same device.
    app_peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    beside = train_run("beside-arena", "quickstart_cpu", common + ["max_minutes=0"], home)
    shared = {
        "app models GiB": round(app_peak, 2) if app_peak else "n/a (CPU)",
        "trainer peak GiB": beside["peak GiB"],
        "s/step beside the Arena": beside["s/step"],
    }
    print(table([shared], "6. Training while the Arena holds its models") + "\n")

    print(table(CHECKS, "Checks"))
    failed = [c["check"] for c in CHECKS if c["ok"] != "yes"]
    out = {"machine": machine(), "decisions": picked, "training": trained, "arena": arena, "evaluate": evaluation,
           "beside_arena": shared, "checks": CHECKS}  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    tail = f"; failed: {failed}" if failed else ""
    print(f"headline: {len(CHECKS) - len(failed)}/{len(CHECKS)} checks passed{tail}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
