"""A run as code (`finetune.runcode`): the file imports no `finetune`, trains on its own for a few steps and saves an
adapter the Arena loads; its data, template and answer-only labels are the app's, row for row; the notebook is the
same cells; `auto` settings are the ones the run decided."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from finetune import FinetuneError
from finetune.config import ModelSpec
from finetune.runcode import run_as_code, write_run_code
from finetune.runs import RunDir
from finetune.templates import TEMPLATES
from tests.test_train import qa_file, tiny_config  # noqa: F401 (a fixture)

ALLOWED = {"torch", "transformers", "peft", "trl", "datasets"} | set(sys.stdlib_module_names)


def make_run(path: Path, cfg) -> RunDir:
    """A run folder as the runner leaves it before training: its config (the code needs nothing else)."""
    run = RunDir(path)
    run.path.mkdir(parents=True)
    run.write_config(cfg)
    return run


@pytest.fixture(scope="module")
def written(tiny_llama, qa_file, tmp_path_factory) -> tuple[RunDir, Path, Path]:  # noqa: F811
    """A 2-step run adapting the last layer only (`lora_layers`: the script finds the modules itself), as code."""
    cfg = tiny_config(tiny_llama, qa_file, max_steps=2, lora_layers=1, lora_r=4)
    run = make_run(tmp_path_factory.mktemp("runs") / "tiny-run", cfg)
    return (run, *write_run_code(run.path))


@pytest.fixture(scope="module")
def tiny_bos(tiny_llama, tmp_path_factory) -> str:
    """The tiny model with a tokenizer that starts each text with BOS, as Gemma's does (SmolLM2's does not)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-bos")
    shutil.copytree(tiny_llama, folder, dirs_exist_ok=True)
    AutoTokenizer.from_pretrained(tiny_llama, add_bos_token=True).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module", autouse=True)
