"""GGUF export benchmark: a quick-start adapter taken home as GGUF files, read back by transformers and llama.cpp.

    python bench/gguf_export.py          # trains the guided path's recipe (recipes/quickstart_cpu.yaml, ~4 minutes)
    python bench/gguf_export.py --quick  # the same recipe, 20 steps; 24/48 new tokens (answers/speed)
    python bench/gguf_export.py --run RUN_DIR   # an existing run folder on the embedded Gemma-3-270M, no training

Measures issue 25's "Done when" on the embedded Gemma-3-270M:
1. Export: the run merged into its base and written as f16 and q8_0 GGUF (`finetune.gguf_export.export_gguf`, each
   timed from the run folder to the file, merge included), and the adapter alone as a GGUF LoRA (`export_gguf_lora`).
2. transformers reads each GGUF (`from_pretrained(dir, gguf_file=..., dtype=float32)`): next-token logits on 5
   held-out lamini_docs questions against the merged model's (float32), max and mean absolute difference, also
   relative to the largest logit, and the greedy answers side by side, with how many are identical.
3. llama.cpp (llama-cpp-python) runs the q8_0 GGUF, and the base model's own GGUF (Q4_K_M) with the GGUF LoRA:
   next-token logits, greedy answers beside the app's, and decode speed against the app's own CPU path for the same
   tuned model (transformers `generate` of the merged model in the app's inference dtype, with the app's output-layer
   step `finetune.generate.prepare_head`), same prompts, every path and thread count interleaved per question in the
   same run.

The baseline of the speed ratio is the app's path measured in this run, at the same thread count (`--threads 2,1`:
torch's intra-op threads and llama.cpp's n_threads; the app itself decodes one answer on all cores). Decode speed is
tokens after the first over the time after the first (both sides run exactly N new tokens: EOS is suppressed);
tokens/s "with prompt" includes the prompt. One thread is measured too because llama.cpp's threads wait for each other
at every operation: with another process on one of 2 cores, 2 threads decoded 10x slower than 1 (measured here).
Default `--cpu-class native` (llama.cpp picks its own kernels; the ISA caps of `--cpu-class avx2` reach only torch's
side). Writes the report (markdown) and the numbers (JSON) to `--out` (default artifacts/gguf/), with the GGUF files.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import time
from pathlib import Path

from common import ROOT, FirstToken, load_note, machine, per_cpu_class, table

BASE = "gemma-3-270m"


def train_run(out: Path, max_steps: int | None) -> tuple[Path, dict]:
    """A quick-start run trained here with the guided path's recipe and budget (`guided_config`): (run folder, what
    it did). `max_steps`: that many steps instead of the recipe's time budget (--quick: 20)."""
    from finetune.guided import guided_config
    from finetune.runs import RunDir
    from finetune.train import train

    cfg = guided_config()
    if max_steps:  # these steps, however long they take: on a busy machine the budget alone leaves only a few
        cfg.max_steps, cfg.max_minutes = max_steps, max(cfg.max_minutes, 30.0)
    run = out / f"run-{time.strftime('%Y%m%d-%H%M%S')}-quickstart"
    t0 = time.perf_counter()
    train(cfg, run)
    status = RunDir(run).read_status()
    return run, {
        "trained_here": True,
        "max_steps": cfg.max_steps,
        "max_minutes": cfg.max_minutes,
        "steps": status.get("step"),
        "wall_s": round(time.perf_counter() - t0, 1),
        "loss": status.get("loss"),
        "state": status.get("state"),
    }


def timed(fn, *args):
    t0 = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t0


def next_logits(model, tokenizer, prompts: list[str]):
    """The next-token logits after each prompt (float32, one row per prompt)."""
    import torch

    from finetune.generate import prompt_inputs

    rows = []
    with torch.inference_mode():
        for p in prompts:
            rows.append(model(**prompt_inputs(tokenizer, p, model.device)).logits[0, -1].float())
    return torch.stack(rows)


