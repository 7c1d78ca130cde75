"""Quick-start benchmark: the guided "Fine-tune in 5 minutes" path, from the click to the adapter in the Arena.

    python bench/quickstart.py            # the app's quickstart recipe (recipes/quickstart_cpu.yaml)
    python bench/quickstart.py --quick    # the same run, only the result table and the headline
    python bench/quickstart.py --set max_steps=30 --set learning_rate=1e-3   # try other settings

Runs `finetune.guided` exactly as the app's button does (prepare -> training subprocess via the Runner -> held-out
loss before/after on the pooled model -> adapter listed for the Arena) in a fresh data dir, and times each step.
Targets (issue 10), on a 2-core CPU: <= 5 minutes from the click to the adapter in the Arena, held-out loss
(answer tokens, the first 40 of the 140 test questions) at least 30% below the base model's. The machine's load
average is printed with the result: other work on the same cores slows training proportionally.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, per_cpu_class, table

TARGET_MINUTES, TARGET_REDUCTION = 5.0, 0.30


def main() -> None:
    if not per_cpu_class():  # ran once per CPU class, each in its own child (--cpu-class native,avx2)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Print only the result table and the headline.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", default=str(ROOT / "artifacts" / "quickstart.json"), help="Result file.")
    args = parser.parse_args()

    # The converted models stay where they are; runs and adapters go to a fresh data dir.
    os.environ.setdefault("FINETUNE_MODEL_CACHE", str(Path.home() / ".cache" / "finetune-workbench" / "models"))
    os.environ["FINETUNE_HOME"] = tempfile.mkdtemp(prefix="quickstart-")  # a fresh start: no runs, no adapters

    from finetune.arena import list_adapters
    from finetune.config import apply_overrides
    from finetune.guided import Guide, guided_config
    from finetune.models import ModelPool
    from finetune.runner import Runner

    cfg = guided_config()
    if args.overrides:
        cfg = type(cfg).from_dict(apply_overrides(cfg.to_dict(), args.overrides))
    load_before = os.getloadavg()
    runner, pool = Runner(poll_interval=0.2), ModelPool()
    guide = Guide(runner, pool, poll_interval=0.5)
    t0 = time.perf_counter()
    reached: dict[str, float] = {}
    step = None
    for step in guide.run(cfg):
        reached.setdefault(step.step, time.perf_counter() - t0)
        if step.error:
            sys.exit(f"guided run failed at {step.step}: {step.message}")
    total = time.perf_counter() - t0
    result = step.result
    in_arena = any(str(a.path) == result["adapter"] for a in list_adapters())
    status = runner.status(step.run_id)
    load_after = os.getloadavg()
    runner.close()

    rows = [
        {"step": name, "started_s": round(reached.get(name, float("nan")), 1)}
        for name in ("prepare", "train", "evaluate", "arena")
    ]
    if not args.quick:
        print(table(rows, "Guided path: seconds from the click to each step") + "\n")
    summary = [
        {
            "minutes to adapter in Arena": round(total / 60, 2),
            "train steps": status.get("step"),
            "train s": round(status.get("elapsed") or 0, 1),
            "held-out questions": result["questions"],
            "loss before": round(result["loss_before"], 3),
            "loss after": round(result["loss_after"], 3),
            "reduction %": round(100 * result["reduction"], 1),
            "in Arena": in_arena,
            "load avg (1 min) before/after": f"{load_before[0]:.1f}/{load_after[0]:.1f}",
        }
    ]
    print(table(summary, f"Result (targets: <= {TARGET_MINUTES:g} min, >= {100 * TARGET_REDUCTION:.0f}% lower loss)"))
    out = {
        "minutes": total / 60,
        "steps": reached,
        "train": {k: status.get(k) for k in ("step", "total", "elapsed", "tokens_per_s", "loss")},
        "result": {k: v for k, v in result.items() if k != "adapter"},
        "in_arena": in_arena,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "cpus": os.cpu_count(),
        "config": cfg.to_dict(),
    }
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    ok = total / 60 <= TARGET_MINUTES and result["reduction"] >= TARGET_REDUCTION and in_arena
    print(
        f"headline: {total / 60:.1f} min from click to adapter in Arena; held-out loss {result['loss_before']:.3f} -> "
        f"{result['loss_after']:.3f} ({100 * result['reduction']:.0f}% lower, {result['questions']} test questions); "
        f"load avg {load_before[0]:.1f} on {os.cpu_count()} cores; {'target met' if ok else 'target NOT met'}"
    )


if __name__ == "__main__":
    main()
