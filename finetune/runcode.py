"""A run as code: one standalone Python file, and the same as a notebook, that trains what a run of the app trained.

    python -m finetune code runs/<id> [--out DIR]   # writes train_<id>.py and train_<id>.ipynb (default: in code/)
    python runs/<id>/code/train_<id>.py            # trains, and saves a LoRA adapter the Arena loads

    from finetune.runcode import run_as_code
    print(run_as_code("runs/<id>"))

The file imports torch, transformers, peft and datasets only, never `finetune`: the base model (an embedded model as
the folder the app converted it to), the data file, the column mapping, the prompt template's text, the split, the
LoRA settings, the dtype and quantization, the schedule and the answer-only labels are written into it as values,
read from the run's config.yaml, and its `auto` settings from what the run decided (its status.json), not from this
machine. It is in jupytext's "percent" format (`# %%` cells), so the notebook is the same cells. Each part names the
course lesson it belongs to. SFT runs with a text template (qa, alpaca, text, your own) are covered; a DPO run and a
chat template say so.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from string import Template as Code

from finetune import FinetuneError
from finetune.config import TrainConfig, decided_settings
from finetune.data import BUNDLED, detect_mapping, is_hub_id, load_dataset_source
from finetune.hardware import DTYPES, compute_dtype, dtype_name
from finetune.models import EMBEDDED, resolve_source
from finetune.runs import RunDir, open_run
from finetune.templates import Template, get_template

CODE_DIR = "code"  # in the run folder: where `write_run_code` writes by default
TEXT_FIELDS = ("instruction", "input", "output")  # the fields a prompt/answer row gets, "" where no column maps
LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}  # datasets' builder per file


def decided_config(run: RunDir) -> TrainConfig:
    """The run's config with each `auto` setting as the run decided it; FinetuneError while one is still undecided."""
    cfg = run.read_decided_config()
    missing = [key for key, value in {**decided_settings(cfg), "max_steps": cfg.max_steps}.items() if value == "auto"]
    if missing:
        raise FinetuneError(
            f"This run has not decided its {', '.join(missing)} yet (auto: set when it starts training on its "
            "machine): show its code once it has started."
        )
    return cfg


def _check_covered(cfg: TrainConfig, template: Template, mapping: dict[str, str]) -> None:
    if cfg.method != "sft":
        raise FinetuneError("The code of a run covers SFT runs; this one is DPO: show the code of the SFT run it "
                            "started from.")  # fmt: skip
    if template.chat or template.chat_template or set(mapping) - {*TEXT_FIELDS, "text"}:
        raise FinetuneError(
            "The code of a run covers prompt/answer and plain-text rows with a text template (qa, alpaca, text or "
            "your own); this run trains conversations with a chat template."
        )


class Expr(str):
    """Python code written as it is (a name, an expression), not as a string literal."""


