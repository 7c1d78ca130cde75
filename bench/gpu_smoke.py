"""GPU smoke test: one command for a GPU owner, with checks that fail when the GPU path is wrong.

    python bench/gpu_smoke.py                  # on a CUDA machine: about 6 minutes on one H100 from a cold model
                                               # cache (estimated: it has not run on a GPU yet), 2-3 more with 2+ GPUs
    python bench/gpu_smoke.py --allow-cpu      # on a CPU, fewer steps: tests this script (GPU checks are skipped)
    python bench/gpu_smoke.py --no-pin         # this process sees every GPU (default: pinned to one, as the app)

It pins itself to one GPU (`pin_one_gpu`) before torch touches CUDA, as a training process does, after counting the
GPUs with `nvidia-smi -L`. Then, each section in its own try/except (an exception is a failed check, and the rest
still runs), the letter saying which defect a check catches (bench/README.md, "GPU smoke test"):
1. the decision table: what this GPU should get from its compute capability and memory, worked out here, against
   each `Machine` method, for Gemma-3 (overflows float16) and a float16-safe model; and the float16 loader guard [I];
2. short trainings, each in a child process as the runner starts them: 8 lamini_docs rows to memorise, QLoRA 4-bit,
   float32 weights + float16 autocast + scaler + gradient checkpointing (the T4 path of a float16-safe model);
3. the app's models (Arena base + reference) in the pool: their GPU memory; a reloaded adapter answers a training
   question with the trained answer's first tokens; the Arena's three columns; the served tuned column [L];
   Evaluate on the pooled base [O]; the held-out loss in chunks [J]; mixed-adapter batches equal separate runs;
4. a run training beside those models on the same GPU [N] within the GPU's memory; eviction frees the GPU [M];
5. ZeroGPU simulated in a fresh process: the real `spaces` wrappers with a stubbed scheduler, arguments and results
   pickled into a forked worker that uses the GPU [E]; a training child there computes on the CPU [D];
6. with 2+ GPUs: `accelerate launch --num_processes 2` agrees on the final evaluation [B]; a plain training process
   sees one GPU and the runner trains two runs at once on two GPUs [A].
Tables go to stdout, artifacts/gpu_smoke.json is always written; exit status 1 when any check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

from common import ROOT, machine, table

CHECKS: list[dict] = []
CHILD_MARK = "gpu_smoke checks: "  # a child section's last stdout line: its checks, as JSON
ELSEWHERE = "cuda:1"  # an app device a training child cannot see (it sees one GPU, or none): it must not use it
MEMORISE_ROWS = 8
# A CPU run tests this script, not the CPU: short rows, the exact softmax (the data's-vocabulary set-up alone took
# 135 s on a loaded 2-core VM), 3 steps.
CPU_SMALL = ["max_steps=3", "warmup_steps=0", "max_length=64", "batch_size=2", "train_vocab=full"]


def check(name: str, ok: bool, detail: str = "", catches: str = "") -> bool:
    CHECKS.append({"check": name, "catches": catches, "result": "pass" if ok else "**FAIL**", "detail": detail})
    print(f"[{'ok' if ok else 'FAIL'}] {name} {detail}", file=sys.stderr, flush=True)
    return ok


def skip(name: str, reason: str, catches: str = "") -> None:
    CHECKS.append({"check": name, "catches": catches, "result": "skip", "detail": reason})
    print(f"[skip] {name}: {reason}", file=sys.stderr, flush=True)


def section(title: str, fn, *args):
    """Run one section; an exception is a failed check with its type and message, and the script goes on."""
    print(f"\n## {title}", file=sys.stderr, flush=True)
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 (whatever broke, the summary and the JSON are still written)
        traceback.print_exc()
        check(f"{title}: ran to the end", False, f"{type(e).__name__}: {str(e)[:300]}")
        return None


def run_process(cmd: list[str], env: dict | None = None, timeout: float = 600, merge: bool = True) -> tuple:
    """(exit code, None on timeout; stdout, with stderr when `merge`) of a command in its own process group, killed
    whole on timeout (accelerate's ranks, ZeroGPU's forked workers)."""
    err = subprocess.STDOUT if merge else None
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env or dict(os.environ), stdout=subprocess.PIPE, stderr=err,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out or ""
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        return None, proc.communicate()[0] or ""
    except BaseException:  # Ctrl-C here: nothing of it keeps running
        _kill_group(proc.pid)
        raise


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # all of it gone already
        os.killpg(pid, signal.SIGKILL)


def count_gpus() -> int:
    """NVIDIA GPUs this process may use, counted without CUDA (`nvidia-smi -L`, narrowed by CUDA_VISIBLE_DEVICES)."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    count = sum(line.startswith("GPU ") for line in listed.splitlines())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return count if visible is None else min(count, len([d for d in visible.split(",") if d.strip()]))


def lamini_rows() -> list[dict]:
    from finetune.data import BUNDLED

    return [json.loads(line) for line in BUNDLED["lamini_docs"].read_text().splitlines() if line.strip()]


