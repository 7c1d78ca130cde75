"""Start-up benchmark: cold start (first GGUF conversion) vs warm start (safetensors cache).

    python bench/startup.py [--quick]

Measures, each in a fresh process: per-model load time cold and warm, and seconds from process start to
the app serving its page. A load is its tokenizer and weights; the imports every load needs (torch, transformers'
tokenizer and model code, `import_model_code`), which a process pays once and the app pays at start, in the
background, are reported beside it.
Targets (issue 9): warm model load <= 2 s each; page served <= 15 s warm.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from common import ROOT, per_cpu_class, run_python, table

LOAD = """
import json, time
t0 = time.perf_counter()
from finetune.config import ModelSpec
from finetune.hardware import inference_dtype_name
from finetune.models import import_model_code, load_model, load_tokenizer
from transformers import PreTrainedTokenizerFast  # tokenizer code: an import, not part of a load
spec = ModelSpec({name!r}, dtype=inference_dtype_name())
t1 = time.perf_counter()
load_tokenizer(spec)  # cold: converts the GGUF first
t2 = time.perf_counter()
import_model_code(spec)  # once per process and architecture (the app: at start, in the background)
t3 = time.perf_counter()
load_model(spec)
t4 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0 + t3 - t2, "tokenizer_s": t2 - t1, "weights_s": t4 - t3,
                  "load_s": t2 - t1 + t4 - t3, "total_s": t4 - t1}}))
"""


def model_load(name: str, cache: str) -> dict:
    return json.loads(run_python(LOAD.format(name=name), env={"FINETUNE_MODEL_CACHE": cache}).strip().splitlines()[-1])


def page_served_s(cache: str, home: str, timeout: float = 600) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "FINETUNE_MODEL_CACHE": cache, "FINETUNE_HOME": home, "GRADIO_ANALYTICS_ENABLED": "False"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "app.py", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while time.perf_counter() - t0 < timeout:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("the app did not serve its page")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    if not per_cpu_class():  # ran once per CPU class, each in its own child (--cpu-class native,avx2)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Cold-convert only the small reference model.")
    args = parser.parse_args()
    from finetune.models import BASE_MODEL, REFERENCE_MODEL, model_cache

    warm_cache = str(model_cache())
    rows = []
    with tempfile.TemporaryDirectory() as cold_cache, tempfile.TemporaryDirectory() as home:
        names = [REFERENCE_MODEL] if args.quick else [BASE_MODEL, REFERENCE_MODEL]
        for name in [BASE_MODEL, REFERENCE_MODEL]:
            model_load(name, warm_cache)  # make sure the warm cache exists
        for name in names:
            cold = model_load(name, cold_cache)
            warm = model_load(name, warm_cache)
            rows.append(
                {
                    "what": f"load {name}",
                    "cold_s": cold["total_s"],
                    "warm_s": warm["load_s"],
                    "cold/warm": cold["total_s"] / warm["load_s"],
                    "warm: imports s": warm["import_s"],
                    "warm: tokenizer s": warm["tokenizer_s"],
                    "warm: weights s": warm["weights_s"],
                    "target_warm": "<= 2 s",
                }
            )
        page = page_served_s(warm_cache, home)
        rows.append(
            {"what": "app serves its page", "cold_s": "", "warm_s": page, "cold/warm": "", "target_warm": "<= 15 s"}
        )
    print(table(rows, "Start-up (fresh process each)"))
    loads = [r for r in rows if r["what"].startswith("load")]
    worst, weights = max(r["warm_s"] for r in loads), max(r["warm: weights s"] for r in loads)
    print(
        f"headline: warm model load {worst:.2f} s in a fresh process (worst model, tokenizer + weights; weights "
        f"{weights:.2f} s; after the one-time imports), page served {page:.1f} s warm; "
        f"cold/warm load ratio {max(r['cold/warm'] for r in rows if r['cold/warm'] != ''):.1f}x"
    )


if __name__ == "__main__":
    main()