def _py(value) -> str:
    """A Python literal of `value`, strings double-quoted (json's escapes are Python's too)."""
    if isinstance(value, Expr):
        return value
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_py, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_py(k)}: {_py(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _text(text: str) -> str:
    """A string literal of `text` split after its line breaks and sentences, one line each: a prompt as it reads."""
    lines = [line for line in re.findall(r"[^\n]*?(?:\n+|\. (?=\S)|$)", text) if line]
    if len(lines) < 2:
        return _py(text)
    return "(\n" + "".join(f"    {_py(line)}\n" for line in lines) + ")"


def _arguments(pairs: list[tuple[str, object, str]], indent: str = "    ") -> str:
    """Keyword arguments one per line, `name=value,  # why`."""
    return "\n".join(f"{indent}{name}={_py(value)},{f'  # {why}' if why else ''}" for name, value, why in pairs)


# --- the parts, one cell (or two: a markdown cell naming its lesson, then the code) each --------------------------

INTRO = Code('''\
# %% [markdown]
# # Run `$run_id` as code
#
# What the Fine-tuning Workbench did in this run, as one program to read, change and run again: the same base model,
# data, prompt template, split, LoRA settings and training schedule, with the values the run used. It needs torch,
# transformers, peft and datasets only:
#
#     python train_$run_id.py    # trains, then saves the LoRA adapter to ./run-$run_id/adapter
#
# The app's trainer computes the same loss faster: it projects to the vocabulary only at answer tokens.$vocab_note

# %%
import torch
from datasets import load_dataset
from peft import LoraConfig, get_peft_model$peft_more
from transformers import AutoModelForCausalLM, AutoTokenizer, ${bnb}Trainer, TrainingArguments, set_seed

OUT_DIR = "run-$run_id"  # the adapter goes to OUT_DIR/adapter
''')

MODEL = Code('''\
# %% [markdown]
# ## Where fine-tuning fits: a pretrained base model
# Pretraining taught this model to continue text, not to answer. Fine-tuning goes on training it on examples of the
# behaviour we want; LoRA keeps its weights frozen and trains small matrices beside them.

# %%
$base_note
BASE_MODEL = $base
DTYPE = $dtype  # the run's weights$decided_note
set_seed($seed)  # the run's seed: LoRA's first weights and the order of the rows

tokenizer = AutoTokenizer.from_pretrained(BASE_MODEL$source_args)
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
$load''')

LOAD = Code('''\
model = AutoModelForCausalLM.from_pretrained(BASE_MODEL, dtype=DTYPE$source_args)
''')

LOAD_QUANTIZED = Code('''\
quantization = $quantization
device = 0 if torch.cuda.is_available() else "cpu"  # quantized weights load straight onto their device
model = AutoModelForCausalLM.from_pretrained(
    BASE_MODEL, dtype=DTYPE, quantization_config=quantization, device_map={"": device}$source_args
)
# Norms and embeddings to float32, inputs that require gradients: what training a quantized model needs.
model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=$checkpointing)
for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):
    embedding.to(DTYPE)  # frozen and vocabulary-sized: float32 would double their memory
''')

DATA = Code('''\
# %% [markdown]
# ## Data preparation: rows, columns, a held-out split
# Fine-tuning data is pairs of what the model is given and the answer we want. The file's columns map to the
# template's fields, and a part of the rows is held out: never trained on, it measures the model on new questions.

# %%
rows = load_dataset($loader, split="train")
$max_rows$fields_comment
COLUMNS = $columns


def to_fields(row):
    return {field: "" if column is None or row[column] is None else str(row[column])
            for field, column in COLUMNS.items()}


rows = rows.map(to_fields)
$clean$split
''')

CLEAN = Code('''\
seen, keep = set(), []  # drop rows without an answer, and repeats of an earlier row
for i, row in enumerate(rows):
    key = tuple(row[field] for field in COLUMNS)
    if row[$answer].strip() and key not in seen:
        keep.append(i)
    seen.add(key)
rows = rows.select(keep)
''')

TEMPLATE = Code('''\
# %% [markdown]
# ## Instruction tuning: the prompt template and the answer-only loss
# Each row becomes one text: the prompt (the template, filled in with the row) and then the answer. The model learns
# to write the answer only: the prompt's labels are -100, which the loss skips, and the answer ends with the
# end-of-sequence token, so the model learns to stop.

# %%
$prompts
ANSWER_FIELD = $answer_field
MAX_LENGTH = $max_length  # tokens per row: a long answer is cut, never the prompt


def encode(row):
    values = {key: "" if value is None else value for key, value in row.items()}
    prompt = $prompt_choice.format_map(values)
    prompt_ids = tokenizer(prompt)["input_ids"]  # with the tokenizer's start token, where it adds one
    answer_ids = tokenizer(str(values[ANSWER_FIELD]), add_special_tokens=False)["input_ids"]
    if not answer_ids or answer_ids[-1] != tokenizer.eos_token_id:
        answer_ids.append(tokenizer.eos_token_id)
    input_ids = (prompt_ids + answer_ids)[:MAX_LENGTH]
    labels = ([-100] * len(prompt_ids) + answer_ids)[:MAX_LENGTH]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels,
            "length": len(input_ids)}


def has_answer(row):  # a prompt that fills MAX_LENGTH leaves nothing to learn
    return any(label != -100 for label in row["labels"][1:])


def collate(batch):  # pad each batch to its longest row, on the right; padding is not trained on either
    width = max(len(row["input_ids"]) for row in batch)
    pad = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "labels": -100}
    return {key: torch.tensor([row[key] + [value] * (width - len(row[key])) for row in batch])
            for key, value in pad.items()}


train_data = splits["train"].map(encode, remove_columns=rows.column_names).filter(has_answer)
$held_out''')

TRAINING = Code('''\
# %% [markdown]
# ## Training: LoRA and the optimizer's schedule
# Ordinary next-token training on the rows above, through the LoRA matrices only (well under 1% of the weights):
# the learning rate warms up, then follows its $scheduler schedule, for $length.

# %%
${targets_code}lora = LoraConfig(
$lora
)
model = get_peft_model(model, lora)
model.print_trainable_parameters()

args = TrainingArguments(
$arguments
)
trainer = Trainer(model=model, args=args, data_collator=collate, train_dataset=train_data$eval_dataset)
trainer.train()
''')

NO_EVALUATION = '''\
# %% [markdown]
# ## Evaluation
# This run measured no held-out loss while it trained (no held-out rows, or eval_rows 0). The app's Evaluate tab, or
# `python -m finetune eval`, has the adapter answer the held-out questions and scores the answers.
'''

EVALUATION = '''\
# %% [markdown]
# ## Evaluation: the loss on held-out rows
# A model can repeat its training rows and still fail on new questions: the held-out loss, measured before training
# and after, tells how much likelier the model now finds answers it never saw. (The app's Evaluate tab also has it
# write answers and scores them.)

# %%
held_out_losses = [log["eval_loss"] for log in trainer.state.log_history if "eval_loss" in log]
held_out_losses.append(trainer.evaluate()["eval_loss"])
print(f"held-out loss: {held_out_losses[0]:.4f} before training, {held_out_losses[-1]:.4f} after")
'''

SAVE = '''\
# %% [markdown]
# ## Keep the adapter
# Only the LoRA matrices and their config are saved (a few MB): `PeftModel.from_pretrained(base, folder)` puts them
# back on the base model, and the app's Arena and Evaluate tabs load the folder as an adapter.

# %%
model.save_pretrained(f"{OUT_DIR}/adapter")
print(f"adapter saved to {OUT_DIR}/adapter")
'''


def _model_part(cfg: TrainConfig, decided: dict | None) -> tuple[str, bool]:
    """The base model cell, and whether it is quantized."""
    spec = cfg.model
    source_args = f", revision={_py(spec.revision)}" if spec.revision else ""
    source_args += ", trust_remote_code=True" if spec.trust_remote_code else ""
    if spec.source in EMBEDDED:
        base_note = f"# {spec.source}: the app's copy of {EMBEDDED[spec.source].description}, as safetensors"
    else:
        base_note = "# The run's base model"
    quantized = spec.quantization in ("4bit", "8bit")
    if spec.quantization == "4bit":
        compute = dtype_name(compute_dtype(DTYPES[spec.dtype], cfg.mixed_precision))  # as the run computed
        nf4 = [("load_in_4bit", True, ""), ("bnb_4bit_quant_type", "nf4", "4-bit NormalFloat"),
               ("bnb_4bit_use_double_quant", True, "its scales quantized too"),
               ("bnb_4bit_compute_dtype", Expr(f"torch.{compute}"), "")]  # fmt: skip
        quantization = f"BitsAndBytesConfig(  # QLoRA: the frozen base in 4 bits\n{_arguments(nf4)}\n)"
    else:
        quantization = "BitsAndBytesConfig(load_in_8bit=True)  # the frozen base in 8 bits"
    load = (LOAD_QUANTIZED if quantized else LOAD).substitute(
        source_args=source_args, quantization=quantization, checkpointing=cfg.gradient_checkpointing
    )
    cell = MODEL.substitute(
        base=_py(resolve_source(spec)),
        base_note=base_note,
        dtype=f"torch.{spec.dtype}",
        decided_note=f" (it decided {', '.join(f'{k} {v}' for k, v in decided.items())})" if decided else "",
        seed=cfg.seed,
        source_args=source_args,
        load=load,
    )
    return cell, quantized


def _loader(source: str) -> str:
    """The arguments of `load_dataset` that read the run's data: a file by its path, or a Hub id."""
    path = BUNDLED.get(source) or Path(source).expanduser()
    if path.is_file():
        kind = LOADERS.get(path.suffix.lower())
        if kind is None:
            raise FinetuneError(f"{path.name}: the code of a run reads {', '.join(LOADERS)} files.")
        more = ""
        if kind == "csv":  # as the app reads it (`readers`): the header line's delimiter, empty fields as ""
            header = path.read_text(encoding="utf-8-sig").lstrip().split("\n", 1)[0]
            more = f", sep={_py(max(',;' + chr(9), key=header.count))}, keep_default_na=False"
        return f"{_py(kind)}, data_files={_py(str(path.resolve()))}{more}"
    if is_hub_id(source):
        name, _, config = source.partition(":")
        return _py(name) + (f", {_py(config)}" if config else "")
    raise FinetuneError(f"The run's data set {source!r} is gone: the code of a run needs its file.")


def _data_part(cfg: TrainConfig, mapping: dict[str, str]) -> str:
    data = cfg.data
    # As `data.canonicalize`: a prompt/answer row gets all three text fields, "" where no column maps.
    columns = {field: mapping.get(field) for field in TEXT_FIELDS} if set(TEXT_FIELDS) & set(mapping) else {}
    columns.update({"text": mapping["text"]} if "text" in mapping else {})
    if data.test_size > 0:
        split = (f"splits = rows.train_test_split(test_size={data.test_size!r}, seed={data.seed})  # the seed fixes "
                 "the held-out rows")  # fmt: skip
    else:
        split = 'splits = {"train": rows}  # no held-out rows: all of them train'
    unmapped = " (None: no column, the field is empty)" if None in columns.values() else ""
    return DATA.substitute(
        loader=_loader(data.source),
        max_rows=f"rows = rows.select(range(min({data.max_rows}, len(rows))))  # the run took the first rows only\n"
        if data.max_rows else "",
        fields_comment=f"# The template's fields -> the file's columns{unmapped}",
        columns=_py(columns),
        clean=CLEAN.substitute(answer=_py("output" if "output" in columns else "text")) if data.clean else "",
        split=split,
    )


def _template_part(cfg: TrainConfig, template: Template, has_eval: bool) -> str:
    prompts, choice = f"PROMPT = {_text(template.prompt)}", "PROMPT"
    if template.prompt_no_input:
        prompts += f"\nPROMPT_NO_INPUT = {_text(template.prompt_no_input)}  # for rows whose input is empty"
        choice = '(PROMPT if str(values.get("input") or "").strip() else PROMPT_NO_INPUT)'
    held_out = ""
    if has_eval:
        held_out = 'held_out = splits["test"].map(encode, remove_columns=rows.column_names).filter(has_answer)\n'
        if cfg.eval_rows is not None:
            held_out += f"held_out = held_out.select(range(min({cfg.eval_rows}, len(held_out))))  # as the run did\n"
    return TEMPLATE.substitute(
        prompts=prompts,
        answer_field=_py(template.answer_field),
        max_length=cfg.max_length,
        prompt_choice=choice,
        held_out=held_out,
    )


def _lora_part(cfg: TrainConfig) -> tuple[str, str]:
    """(code that finds the adapted layers, the LoraConfig's arguments), as `train.lora_config`."""
    targets, found = cfg.target_modules, ""
    layers = []
    if cfg.lora_layers > 0:
        found = (f"# Only the last {cfg.lora_layers} layers: the backward pass stops at the first of them, so a step "
                 "costs less.\nlayers = model.config.get_text_config().num_hidden_layers\n")  # fmt: skip
        layers = [("layers_to_transform", Expr(f"list(range(layers - {cfg.lora_layers}, layers))"), "")]
        if targets == "all-linear":  # PEFT wants the modules' names with `layers_to_transform`
            found += ("head = model.get_output_embeddings()\ntargets = sorted({name.rsplit(\".\", 1)[-1] for name, "
                      "module in model.named_modules()\n                  if isinstance(module, torch.nn.Linear) "
                      "and module is not head})\n")  # fmt: skip
            targets = Expr("targets")
    arguments = [
        ("r", cfg.lora_r, "rank of the two small matrices"),
        ("lora_alpha", cfg.lora_alpha, "their update is scaled by lora_alpha / r"),
        ("lora_dropout", cfg.lora_dropout, ""),
        ("target_modules", targets, "every linear layer but the output head" if cfg.target_modules == "all-linear"
         else ""),
        *layers,
        ("task_type", "CAUSAL_LM", ""),
    ]  # fmt: skip
    return found, _arguments(arguments)


def _training_part(cfg: TrainConfig, has_eval: bool) -> str:
    if cfg.max_steps > 0:
        steps = [("max_steps", cfg.max_steps, "optimizer steps")]
    else:
        steps = [("num_train_epochs", cfg.num_epochs, "passes over the training rows")]
    evaluation = [("eval_on_start", True, "the held-out loss before training too")] if has_eval else []
    if has_eval and cfg.eval_steps > 0:
        evaluation += [("eval_strategy", "steps", ""), ("eval_steps", cfg.eval_steps, "")]
    checkpointing = [("activation_checkpointing", True, "recompute activations in backward: less memory")]
    arguments = [
        ("output_dir", Expr("OUT_DIR"), ""),
        *steps,
        ("per_device_train_batch_size", cfg.batch_size, ""),
        ("per_device_eval_batch_size", cfg.batch_size, ""),
        ("gradient_accumulation_steps", cfg.grad_accum, "forward passes per optimizer step"),
        ("learning_rate", cfg.learning_rate, "the peak, after the warm-up"),
        ("lr_scheduler_type", cfg.lr_scheduler, ""),
        ("warmup_steps", cfg.warmup_steps, "below 1: a fraction of the steps"),
        ("weight_decay", cfg.weight_decay, ""),
        ("bf16", cfg.mixed_precision == "bf16", f"mixed precision as the run decided: {cfg.mixed_precision}"),
        ("fp16", cfg.mixed_precision == "fp16", ""),
        *checkpointing * cfg.gradient_checkpointing,
        ("train_sampling_strategy", "group_by_length", "batches of rows of similar length: less padding"),
        *evaluation,
        ("logging_steps", cfg.logging_steps, ""),
        ("logging_first_step", True, ""),
        ("save_strategy", "no", "the adapter is saved at the end"),
        ("seed", cfg.seed, ""),
        ("label_names", ["labels"], ""),
        ("remove_unused_columns", False, "keep `length` for the length grouping"),
        ("report_to", "none", ""),
    ]
    found, lora = _lora_part(cfg)
    return TRAINING.substitute(
        targets_code=found,
        scheduler=cfg.lr_scheduler,
        length=f"{cfg.max_steps} optimizer steps" if cfg.max_steps > 0 else f"{cfg.num_epochs:g} passes over the rows",
        lora=lora,
        arguments=_arguments(arguments),
        eval_dataset=", eval_dataset=held_out" if has_eval else "",
    )


def run_as_code(run_path: str | Path) -> str:
    """The run at `run_path` (a run folder, or an id under the runs folder) as one standalone Python file that trains
    it again and saves its LoRA adapter; FinetuneError when the run cannot be written as code yet (it has not
    started) or at all (DPO, chat templates)."""
    run = open_run(Path(run_path))
    status = run.read_status()
    cfg = decided_config(run)
    template = get_template(cfg.data.template)
    mapping = cfg.data.mapping or detect_mapping(load_dataset_source(cfg.data.source).column_names)
    _check_covered(cfg, template, mapping)
    has_eval = cfg.data.test_size > 0 and cfg.eval_rows != 0
    model_cell, quantized = _model_part(cfg, status.get("decided"))
    vocab_note = (
        "\n# This run also trained its softmax over the data's tokens only (train_vocab: data, a CPU speed-up); this"
        "\n# program trains the full one, whose loss the app reports as the held-out loss."
    ) if "training softmax over" in status.get("summary", "") else ""  # fmt: skip
    intro = INTRO.substitute(
        run_id=run.run_id,
        vocab_note=vocab_note,
        peft_more=", prepare_model_for_kbit_training" if quantized else "",
        bnb="BitsAndBytesConfig, " if quantized else "",
    )
    parts = [
        intro,
        model_cell,
        _data_part(cfg, mapping),
        _template_part(cfg, template, has_eval),
        _training_part(cfg, has_eval),
        EVALUATION if has_eval else NO_EVALUATION,
        SAVE,
    ]
    return "\n\n".join(part.rstrip("\n") for part in parts) + "\n"


def write_run_code(run_path: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write the run's code as `train_<run id>.py` and the same cells as `train_<run id>.ipynb` into `out_dir`
    (default: `code/` in the run folder); returns both paths."""
    import jupytext

    run = open_run(Path(run_path))
    text = run_as_code(run.path)
    out = Path(out_dir) if out_dir is not None else run.path / CODE_DIR
    out.mkdir(parents=True, exist_ok=True)
    script, notebook = out / f"train_{run.run_id}.py", out / f"train_{run.run_id}.ipynb"
    script.write_text(text, encoding="utf-8")
    nb = jupytext.reads(text, fmt="py:percent")
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    jupytext.write(nb, notebook, fmt="ipynb")
    return script, notebook