def memorise_rows() -> list[dict]:
    """8 short training rows whose answers start in their own words (not "Yes, ..."), so the base model does not."""
    short = [r for r in lamini_rows() if len(r["answer"]) < 120 and len(r["question"]) > 20]
    return [r for r in short if not r["answer"].startswith(("Yes", "No"))][:MEMORISE_ROWS]


# --- 1. the decision table ------------------------------------------------------------------------------------


def expected_decisions(m) -> dict:
    """What this machine should get, keyed by decision and then by `fp16_ok`, worked out here from the GPU's compute
    capability and memory as torch reports them (not by asking `Machine`); on a CPU from the probe's measurement."""
    import torch

    both = (False, True)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        native, gb = (p.major, p.minor) >= (8, 0), p.total_memory / 2**30
        half = {False: "float32", True: "float16"}  # without native bfloat16: float16 only within its range
        return {
            "train dtype": dict.fromkeys(both, "bfloat16" if native else "float32"),
            "mixed precision": {s: "bf16" if native else "fp16" if s else "no" for s in both},
            "4-bit compute dtype": {s: "bfloat16" if native else half[s] for s in both},
            "inference dtype": {s: "bfloat16" if native else half[s] for s in both},
            "batch size (auto)": 32 if gb >= 40 else 16 if gb >= 14 else 8,
            "training devices": [f"cuda:{i}" for i in range(torch.cuda.device_count())],
        }
    bf16 = m.probe is not None and m.probe.bf16_fast  # the probe's choice, measured (the ISA flags are only a hint)
    dtype = "bfloat16" if bf16 else "float32"
    return {
        "train dtype": dict.fromkeys(both, dtype),
        "mixed precision": dict.fromkeys(both, "bf16" if bf16 else "no"),
        "4-bit compute dtype": dict.fromkeys(both, dtype),
        "inference dtype": dict.fromkeys(both, "float32" if m.mps else dtype),
        "batch size (auto)": 8,
        "training devices": ["cpu"],
    }


def decisions() -> tuple[list[dict], dict]:
    from finetune.config import ModelSpec, load_train_config
    from finetune.hardware import dtype_name, resolve_auto
    from finetune.hardware import machine as this_machine
    from finetune.models import BASE_MODEL, REFERENCE_MODEL, fp16_ok

    m = this_machine()
    want = expected_decisions(m)
    device = "cuda:0" if m.gpus else "cpu"
    rows = []

    def row(decision: str, model: str, expected, got) -> None:
        rows.append({"decision": decision, "model": model, "expected": expected, "got": got,
                     "ok": "yes" if expected == got else "**NO**"})  # fmt: skip

    for source, safe in ((BASE_MODEL, False), (REFERENCE_MODEL, True)):
        row("models.fp16_ok (its config.json)", source, safe, fp16_ok(ModelSpec(source)))
        row("train dtype", source, want["train dtype"][safe], dtype_name(m.train_dtype()))
        row("mixed precision", source, want["mixed precision"][safe], m.mixed_precision(fp16_ok=safe))
        row("4-bit compute dtype", source, want["4-bit compute dtype"][safe],
            dtype_name(m.quant_compute_dtype(fp16_ok=safe)))  # fmt: skip
        row("inference dtype", source, want["inference dtype"][safe], dtype_name(m.inference_dtype(device, safe)))
        cfg, _ = resolve_auto(load_train_config("quickstart_cpu", [f"model.source={source}"]), 0, m, fp16_ok=safe)
        expected = f"{want['train dtype'][safe]}, {want['mixed precision'][safe]}, batch {want['batch size (auto)']}"
        row("trainer (resolve_auto, quickstart recipe)", source, expected,
            f"{cfg.model.dtype}, {cfg.mixed_precision}, batch {cfg.batch_size}")  # fmt: skip
    row("batch size (auto)", "any", want["batch size (auto)"], m.batch_size())
    row("training devices (one per GPU this process sees)", "any", want["training devices"], m.training_devices())
    wrong = [f"{r['decision']} ({r['model']}): {r['got']}, not {r['expected']}" for r in rows if r["ok"] != "yes"]
    check("decisions: each Machine answer as this GPU's compute capability and memory imply", not wrong,
          "; ".join(wrong) or f"{len(rows)} decisions, {m.describe()}", "I")  # fmt: skip
    return rows, want


def float16_loader() -> None:
    """[I] A T4's Arena asks for float16 (its inference dtype); Gemma-3's activations overflow it, so the loader gives
    float32. The guard does not depend on the device, so it is checked on every one (a T4 runs it for real)."""
    import torch

    from finetune.config import ModelSpec
    from finetune.models import BASE_MODEL, load_model, release_device_memory

    model, tokenizer = load_model(ModelSpec(BASE_MODEL, dtype="float16"))
    inputs = tokenizer("### Question:\nWhat is Lamini?\n\n### Answer:\n", return_tensors="pt").to(model.device)
    with torch.inference_mode():
        logits = model(**inputs).logits
    dtype, finite = next(model.parameters()).dtype, bool(torch.isfinite(logits).all())
    check("loader: Gemma-3 asked for in float16 loads in float32, finite logits", dtype == torch.float32 and finite,
          f"{dtype} on {model.device}, logits finite: {finite}", "I")  # fmt: skip
    del model, logits
    release_device_memory()


