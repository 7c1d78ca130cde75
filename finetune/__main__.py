"""Command line: `python -m finetune <command> --help`.

    python -m finetune train --config recipes/lamini_docs_qlora.yaml [--set key=value ...]
    python -m finetune train --run-dir RUN_DIR --resume [--checkpoint STEP]
    python -m finetune export RUN_DIR OUT_DIR [--checkpoint STEP]   # adapter merged into its base, + how to serve it
    python -m finetune eval --run runs/<id> [--limit N] [--checkpoint STEP]  # base vs tuned, kept in the run
    python -m finetune compare RUN RUN...                # the settings that differ, losses, evaluations side by side
    python -m finetune votes [--out pairs.jsonl]         # the Arena's blind votes as preference pairs (for DPO)
    python -m finetune code RUN [--out DIR]              # the run as one standalone Python file and notebook

Each command is an `add_<name>(subparsers)` function that registers its parser and sets `func`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from finetune import FinetuneError


def _same_file(stream, path: Path) -> bool:
    try:
        return path.exists() and os.path.samestat(os.fstat(stream.fileno()), path.stat())
    except (OSError, ValueError, AttributeError):
        return False


def _cmd_train(args: argparse.Namespace) -> int:
    from finetune.hardware import pin_one_gpu

    pin_one_gpu()  # one process, one GPU: several GPUs are `accelerate launch`'s (DDP), never DataParallel
    from finetune.config import load_train_config
    from finetune.runs import RunDir, new_run_id, runs_root
    from finetune.train import train

    if args.run_dir is None and args.config is None and not args.set:
        raise FinetuneError("Give --config recipes/<name>.yaml (or --run-dir of an existing run).")
    run_dir = Path(args.run_dir) if args.run_dir else None
    if args.config is None and run_dir is not None and RunDir(run_dir).config_file.is_file():
        cfg = RunDir(run_dir).read_config(args.set)
    else:
        cfg = load_train_config(args.config, args.set)
    if run_dir is None:
        run_dir = runs_root() / new_run_id(cfg)
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            # Under `accelerate launch` each process would name its own folder: all take process 0's.
            from accelerate.utils import broadcast_object_list

            from finetune.train import join_process_group

            join_process_group()
            run_dir = Path(broadcast_object_list([str(run_dir)])[0])
    run_dir.mkdir(parents=True, exist_ok=True)
    # The runner sends our output to the run's log; run by hand, we also write it there for the UI's log tail.
    log_file = RunDir(run_dir).log_file
    if int(os.environ.get("RANK", 0)) == 0 and not _same_file(sys.stderr, log_file):
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logging.getLogger("finetune").addHandler(handler)
    print(f"run folder: {run_dir}", flush=True)
    from finetune.evaluate import evaluate_run

    adapter = train(cfg, run_dir, resume=args.resume, checkpoint=args.checkpoint, evaluate=evaluate_run)
    print(f"adapter: {adapter}", flush=True)
    return 0


def add_train(sub) -> None:
    p = sub.add_parser("train", help="Train a LoRA/QLoRA adapter (one run).")
    p.add_argument("--config", help="YAML recipe, e.g. recipes/lamini_docs_qlora.yaml.")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="Override, e.g. model.quantization=4bit"
    )
    p.add_argument("--run-dir", help="Run folder (default: a new one under $FINETUNE_HOME/runs).")
    p.add_argument("--resume", action="store_true", help="Continue from the run folder's latest checkpoint.")
    p.add_argument(
        "--checkpoint", type=int, metavar="STEP", help="Continue from the checkpoint of this step (implies --resume)."
    )
    p.set_defaults(func=_cmd_train)


def _cmd_export(args: argparse.Namespace) -> int:
    from finetune.export import export_merged
    from finetune.serving import serve_commands

    if args.gguf or args.gguf_lora:
        return _export_gguf(args)
    out = export_merged(args.run, args.out, base=args.base, step=args.checkpoint)
    print(f"merged model: {out}")
    if not (out / "chat_template.jinja").is_file():
        print("note: no chat template written (a custom template): servers will prompt it with the base's format")
    print(f"serve it and ask it (OpenAI-compatible, prompted with the training template):\n{serve_commands(out)}")
    return 0


def _export_gguf(args: argparse.Namespace) -> int:
    from finetune.gguf_export import export_gguf, export_gguf_lora

    if args.gguf:
        result = export_gguf(args.run, args.out, args.gguf, step=args.checkpoint)
        print(f"GGUF ({args.gguf}): {result.gguf}")
        print(f"Ollama Modelfile: {result.modelfile}" if result.modelfile else "no Modelfile: no Ollama form here")
        print(f"run it:\n{result.commands()}")
    if args.gguf_lora:
        lora = export_gguf_lora(args.run, args.out, step=args.checkpoint)
        print(f"GGUF LoRA: {lora.gguf}\nrun it:\n{lora.commands()}")
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="Merge a run's adapter into its base model and save it (safetensors or GGUF).")
    p.add_argument("run", help="Run folder or adapter folder.")
    p.add_argument("out", help="Output folder for the merged model.")
    p.add_argument("--base", help="Base model (default: the one in the run's config).")
    p.add_argument("--checkpoint", type=int, metavar="STEP", help="The adapter of this checkpoint, not the final one.")
    p.add_argument("--gguf", metavar="TYPE", help="Write the merged model as one GGUF file instead (llama.cpp, "
                   "Ollama), with an Ollama Modelfile: f16, q8_0 or q4_0.")  # fmt: skip
    p.add_argument("--gguf-lora", action="store_true", help="Write the adapter alone as a GGUF LoRA (for --lora).")
    p.set_defaults(func=_cmd_export)


def _cmd_eval(args: argparse.Namespace) -> int:
    from finetune.config import GenerationParams
    from finetune.evaluate import evaluate_run, format_summary
    from finetune.runs import RunDir

    def progress(done: int, total: int, text: str) -> None:
        print(f"[{done}/{total}] {text}", file=sys.stderr, flush=True)

    result = evaluate_run(
        Path(args.run),  # a folder or an id, as typed (a str would be an id only: what a browser may send)
        limit=args.limit,
        progress=progress,
        params=GenerationParams(max_new_tokens=args.max_new_tokens),
        batch_size=args.batch_size,
        embedding_model=args.embedding_model or ("auto" if not args.no_similarity else None),
        benchmarks=args.arc_easy,
        checkpoint=args.checkpoint,
    )
    print(format_summary(result))
    print(f"written: {RunDir(Path(result['run_dir'])).eval_file_of(args.checkpoint)}")
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="Base vs tuned on the run's held-out questions: loss, perplexity, scores.")
    p.add_argument("--run", required=True, help="Run folder (runs/<id>) or run id.")
    p.add_argument("--limit", type=int, help="Only the first N test questions (default: all).")
    p.add_argument("--max-new-tokens", type=int, default=128, help="Upper bound on each generated answer.")
    p.add_argument("--batch-size", type=int, default=8, help="Questions per batched generate (x2: base + tuned).")
    p.add_argument("--embedding-model", help="Sentence-embedding model (folder or Hub id) for the similarity score.")
    p.add_argument("--no-similarity", action="store_true", help="Skip the embedding similarity score.")
    p.add_argument("--arc-easy", action="store_true", help="Also run ARC-Easy (needs lm-eval and the data set).")
    p.add_argument("--checkpoint", type=int, metavar="STEP", help="Evaluate this checkpoint's adapter.")
    p.set_defaults(func=_cmd_eval)


def _cmd_compare(args: argparse.Namespace) -> int:
    from finetune.compare import compare_runs, format_comparison
    from finetune.runs import open_run

    # Folders or ids, as typed (a str would be an id only: what a browser may send).
    print(format_comparison(compare_runs([open_run(Path(run)) for run in args.runs])))
    return 0


def add_compare(sub) -> None:
    p = sub.add_parser("compare", help="Two or more runs side by side: the settings that differ, losses, evaluations.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="Run folder (runs/<id>) or run id.")
    p.set_defaults(func=_cmd_compare)


def _cmd_votes(args: argparse.Namespace) -> int:
    from finetune.preferences import adapter_votes, preference_pairs, write_pairs
    from finetune.votes import VoteStore

    votes = VoteStore().votes()
    pairs = preference_pairs(adapter_votes(votes, args.adapter) if args.adapter else votes)
    print(pairs.summary)
    if args.out:
        print(f"written: {write_pairs(pairs, Path(args.out))}")
    return 0


def add_votes(sub) -> None:
    p = sub.add_parser("votes", help="The Arena's blind votes as preference pairs (prompt/chosen/rejected JSONL).")
    p.add_argument("--out", help="Write the pairs to this .jsonl file (TRL's preference format).")
    p.add_argument("--adapter", help="Only the votes on this adapter (a run id) in the tuned column.")
    p.set_defaults(func=_cmd_votes)


def _cmd_code(args: argparse.Namespace) -> int:
    from finetune.runcode import write_run_code

    for path in write_run_code(Path(args.run), args.out):  # a folder or an id, as typed (see _cmd_compare)
        print(f"written: {path}")
    return 0


def add_code(sub) -> None:
    p = sub.add_parser("code", help="A run as code: one Python file (and notebook) that trains it with transformers.")
    p.add_argument("run", help="Run folder (runs/<id>) or run id.")
    p.add_argument("--out", help="Folder to write train_<id>.py and train_<id>.ipynb to (default: the run's code/).")
    p.set_defaults(func=_cmd_code)


COMMANDS = [add_train, add_export, add_eval, add_compare, add_votes, add_code]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune", description="Fine-tuning workbench for small LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except FinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
