"""DPO benchmark: does training on preferences (`finetune.dpo`) make the adapter prefer the preferred answers, and
what does a 2-minute DPO run take on this CPU?

    python bench/dpo.py [--quick] [--minutes 2] [--questions 48]

1. The SFT adapter DPO starts from: the Gemma-3-270M run with the most Arena votes on it (or the newest SFT run) in
   $FINETUNE_HOME; with none, a short SFT run trained here (`recipes/cpu_quick.yaml`; --quick: 4 steps).
2. Preference pairs. With at least --min-votes blind votes on that adapter: the pairs of the Arena's votes, every
   4th vote held out. With fewer: pairs the reference model prefers. Two sampled answers of the SFT adapter to a
   lamini_docs question, the one SmolLM2-135M-Instruct finds likelier (mean log-likelihood per token of the answer to
   the question in its chat template) chosen; training questions give the training pairs, test questions the
   held-out ones. The output says which.
3. A DPO run from that adapter (`recipes/dpo_votes.yaml`, max_minutes --minutes, steps planned to fit: the app's
   run), started as the runner starts it (`python -m finetune train`), timed from the command to the adapter.
4. Preference win-rate on the held-out pairs: the DPO adapter wins a pair when it prefers the chosen answer by more
   than the SFT adapter does (log-likelihood of the chosen answer minus the rejected one, under the Q/A template);
   ties count half. Also each adapter's preference accuracy (the chosen answer likelier).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, load_note, machine, per_cpu_class, table

BASE, REFERENCE = "gemma-3-270m", "smollm2-135m-instruct"
MIN_VOTES = 20


def cli(*args: str) -> float:
    """Run `python -m finetune ...` as the runner does; its wall time in seconds."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "finetune", *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"python -m finetune {args[0]} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def sft_adapter(tmp: Path, quick: bool, votes: list) -> tuple[Path, str, list]:
    """(adapter folder, what it is, the votes on it)."""
    from finetune.preferences import adapter_votes
    from finetune.runs import list_runs

    runs = [i for i in list_runs() if i.has_adapter and i.run.config_file.is_file()]
    runs = [i for i in runs if (c := i.run.read_config()).method == "sft" and c.model.source == BASE]
    if runs:
        best = max(runs, key=lambda i: (len(adapter_votes(votes, i.run_id)), i.created))
        return best.run.adapter_dir, f"run {best.run_id}", adapter_votes(votes, best.run_id)
    steps = 4 if quick else 40
    cli("train", "--config", "cpu_quick", "--run-dir", str(tmp / "sft"), "--set", f"max_steps={steps}")
    return tmp / "sft" / "adapter", f"cpu_quick, {steps} steps, trained here", []


def vote_pairs(votes: list) -> tuple[list[dict], list[dict]]:
    """(training pairs, held-out pairs) of the votes; every 4th vote held out."""
    from finetune.preferences import preference_pairs

    held = [v for i, v in enumerate(votes) if i % 4 == 3]
    kept = [v for i, v in enumerate(votes) if i % 4 != 3]
    return preference_pairs(kept).pairs, preference_pairs(held).pairs


def tuned(adapter: Path):
    """(base + `adapter` in the app's inference dtype, its tokenizer)."""
    from peft import PeftModel

    from finetune.config import ModelSpec
    from finetune.hardware import inference_dtype_name
    from finetune.models import load_model

    base, tokenizer = load_model(ModelSpec(BASE, dtype=inference_dtype_name()))
    return PeftModel.from_pretrained(base, str(adapter)).eval(), tokenizer


def answer_sums(model, tokenizer, template: str, qa: list[tuple[str, str]]) -> list[tuple[float, int]]:
    """Per (question, answer): the answer's summed cross-entropy (EOS included) under `template`, and its tokens."""
    from finetune.evaluate import answer_losses
    from finetune.templates import encode_row, get_template

    rows = [encode_row(tokenizer, get_template(template), {"instruction": q, "output": a}) for q, a in qa]
    return answer_losses(model, tokenizer, rows)


def sampled_answers(adapter: Path, questions: list[str], max_new_tokens: int, seed: int = 0) -> list[list[str]]:
    """Two sampled answers of base + adapter per question (Q/A template, cut at the template's next header)."""
    import torch

    from finetune.templates import build_prompt, get_template, pad_id

    model, tokenizer = tuned(adapter)
    template = get_template("qa")
    torch.manual_seed(seed)
    answers = []
    for i in range(0, len(questions), 8):
        prompts = [build_prompt(template, q) for q in questions[i : i + 8]]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        with torch.inference_mode():
            out = model.generate(**batch, do_sample=True, temperature=1.0, top_p=0.95, max_new_tokens=max_new_tokens,
                                 num_return_sequences=2, pad_token_id=pad_id(tokenizer))  # fmt: skip
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        texts = [t.split(template.stop[0])[0].strip() for t in texts]
        answers += [texts[j : j + 2] for j in range(0, len(texts), 2)]
    return answers