def training(written, tmp_path_factory) -> Iterator[tuple[subprocess.Popen, Path]]:
    """The written file training in its own process, with `finetune` made unimportable (the file stands alone):
    started with this module's first test, so its imports and steps (~10 s) overlap the other tests, and awaited by
    the last one. Yields the process and its folder (the script's output and log)."""
    folder = tmp_path_factory.mktemp("trained-by-the-code")
    block = "import runpy, sys; sys.modules['finetune'] = None; runpy.run_path(sys.argv[1], run_name='__main__')"
    env = {**os.environ, "HF_DATASETS_CACHE": str(folder / "datasets-cache"), "OMP_NUM_THREADS": "2"}
    with open(folder / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", block, str(written[1])], cwd=folder, env=env, stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip
    yield proc, folder
    proc.kill()
    proc.wait()


def cells(script: Path) -> list[tuple[str, str]]:
    """(kind, source) of each `# %%` cell of a percent-format file, as Jupyter shows it."""
    found = []
    for chunk in script.read_text().split("# %%")[1:]:
        header, _, body = chunk.partition("\n")
        if header.strip() == "[markdown]":
            lines = [line[2:] if line.startswith("# ") else line.removeprefix("#") for line in body.splitlines()]
            found.append(("markdown", "\n".join(lines).strip()))
        else:
            found.append(("code", body.strip()))
    return found


def test_the_code_imports_only_the_libraries_and_compiles(written, tiny_llama, qa_file):  # noqa: F811
    run, script, _ = written
    assert script == run.path / "code" / "train_tiny-run.py"
    text = script.read_text()
    tree = ast.parse(text)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {m.split(".")[0] for m in imported} <= ALLOWED
    compile(text, str(script), "exec")
    # The run's values, written in: the base model and data by path, the prompt's text, LoRA, the schedule.
    prompt = next(n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "PROMPT")
    assert ast.literal_eval(prompt) == TEMPLATES["qa"].prompt  # the template's text itself
    for literal in (f'BASE_MODEL = "{tiny_llama}"', f'data_files="{qa_file}"', "test_size=0.25, seed=123",
                    "r=4,", "layers - 1, layers", "max_steps=2,", "learning_rate=0.01,", 'lr_scheduler_type="cosine"',
                    "[-100] * len(prompt_ids)"):  # fmt: skip
        assert literal in text, literal


@pytest.mark.parametrize(
    ("model", "template"),
    [("tiny_llama", "qa"), ("tiny_llama", "alpaca"), ("tiny_llama", "Q: {question}\nA: "), ("tiny_bos", "qa")],
)
def test_the_codes_rows_and_labels_are_the_apps(model, template, qa_file, tmp_path, monkeypatch, request):  # noqa: F811
    """The data, split, template, cut at max_length and answer-only mask of the file, run up to its training cell,
    equal the app's (`train.encode_splits`): so the loss it trains on is the run's."""
    import datasets

    from finetune.data import load_rows
    from finetune.models import load_tokenizer
    from finetune.templates import encode_row, get_template
    from finetune.train import encode_splits, held_out

    cfg = tiny_config(request.getfixturevalue(model), qa_file)
    cfg.data.template = template
    tokenizer = load_tokenizer(cfg.model)
    # Item 10's prompt fills max_length: from it on the rows have nothing to learn, the earlier ones one answer token.
    cfg.max_length = encode_row(tokenizer, get_template(template), load_rows(cfg.data)[10])["prompt_length"]
    script, _ = write_run_code(make_run(tmp_path / "run", cfg).path, tmp_path / "code")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    imports, *parts = [source for kind, source in cells(script) if kind == "code"][:4]  # up to training
    names: dict = {}
    exec(imports, names)
    names["AutoModelForCausalLM"] = SimpleNamespace(from_pretrained=lambda *args, **kwargs: None)  # weights: unused
    exec("\n\n".join(parts), names)  # the model cell (its tokenizer), the data and template cells
    app = encode_splits(cfg, tokenizer)
    assert 0 < len(names["train_data"]) < len(names["splits"]["train"])  # the filter dropped prompts that fill it
    for key in ("input_ids", "labels"):
        assert names["train_data"][key] == app.train[key], key
        assert names["held_out"][key] == held_out(app.test, cfg)[0][key], key


def test_the_notebook_has_the_files_cells(written):
    _, script, notebook = written
    assert notebook == script.with_suffix(".ipynb")
    saved = json.loads(notebook.read_text())
    found = [(c["cell_type"], "".join(c["source"]).strip()) for c in saved["cells"]]
    assert found == cells(script) and [kind for kind, _ in found].count("code") == 7
    assert saved["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize(("gpu", "dtype", "autocast"), [(("L4", 22.0, (8, 9)), "bfloat16", "bf16"),
                                                        (("T4", 15.0, (7, 5)), "float32", "fp16")])  # fmt: skip
def test_auto_settings_are_what_the_run_decided(gpu, dtype, autocast, tiny_llama, qa_file, tmp_path):  # noqa: F811
    from finetune.config import decided_settings
    from finetune.hardware import GPU, Machine, resolve_auto

    cfg = tiny_config(tiny_llama, qa_file, max_steps="auto", max_minutes=1, batch_size="auto", mixed_precision="auto")
    cfg.model.dtype = "auto"
    run = make_run(tmp_path / "auto-run", cfg)
    with pytest.raises(FinetuneError, match="not decided its dtype, mixed_precision, batch_size, max_steps yet"):
        run_as_code(run.path)
    # The run trained on a GPU machine, not this one: the code says what that machine decided.
    decided, _ = resolve_auto(cfg, 49152, Machine(gpus=(GPU(0, *gpu),)))
    assert (decided.model.dtype, decided.mixed_precision) == (dtype, autocast)
    run.update_status(decided=decided_settings(decided), planned_steps=7)
    text = run_as_code(run.path)
    literals = (f"DTYPE = torch.{dtype}", f"per_device_train_batch_size={decided.batch_size},", "max_steps=7,",
                f"bf16={autocast == 'bf16'},", f"fp16={autocast == 'fp16'},", f"decided dtype {dtype}, ")
    for literal in literals:
        assert literal in text, literal


