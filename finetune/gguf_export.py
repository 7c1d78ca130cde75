"""A run taken home to llama.cpp and Ollama: the merged model as one GGUF file, the adapter alone as a GGUF LoRA,
and an Ollama Modelfile that prompts the model as it was trained.

    python -m finetune export RUN OUT --gguf q8_0   # OUT/<run>-q8_0.gguf, OUT/Modelfile
    python -m finetune export RUN OUT --gguf-lora   # OUT/<run>-lora.gguf: llama.cpp's --lora, beside the base GGUF

The base model's own GGUF file (the embedded models arrive as GGUF files) is the reference: its metadata (architecture,
tokenizer, ...) is copied and its list of tensors is the one written, each from the merged model, turned from the
transformers layout into llama.cpp's. That is the inverse of what transformers does when it loads a GGUF: Gemma's norm
weights are stored plus one, and LLaMA's query and key rows are permuted per head (rotary pairs). The chat template the
run was trained with goes into `tokenizer.chat_template`, so llama.cpp builds the same prompt.
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finetune import FinetuneError
from finetune.export import adapter_and_config, merged_model
from finetune.models import EMBEDDED, embedded_gguf, embedded_name
from finetune.runs import ADAPTER_CONFIG, run_of_adapter
from finetune.serving import serving_chat_template
from finetune.templates import Template, conversation_prompt, get_template

KINDS = ("f16", "q8_0", "q4_0")  # what the `gguf` package writes: 16-bit floats, and its two 32-value block formats
ARCHS = ("llama", "gemma3")  # the base GGUFs here, each with its layout rule below (`_to_gguf_layout`)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise FinetuneError(f"GGUF type {kind!r} cannot be written here: use {', '.join(KINDS)}.")


def _gguf():
    import gguf  # installed with transformers' GGUF support; imported here so the app starts without it

    return gguf


def base_gguf(source: str) -> Path:
    """The base model's own GGUF file: the file an embedded model arrives as (named, or by its cache folder)."""
    found = embedded_gguf(source)
    if found is None:
        name = embedded_name(source) or source
        raise FinetuneError(
            f"GGUF export starts from the base model's own GGUF file, and {name} has none here (the embedded models "
            f"{', '.join(EMBEDDED)} do): export the merged model (`python -m finetune export RUN OUT`) and convert it "
            "with llama.cpp's convert_hf_to_gguf.py."
        )
    return found


@dataclass
class Header:
    """A GGUF file's metadata (key -> (value, type, type of an array's items)) and its tensors, in order (name ->
    (shape, as numpy's; ggml type; where its data starts in the file))."""

    path: Path
    fields: dict[str, tuple]
    tensors: dict[str, tuple[tuple[int, ...], int, int]]

    @property
    def arch(self) -> str:
        return self.fields["general.architecture"][0]

    def value(self, key: str):
        return self.fields[key][0]

    def tensor(self, name: str) -> np.ndarray:
        """A tensor's values as float32 (dequantized by the `gguf` package)."""
        gguf = _gguf()
        shape, qtype, offset = self.tensors[name]
        block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        n_bytes = int(np.prod(shape)) // block * block_bytes
        raw = np.fromfile(self.path, np.uint8, n_bytes, offset=offset)
        return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(qtype)).reshape(shape).astype(np.float32)