def compare_logits(got, ref) -> dict:
    """Max and mean absolute difference of `got` vs `ref` logits, also over ref's largest |logit|; top-1 agreement."""
    import torch

    got, ref = torch.as_tensor(got).float(), torch.as_tensor(ref).float()
    diff = (got - ref).abs()
    scale = ref.abs().max().item()
    return {
        "max_abs": diff.max().item(),
        "mean_abs": diff.mean().item(),
        "max_rel": diff.max().item() / scale,
        "mean_rel": diff.mean().item() / scale,
        "largest_logit": scale,
        "top1_same": int((got.argmax(-1) == ref.argmax(-1)).sum()),
    }


def hf_answers(model, tokenizer, prompts: list[str], n: int) -> list[str]:
    """Greedy answers (raw text of up to `n` new tokens, stopping at EOS), as the app generates them."""
    import torch

    from finetune.config import GenerationParams
    from finetune.generate import generate_kwargs, prompt_inputs

    kwargs = generate_kwargs(tokenizer, GenerationParams(max_new_tokens=n, stop=()))
    out = []
    with torch.inference_mode():
        for p in prompts:
            inputs = prompt_inputs(tokenizer, p, model.device)
            ids = model.generate(**inputs, **kwargs)[0, inputs["input_ids"].shape[1] :]
            out.append(tokenizer.decode(ids, skip_special_tokens=True))
    return out


def hf_speed(model, tokenizer, prompt: str, n: int, threads: int) -> dict:
    """One greedy `generate` of exactly `n` new tokens (EOS suppressed) on `threads` torch threads: tokens, seconds,
    time of the first token."""
    import torch

    from finetune.config import GenerationParams
    from finetune.generate import CPU_THREADS, generate_kwargs, prompt_inputs

    inputs = prompt_inputs(tokenizer, prompt, model.device)
    streamer = FirstToken()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                **generate_kwargs(tokenizer, GenerationParams(max_new_tokens=n, stop=())),
                min_new_tokens=n,
                streamer=streamer,
            )
    finally:
        end = time.perf_counter()
        torch.set_num_threads(CPU_THREADS)
    return {"tokens": out.shape[1] - inputs["input_ids"].shape[1], "s": end - t0, "first_s": streamer.at - t0}


def llama_logits(llm, ids: list[int]):
    """llama.cpp's next-token logits after `ids`."""
    import llama_cpp
    import numpy as np

    llm.reset()
    llm.eval(ids)
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


def llama_answer(llm, prompt: str, n: int) -> str:
    """llama.cpp's greedy completion of the prompt text (its own tokenizer), to its end-of-generation token. From an
    empty cache, as a fresh `llama-cli` run: reusing a cached prompt prefix splits the prompt into other batches, whose
    products round differently, and near-tied greedy answers then change (seen with the LoRA: 2 of 5)."""
    llm.reset()
    out = llm.create_completion(
        prompt, max_tokens=n, temperature=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0
    )
    return out["choices"][0]["text"]


def llama_speed(llm, ids: list[int], n: int) -> dict:
    """Exactly `n` greedy tokens from llama.cpp (its `generate` does not stop at EOS), from an empty cache."""
    llm.reset()
    t0, first, count = time.perf_counter(), None, 0
    for _ in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        count += 1
        first = first or time.perf_counter()
        if count >= n:
            break
    end = time.perf_counter()
    return {"tokens": count, "s": end - t0, "first_s": first - t0}


def speed_summary(runs: list[dict]) -> dict:
    tokens, seconds = sum(r["tokens"] for r in runs), sum(r["s"] for r in runs)
    decode_s = sum(r["s"] - r["first_s"] for r in runs)
    return {
        "tokens": tokens,
        "s": seconds,
        "tokens_per_s": tokens / seconds,
        "decode_tokens_per_s": (tokens - len(runs)) / decode_s,
        "first_token_p50_s": statistics.median(r["first_s"] for r in runs),
    }


def shown(text: str) -> str:
    """An answer as the Arena shows it: cut at the template's next header, stripped."""
    from finetune.generate import cut_at_stop

    return cut_at_stop(text, ("###",)).strip()