def test_a_qlora_run_loads_its_base_as_the_app_does(tiny_llama, qa_file, tmp_path, monkeypatch):  # noqa: F811
    import torch
    from transformers import BitsAndBytesConfig

    from finetune.models import quantization_config

    cfg = tiny_config(tiny_llama, qa_file, mixed_precision="bf16")  # float32 weights: compute in the autocast's dtype
    cfg.model.quantization = "4bit"
    text = run_as_code(make_run(tmp_path / "qlora-run", cfg).path)
    compile(text, "qlora", "exec")
    tree = ast.parse(text)
    statement = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "quantization")
    names = {"torch": torch, "BitsAndBytesConfig": BitsAndBytesConfig}
    exec(compile(ast.Module([statement], []), "qlora", "exec"), names)
    monkeypatch.setattr("finetune.models.bitsandbytes_available", lambda: True)  # the config needs no kernels
    assert names["quantization"].to_dict() == quantization_config("4bit", torch.bfloat16).to_dict()  # NF4, double
    assert "prepare_model_for_kbit_training(model" in text


@pytest.mark.parametrize(("field", "value", "says"), [("method", "dpo", "this one is DPO"),
                                                      ("template", "chat", "chat template")])  # fmt: skip
def test_runs_it_cannot_write_say_why(field, value, says, tiny_llama, qa_file, tmp_path):  # noqa: F811
    cfg = tiny_config(tiny_llama, qa_file)
    setattr(cfg if field == "method" else cfg.data, field, value)
    with pytest.raises(FinetuneError, match=says):
        run_as_code(make_run(tmp_path / "run", cfg).path)


def test_the_cli_writes_both_files(written, tmp_path, capsys):
    from finetune.__main__ import main

    run, script, _ = written
    assert main(["code", str(run.path), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == ["written:", str(tmp_path / script.name), "written:", str(tmp_path / f"{script.stem}.ipynb")]
    assert (tmp_path / script.name).read_text() == script.read_text()
    assert main(["code", str(tmp_path / "no-run")]) == 2


def test_show_the_code_in_the_train_tab(written, monkeypatch):
    import gradio as gr

    from finetune.runner import Runner
    from finetune.ui.checkpoints import build_checkpoints_panel

    run, script, notebook = written
    runner = Runner(root=run.path.parent)
    try:
        with gr.Blocks() as app:
            build_checkpoints_panel(runner, gr.Dropdown(allow_custom_value=True), gr.Timer(active=False))
        show = next(d.fn for d in app.fns.values() if d.api_name == "train_show_code")
        code, files = show(run.run_id)
        assert code["value"] == script.read_text() and code["visible"]
        assert files["value"] == [str(script), str(notebook)]
        with pytest.raises(gr.Error, match="not a run id"):
            show("../tiny-run")
    finally:
        runner.close()


def test_the_code_trains_and_the_arena_answers_with_its_adapter(training, tiny_llama):  # last: it waits for `training`
    from safetensors.torch import load_file

    from finetune.backends import LocalBackend, merge_streams, stream_all
    from finetune.config import GenerationParams
    from finetune.models import ModelPool

    proc, folder = training
    assert proc.wait(timeout=300) == 0, (folder / "log.txt").read_text()[-3000:]
    assert "held-out loss:" in (folder / "log.txt").read_text()
    adapter = folder / "run-tiny-run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["layers_to_transform"]) == (4, [1])  # the run's rank, its last layer only
    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights and all(".layers.1." in name for name in weights)
    assert any(w.abs().sum() > 0 for name, w in weights.items() if "lora_B" in name)  # B starts at 0: it trained
    backend = LocalBackend(ModelPool(), ModelSpec(tiny_llama), "qa", adapter)
    params = GenerationParams(max_new_tokens=8, stop=())
    question = [{"role": "user", "content": "What is item number 3 of the list?"}]
    answer = list(merge_streams(stream_all({"tuned": backend}, {"tuned": question}, params)))[-1]["tuned"]
    assert answer.error is None and answer.done and answer.chunks and answer.text