def read_header(path: Path) -> Header:
    """The header of a GGUF file (version 2 or 3). The `gguf` package's reader takes a minute on Gemma's (a view per
    item of its 262,144-token vocabulary); this reads numeric arrays in one piece."""
    gguf = _gguf()
    kind = gguf.GGUFValueType
    numeric = {kind.UINT8: "u1", kind.INT8: "i1", kind.UINT16: "u2", kind.INT16: "i2", kind.UINT32: "u4",
               kind.INT32: "i4", kind.FLOAT32: "f4", kind.BOOL: "?", kind.UINT64: "u8", kind.INT64: "i8",
               kind.FLOAT64: "f8"}  # fmt: skip
    with open(path, "rb") as f:
        data = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    pos = 0

    def take(fmt: str):
        nonlocal pos
        out = np.frombuffer(data, np.dtype(fmt).newbyteorder("<"), 1, pos)[0]
        pos += np.dtype(fmt).itemsize
        return out.item()

    def string() -> str:
        nonlocal pos
        n = take("u8")
        pos += n
        return bytes(data[pos - n : pos]).decode("utf-8", errors="replace")

    def value(vtype):
        nonlocal pos
        if vtype == kind.STRING:
            return string()
        if vtype != kind.ARRAY:
            return take(numeric[vtype])
        sub, n = kind(take("u4")), take("u8")
        if sub == kind.STRING:
            return [string() for _ in range(n)], sub
        items = np.frombuffer(data, np.dtype(numeric[sub]).newbyteorder("<"), n, pos)
        pos += items.nbytes
        return items.tolist(), sub

    if bytes(data[:4]) != b"GGUF":
        raise FinetuneError(f"{path.name} is not a GGUF file.")
    pos = 4
    _version, n_tensors, n_fields = take("u4"), take("u8"), take("u8")
    fields = {}
    for _ in range(n_fields):
        key, vtype = string(), kind(take("u4"))
        got = value(vtype)
        fields[key] = (got[0], vtype, got[1]) if vtype == kind.ARRAY else (got, vtype, None)
    infos = []
    for _ in range(n_tensors):
        name, n_dims = string(), take("u4")
        dims = [take("u8") for _ in range(n_dims)]
        infos.append((name, tuple(reversed(dims)), take("u4"), take("u8")))
    align = fields.get("general.alignment", (32,))[0]
    start = -(-pos // align) * align  # the tensors' data follows the header, aligned
    header = Header(path, fields, {name: (shape, qtype, start + at) for name, shape, qtype, at in infos})
    if header.arch not in ARCHS:
        raise FinetuneError(f"GGUF export knows the {', '.join(ARCHS)} layouts; {path.name} is {header.arch}.")
    return header


def _gguf_names(arch: str, hf_names: list[str], n_layers: int) -> dict[str, str]:
    """GGUF tensor name -> transformers parameter name (the `gguf` package's map, as transformers' loader uses it)."""
    gguf = _gguf()
    name_map = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), n_layers)
    out = {}
    for hf in hf_names:
        stem, _, suffix = hf.rpartition(".")
        found = name_map.get_name(stem)
        if found:
            out[f"{found}.{suffix}"] = hf
    return out


