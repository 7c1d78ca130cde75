"""A run as GGUF files, checked by readers nobody here wrote: transformers loads the merged GGUF, llama.cpp runs the
GGUF LoRA over a base GGUF, Go's text/template (Ollama's) renders the Modelfile's TEMPLATE, and the layout rules turn
each embedded model into the very file llama.cpp's converter wrote."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from conftest import make_run  # tests/ is on sys.path

from finetune import FinetuneError
from finetune.config import DataConfig, ModelSpec
from finetune.data import load_splits
from finetune.export import adapter_and_config, merged_model
from finetune.gguf_export import (
    _gguf_names,
    _to_gguf_layout,
    base_gguf,
    export_gguf,
    export_gguf_lora,
    modelfile,
    read_header,
    write_gguf,
)
from finetune.models import EMBEDDED, cached_embedded, load_model, load_tokenizer
from finetune.templates import TEMPLATES, conversation_prompt

gguf = pytest.importorskip("gguf")
SMOL = "smollm2-135m-instruct"


def questions(n: int = 5) -> list[str]:
    return load_splits(DataConfig("lamini_docs"))["test"]["instruction"][:n]


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory):
    """A run on the embedded SmolLM2 (LLaMA layout) with a random LoRA on q and v."""
    return make_run(tmp_path_factory.mktemp("gguf"), str(cached_embedded(SMOL)))


@pytest.fixture(scope="module")
def merged(smol_run):
    model, tokenizer = merged_model(*adapter_and_config(smol_run))
    return model.float().eval(), tokenizer


def test_the_header_reads_as_the_gguf_package_reads_it():
    path = EMBEDDED[SMOL].locate_gguf()
    header, reader = read_header(path), gguf.GGUFReader(path)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(header.fields) == list(fields)
    for key, field in fields.items():
        value, vtype, sub_type = header.fields[key]
        assert value == field.contents() and [vtype, sub_type][: len(field.types)] == field.types, key
    assert list(header.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors[:4]:
        assert np.array_equal(header.tensor(t.name).ravel(), gguf.quants.dequantize(t.data, t.tensor_type).ravel())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EMBEDDED))
def test_the_layout_rules_turn_each_embedded_model_into_its_own_gguf(name):
    """Gemma's norms (+1) and LLaMA's rotary rows (permuted), checked against the file llama.cpp's converter wrote."""
    header = read_header(EMBEDDED[name].locate_gguf())
    model, _ = load_model(ModelSpec(name, dtype="float32"), device="cpu")
    state = model.state_dict()
    names = _gguf_names(header.arch, list(state), model.config.num_hidden_layers)
    checked = [t for t in header.tensors if t.startswith("blk.0.") or t == "output_norm.weight"]
    for t in checked:
        ours, theirs = _to_gguf_layout(header.arch, t, state[names[t]].numpy(), model.config), header.tensor(t)
        # The app's copy is the GGUF dequantized to bfloat16: equal to its 8 bits of mantissa.
        assert np.allclose(ours, theirs, rtol=2**-7, atol=2**-7 * np.abs(theirs).max()), t
    assert {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_norm.weight"} <= set(checked)


@pytest.mark.slow
def test_f16_and_q8_0_load_in_transformers_with_the_merged_models_logits(merged, smol_run, tmp_path):
    model, tokenizer = merged
    adapter, cfg = adapter_and_config(smol_run)
    prompts = [conversation_prompt(TEMPLATES["qa"], [{"role": "user", "content": q}]) for q in questions(3)]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        want = model(**batch).logits[:, -1]
    from transformers import AutoModelForCausalLM

    worst = {}
    for kind in ("f16", "q8_0"):
        path = write_gguf(model, EMBEDDED[SMOL].locate_gguf(), tmp_path / f"m-{kind}.gguf", kind, "{{ x }}", "mine")
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
        with torch.no_grad():
            got = loaded(**batch).logits[:, -1]
        worst[kind] = float((got - want).abs().max() / want.abs().max())
        assert torch.equal(got.argmax(-1), want.argmax(-1)), kind
    # Measured (largest logit difference over the largest logit): f16 0.0017, q8_0 0.08.
    assert worst["f16"] < 0.005 and worst["q8_0"] < 0.15 and worst["f16"] < worst["q8_0"], worst
    reader = gguf.GGUFReader(tmp_path / "m-q8_0.gguf")
    assert reader.fields["tokenizer.chat_template"].contents() == "{{ x }}"
    assert reader.fields["general.name"].contents() == "mine"
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert reader.fields["tokenizer.ggml.tokens"].contents()[:50] == tokenizer.convert_ids_to_tokens(range(50))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


@pytest.mark.slow
def test_the_gguf_lora_over_the_base_gguf_answers_as_the_merged_model_in_llama_cpp(merged, smol_run, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    model, tokenizer = merged
    lora = export_gguf_lora(smol_run, tmp_path).gguf
    reader = gguf.GGUFReader(lora)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.lora.alpha"].contents() == 16
    assert {t.name for t in reader.tensors} >= {"blk.0.attn_q.weight.lora_a", "blk.29.attn_v.weight.lora_b"}
    # A float16 base, so that what is compared is the adapter (the shipped Q4_1 base moves logits by itself).
    base, _ = load_model(ModelSpec(SMOL, dtype="float32"), device="cpu")
    base_f16 = write_gguf(base, EMBEDDED[SMOL].locate_gguf(), tmp_path / "base-f16.gguf", "f16")
    llm = llama_cpp.Llama(str(base_f16), lora_path=str(lora), n_ctx=256, n_threads=2, verbose=False)
    for question in questions(2):
        prompt = conversation_prompt(TEMPLATES["qa"], [{"role": "user", "content": question}])
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=12, do_sample=False)
        want = tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)
        got = llm(prompt, max_tokens=12, temperature=0.0, top_k=1)["choices"][0]["text"]
        assert got == want, question


