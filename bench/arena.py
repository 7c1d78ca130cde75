"""Arena benchmark: the Arena on llama.cpp and on transformers vs three plain `model.generate` calls in a row.

    python bench/arena.py [--quick] [--max-new-tokens 64] [--adapter PATH] [--same 20]

The Arena (`finetune.arena.ask`) answers each question in three columns: base and tuned (base + LoRA adapter)
as two rows of ONE batched `generate` on the shared pooled base model (PEFT mixed-adapter batch), the reference
model concurrently. The baseline is what a tutorial does: `generate` on a separate base model, on a merged
tuned model (`merge_and_unload` of a copy), then on the reference model. Both sides are greedy, in the app's
inference dtype, with the same prompts, stop strings and max new tokens, on lamini_docs test questions.

The Arena on llama.cpp (`finetune.llamacpp`, the app's default on a CPU where llama-cpp-python is installed) answers
from the embedded GGUF files as shipped (Q4_K_M, Q4_1), the tuned column as the base GGUF + the adapter as a GGUF
LoRA, each column a sequence of the one engine's batched steps.

Reports aggregate tokens/s (generated tokens of all three columns / wall time), time to first token p50 per
column (from the moment the question is asked, as the user waits), and the fraction of the machine's
memory-bandwidth bound: bytes of weights read by the decoding steps per second vs the copy bandwidth measured
in the same run. Targets: transformers Arena >= 2.0x aggregate tokens/s (issue 9); llama.cpp Arena >= 3x the
transformers Arena (issue 27); first token <= 1 s per column after warm load.
Then the same answers (`--same`, held-out questions): how many greedy answers of the tuned and base columns agree in
their first 8 and 16 tokens between llama.cpp and transformers, and the held-out loss of each path (answer tokens of
the first 40 test rows, as the guided path measures; llama.cpp's from its logits over the same token ids).
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


def measure_arena(backends: dict, questions: list[str], params) -> dict:
    """The Arena's rounds over `questions`, after a warm-up round that loads the models, adapter and GGUF LoRA."""
    from finetune.arena import ArenaSession, ask

    for _ in ask(backends, ArenaSession.start(), "Warm up: what is Lamini?", params):
        pass
    result = {"wall": 0.0, "tokens": {r: 0 for r in backends}, "first": {r: [] for r in backends}, "base_steps": 0}
    for q in questions:
        t0 = time.perf_counter()
        *_, columns = ask(backends, ArenaSession.start(), q, params)  # the last update: every column done
        result["wall"] += time.perf_counter() - t0
        for role, col in columns.items():
            if col.error:
                raise SystemExit(f"{role} failed: {col.error}")
            result["tokens"][role] += col.tokens or 0
            result["first"][role].append(col.first_token_s if col.first_token_s is not None else float("nan"))
        # Base and tuned share one batched generate: it runs as many steps as the longer of the two rows.
        result["base_steps"] += max(columns["base"].tokens or 0, columns["tuned"].tokens or 0)
    return result


def llama_losses(gguf, lora, encoded: list[dict]) -> list[tuple[float, int]]:
    """(summed cross-entropy, answer tokens) per encoded row from llama.cpp's logits over the very same token ids."""
    import llama_cpp
    import numpy as np

    from finetune.llamacpp import LlamaEngine

    engine = LlamaEngine(slots=1, per_slot=max(len(r["input_ids"]) for r in encoded) + 8)
    model = engine.model(gguf)
    context = engine.context(model, lora)  # a context of its own: no answer shares its KV cache
    out = []
    for row in encoded:
        ids, labels = list(row["input_ids"]), list(row["labels"])
        llama_cpp.llama_memory_clear(context.ctx.memory, True)
        rows = context.decode([(token, i, 0, True) for i, token in enumerate(ids)])
        total, count = 0.0, 0
        for t in range(len(ids) - 1):
            if labels[t + 1] == -100:
                continue
            logits = rows[t]
            top = logits.max()
            total += float(np.log(np.exp(logits - top).sum()) + top - logits[ids[t + 1]])
            count += 1
        out.append((total, count))
    return out


def same_answers(pool, adapter, questions: list[str], tokenizer) -> list[dict]:
    """Greedy answers of base and tuned on both engines, compared token by token (the base model's tokenizer)."""
    from finetune.arena import ArenaSession, ArenaSetup, ask, make_backends
    from finetune.config import GenerationParams
    from finetune.models import BASE_MODEL

    params = GenerationParams(max_new_tokens=16, stop=())
    answers = {}
    for engine in ("llama.cpp", "transformers"):
        backends = make_backends(pool, ArenaSetup(BASE_MODEL, adapter.path, engine=engine))
        del backends["reference"]
        answers[engine] = []
        for q in questions:
            *_, columns = ask(backends, ArenaSession.start(), q, params)
            answers[engine].append({r: tokenizer(c.text.strip(), add_special_tokens=False)["input_ids"]
                                    for r, c in columns.items()})  # fmt: skip
    rows = []
    for role in ("base", "tuned"):
        pairs = [(a[role], b[role]) for a, b in zip(answers["llama.cpp"], answers["transformers"])]
        row = {"column": role, "questions": len(pairs)}
        for n in (8, 16):
            row[f"first {n} tokens equal"] = sum(x[:n] == y[:n] for x, y in pairs)
        rows.append(row)
    return rows


