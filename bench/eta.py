"""ETA benchmark: the step time the Start and Train tabs show before a run starts, against the steps it then takes.

    python bench/eta.py                       # both CPU classes (native, AVX2 reproduced), five forms, 50 steps each
    python bench/eta.py --cpu-class avx2 --steps 8

For each form: `finetune.plan.estimate_run` (the CPU probe and the form's shape, nothing trained), then a real
training run of the same config in its own process and its steady-state seconds per step (steps after the 4th: the
first ones pay one-time kernel and allocation set-up, about 3 steps' worth in all). 50 steps: length grouping sorts
each group of up to 50 batches longest first, so fewer steps time the longest rows only (12 steps: 1.06 s against
0.81 s over 50 for the quick CPU run). Target (issue 14): the estimate within 30% of the steady state on every class.
"""

from __future__ import annotations

import argparse
import json
import sys

from common import ROOT, load_note, machine, per_cpu_class, run_python, table

FORMS = {
    "quick start": ("quickstart_cpu", []),
    "quick CPU run": ("cpu_quick", []),
    "quick CPU run (full vocabulary)": ("cpu_quick", ["train_vocab=full"]),
    "quick start (SmolLM2 base)": ("quickstart_cpu", ["model.source=smollm2-135m-instruct"]),
    "quick start (all layers)": ("quickstart_cpu", ["lora_layers=0"]),
}

WORKER = """
import json, sys, tempfile, time
sys.path.insert(0, {bench!r})
from finetune import train as ft
from finetune.config import load_train_config
from finetune.plan import estimate_run
marks = []

class Timed(ft.RunCallback):
    def on_step_end(self, args, state, control, **kwargs):
        marks.append(time.perf_counter())
        return super().on_step_end(args, state, control, **kwargs)

ft.RunCallback = Timed
cfg = load_train_config({recipe!r}, {sets!r})
estimate = estimate_run(cfg).step_s
run_dir = tempfile.mkdtemp()
ft.train(cfg, run_dir)
gaps = [b - a for a, b in zip(marks, marks[1:])][3:]
print(json.dumps({{"estimate": estimate, "steady": sum(gaps) / len(gaps)}}))
"""


def main() -> None:
    if not per_cpu_class():  # ran once per CPU class, each in its own child (--cpu-class native,avx2)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--forms", default=";".join(FORMS), help="Names of FORMS, separated by semicolons.")
    args = parser.parse_args()
    from finetune.hardware import refresh_probe

    refresh_probe()  # the probe of this quiet machine, as a training run leaves it (a cached one may be stale)
    print(f"machine: {machine()}; {load_note()} at start")
    rows = []
    for name in args.forms.split(";"):
        recipe, sets = FORMS[name]
        sets = [*sets, f"max_steps={args.steps}", "max_minutes=0", "logging_steps=1", "save_steps=100000"]
        sets.append("eval_rows=0")
        code = WORKER.format(bench=str(ROOT / "bench"), recipe=recipe, sets=sets)
        out = json.loads(run_python(code, timeout=3600).strip().splitlines()[-1])
        rows.append(
            {
                "form": name,
                "estimate s/step": out["estimate"],
                "steady s/step": out["steady"],
                "estimate / steady": f"{out['estimate'] / out['steady']:.2f}",
            }
        )
        print(f"  {name}: {rows[-1]['estimate / steady']}", file=sys.stderr, flush=True)
    print(table(rows, f"Step time: estimate before training vs steady state ({args.steps} steps per form)"))
    worst = max(abs(float(r["estimate / steady"]) - 1) for r in rows)
    print(f"{load_note()} at end")
    print(f"headline: estimates within {100 * worst:.0f}% of the steady state (target: within 30%)")


if __name__ == "__main__":
    main()