GO_RENDER = """package main

import ("encoding/json"; "os"; "text/template")

type Message struct { Role string; Content string }

func main() {
    text, _ := os.ReadFile(os.Args[1])
    var messages []Message
    raw, _ := os.ReadFile(os.Args[2])
    json.Unmarshal(raw, &messages)
    t := template.Must(template.New("m").Parse(string(text)))
    if err := t.Execute(os.Stdout, map[string]any{"Messages": messages}); err != nil { panic(err) }
}
"""


def go_render(tmp_path, template: str, messages: list[dict]) -> str:
    (tmp_path / "render.go").write_text(GO_RENDER)
    (tmp_path / "template.txt").write_text(template)
    ollama = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    (tmp_path / "messages.json").write_text(json.dumps(ollama))
    command = ["go", "run", "render.go", "template.txt", "messages.json"]
    out = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(shutil.which("go") is None, reason="Go renders Ollama's templates: apt-get install golang-go")
@pytest.mark.parametrize("template", ["qa", "alpaca", "chat"])
def test_the_modelfile_template_renders_the_apps_prompt(template, tmp_path):
    tokenizer = load_tokenizer(ModelSpec(SMOL))
    text = modelfile(TEMPLATES[template], tokenizer, "./m.gguf")
    assert text.startswith('FROM ./m.gguf\nTEMPLATE """')
    go = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    stops = [json.loads(line.split(" ", 2)[2]) for line in text.splitlines() if line.startswith("PARAMETER stop")]
    assert stops == (["<|im_end|>"] if template == "chat" else ["###"])
    q1, q2 = questions(2)
    for messages in ([{"role": "user", "content": q1}],
                     [{"role": "user", "content": q1}, {"role": "assistant", "content": "An LLM engine."},
                      {"role": "user", "content": q2}]):  # fmt: skip
        # llama.cpp and Ollama add the BOS token themselves, as the app's tokenizer does.
        want = conversation_prompt(TEMPLATES[template], messages, tokenizer).removeprefix(tokenizer.bos_token or "")
        assert go_render(tmp_path, go, messages) == want


def test_a_base_without_its_own_gguf_and_an_unknown_type_get_a_sentence(tiny_llama, tmp_path):
    run = make_run(tmp_path, tiny_llama)
    with pytest.raises(FinetuneError, match="has none here.*convert_hf_to_gguf"):
        export_gguf(run, tmp_path / "out", "f16")
    with pytest.raises(FinetuneError, match="GGUF type 'q3_k' cannot be written here: use f16, q8_0, q4_0"):
        export_gguf(run, tmp_path / "out", "q3_k")


@pytest.mark.slow
def test_export_gguf_writes_the_file_and_a_modelfile_ollama_can_read(smol_run, tmp_path):
    result = export_gguf(smol_run, tmp_path, "q8_0")
    assert result.gguf == tmp_path / "run-1-q8_0.gguf" and result.gguf.stat().st_size > 50 * 2**20
    assert result.modelfile.read_text().startswith("FROM ./run-1-q8_0.gguf\n")
    assert f"ollama create {result.name} -f Modelfile" in result.commands()
    assert read_header(result.gguf).value("tokenizer.chat_template")  # the run's template, for llama.cpp's --jinja


def test_the_cli_writes_the_gguf_lora_and_says_how_to_run_it(smol_run, tmp_path, capsys):
    from finetune.__main__ import main

    assert main(["export", str(smol_run), str(tmp_path), "--gguf-lora"]) == 0
    out = capsys.readouterr().out
    assert f"GGUF LoRA: {tmp_path / 'run-1-lora.gguf'}" in out
    assert f"llama-cli -m {EMBEDDED[SMOL].locate_gguf()} --lora" in out


def test_the_train_tab_exports_the_gguf_lora_and_says_what_is_missing(smol_run, tiny_llama, tmp_path):
    """The handlers as the Train tab calls them, without a server."""
    import gradio as gr

    from finetune.runner import Runner
    from finetune.ui.checkpoints import build_checkpoints_panel

    runner = Runner(root=smol_run.parent)
    try:
        with gr.Blocks() as app:
            build_checkpoints_panel(runner, gr.Dropdown(allow_custom_value=True), gr.Timer(active=False))
        handler = {d.api_name: d.fn for d in app.fns.values()}
        files, howto = handler["train_export_gguf_lora"]("run-1", "q8_0", progress=lambda *a, **k: None)
        (lora,) = files["value"]
        assert lora.endswith("run-1-lora.gguf") and read_header_of(lora) == "adapter"
        assert f"llama-cli -m {base_gguf(SMOL)} --lora {lora}" in howto["value"]
        make_run(smol_run.parent.parent, tiny_llama, run_id="tiny")  # a base with no GGUF of its own
        with pytest.raises(gr.Error, match="has none here"):
            handler["train_export_gguf"]("tiny", "q8_0", progress=lambda *a, **k: None)
        with pytest.raises(gr.Error, match="Pick a run first"):
            handler["train_export_gguf"]("", "q8_0", progress=lambda *a, **k: None)
    finally:
        runner.close()


def read_header_of(path: str) -> str:
    return gguf.GGUFReader(path).fields["general.type"].contents()