def main() -> None:
    if not per_cpu_class():  # ran once per CPU class, each in its own child (--cpu-class native,avx2)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 questions, 32 new tokens.")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--adapter", help="Adapter folder for the tuned column (default: newest run, else random).")
    parser.add_argument("--same", type=int, default=20, help="Held-out questions of the same-answers check (0: none).")
    args = parser.parse_args()
    if args.quick:
        args.questions, args.max_new_tokens, args.same = 4, 32, 8

    import torch
    from peft import PeftModel

    from finetune import llamacpp
    from finetune.arena import ArenaSetup, make_backends
    from finetune.config import DataConfig, GenerationParams, ModelSpec
    from finetune.data import load_splits
    from finetune.evaluate import answer_losses, mean_loss
    from finetune.generate import BASE_ADAPTER, CPU_THREADS, threads_per_generation
    from finetune.hardware import inference_dtype_name
    from finetune.models import BASE_MODEL, REFERENCE_MODEL, ModelPool, embedded_gguf, load_model, model_bytes
    from finetune.templates import conversation_prompt, encode_row, get_template

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
        setup = ArenaSetup(BASE_MODEL, adapter.path, reference_model=REFERENCE_MODEL, engine="transformers")
        backends = make_backends(pool, setup)
        arena = measure_arena(backends, questions, params)
        llama = None
        if llamacpp.available():
            setup.engine = "llama.cpp"
            llama = measure_arena(make_backends(pool, setup), questions, params)

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

        same, losses = [], []
        if llama is not None and args.same:
            held_out = load_splits(DataConfig("lamini_docs"))["test"]
            asked = [q for q in held_out["instruction"] if len(q.split()) >= 4][: args.same]
            same = same_answers(pool, adapter, asked, tokenizer)
            template = get_template(backends["base"].template)
            encoded = [encode_row(tokenizer, template, row) for row in held_out.select(range(40))]
            base_gguf, lora = embedded_gguf(BASE_MODEL), llamacpp.lora_gguf(adapter.path)
            tuned_name = pool.get_with_adapter(base_spec, adapter.path)[1]
            for label, names, gguf_lora in (("base", BASE_ADAPTER, None), ("tuned", tuned_name, lora)):
                hf = mean_loss(answer_losses(base_entry.model, tokenizer, encoded, [names] * len(encoded)))
                cpp = mean_loss(llama_losses(base_gguf, gguf_lora, encoded))
                losses.append({"column": label, "held-out loss, transformers": hf, "held-out loss, llama.cpp": cpp})

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
    rows.append(row(f"Arena on transformers (batched + concurrent, {threads_per_generation(2)} thread each)", arena,
                    arena_bytes))  # fmt: skip
    best_plain = max(r["tokens/s"] for r in rows[:-1])
    speedup = rows[-1]["tokens/s"] / best_plain
    if llama is not None:
        # Every llama.cpp step reads the GGUF's weights once per context: base and tuned contexts, and the reference.
        models = (("base", BASE_MODEL), ("ref", REFERENCE_MODEL))
        gguf_bytes = {r: embedded_gguf(m).stat().st_size for r, m in models}
        t = llama["tokens"]
        llama_bytes = (t["base"] + t["tuned"]) * gguf_bytes["base"] + t["reference"] * gguf_bytes["ref"]
        rows.append(row("Arena on llama.cpp (GGUF as shipped, one engine)", llama, llama_bytes))
    print(
        f"adapter: {adapter_note}; dtype {dtype}; {len(questions)} lamini_docs test questions, greedy, "
        f"max_new_tokens {params.max_new_tokens}; torch threads {torch.get_num_threads()}"
    )
    print(
        f"weights read per decoding step: base {base_bytes / 1e6:.0f} MB (+ adapter {adapter_bytes / 1e6:.0f} MB), "
        f"reference {ref_bytes / 1e6:.0f} MB; measured copy bandwidth {bandwidth:.1f} GB/s"
    )
    print(table(rows, "Arena: three columns per question"))
    if same:
        print(table(same, "Same answers: greedy, 16 new tokens, llama.cpp vs transformers, held-out questions"))
        print(table(losses, "Held-out loss (answer tokens, first 40 lamini_docs test rows)"))
    worst_first = max(rows[-1][f"first token p50 {k} s"] for k in ("base", "tuned", "reference"))
    print(f"{load_note()} at end")
    headline = (
        f"headline: Arena on transformers {speedup:.2f}x aggregate tokens/s over the best plain-generate baseline "
        f"(target >= 2.0x)"
    )
    if llama is not None:
        llama_tps, hf_tps = rows[-1]["tokens/s"], rows[-2]["tokens/s"]
        headline += (
            f"; Arena on llama.cpp {llama_tps:.1f} tokens/s = {llama_tps / hf_tps:.2f}x the transformers Arena "
            f"(target >= 3x), {llama_tps / best_plain:.2f}x the plain-generate baseline"
        )
        if same:
            tuned = next(r for r in same if r["column"] == "tuned")
            headline += f"; tuned first 8 tokens equal on {tuned['first 8 tokens equal']}/{tuned['questions']}"
    else:
        headline += "; llama-cpp-python is not installed: no llama.cpp side"
    print(f"{headline}; first token p50 <= {worst_first:.2f} s per column (target <= 1 s)")


if __name__ == "__main__":
    main()
