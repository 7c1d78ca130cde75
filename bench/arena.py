"""Arena benchmark: the Arena's way of answering vs three plain `model.generate` calls one after another.

    python bench/arena.py [--quick] [--max-new-tokens 64] [--adapter PATH]

The Arena (`finetune.arena.ask`) answers each question in three columns: base and tuned (base + LoRA adapter)
as two rows of ONE batched `generate` on the shared pooled base model (PEFT mixed-adapter batch), the reference
model concurrently. The baseline is what a tutorial does: `generate` on a separate base model, on a merged
tuned model (`merge_and_unload` of a copy), then on the reference model. Both sides are greedy, in the app's
inference dtype, with the same prompts, stop strings and max new tokens, on lamini_docs test questions.

Reports aggregate tokens/s (generated tokens of all three columns / wall time), time to first token p50 per
column (from the moment the question is asked, as the user waits), and the fraction of the machine's
memory-bandwidth bound: bytes of weights read by the decoding steps per second vs the copy bandwidth measured
in the same run. Targets (issue 9): >= 2.0x aggregate tokens/s; first token <= 1 s per column after warm load.
The adapter is the newest trained run's (if it was trained on the base model) or a random LoRA (r=16, all
linear layers, non-zero B) made here; the output says which.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

from common import FirstToken, load_note, machine, memory_bandwidth_gbs, p50, per_cpu_class, pick_adapter, table


def plain_generate(model, tokenizer, prompt: str, stops: tuple[str, ...], params) -> tuple[int, float | None]:
    """One baseline call: (generated tokens without EOS/padding, time of the first token)."""
    import torch

    from finetune.generate import eos_ids, generate_kwargs, prompt_inputs

    inputs = prompt_inputs(tokenizer, prompt, model.device)
    streamer = FirstToken()
    kwargs = generate_kwargs(tokenizer, params)
    if stops:
        kwargs.update(stop_strings=list(stops), tokenizer=tokenizer)
    with torch.inference_mode():
        out = model.generate(**inputs, **kwargs, streamer=streamer)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    ends = eos_ids(model, tokenizer)
    n = next((i for i, t in enumerate(new) if t in ends), len(new))
    return n, streamer.at


def main() -> None:
    if not per_cpu_class():  # ran once per CPU class, each in its own child (--cpu-class native,avx2)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 questions, 32 new tokens.")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--adapter", help="Adapter folder for the tuned column (default: newest run, else random).")
    args = parser.parse_args()
    if args.quick:
        args.questions, args.max_new_tokens = 4, 32

    import torch
    from peft import PeftModel

    from finetune.arena import ArenaSession, ArenaSetup, ask, make_backends
    from finetune.config import DataConfig, GenerationParams, ModelSpec
    from finetune.data import load_splits
    from finetune.generate import CPU_THREADS, threads_per_generation
    from finetune.hardware import inference_dtype_name
    from finetune.models import BASE_MODEL, REFERENCE_MODEL, ModelPool, load_model, model_bytes
    from finetune.templates import conversation_prompt, get_template

    print(f"machine: {machine()}; {load_note()} at start")
    questions = load_splits(DataConfig("lamini_docs"))["test"]["instruction"][: args.questions]
    params = GenerationParams(max_new_tokens=args.max_new_tokens, stop=())
    dtype = inference_dtype_name()
    bandwidth = memory_bandwidth_gbs()

    with tempfile.TemporaryDirectory() as tmp:
        base_spec, ref_spec = ModelSpec(BASE_MODEL, dtype=dtype), ModelSpec(REFERENCE_MODEL, dtype=dtype)
        # --- the Arena: pooled base model with the adapter attached, reference model, streamed together
        pool = ModelPool()
        adapter, adapter_note = pick_adapter(BASE_MODEL, lambda: pool.get(base_spec).model, tmp, args.adapter)
        backends = make_backends(pool, ArenaSetup(BASE_MODEL, adapter.path, reference_model=REFERENCE_MODEL))
        for _ in ask(backends, ArenaSession.start(), "Warm up: what is Lamini?", params):
            pass  # loads both models and the adapter: the targets are "after warm load"
        arena = {"wall": 0.0, "tokens": {r: 0 for r in backends}, "first": {r: [] for r in backends}, "base_steps": 0}
        for q in questions:
            t0 = time.perf_counter()
            *_, columns = ask(backends, ArenaSession.start(), q, params)  # the last update: every column done
            arena["wall"] += time.perf_counter() - t0
            for role, col in columns.items():
                if col.error:
                    raise SystemExit(f"{role} failed: {col.error}")
                arena["tokens"][role] += col.tokens or 0
                arena["first"][role].append(col.first_token_s if col.first_token_s is not None else float("nan"))
            # Base and tuned share one batched generate: it runs as many steps as the longer of the two rows.
            arena["base_steps"] += max(columns["base"].tokens or 0, columns["tuned"].tokens or 0)

        base_entry, ref_entry = pool.get(base_spec), pool.get(ref_spec)
        tokenizer, ref_tok = base_entry.tokenizer, ref_entry.tokenizer
        base_bytes, ref_bytes = model_bytes(load_model(base_spec)[0]), model_bytes(ref_entry.model)
        adapter_bytes = model_bytes(base_entry.model) - base_bytes

        # --- the baseline: separate base model, merged tuned copy, reference; three generate calls in a row
        plain_base = load_model(base_spec)[0]
        merged = PeftModel.from_pretrained(copy.deepcopy(plain_base), str(adapter.path)).merge_and_unload().eval()
        template, chat = get_template(backends["base"].template), get_template("chat")
        columns = {
            "base": (plain_base, tokenizer, template),
            "tuned": (merged, tokenizer, template),
            # Its own copy: the pool's model has the Arena's generation patches (`generate.prepare_head`).
            "reference": (load_model(ref_spec)[0], ref_tok, chat),
        }
        plain_generate(plain_base, tokenizer, "Warm up", template.stop, params)
        plain_generate(merged, tokenizer, "Warm up", template.stop, params)
        # torch's default (one thread per core) and one thread: the baseline gets the better of the two.
        baselines = {}
        for threads in sorted({CPU_THREADS, 1}, reverse=True):
            torch.set_num_threads(threads)
            base = {"wall": 0.0, "tokens": {r: 0 for r in columns}, "first": {r: [] for r in columns}}
            for q in questions:
                messages = [{"role": "user", "content": q}]
                t0 = time.perf_counter()
                for role, (model, tok, tmpl) in columns.items():
                    prompt = conversation_prompt(tmpl, messages, tok)
                    n, first = plain_generate(model, tok, prompt, tmpl.stop if not tmpl.chat else (), params)
                    base["tokens"][role] += n
                    base["first"][role].append(first - t0 if first else float("nan"))
                base["wall"] += time.perf_counter() - t0
            baselines[threads] = base
        torch.set_num_threads(CPU_THREADS)
        bandwidth = (bandwidth + memory_bandwidth_gbs()) / 2  # before and after: the machine's load changes

    def row(side: str, r: dict, weight_bytes: float) -> dict:
        tokens = sum(r["tokens"].values())
        return {
            "side": side,
            "tokens (base/tuned/ref)": "/".join(str(r["tokens"][k]) for k in ("base", "tuned", "reference")),
            "wall s": r["wall"],
            "tokens/s": tokens / r["wall"],
            **{f"first token p50 {k} s": p50(r["first"][k]) for k in ("base", "tuned", "reference")},
            "GB/s of weights": weight_bytes / r["wall"] / 1e9,
            "of bandwidth": f"{weight_bytes / r['wall'] / 1e9 / bandwidth:.0%}",
        }

    arena_bytes = arena["base_steps"] * (base_bytes + adapter_bytes) + arena["tokens"]["reference"] * ref_bytes
    rows = []
    for threads, base in baselines.items():
        t = base["tokens"]
        plain_bytes = (t["base"] + t["tuned"]) * base_bytes + t["reference"] * ref_bytes
        rows.append(row(f"three generate calls, {threads} thread(s)", base, plain_bytes))
    rows.append(row(f"Arena (batched + concurrent, {threads_per_generation(2)} thread each)", arena, arena_bytes))
    speedup = rows[-1]["tokens/s"] / max(r["tokens/s"] for r in rows[:-1])
    print(
        f"adapter: {adapter_note}; dtype {dtype}; {len(questions)} lamini_docs test questions, greedy, "
        f"max_new_tokens {params.max_new_tokens}; torch threads {torch.get_num_threads()}"
    )
    print(
        f"weights read per decoding step: base {base_bytes / 1e6:.0f} MB (+ adapter {adapter_bytes / 1e6:.0f} MB), "
        f"reference {ref_bytes / 1e6:.0f} MB; measured copy bandwidth {bandwidth:.1f} GB/s"
    )
    print(table(rows, "Arena: three columns per question"))
    worst_first = max(rows[-1][f"first token p50 {k} s"] for k in ("base", "tuned", "reference"))
    print(f"{load_note()} at end")
    print(
        f"headline: Arena {speedup:.2f}x aggregate tokens/s over the best baseline (target >= 2.0x); "
        f"first token p50 <= {worst_first:.2f} s per column (target <= 1 s)"
    )


if __name__ == "__main__":
    main()