def _permute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """transformers' rotary halves -> llama.cpp's interleaved pairs, per head (llama.cpp's convert_hf_to_gguf)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _to_gguf_layout(arch: str, name: str, w: np.ndarray, config) -> np.ndarray:
    if arch == "gemma3" and name.endswith("norm.weight"):
        return w + 1  # Gemma scales by (1 + weight); llama.cpp stores the factor itself
    if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
        heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
        return _permute_rotary(w, heads)
    return w


def _tensor_data(w: np.ndarray, kind: str):
    """(data, ggml type): norms and other vectors stay float32 (as llama.cpp's converter keeps them); matrices whose
    rows split into whole 32-value blocks are quantized, the rest float16."""
    gguf = _gguf()
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0}[kind]  # fmt: skip
    if w.ndim == 1:
        return w.astype(np.float32), gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.F16 or w.shape[-1] % 32:
        return w.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(w.astype(np.float32), qtype), qtype


def _copy_metadata(header: Header, writer, skip: set[str]) -> None:
    for key, (value, vtype, sub_type) in header.fields.items():
        if key not in skip:
            writer.add_key_value(key, value, vtype, sub_type)


def _file_type(kind: str) -> int:
    types = _gguf().LlamaFileType
    return {"f16": types.MOSTLY_F16, "q8_0": types.MOSTLY_Q8_0, "q4_0": types.MOSTLY_Q4_0}[kind]


def write_gguf(
    model, base: Path, out: Path, kind: str = "q8_0", chat_template: str | None = None, name: str = ""
) -> Path:
    """`model` (a transformers model of the base GGUF's architecture) as a GGUF file: the base file's metadata and
    tensor list, the model's weights."""
    _check_kind(kind)
    gguf = _gguf()
    header = read_header(base)
    arch = header.arch
    state = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    names = _gguf_names(arch, list(state), model.config.num_hidden_layers)
    missing = [t for t, (shape, _, _) in header.tensors.items() if t not in names or state[names[t]].shape != shape]
    if missing:
        raise FinetuneError(
            f"The model has no weights shaped as {', '.join(missing[:3])} of {base.name}: another model?"
        )
    writer = gguf.GGUFWriter(out, arch)
    keys = gguf.Keys
    _copy_metadata(header, writer, {"general.architecture", keys.General.FILE_TYPE, keys.Tokenizer.CHAT_TEMPLATE,
                                    keys.General.NAME})  # fmt: skip
    writer.add_name(name or out.stem)
    writer.add_file_type(_file_type(kind))
    if chat_template:
        writer.add_chat_template(chat_template)
    for t in header.tensors:
        data, qtype = _tensor_data(_to_gguf_layout(arch, t, state[names[t]], model.config), kind)
        writer.add_tensor(t, data, raw_dtype=qtype)
    _write(writer)
    return out


def _write(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@dataclass
class GGUFExport:
    gguf: Path
    modelfile: Path | None  # None: the run's template has no Ollama form (a chat template with system turns, ...)
    name: str  # the Ollama model's name suggested: the run's
    lora_of: Path | None = None  # a GGUF LoRA: the base model's own GGUF file it runs over

    def commands(self) -> str:
        if self.lora_of is not None:
            return f"llama-cli -m {self.lora_of} --lora {self.gguf}   # llama.cpp, over the base model's own GGUF"
        llama = f"llama-cli -m {self.gguf} --jinja   # llama.cpp, with the chat template inside the file"
        if self.modelfile is None:
            return llama
        ollama = f"ollama create {self.name} -f Modelfile && ollama run {self.name}"
        return f"cd {self.modelfile.parent} && {ollama}\n{llama}"


def _ollama_name(name: str) -> str:
    return name.lower().replace("_", "-")


def _run_name(adapter: Path) -> str:
    found = run_of_adapter(adapter)
    return found[0].path.name if found else adapter.name


def export_gguf(path: str | Path, out_dir: str | Path, kind: str = "q8_0", step: int | None = None) -> GGUFExport:
    """Merge a run's adapter into its base model and write it as `OUT/<run>-<kind>.gguf`, with an Ollama Modelfile."""
    _check_kind(kind)  # before the merge, which takes a while
    adapter, cfg = adapter_and_config(path, step)
    base = base_gguf(cfg.model.source)
    model, tokenizer = merged_model(adapter, cfg)
    template = get_template(cfg.data.template)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = _run_name(adapter)
    gguf_path = write_gguf(model, base, out_dir / f"{name}-{kind}.gguf", kind,
                           serving_chat_template(template, tokenizer), name)  # fmt: skip
    text = modelfile(template, tokenizer, f"./{gguf_path.name}")
    modelfile_path = None
    if text is not None:
        modelfile_path = out_dir / "Modelfile"
        modelfile_path.write_text(text, encoding="utf-8")
    return GGUFExport(gguf_path, modelfile_path, _ollama_name(name))


def export_gguf_lora(path: str | Path, out_dir: str | Path, step: int | None = None) -> GGUFExport:
    """The adapter alone as a GGUF LoRA (`OUT/<run>-lora.gguf`), for llama.cpp's `--lora` and its server's per-request
    adapters over the base model's own GGUF file."""
    from safetensors.numpy import load_file

    gguf = _gguf()
    adapter, cfg = adapter_and_config(path, step)
    base = base_gguf(cfg.model.source)
    header = read_header(base)
    arch = header.arch
    lora = json.loads((adapter / ADAPTER_CONFIG).read_text())
    if lora.get("use_dora") or lora.get("use_rslora") or lora.get("modules_to_save"):
        raise FinetuneError("A GGUF LoRA holds plain LoRA pairs: this adapter uses DoRA, rsLoRA or saved modules.")
    weights = {k: v.astype(np.float32) for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, w in weights.items():  # base_model.model.<module>.lora_A.weight
        module, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        pairs.setdefault(f"{module}.weight", {})[part.split(".")[0]] = w
    config = _base_config(header)
    names = {hf: g for g, hf in _gguf_names(arch, list(pairs), config.num_hidden_layers).items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = _run_name(adapter)
    out = out_dir / f"{name}-lora.gguf"
    writer = gguf.GGUFWriter(out, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora["lora_alpha"]))
    for hf, pair in pairs.items():
        if hf not in names or set(pair) != {"A", "B"}:
            raise FinetuneError(f"{hf} of this adapter has no place in {base.name}.")
        # A (r, in) is applied first; the layout rule permutes output rows, so it goes on B (out, r).
        writer.add_tensor(f"{names[hf]}.lora_a", pair["A"])
        writer.add_tensor(f"{names[hf]}.lora_b", _to_gguf_layout(arch, names[hf], pair["B"], config))
    _write(writer)
    return GGUFExport(out, None, _ollama_name(name), lora_of=base)


def _base_config(header: Header):
    """The head counts the layout rule needs, read from the base GGUF."""
    from types import SimpleNamespace

    def read(key: str):
        return header.value(f"{header.arch}.{key}")

    return SimpleNamespace(num_hidden_layers=read("block_count"), num_attention_heads=read("attention.head_count"),
                           num_key_value_heads=read("attention.head_count_kv"))  # fmt: skip


# --- Ollama ----------------------------------------------------------------------------------------

_U, _A, _U2 = "\x01U\x01", "\x02A\x02", "\x03V\x03"  # sentinels: where each turn's text goes in a rendered prompt


def _turns(template: Template, tokenizer) -> tuple[str, str, str] | None:
    """(text before the first question, text after each question, text after each answer), found by rendering the
    app's own prompt around sentinel turns; None where one pattern does not hold for every turn."""
    one = conversation_prompt(template, [{"role": "user", "content": _U}], tokenizer)
    two = conversation_prompt(template, [{"role": "user", "content": _U}, {"role": "assistant", "content": _A},
                                         {"role": "user", "content": _U2}], tokenizer)  # fmt: skip
    if one.count(_U) != 1:
        return None
    head, after_question = one.split(_U)
    if not two.startswith(head + _U + after_question + _A) or not two.endswith(_U2 + after_question):
        return None
    after_answer = two[len(head + _U + after_question + _A) : -len(_U2 + after_question)]
    return head, after_question, after_answer


def ollama_template(turns: tuple[str, str, str], tokenizer) -> str:
    """The prompt as an Ollama (Go) template over the conversation's messages, from the template's `_turns`: the same
    text the app builds for user and assistant turns."""
    head, after_question, after_answer = turns
    bos = getattr(tokenizer, "bos_token", None)
    if bos and head.startswith(bos):  # llama.cpp adds the BOS token itself (the GGUF's add_bos_token)
        head = head[len(bos) :]
    # Go's text/template, as Ollama runs it: `head` before the first question only; system turns are not part of
    # the app's prompt for these templates and are left out.
    return (
        "{{- $first := true }}{{- range .Messages }}"
        f'{{{{- if eq .Role "user" }}}}{{{{ if $first }}}}{head}{{{{ $first = false }}}}{{{{ end }}}}'
        f'{{{{ .Content }}}}{after_question}{{{{ else if eq .Role "assistant" }}}}{{{{ .Content }}}}{after_answer}'
        "{{ end }}{{ end }}"  # no `{{-` after text: it would trim the template's own newlines
    )


def modelfile(template: Template, tokenizer, gguf_file: str) -> str | None:
    """An Ollama Modelfile for the GGUF: its TEMPLATE builds the app's prompt, its stops are the template's. None
    where the template has no such form."""
    if template.answer_field != "output":  # the `text` template prompts nothing
        return None
    turns = _turns(template, tokenizer)
    if turns is None or any("{{" in text or '"""' in text for text in turns):  # not literal text in a Modelfile
        return None
    stops = template.stop
    if template.chat or template.chat_template:  # a chat template's end of turn (e.g. `<|im_end|>`) ends an answer
        marker = turns[2].strip().split("\n")[0].strip()
        stops += (marker,) if marker else ()
    go = ollama_template(turns, tokenizer)
    lines = [f"FROM {gguf_file}", f'TEMPLATE """{go}"""']
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in dict.fromkeys(stops)]
    return "\n".join(lines) + "\n"