def reference_pairs(adapter: Path, questions: list[str], max_new_tokens: int) -> list[dict]:
    """Pairs the reference model prefers: of two sampled answers of the adapter, the one it finds likelier (a lower
    mean cross-entropy per token, as its own chat answer)."""
    from finetune.config import ModelSpec
    from finetune.hardware import inference_dtype_name
    from finetune.models import load_model

    answers = sampled_answers(adapter, questions, max_new_tokens)
    model, tokenizer = load_model(ModelSpec(REFERENCE, dtype=inference_dtype_name()))
    flat = [(q, a) for q, two in zip(questions, answers) for a in two]
    means = [s / max(n, 1) for s, n in answer_sums(model.eval(), tokenizer, "chat", flat)]
    pairs = []
    for k, (q, (a, b)) in enumerate(zip(questions, answers)):
        if a and b and a != b:
            first = means[2 * k] <= means[2 * k + 1]
            pairs.append({"prompt": q, "chosen": a if first else b, "rejected": b if first else a})
    return pairs


def margins(adapter: Path, pairs: list[dict]) -> list[float]:
    """Per pair: log-likelihood of the chosen answer minus the rejected one, under base + `adapter` (Q/A)."""
    model, tokenizer = tuned(adapter)
    qa = [(p["prompt"], p[side]) for p in pairs for side in ("chosen", "rejected")]
    sums = [s for s, _ in answer_sums(model, tokenizer, "qa", qa)]
    return [sums[2 * i + 1] - sums[2 * i] for i in range(len(pairs))]  # loss(rejected) - loss(chosen)


def main() -> None:
    if not per_cpu_class():  # ran once per CPU class, each in its own child (--cpu-class native,avx2)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="A 4-step SFT adapter, 8+4 questions, 3 DPO steps.")
    parser.add_argument("--minutes", type=float, default=2.0, help="The DPO run's max_minutes.")
    parser.add_argument("--questions", type=int, default=48, help="Training questions for the reference's pairs.")
    parser.add_argument("--min-votes", type=int, default=MIN_VOTES, help="Fewer votes: the reference's pairs.")
    args = parser.parse_args()
    print(f"machine: {machine()}; {load_note()} at start")

    from finetune.config import DataConfig, dump_train_config, load_train_config
    from finetune.data import load_splits
    from finetune.preferences import PairSet, write_pairs
    from finetune.runs import RunDir
    from finetune.votes import VoteStore

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sft, sft_what, votes = sft_adapter(tmp, args.quick, VoteStore().votes())
        from_votes = len(votes) >= args.min_votes
        if from_votes:
            train_pairs, test_pairs = vote_pairs(votes)
            source = f"the Arena's votes on it ({len(votes)} votes, every 4th held out)"
        else:
            splits = load_splits(DataConfig("lamini_docs"))
            n_train, n_test = (8, 4) if args.quick else (args.questions, args.questions // 2)
            tokens = 24 if args.quick else 48
            train_pairs = reference_pairs(sft, splits["train"]["instruction"][:n_train], tokens)
            test_pairs = reference_pairs(sft, splits["test"]["instruction"][:n_test], tokens)
            source = (f"pairs {REFERENCE} prefers (two sampled answers of the SFT adapter to lamini_docs questions; "
                      f"{len(votes)} votes on it, fewer than {args.min_votes})")  # fmt: skip
        print(f"SFT adapter: {sft} ({sft_what}); preference pairs: {source}", flush=True)

        cfg = load_train_config("dpo_votes")
        cfg.base_adapter = str(sft)
        cfg.data = DataConfig(str(write_pairs(PairSet(train_pairs), tmp / "pairs.jsonl")), test_size=0)
        cfg.max_minutes = 0 if args.quick else args.minutes
        cfg.max_steps = 3 if args.quick else "auto"
        dump_train_config(cfg, tmp / "dpo.yaml")
        wall = cli("train", "--config", str(tmp / "dpo.yaml"), "--run-dir", str(tmp / "dpo"))
        status = RunDir(tmp / "dpo").read_status()
        sft_margins, dpo_margins = margins(sft, test_pairs), margins(tmp / "dpo" / "adapter", test_pairs)

    wins = sum(1.0 if d > s else 0.5 if d == s else 0.0 for s, d in zip(sft_margins, dpo_margins))
    win_rate = wins / len(test_pairs) if test_pairs else float("nan")
    accuracy = {name: sum(m > 0 for m in ms) / max(len(ms), 1) for name, ms in (("sft", sft_margins),
                                                                                  ("dpo", dpo_margins))}  # fmt: skip
    steps, elapsed = status.get("step", 0), status.get("elapsed") or float("nan")
    row = {
        "pairs": "votes" if from_votes else "reference prefers",
        "train pairs": len(train_pairs),
        "held-out pairs": len(test_pairs),
        "DPO steps": steps,
        "wall s (command)": wall,
        "training s": elapsed,
        "s/step": status.get("step_s") or elapsed / max(steps, 1),
        "SFT accuracy": accuracy["sft"],
        "DPO accuracy": accuracy["dpo"],
        "DPO win-rate vs SFT": win_rate,
        "peak RSS GiB": status.get("peak_memory_gb"),
    }
    budget = f"{cfg.max_minutes:g}-minute" if cfg.max_steps == "auto" else f"{cfg.max_steps}-step"
    print(table([row], f"A {budget} DPO run from the SFT adapter (recipes/dpo_votes.yaml, beta {cfg.beta:g})"))
    print(f"{load_note()} at end")
    print(
        f"headline: the DPO adapter wins {100 * win_rate:.0f}% of {len(test_pairs)} held-out pairs against the SFT "
        f"adapter ({row['pairs']}); a {budget} DPO run: {steps} steps, {wall:.0f} s from the command to the adapter "
        "on this CPU"
    )


if __name__ == "__main__":
    main()