# --- 2. training runs, each in its own process ----------------------------------------------------------------


def train_run(name: str, recipe: str, sets: list[str], env: dict | None = None, falling: bool = True,
              catches: str = "") -> dict:  # fmt: skip
    """Train in a child process as the app's runner does (`python -m finetune train`); read its files."""
    from finetune.runs import RunDir, runs_root

    run = RunDir(runs_root() / name)
    cmd = [sys.executable, "-m", "finetune", "train", "--config", recipe, "--run-dir", str(run.path)]
    cmd += [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    code, out = run_process(cmd, env, timeout=600)
    seconds = time.perf_counter() - t0
    status, metrics = run.read_status(), run.read_metrics()
    losses = [r["loss"] for r in metrics if "loss" in r]
    elapsed = [r["elapsed"] for r in metrics if "loss" in r]
    step_s = (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1) if len(elapsed) > 1 else None
    trained = code == 0 and status.get("state") == "finished"
    why = "timed out" if code is None else f"exit {code}: {status.get('message') or out[-300:]}"
    check(f"{name}: trains", trained, "" if trained else why, catches)
    k = max(1, len(losses) // 4)
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    down = finite and sum(losses[-k:]) / k < sum(losses[:k]) / k
    if falling:
        check(f"{name}: loss finite and falling", down, f"{losses[:1]} -> {losses[-1:]}")
    else:
        skip(f"{name}: loss finite and falling", f"informational, a few steps of small batches: {losses}")
    return {
        "run": name,
        "trained on": status.get("summary", "").rsplit(" · ", 1)[-1],
        "steps": status.get("step") or 0,
        "s/step": round(step_s, 3) if step_s else None,
        "first loss": round(losses[0], 3) if losses else None,
        "last loss": round(losses[-1], 3) if losses else None,
        "peak GiB": status.get("peak_memory_gb"),
        "wall s": round(seconds, 1),
        "run_dir": str(run.path),
        "status": status,
        "output": out,
    }


def trainings(home: Path, on_gpu: bool, steps: int) -> list[dict]:
    data = home / "memorise.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in memorise_rows() * 8))
    quiet = ["logging_steps=1", "save_steps=100000", "eval_steps=0", "eval_at_end=false"]
    memorise = [f"data.source={data}", "lr_scheduler=constant_with_warmup", "eval_rows=0"]
    memorise += ["max_steps=60", "warmup_steps=5", "max_length=96", "batch_size=8"] if on_gpu else CPU_SMALL
    fp16 = [f"max_steps={steps}", "model.source=smollm2-135m-instruct", "model.dtype=float32", "mixed_precision=fp16",
            "gradient_checkpointing=true", "eval_rows=16"]  # fmt: skip
    runs = [("memorise", "cpu_quick", memorise)]
    if on_gpu:  # 4-bit and float16 autocast on a CPU: slow, and not what a GPU owner needs to know
        runs += [("qlora-4bit", "lamini_docs_qlora", [f"max_steps={steps}", "eval_rows=16", "max_length=256"]),
                 ("fp16-checkpointing", "cpu_quick", fp16)]  # fmt: skip
    else:
        skip("qlora-4bit, fp16-checkpointing: train", "no GPU: 4-bit and float16 autocast run on a GPU only here")
    return [train_run(name, recipe, quiet + sets, falling=on_gpu) for name, recipe, sets in runs]


# --- 3. the app's models in the pool ---------------------------------------------------------------------------


def app_models(pool, want: dict, on_gpu: bool) -> float | None:
    """Load the Arena's base and reference as `arena.make_backends` does; their GPU memory, right after (GiB)."""
    import torch

    from finetune.config import ModelSpec
    from finetune.hardware import dtype_name, inference_dtype_name
    from finetune.models import BASE_MODEL, REFERENCE_MODEL

    before = torch.cuda.memory_allocated() if on_gpu else 0
    got = []
    for source, safe in ((BASE_MODEL, False), (REFERENCE_MODEL, True)):
        entry = pool.get(ModelSpec(source, dtype=inference_dtype_name()))
        weights = next(entry.model.parameters())
        got.append((source, str(weights.device), dtype_name(weights.dtype), want["inference dtype"][safe]))
    held = (torch.cuda.memory_allocated() - before) / 2**30 if on_gpu else None
    device = "cuda:0" if on_gpu else "cpu"
    wrong = [f"{s} on {d} in {t}, not {w}" for s, d, t, w in got if d != device or t != w]
    check("app models: Arena base and reference on the app's device, each in its inference dtype", not wrong,
          "; ".join(wrong) or ", ".join(f"{s} {t}" for s, _, t, _ in got) + f" on {device}", "I")  # fmt: skip
    return held


def memorised_answer(pool, run_dir: str, rows: list[dict], on_gpu: bool) -> str:
    """The adapter reloaded from disk answers a training question with the trained answer's first 3 tokens; returns
    the expected start, for the served column."""
    from finetune.config import GenerationParams
    from finetune.evaluate import eval_spec, eval_target
    from finetune.generate import BASE_ADAPTER, generate_batch
    from finetune.templates import build_prompt, get_template

    target = eval_target(Path(run_dir))
    template = get_template(target.data.template)
    entry, adapter = pool.get_with_adapter(eval_spec(target.spec), target.adapter)
    tok = entry.tokenizer
    prompts = [build_prompt(template, r["question"], tokenizer=tok) for r in rows]
    params = GenerationParams(max_new_tokens=16, stop=template.stop)
    with entry.lock:
        tuned = generate_batch(entry.model, tok, prompts, params, [adapter] * len(prompts))
        base = generate_batch(entry.model, tok, prompts[:1], params, [BASE_ADAPTER])[0]
    starts = [tok.decode(tok(r["answer"], add_special_tokens=False).input_ids[:3]).strip() for r in rows]
    right = [t.strip().startswith(s) for t, s in zip(tuned, starts)]
    name = "reloaded adapter answers a training question with the trained answer's first 3 tokens"
    detail = (f"{tuned[0].strip()[:40]!r} for {starts[0]!r} (base model: {base.strip()[:30]!r}); "
              f"{sum(right)}/{len(rows)} training questions start right")  # fmt: skip
    if on_gpu:
        check(name, right[0], detail)
    else:
        skip(name, f"informational on a CPU (3 steps do not memorise): {detail}")
    return starts[0]


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


def served_adapter(pool, run_dir: str, row: dict, start: str, on_gpu: bool) -> None:
    """[L] The tuned column on the serving engine (vLLM, runtime LoRA) answers as the adapter was trained."""
    from finetune.arena import ArenaSetup, make_backends
    from finetune.config import GenerationParams
    from finetune.models import BASE_MODEL
    from finetune.runs import RunDir
    from finetune.settings import Settings

    name = "served tuned column (vLLM, adapter loaded at run time) answers with the trained answer's first tokens"
    settings = Settings.current()
    if not settings.serve_url.strip():
        return skip(name, "no serving engine: start vLLM as README says and set FINETUNE_SERVE_URL", "L")
    setup = ArenaSetup(base_model=BASE_MODEL, adapter=RunDir(Path(run_dir)).adapter_dir,
                       serve_url=settings.serve_url, serve_model=settings.serve_model)  # fmt: skip
    tuned = make_backends(pool, setup)["tuned"]
    text = "".join(tuned.stream([{"role": "user", "content": row["question"]}], GenerationParams(max_new_tokens=16)))
    detail = f"{text.strip()[:40]!r} for {start!r} from {settings.serve_url}"
    if on_gpu:
        check(name, text.strip().startswith(start), detail, "L")
    else:
        skip(name, f"informational on a CPU: {detail}", "L")


def evaluate_in_pool(pool, run_dir: str, on_gpu: bool) -> dict:
    """[O] Evaluate answers on the Arena's pooled base (de-quantized, inference dtype), not on a copy of its own."""
    import torch

    from finetune.config import GenerationParams, ModelSpec
    from finetune.evaluate import eval_spec, evaluate_run
    from finetune.hardware import inference_dtype_name
    from finetune.models import BASE_MODEL

    arena_base = ModelSpec(BASE_MODEL, dtype=inference_dtype_name())
    qlora = eval_spec(ModelSpec(BASE_MODEL, quantization="4bit"))
    check("Evaluate's model of a QLoRA run is the Arena's base", qlora.key == arena_base.key, str(qlora.key), "O")
    loaded = [s.key for s in pool.loaded()]
    before = torch.cuda.memory_allocated() if on_gpu else 0
    limit, tokens = (16, 64) if on_gpu else (4, 16)
    t0 = time.perf_counter()
    result = evaluate_run(Path(run_dir), limit=limit, pool=pool, params=GenerationParams(max_new_tokens=tokens))
    s = result["summary"]
    ok = result["questions"] == limit and all(math.isfinite(s[c]["loss"]) for c in ("base", "tuned"))
    check(f"evaluate: {limit} held-out questions of {Path(run_dir).name}, finite losses", ok,
          f"loss {s['base']['loss']:.3f} -> {s['tuned']['loss']:.3f}")  # fmt: skip
    grew = (torch.cuda.memory_allocated() - before) / 2**30 if on_gpu else 0.0
    now = [spec.key for spec in pool.loaded()]
    names = ", ".join(f"{k[0]} {k[1]}" for k in now)
    check("Evaluate loads no second copy of the base (pool and GPU memory as before)",
          sorted(now, key=str) == sorted(loaded, key=str) and grew < 0.15,
          f"{len(now)} pooled models ({names}); allocated {grew:+.2f} GiB", "O")  # fmt: skip
    seconds = round(time.perf_counter() - t0, 1)
    return {"run": Path(run_dir).name, "questions": limit, "seconds": seconds, "base loss": s["base"]["loss"],
            "tuned loss": s["tuned"]["loss"], "tuned F1": s["tuned"]["f1"]}  # fmt: skip


def heldout_loss_memory(pool) -> float:
    """[J] The held-out loss of 4 rows x 512 answer tokens keeps at most one chunk of vocabulary logits at a time."""
    import torch

    from finetune.config import ModelSpec
    from finetune.evaluate import answer_losses
    from finetune.hardware import inference_dtype_name
    from finetune.models import BASE_MODEL

    entry = pool.get(ModelSpec(BASE_MODEL, dtype=inference_dtype_name()))
    tok = entry.tokenizer
    ids = tok(" ".join(r["answer"] for r in lamini_rows()[:100]), add_special_tokens=False).input_ids[:512]
    rows = [{"input_ids": ids, "labels": ids} for _ in range(4)]  # every next token an answer token
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    with entry.lock:
        losses = answer_losses(entry.model, tok, rows, batch_size=4)
    extra = (torch.cuda.max_memory_allocated() - start) / 2**30
    at_once = 4 * (len(ids) - 1) * len(tok) * 4 / 2**30  # float32 logits of every answer position
    finite = all(math.isfinite(s) for s, _ in losses)
    check("held-out loss in chunks: 4 rows x 512 answer tokens", finite and extra < at_once / 2,
          f"peak +{extra:.2f} GiB; all logits at once would be {at_once:.1f} GiB (float32)", "J")  # fmt: skip
    return round(extra, 2)


def batched_equals_separate(pool, run_dir: str) -> None:
    """In float32: lower precisions round differently for different batch shapes, so greedy answers may part."""
    from dataclasses import replace

    from finetune.config import GenerationParams
    from finetune.evaluate import eval_spec, eval_target
    from finetune.generate import BASE_ADAPTER, generate_batch

    target = eval_target(Path(run_dir))
    spec = replace(eval_spec(target.spec), dtype="float32")
    entry, adapter = pool.get_with_adapter(spec, target.adapter)
    prompts = [f"### Question:\n{q}\n\n### Answer:\n" for q in ("What is Lamini?", "How do I fine-tune a model?")]
    params = GenerationParams(max_new_tokens=24)
    with entry.lock:
        mixed = generate_batch(entry.model, entry.tokenizer, prompts * 2, params, [BASE_ADAPTER] * 2 + [adapter] * 2)
        alone = [generate_batch(entry.model, entry.tokenizer, [p], params, [name])[0]
                 for name in (BASE_ADAPTER, adapter) for p in prompts]  # fmt: skip
    device = next(entry.model.parameters()).device
    check(f"mixed-adapter batch equals separate runs ({device})", mixed == alone, f"{mixed[0][:40]!r}")
    check("the adapter changes the answers", mixed[:2] != mixed[2:])


# --- 4. training beside the app's models; eviction -------------------------------------------------------------


def train_beside(app_gib: float | None, on_gpu: bool, steps: int) -> dict:
    """[N] A run started beside the app (whose FINETUNE_APP_DEVICE it inherits) trains and evaluates on its own
    device; with the app's models it fits the GPU."""
    import torch

    from finetune.runs import RunDir

    # A CPU run skips the evaluation at the end: 3 questions' 128-token answers took 4.5 minutes on a loaded 2-core
    # VM (tests/test_train.py checks it there, on a tiny model).
    sets = [f"eval_at_end={str(on_gpu).lower()}", "max_minutes=0", "logging_steps=1", "save_steps=100000"]
    sets += [f"max_steps={steps}", "data.max_rows=80"] if on_gpu else CPU_SMALL
    row = train_run("beside-the-app", "quickstart_cpu", sets, {**os.environ, "FINETUNE_APP_DEVICE": ELSEWHERE}, on_gpu)
    own = "cuda:0" if on_gpu else "cpu"
    evaluated = RunDir(Path(row["run_dir"])).read_eval() is not None or not on_gpu
    where = f" · {own}: " in row["status"].get("summary", "")
    what = "trains and evaluates" if on_gpu else "trains"
    check(f"a run beside the app (FINETUNE_APP_DEVICE={ELSEWHERE}) {what} on its own {own}",
          row["status"].get("state") == "finished" and evaluated and where,
          f"{row['trained on']!r}; {row['status'].get('message', '')[:80]}", "N")  # fmt: skip
    if not on_gpu:
        skip("a run beside the app evaluates at the end on its own device", "CPU: minutes of 128-token answers", "N")
    out = {"app models GiB": round(app_gib, 2) if app_gib is not None else "n/a (CPU)",
           "trainer peak GiB": row["peak GiB"], "s/step beside the app": row["s/step"]}  # fmt: skip
    if on_gpu and app_gib is not None and row["peak GiB"] is not None:
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        both = app_gib + row["peak GiB"]
        check("app models + trainer peak < 0.9 x the GPU's memory", both < 0.9 * total,
              f"{app_gib:.2f} + {row['peak GiB']:.2f} = {both:.2f} GiB of {total:.1f}")  # fmt: skip
        out["GPU GiB"] = round(total, 1)
    return out


def evict(pool) -> dict:
    """[M] The pool's own eviction (what a budget overrun does) hands the GPU memory back: torch's cache emptied."""
    import torch

    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    pool.budget_bytes = 0
    pool._evict(keep=None)  # every model out, each through the eviction path
    freed = (allocated - torch.cuda.memory_allocated()) / 2**30
    returned = (reserved - torch.cuda.memory_reserved()) / 2**30
    left = len(pool.loaded())
    check("eviction frees the models' GPU memory and empties torch's cache", freed > 0.1 and returned > 0.5 * freed,
          f"allocated -{freed:.2f} GiB, reserved -{returned:.2f} GiB; {left} models left", "M")  # fmt: skip
    return {"allocated freed GiB": round(freed, 2), "reserved returned GiB": round(returned, 2)}


# --- 5. ZeroGPU, in a fresh process (its own CUDA never initialised, as on a Space) -----------------------------


def pooled_model_device(pool, run_dir: str) -> str:
    """Runs in the ZeroGPU worker: where its copy of the pool holds the run's base model."""
    from finetune.evaluate import eval_spec, eval_target

    return str(next(pool.get(eval_spec(eval_target(Path(run_dir)).spec)).model.parameters()).device)


def zero_gpu(run_dir: Path, on_gpu: bool) -> None:
    """As tests/test_spaces.py: the real `spaces` wrappers, less the scheduler (stubbed) and its torch part (a stub
    module): each call's arguments pickled into a worker forked from this process, results pickled back."""
    import multiprocessing

    try:
        from spaces.config import Config
    except ImportError:
        check("ZeroGPU: the spaces package is installed", False, "pip install spaces", "E")
        return
    Config.zero_gpu = True
    no_moves = types.ModuleType("spaces.zero.torch")  # its real one moves tensors to the GPU the scheduler grants
    for name in ("unpatch", "init", "move", "enter_mode"):
        setattr(no_moves, name, lambda *args, **kwargs: None)
    no_moves.size = lambda: 0
    sys.modules["spaces.zero.torch"] = no_moves
    from spaces.zero import client

    granted = types.SimpleNamespace(allowToken="token", nvidiaIndex=0, nvidiaUUID="GPU-smoke", idle=True)
    client.schedule = lambda **kwargs: granted
    client.allow = lambda token: None
    client.release = lambda token, **kwargs: None
    client.get_duration_seconds = lambda *args: 600
    os.environ.update(SPACE_ID="gpu-smoke/zero-gpu", SPACES_ZERO_GPU="true")
    if not on_gpu:
        os.environ["FINETUNE_APP_DEVICE"] = "cpu"  # the Space's GPU, played by this CPU
    from finetune.config import GenerationParams, load_train_config
    from finetune.evaluate import evaluation, follow_evaluation
    from finetune.guided import heldout_losses
    from finetune.models import ModelPool
    from finetune.runner import Runner
    from finetune.runs import RunDir, runs_root
    from finetune.spaces import gpu

    pool = ModelPool()
    limit, tokens = (16, 64) if on_gpu else (4, 16)
    params = GenerationParams(max_new_tokens=tokens)
    last = follow_evaluation(gpu(duration=60)(evaluation)(run_dir, limit, pool, params))
    s = RunDir(run_dir).read_eval()["summary"]
    check("ZeroGPU: evaluation through spaces.GPU (a forked worker) finishes",
          last.done == last.total and all(math.isfinite(s[c]["loss"]) for c in ("base", "tuned")),
          f"{last.text}; loss {s['base']['loss']:.3f} -> {s['tuned']['loss']:.3f}", "E")  # fmt: skip
    held = gpu(duration=60)(heldout_losses)(run_dir, pool, 8)
    check("ZeroGPU: heldout_losses through spaces.GPU finishes",
          all(math.isfinite(held[k]) for k in ("loss_before", "loss_after")),
          f"{held['loss_before']:.3f} -> {held['loss_after']:.3f} on {held['questions']} questions", "E")  # fmt: skip
    where = gpu(duration=60)(pooled_model_device)(pool, run_dir)
    want = "cuda:0" if on_gpu else "cpu"
    check("ZeroGPU: the worker's models on the Space's GPU", where == want, f"{where} (want {want})", "E")
    check("ZeroGPU: the app's own pool stayed empty", not pool.loaded(), f"{len(pool.loaded())} models", "E")

    runner = Runner(runs_root().parent / "zero-gpu-runs", poll_interval=0.2)
    sets = ["max_steps=1", "batch_size=2", "max_length=64", "data.max_rows=40", "eval_rows=0", "train_vocab=full",
            "save_steps=100000", "logging_steps=1"]  # fmt: skip
    try:
        status = runner.wait(runner.submit(load_train_config("cpu_quick", sets)), timeout=480)
    finally:
        runner.close()
    on_cpu = runner.devices == ["cpu"] and " · cpu: " in status.get("summary", "")
    check("ZeroGPU: a training child computes on the CPU (no GPU in a subprocess there)",
          on_cpu and status.get("state") == "finished",
          f"runner devices {runner.devices}; {status.get('summary', '').rsplit(' · ', 1)[-1]!r}; "
          f"{status.get('message', '')[:80]}", "D")  # fmt: skip
    for worker in multiprocessing.active_children():  # the forked workers wait for more calls
        worker.kill()
        worker.join(5)


# --- 6. two or more GPUs ----------------------------------------------------------------------------------------


def accelerate_two_processes(env: dict) -> None:
    """[B] Under DDP both ranks decide the final evaluation alike (a collective: one alone would hang)."""
    from finetune.runs import RunDir, runs_root

    run = RunDir(runs_root() / "accelerate-2")
    sets = ["max_steps=4", "eval_steps=1", "eval_rows=8", "batch_size=4", "save_steps=100000", "logging_steps=1",
            "eval_at_end=false"]  # fmt: skip
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "-m", "finetune", "train",
           "--config", "cpu_quick", "--run-dir", str(run.path), *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    code, out = run_process(cmd, env, timeout=420)
    said = sorted(line.split("final evaluation: ")[1].strip() for line in out.splitlines()
                  if "final evaluation: " in line)  # fmt: skip
    want = [f"no, done at the last step (process {rank})" for rank in (0, 1)]
    state = run.read_status().get("state")
    why = "timed out: a rank evaluating alone waits forever" if code is None else f"exit {code}, {state}"
    check("accelerate launch, 2 processes: both skip the final evaluation, the run finishes",
          code == 0 and said == want and state == "finished", f"{why}; {said}", "B")  # fmt: skip


def two_gpu_runner(n_gpus: int) -> None:
    """[A] In a process that sees every GPU: one training device per GPU, two runs at once on two of them."""
    from finetune.config import load_train_config
    from finetune.hardware import machine as this_machine
    from finetune.runner import Runner
    from finetune.runs import ACTIVE_STATES, runs_root

    devices = this_machine().training_devices()
    want = [f"cuda:{i}" for i in range(n_gpus)]
    check("training devices: one per GPU (a process that sees them all)", devices == want, str(devices), "A")
    runner = Runner(runs_root().parent / "two-gpu-runs", poll_interval=0.2)
    cfg = load_train_config("cpu_quick", ["max_steps=150", "eval_rows=0", "save_steps=100000", "logging_steps=1"])
    together, deadline, states = False, time.monotonic() + 480, []
    try:
        ids = [runner.submit(cfg) for _ in range(2)]
        while time.monotonic() < deadline:
            states = [runner.status(i) for i in ids]
            together |= all(s.get("state") == "running" and (s.get("step") or 0) >= 1 for s in states)
            if not any(s.get("state") in ACTIVE_STATES for s in states):
                break
            time.sleep(0.2)
    finally:
        runner.close()
    used = [s.get("device") for s in states]
    ended = [s.get("state") for s in states]
    check("runner: two runs train at the same time, on two GPUs",
          together and len(set(used)) == 2 and ended == ["finished"] * 2,
          f"devices {used}; both training at once: {together}; {ended}", "A")  # fmt: skip


def run_child(name: str, args: list[str], env: dict, timeout: float) -> None:
    """A section in a fresh process (`--child NAME`): its checks come back as its last stdout line."""
    code, out = run_process([sys.executable, __file__, "--child", name, *args], env, timeout, merge=False)
    found = [line for line in out.splitlines() if line.startswith(CHILD_MARK)]
    if found:
        CHECKS.extend(json.loads(found[-1][len(CHILD_MARK) :]))
    else:
        check(f"{name}: child process reported", False, "timed out" if code is None else f"exit {code} (stderr above)")


def child_main(args: argparse.Namespace) -> None:
    if args.child == "zero-gpu":
        section("5. ZeroGPU, simulated", zero_gpu, Path(args.child_args[0]), args.child_args[1] == "gpu")
    elif args.child == "two-gpu-runner":
        section("6b. Runner on every GPU", two_gpu_runner, int(args.child_args[0]))
    print(CHILD_MARK + json.dumps(CHECKS), flush=True)


# --- the whole smoke test --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allow-cpu", action="store_true", help="Run on a CPU (fewer steps): tests this script.")
    parser.add_argument("--no-pin", action="store_true", help="Do not pin this process to one GPU.")
    parser.add_argument("--steps", type=int, default=20, help="Steps of the QLoRA, fp16 and beside-the-app runs.")
    parser.add_argument("--json", default=str(ROOT / "artifacts" / "gpu_smoke.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("child_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args)

    t_start = time.perf_counter()
    os.environ.setdefault("FINETUNE_MODEL_CACHE", str(Path.home() / ".cache" / "finetune-workbench" / "models"))
    home = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    os.environ["FINETUNE_HOME"] = str(home)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # processes fork below (ZeroGPU's workers)
    n_gpus = count_gpus()
    every_gpu = dict(os.environ)  # for the children that must see them all
    from finetune.hardware import pin_one_gpu

    if not args.no_pin:
        pin_one_gpu()  # before torch touches CUDA: one process, one GPU, as a training process
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.allow_cpu:
        sys.exit("No CUDA device here: run on a GPU machine, or pass --allow-cpu to test the script on a CPU.")
    print(f"machine: {machine()}; {n_gpus} GPU(s) listed by nvidia-smi; FINETUNE_HOME={home}")
    out: dict = {"machine": machine(), "gpus": n_gpus}

    from finetune.models import ModelPool

    found = section("1. Decisions", decisions)
    out["decisions"] = found[0] if found else []
    want = found[1] if found else None
    section("1b. float16 loader guard", float16_loader)
    out["training"] = section("2. Training", trainings, home, on_gpu, args.steps) or []
    runs = {r["run"]: r["run_dir"] for r in out["training"] if r["status"].get("state") == "finished"}
    memorise = runs.get("memorise")
    needs = "needs the memorise run, which did not finish"

    pool = ModelPool()
    app_gib = section("3. App models", app_models, pool, want, on_gpu) if want else None
    if want is None:
        skip("app models: Arena base and reference in their inference dtype", "the decision table did not run", "I")
    if memorise:
        rows = memorise_rows()
        start = section("3b. Memorised answer", memorised_answer, pool, memorise, rows, on_gpu)
        out["arena"] = section("3c. Arena", arena_streams, pool, memorise)
        if start:
            section("3d. Served tuned column", served_adapter, pool, memorise, rows[0], start, on_gpu)
        out["evaluate"] = section("3e. Evaluate", evaluate_in_pool, pool, runs.get("qlora-4bit", memorise), on_gpu)
    else:
        skip("reloaded adapter, arena, served column, Evaluate", needs)
    if on_gpu:
        out["heldout peak GiB"] = section("3f. Held-out loss memory", heldout_loss_memory, pool)
    else:
        skip("held-out loss in chunks: 4 rows x 512 answer tokens", "no GPU: the device's peak memory is the measure",
             "J")  # fmt: skip
    if memorise:
        section("3g. Mixed-adapter batch", batched_equals_separate, pool, memorise)
    out["beside"] = section("4. Training beside the app", train_beside, app_gib, on_gpu, args.steps)
    if on_gpu:
        out["eviction"] = section("4b. Eviction", evict, pool)
    else:
        skip("eviction frees the models' GPU memory and empties torch's cache", "no GPU", "M")
    del pool

    if memorise:
        zero_env = {k: v for k, v in os.environ.items() if k not in ("SPACE_ID", "SPACES_ZERO_GPU")}
        zero_env["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # is_available() without initialising CUDA before the fork
        run_child("zero-gpu", [memorise, "gpu" if on_gpu else "cpu"], zero_env, timeout=600)
    else:
        skip("ZeroGPU: evaluation, heldout_losses, training child", needs, "E, D")

    if n_gpus >= 2 and on_gpu:
        section("6. accelerate launch, 2 processes", accelerate_two_processes, every_gpu)
        sets = ["max_steps=2", "eval_rows=0", "save_steps=100000", "logging_steps=1"]
        section("6a. A training process with every GPU visible", train_run, "every-gpu-visible", "cpu_quick", sets,
                every_gpu, False, "A")  # fmt: skip
        run_child("two-gpu-runner", [str(n_gpus)], every_gpu, timeout=600)
    else:
        for name, letter in (("accelerate launch, 2 processes: both skip the final evaluation", "B"),
                             ("a training process with every GPU visible trains on one", "A"),
                             ("runner: two runs train at the same time, on two GPUs", "A")):  # fmt: skip
            skip(name, f"{n_gpus} GPU(s) here: needs 2 or more", letter)

    print(table(out["decisions"], "1. Decisions: expected from the GPU (or the CPU probe) vs Machine") + "\n")
    trained = [{k: v for k, v in r.items() if k not in ("run_dir", "status", "output")} for r in out["training"]]
    print(table(trained, "2. Training (each in its own process)") + "\n")
    if out.get("arena"):
        print(table([out["arena"]], "3. Arena: three columns at once (tokens/s per column)") + "\n")
    if out.get("evaluate"):
        print(table([out["evaluate"]], "3. Evaluate on the pooled base") + "\n")
    memory = {**(out.get("beside") or {}), **(out.get("eviction") or {})}
    if out.get("heldout peak GiB") is not None:
        memory["held-out loss peak GiB"] = out["heldout peak GiB"]
    if memory:
        print(table([memory], "4. Memory: the app's models, a run beside them, eviction") + "\n")
    print(table(CHECKS, "Checks"))
    failed = [c["check"] for c in CHECKS if c["result"] == "**FAIL**"]
    skipped = sum(c["result"] == "skip" for c in CHECKS)
    wall = time.perf_counter() - t_start
    out.update(training=trained, checks=CHECKS, wall_s=round(wall, 1))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    tail = f"; failed: {failed}" if failed else ""
    print(f"headline: {len(CHECKS) - len(failed) - skipped} passed, {skipped} skipped, {len(failed)} failed "
          f"of {len(CHECKS)} checks in {wall / 60:.1f} min{tail}")  # fmt: skip
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