def cell(text: str, width: int = 110) -> str:
    text = shown(text).replace("|", "\\|").replace("\n", " ⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"


def main() -> None:
    if not per_cpu_class(default="native"):  # --cpu-class native,avx2: once per class, each in its own child
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Train 20 steps; 24 new tokens (answers), 48 (speed).")
    parser.add_argument("--run", help="An existing run folder (trained on gemma-3-270m) instead of training one.")
    parser.add_argument("--steps", type=int, help="Training steps (default: the recipe's budget; --quick: 20).")
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--answer-tokens", type=int, help="New tokens of each greedy answer (default 32; --quick 24).")
    parser.add_argument("--speed-tokens", type=int, help="New tokens of each speed run (default 64; --quick 48).")
    parser.add_argument("--threads", default="2,1", help="Thread counts of the speed runs, both sides (default 2,1).")
    parser.add_argument("--out", default=str(ROOT / "artifacts" / "gguf"), help="GGUF files, run, report, JSON.")
    args = parser.parse_args()
    answer_n = args.answer_tokens or (24 if args.quick else 32)
    speed_n = args.speed_tokens or (48 if args.quick else 64)
    threads = [int(t) for t in args.threads.split(",")]
    steps = args.steps or (20 if args.quick and not args.run else None)
    os.environ.setdefault("FINETUNE_MODEL_CACHE", str(Path.home() / ".cache" / "finetune-workbench" / "models"))

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.data import load_splits
    from finetune.export import adapter_and_config, merged_model
    from finetune.generate import prepare_head, prompt_inputs
    from finetune.gguf_export import export_gguf, export_gguf_lora
    from finetune.hardware import inference_dtype_name, torch_dtype
    from finetune.hardware import machine as hw_machine
    from finetune.models import EMBEDDED, embedded_name
    from finetune.templates import conversation_prompt, get_template

    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    print(f"machine: {machine()}; {load_note()} at start")
    print(f"CPU class: {hw_machine().describe()}")
    version = llama_cpp.__version__ if llama_cpp else "not installed"
    print(
        f"torch threads: {torch.get_num_threads()}; llama.cpp (llama-cpp-python): {version}; speed runs on "
        f"{', '.join(map(str, threads))} threads\n",
        flush=True,
    )

    # --- 1. the quick-start adapter ----------------------------------------------------------------------------------
    if args.run:
        run, run_info = Path(args.run), {"trained_here": False, "path": args.run}
    else:
        print(f"training the guided recipe{f' for {steps} steps' if steps else ''} ...", flush=True)
        run, run_info = train_run(out, steps)
    adapter, cfg = adapter_and_config(run)
    if (embedded_name(cfg.model.source) or cfg.model.source) != BASE:
        raise SystemExit(f"{run} was trained on {cfg.model.source}: this bench measures {BASE} (its own GGUF is here)")
    run_info["path"] = str(run)

    # --- 2. export ---------------------------------------------------------------------------------------------------
    exports, export_rows = {}, []
    for kind in ("f16", "q8_0"):
        result, seconds = timed(export_gguf, run, out, kind)
        exports[kind] = result.gguf
        export_rows.append(
            {
                "file": f"{kind} GGUF (merged)",
                "export s": round(seconds, 1),
                "MB": round(result.gguf.stat().st_size / 1e6, 1),
                "name": result.gguf.name,
            }
        )
        gc.collect()
    lora, seconds = timed(export_gguf_lora, run, out)
    export_rows.append(
        {
            "file": "GGUF LoRA (adapter alone)",
            "export s": round(seconds, 1),
            "MB": round(lora.stat().st_size / 1e6, 1),
            "name": lora.name,
        }
    )
    base_gguf = EMBEDDED[BASE].locate_gguf()

    # --- 3. transformers: the merged model vs each GGUF read back ----------------------------------------------------
    merged, tokenizer = merged_model(adapter, cfg)
    merged = merged.float().eval()
    template = get_template(cfg.data.template)
    questions = load_splits(cfg.data)["test"]["instruction"][: args.questions]
    prompts = [conversation_prompt(template, [{"role": "user", "content": q}], tokenizer) for q in questions]
    prompt_ids = [prompt_inputs(tokenizer, p, "cpu")["input_ids"][0].tolist() for p in prompts]
    ref_logits = next_logits(merged, tokenizer, prompts)
    answers = {"merged (transformers, float32)": hf_answers(merged, tokenizer, prompts, answer_n)}
    logits, loads = {}, {}
    for kind, path in exports.items():
        model, seconds = timed(
            lambda p=path: AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
        )
        loads[f"{kind} GGUF (transformers)"] = seconds
        logits[f"{kind} GGUF (transformers)"] = compare_logits(next_logits(model, tokenizer, prompts), ref_logits)
        answers[f"{kind} GGUF (transformers)"] = hf_answers(model, tokenizer, prompts, answer_n)
        del model
        gc.collect()

    # The app's own path: the merged model in the app's inference dtype, with its output-layer step.
    app_dtype = inference_dtype_name()
    app_model = merged if torch_dtype(app_dtype, "cpu") == torch.float32 else copy.deepcopy(merged)
    app_model = app_model.to(torch_dtype(app_dtype, "cpu")).eval()
    prepare_head(app_model)
    app_label = f"app path (transformers, {app_dtype})"
    answers[app_label] = hf_answers(app_model, tokenizer, prompts, answer_n)

    # --- 4. llama.cpp ------------------------------------------------------------------------------------------------
    llama_note, tokenization = "", {}
    paths = {(app_label, t): (lambda p, ids, t=t: hf_speed(app_model, tokenizer, p, speed_n, t)) for t in threads}
    if llama_cpp is None:
        llama_note = "llama-cpp-python is not installed: no llama.cpp numbers"
    else:
        llms = {
            "llama.cpp q8_0 (merged)": (exports["q8_0"], None),
            "llama.cpp Q4_K_M base + GGUF LoRA": (base_gguf, lora),
        }
        for label, (model_path, lora_path) in llms.items():
            kwargs = {"lora_path": str(lora_path)} if lora_path else {}
            for t in threads:  # one instance per thread count; the first answers and gives the logits
                llm, seconds = timed(
                    lambda m=model_path, k=kwargs, t=t: llama_cpp.Llama(
                        model_path=str(m), n_threads=t, n_ctx=512, verbose=False, **k
                    )
                )
                paths[(label, t)] = lambda p, ids, llm=llm: llama_speed(llm, ids, speed_n)
                if label in logits:
                    continue
                loads[label] = seconds
                own = [llm.tokenize(p.encode(), add_bos=True, special=True) for p in prompts]
                tokenization[label] = sum(a == b for a, b in zip(own, prompt_ids, strict=True))
                logits[label] = compare_logits(np.stack([llama_logits(llm, ids) for ids in prompt_ids]), ref_logits)
                answers[label] = [llama_answer(llm, p, answer_n) for p in prompts]
    # Speed: every path and thread count interleaved per question, after a warm-up each, so that other work on the
    # machine slows all of them alike.
    for run_one in paths.values():
        run_one(prompts[0], prompt_ids[0])
    runs = {key: [] for key in paths}
    for p, ids in zip(prompts, prompt_ids, strict=True):
        for key, run_one in paths.items():
            runs[key].append(run_one(p, ids))
    speed = {key: speed_summary(r) for key, r in runs.items()}

    # --- 5. report ---------------------------------------------------------------------------------------------------
    load_end = os.getloadavg()
    ref_answers = answers["merged (transformers, float32)"]
    app_answers = answers[app_label]
    logit_table = [
        {
            "model": label,
            "max abs diff": round(c["max_abs"], 4),
            "mean abs diff": round(c["mean_abs"], 5),
            "max / largest logit": f"{100 * c['max_rel']:.2f}%",
            "mean / largest logit": f"{100 * c['mean_rel']:.3f}%",
            "same top-1": f"{c['top1_same']}/{len(prompts)}",
            "load s": round(loads[label], 1),
        }
        for label, c in logits.items()
    ]
    same_rows = []
    for label, texts in list(answers.items())[1:]:
        vs = app_answers if label.startswith("llama.cpp") else ref_answers
        vs_name = "app path" if label.startswith("llama.cpp") else "merged float32"
        pairs = list(zip(texts, vs, strict=True))
        same_rows.append(
            {
                "answers of": label,
                "vs": vs_name,
                "identical as shown": f"{sum(shown(a) == shown(b) for a, b in pairs)}/{len(pairs)}",
                "identical raw": f"{sum(a == b for a, b in pairs)}/{len(pairs)}",
            }
        )
    answer_table = []
    for i, q in enumerate(questions):
        for label, texts in answers.items():
            answer_table.append(
                {
                    "question": cell(q, 60) if label == next(iter(answers)) else "",
                    "model": label,
                    f"greedy answer ({answer_n} new tokens at most)": cell(texts[i]),
                }
            )

    def ratio(label: str, t: int) -> float:
        """Decode tokens/s of `label` over the app path's, at the same thread count."""
        return speed[(label, t)]["decode_tokens_per_s"] / speed[(app_label, t)]["decode_tokens_per_s"]

    speed_table = [
        {
            "path": label,
            "threads": t,
            "new tokens": s["tokens"],
            "s": round(s["s"], 1),
            "tokens/s (with prompt)": round(s["tokens_per_s"], 1),
            "decode tokens/s": round(s["decode_tokens_per_s"], 1),
            "vs app path (decode, same threads)": f"{ratio(label, t):.2f}x",
            "first token p50 s": round(s["first_token_p50_s"], 3),
        }
        for (label, t), s in sorted(speed.items(), key=lambda item: -item[0][1])
    ]
    run_table = [{"run": run.name, **{k: v for k, v in run_info.items() if k not in ("path",)}}]
    sections = [
        f"machine: {machine()}\nCPU class: {hw_machine().describe()}\n"
        f"load average (1 min) {load_start[0]:.1f} at start, {load_end[0]:.1f} at end, on {os.cpu_count()} cores",
        table(run_table, "Quick-start run"),
        table(export_rows, "Export (each from the run folder: merge included)"),
        table(logit_table, f"Next-token logits vs the merged model (float32), {len(prompts)} held-out questions"),
        table(same_rows, "Greedy answers: identical"),
        table(answer_table, "Greedy answers side by side"),
    ]
    title = f"Decode speed: {speed_n} new tokens x {len(prompts)} questions (EOS suppressed), greedy, interleaved"
    sections.append(table(speed_table, title))
    if tokenization:
        sections.append(
            "llama.cpp's own tokenization of the prompt text equals the app's: "
            + ", ".join(f"{k} {v}/{len(prompts)}" for k, v in tokenization.items())
        )
    if llama_note:
        sections.append(llama_note)
    report = "\n\n".join(sections)
    print(report)
    (out / "gguf.md").write_text(report + "\n", encoding="utf-8")
    data = {
        "machine": machine(),
        "cpu_class": hw_machine().describe(),
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "run": run_info,
        "exports": export_rows,
        "load_s": loads,
        "logits": logits,
        "questions": questions,
        "answers": answers,
        "identical": same_rows,
        "speed_tokens": speed_n,
        "speed": [{"path": label, "threads": t, **s} for (label, t), s in speed.items()],
        "answer_tokens": answer_n,
        "app_dtype": app_dtype,
        "llama_cpp_tokenization_same": tokenization,
        "llama_cpp": llama_cpp.__version__ if llama_cpp else None,
    }
    with open(out / "gguf.json", "w") as f:
        json.dump(data, f, indent=1)
    print(f"\nwrote {out / 'gguf.md'} and {out / 'gguf.json'}")

    f16, q8 = logits["f16 GGUF (transformers)"], logits["q8_0 GGUF (transformers)"]
    same = {r["answers of"]: r["identical as shown"] for r in same_rows}
    line = (
        f"headline: logits vs merged, max |diff| f16 {f16['max_abs']:.3g} ({100 * f16['max_rel']:.2f}% of the "
        f"largest), q8_0 {q8['max_abs']:.3g} ({100 * q8['max_rel']:.2f}%); identical greedy answers f16 "
        f"{same['f16 GGUF (transformers)']}, q8_0 {same['q8_0 GGUF (transformers)']}"
    )
    if llama_cpp is not None:
        llama_same = ", ".join(f"{k.removeprefix('llama.cpp ')} {v}" for k, v in same.items() if k.startswith("llama"))
        line += f"; llama.cpp answers identical to the app's: {llama_same}"
        for t in threads:
            ratios = ", ".join(
                f"{label.removeprefix('llama.cpp ')} {ratio(label, t):.1f}x"
                for (label, n), _ in speed.items()
                if n == t and label != app_label
            )
            app = speed[(app_label, t)]["decode_tokens_per_s"]
            line += (
                f"; {t} thread{'s' if t > 1 else ''}: llama.cpp decodes {ratios} the app's transformers path "
                f"({app_dtype}, {app:.1f} tokens/s)"
            )
    print(line + f"; load avg {load_start[0]:.1f}-{load_end[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
