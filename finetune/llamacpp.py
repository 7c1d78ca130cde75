"""The Arena's local columns on llama.cpp: the embedded GGUF files as shipped, the tuned column as the base GGUF with
the run's adapter as a GGUF LoRA, and every open answer of the app decoded together.

    engine = LlamaEngine.shared()
    model = engine.model(gguf_path)
    for chunk in engine.answer(model, None, "### Question:\\nWhat is Lamini?\\n\\n### Answer:\\n", params, ("###",)):
        print(chunk, end="")

Why llama.cpp: decoding a small model on a CPU is bound by reading its weights, and llama.cpp reads the 4-bit weights
as they are (a quarter of bfloat16's bytes, no conversion). Why one engine: each context (a model with one LoRA
adapter, or none) holds up to `slots` answers, and one scheduler thread decodes the contexts in turn with the free
cores; each step is one new token of every open answer plus the prompts of the newly asked (continuous batching, as
llama.cpp's server does), so each weight is read once per step for the whole room (on 2 AVX2 cores the products are
then bound by arithmetic: 24 rounds at once decode 2.1x the tokens per second of one, `bench/workshop.py`). Two decodes
at once, or more threads than free cores, wait on each other at every operation (2-core EPYC beside one busy core:
1 thread 42 tokens/s, 2 threads 30), hence one thread that decodes and `FreeCores` that counts what others use.

`LlamaBackend` is an Arena column on this engine (a `finetune.backends.Backend`). It needs llama-cpp-python, built
without OpenMP (`CMAKE_ARGS=-DGGML_OPENMP=OFF pip install llama-cpp-python`, as the Makefile does: pip builds it with
a C compiler and cmake); `available()` says whether it is there.
"""

from __future__ import annotations

import codecs
import ctypes
import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finetune import FinetuneError
from finetune.backends import Backend, column_label, template_stops
from finetune.config import GenerationParams
from finetune.generate import CPU_THREADS, RowText, StopFilter, TextStream
from finetune.models import model_cache
from finetune.templates import conversation_prompt, get_template

SLOTS = 24  # answers each context decodes at once (a workshop room); more wait for a free slot
CONTEXT_PER_SLOT = 1024  # tokens of prompt and answer per slot on average: the slots share one KV cache
BATCH = 512  # tokens of one decoding step: longer prompts are fed over several steps
# Tokens llama.cpp computes at once within a step. Its work buffer holds the logits of that many: 64 x Gemma's 262k
# words is 64 MiB where 512 took 514 MiB per context; a decoding step of a room's answers fits in 64.
UBATCH = 64
GGML_LOG_LEVEL_ERROR = 4  # ggml.h: debug 1, info 2, warn 3, error 4 (older than llama_cpp._logger's table)
MAX_CONTEXTS = 4  # base, tuned, reference and one more adapter; the least recently used idle one is freed first


def available() -> bool:
    """Whether llama-cpp-python is installed (without importing it: that loads the library)."""
    return importlib.util.find_spec("llama_cpp") is not None


_LOG: list = []  # the log callback handed to llama.cpp, kept alive here


def _lib():
    import llama_cpp

    if not _LOG:  # llama.cpp's log: errors only (loading a model prints hundreds of lines, a context its warnings)

        @llama_cpp.llama_log_callback
        def errors_only(level: int, text: bytes, _user_data) -> None:
            if level == GGML_LOG_LEVEL_ERROR:
                print(text.decode("utf-8", "replace"), end="", file=sys.stderr, flush=True)

        _LOG.append(errors_only)
        llama_cpp.llama_log_set(errors_only, ctypes.c_void_p(0))
    return llama_cpp


@dataclass
class PromptTokenizer:
    """What the prompt templates ask of a tokenizer (`templates.conversation_prompt`), read from a GGUF file."""

    name_or_path: str
    chat_template: str | None
    special_tokens_map: dict[str, str]

    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str | None:
        return chat_template or self.chat_template


class GGUFModel:
    """A GGUF file loaded by llama.cpp: its tokenizer, chat template and end-of-generation tokens."""

    def __init__(self, path: str | Path):
        from llama_cpp._internals import LlamaModel

        lib = _lib()
        self.path = Path(path)
        # verbose=True lets llama.cpp log through the callback `_lib` quietened; False would redirect the whole
        # process's stdout and stderr while loading, which other threads write to as well.
        self.llama = LlamaModel(path_model=str(self.path), params=lib.llama_model_default_params(), verbose=True)
        self.vocab, self.n_vocab = self.llama.vocab, self.llama.n_vocab()
        # Looked up once, not per token: each call into llama.cpp lets go of the GIL, and with a room of Arena rounds
        # the decoding thread then waits behind the app's other threads to get it back.
        self.ends = frozenset(t for t in range(self.n_vocab) if lib.llama_vocab_is_eog(self.vocab, t))
        self._pieces: dict[int, bytes] = {}
        meta = self.llama.metadata()
        specials = {"bos_token": self.llama.token_bos(), "eos_token": self.llama.token_eos()}
        self.tokenizer = PromptTokenizer(
            self.path.stem,
            meta.get("tokenizer.chat_template"),
            {k: self.llama.token_get_text(t) for k, t in specials.items() if 0 <= t < self.n_vocab},
        )

    def tokenize(self, prompt: str) -> list[int]:
        """The prompt's tokens, with BOS only where the text does not already start with a control token (as
        `generate.prompt_inputs` does for the transformers path)."""
        lib = _lib()
        ids = self.llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        control = bool(ids) and lib.llama_vocab_get_attr(self.vocab, ids[0]) & lib.LLAMA_TOKEN_ATTR_CONTROL
        return [self.llama.token_bos(), *ids] if self.llama.add_bos_token() and not control else ids

    def piece(self, token: int) -> bytes:
        """A token's bytes as text (control tokens: none, as `skip_special_tokens` decodes them)."""
        if token not in self._pieces:
            lib, size = _lib(), 64
            while True:
                buf = ctypes.create_string_buffer(size)
                n = lib.llama_token_to_piece(self.vocab, token, buf, size, 0, False)
                if n >= 0:
                    break
                size = -n
            self._pieces[token] = buf.raw[:n]
        return self._pieces[token]


@dataclass(eq=False)
class _Answer:
    """One answer being generated: its prompt, where it is in the context, and the row its reader drains."""

    ids: list[int]
    params: GenerationParams
    row: RowText
    sampler: object | None  # a llama.cpp sampler chain (`_sampler`); None: greedy
    seq: int = -1  # its sequence id in the context's KV cache while it holds a slot
    fed: int = 0  # prompt tokens decoded so far
    next: int | None = None  # the token sampled last: decoded at the next step
    generated: int = 0
    seen: list[int] = field(default_factory=list)  # prompt and answer, for the repetition penalty
    text: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))

    @property
    def need(self) -> int:
        return len(self.ids) + self.params.max_new_tokens

    @property
    def gone(self) -> bool:
        return self.row.done or self.row.closed


def _sampler(params: GenerationParams):
    """llama.cpp's sampler chain for `params`, in transformers' order: temperature, top-p, then a draw; None for
    greedy decoding (the step takes the argmax itself)."""
    from llama_cpp._internals import LlamaSampler

    if params.greedy:
        return None
    chain = LlamaSampler()
    chain.add_temp(params.temperature)
    chain.add_top_p(params.top_p, 1)
    chain.add_dist(params.seed if params.seed is not None else _lib().LLAMA_DEFAULT_SEED)
    return chain


def _penalize(logits: np.ndarray, seen: list[int], penalty: float) -> None:
    """transformers' repetition penalty, in place: every token of the prompt and answer made less likely."""
    idx = np.unique(np.asarray(seen, dtype=np.int64))
    chosen = logits[idx]
    logits[idx] = np.where(chosen > 0, chosen / penalty, chosen * penalty)


class _Context:
    """One llama.cpp context: a model with one LoRA adapter (or none), decoding up to `slots` answers at once."""

    def __init__(self, model: GGUFModel, lora: Path | None, slots: int, capacity: int):
        from llama_cpp._internals import LlamaContext

        lib = _lib()
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_seq_max = capacity, slots
        params.n_batch, params.n_ubatch = BATCH, UBATCH
        params.kv_unified = True  # one cache shared by the slots: a long conversation may take what short ones leave
        self.model, self.capacity = model, capacity
        self.ctx = LlamaContext(model=model.llama, params=params, verbose=True)
        if lora is not None:
            adapter = lib.llama_adapter_lora_init(model.llama.model, str(lora).encode())
            if not adapter:
                raise FinetuneError(f"llama.cpp could not load the LoRA {lora.name} onto {model.path.name}.")
            adapters = (lib.llama_adapter_lora_p_ctypes * 1)(adapter)
            lib.llama_set_adapters_lora(self.ctx.ctx, adapters, 1, (ctypes.c_float * 1)(1.0))
        self.batch = lib.llama_batch_init(BATCH, 0, 1)
        self.free_seqs = list(range(slots))[::-1]
        self.reserved = 0  # KV cache promised to the active answers (prompt + max new tokens each)
        self.waiting: deque[_Answer] = deque()  # guarded by the engine's lock
        self.active: list[_Answer] = []  # touched by the scheduler thread only
        self.threads = 0
        self.used = time.monotonic()

    @property
    def busy(self) -> bool:
        """Answers wait or are under way (an answer that ended gives back its slot at the next step)."""
        return bool(self.waiting) or any(not a.gone for a in self.active)

    def admit(self) -> None:
        """Waiting answers take free slots, first come first served (under the engine's lock)."""
        while self.waiting and self.free_seqs and self.reserved + self.waiting[0].need <= self.capacity:
            answer = self.waiting.popleft()
            if answer.gone:
                continue
            answer.seq = self.free_seqs.pop()
            self.reserved += answer.need
            self.active.append(answer)
        self.used = time.monotonic()

    def step(self, threads: int) -> None:
        """One decode: the next token of every answer under way, and prompt tokens of the new ones up to BATCH."""
        lib = _lib()
        self._release_gone()  # readers that went away since the last step
        if not self.active:
            return
        if threads != self.threads:
            lib.llama_set_n_threads(self.ctx.ctx, threads, threads)
            self.threads = threads
        items: list[tuple[_Answer, int, int, bool]] = []  # answer, token, position, whether its logits are wanted
        for a in self.active:
            if a.next is not None:
                items.append((a, a.next, len(a.ids) + a.generated - 1, True))
        for a in self.active:
            take = min(len(a.ids) - a.fed, BATCH - len(items))
            items += [(a, a.ids[k], k, k == len(a.ids) - 1) for k in range(a.fed, a.fed + max(take, 0))]
            a.fed += max(take, 0)
        try:
            logits = self.decode([(token, pos, a.seq, out) for a, token, pos, out in items])
        except FinetuneError as error:
            for a in {id(a): a for a, *_ in items}.values():
                a.row.finish(error)
            return
        rows = [(i, a) for i, (a, _, _, out) in enumerate(items) if out]
        for k, (i, a) in enumerate(rows):
            if a.gone:
                continue
            if a.params.repetition_penalty != 1.0:
                _penalize(logits[k], a.seen, a.params.repetition_penalty)
            if a.sampler is None:  # greedy: one argmax here rather than a call into llama.cpp per answer
                self._emit(a, int(logits[k].argmax()))
            else:
                self._emit(a, lib.llama_sampler_sample(a.sampler.sampler, self.ctx.ctx, i))
        self._release_gone()  # finished answers give back their slot now: the context may be idle after this step

    def decode(self, tokens: list[tuple[int, int, int, bool]]) -> np.ndarray:
        """One llama_decode of (token, position, sequence, logits wanted) rows, at most BATCH: the logits of the rows
        that want them, in their order (a view into llama.cpp's buffer, valid until the next decode)."""
        lib, batch = _lib(), self.batch
        batch.n_tokens = len(tokens)
        for i, (token, pos, seq, out) in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, out
            batch.seq_id[i][0] = seq
        code = lib.llama_decode(self.ctx.ctx, batch)
        if code != 0:
            raise FinetuneError(f"llama.cpp could not decode this step (code {code}): ask again.")
        wanted = sum(out for *_, out in tokens)
        return np.ctypeslib.as_array(lib.llama_get_logits(self.ctx.ctx), (wanted, self.model.n_vocab))

    def _emit(self, a: _Answer, token: int) -> None:
        if token in self.model.ends:
            a.row.push(a.text.decode(b"", final=True))
            a.row.finish()
            return
        a.generated += 1
        a.row.tokens += 1
        a.seen.append(token)
        a.row.push(a.text.decode(self.model.piece(token)))
        if a.generated >= a.params.max_new_tokens:
            a.row.finish()
        a.next = token

    def _release_gone(self) -> None:
        for answer in [a for a in self.active if a.gone]:
            _lib().llama_memory_seq_rm(self.ctx.memory, answer.seq, -1, -1)
            self.free_seqs.append(answer.seq)
            self.reserved -= answer.need
            self.active.remove(answer)
            answer.row.finish()

    def close(self) -> None:
        _lib().llama_batch_free(self.batch)
        self.ctx.close()


class FreeCores:
    """Cores not kept busy by other processes (a training run, a browser), measured every `every_s` seconds: the busy
    time of this process's CPUs less this process's own."""

    def __init__(self, cores: int = CPU_THREADS, every_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        import psutil

        self.cores, self.every_s, self.clock = cores, every_s, clock
        self._psutil, self._process = psutil, psutil.Process()
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        self._cpus = sorted(cpus)
        self._last = (self.clock(), *self._busy_s())
        self.free = cores

    def _busy_s(self) -> tuple[float, float]:
        """(CPU seconds busy on this process's CPUs, of which this process's own) since boot / its start."""
        per_cpu = self._psutil.cpu_times(percpu=True)
        chosen = [per_cpu[i] for i in self._cpus if i < len(per_cpu)] or per_cpu
        busy = sum(sum(t) - t.idle - getattr(t, "iowait", 0.0) for t in chosen)
        own = self._process.cpu_times()
        return busy, own.user + own.system

    def __call__(self) -> int:
        now = self.clock()
        if now - self._last[0] >= self.every_s:
            busy, own = self._busy_s()
            others = max(0.0, (busy - self._last[1]) - (own - self._last[2])) / (now - self._last[0])
            self.free = self.count(others)
            self._last = (now, busy, own)
        return self.free

    def count(self, others: float) -> int:
        """Threads for llama.cpp when others keep `others` cores busy: a core 70% busy is taken, at least one left."""
        return max(1, self.cores - int(others + 0.3))


class LlamaEngine:
    """Every llama.cpp answer of this process: the loaded models, their contexts and the one thread decoding them."""

    _shared: LlamaEngine | None = None
    _shared_lock = threading.Lock()

    def __init__(self, slots: int = SLOTS, per_slot: int = CONTEXT_PER_SLOT, cores: int = CPU_THREADS):
        self.slots, self.capacity = slots, slots * per_slot  # a context's answers at once, and its tokens
        self.free_cores = FreeCores(cores)
        self._cv = threading.Condition()
        self._load = threading.Lock()  # loading a model or making a context: one at a time
        self._models: dict[Path, GGUFModel] = {}
        self._contexts: dict[tuple[Path, Path | None], _Context] = {}
        self._thread: threading.Thread | None = None
        self._retired: list[_Context] = []  # evicted contexts, freed by the scheduler thread (it may be stepping one)

    @classmethod
    def shared(cls) -> LlamaEngine:
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = LlamaEngine()
            return cls._shared

    def model(self, gguf: str | Path) -> GGUFModel:
        """The GGUF file loaded once (about a second for the embedded models)."""
        path = Path(gguf).resolve()
        with self._load:
            if path not in self._models:
                try:
                    self._models[path] = GGUFModel(path)
                except ValueError as e:  # llama-cpp-python's word for "llama.cpp returned no model"
                    raise FinetuneError(f"llama.cpp could not load {path.name}: {e}") from None
            return self._models[path]

    def context(self, model: GGUFModel, lora: Path | None, answer: _Answer | None = None) -> _Context:
        """The context for `model` with `lora`, made where there is none; `answer` joins its queue before any other
        caller can retire it."""
        key = (model.path, lora)
        with self._load:
            with self._cv:
                context = self._contexts.get(key)
                if context is None:  # the least recently used idle contexts go; the scheduler frees them
                    idle = sorted((c.used, k) for k, c in self._contexts.items() if not c.busy)
                    excess = max(0, len(self._contexts) + 1 - MAX_CONTEXTS)
                    self._retired += [self._contexts.pop(k) for _, k in idle[:excess]]
            if context is None:
                context = _Context(model, lora, self.slots, self.capacity)
            with self._cv:
                self._contexts[key] = context
                if answer is not None:
                    context.waiting.append(answer)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name="llama.cpp", daemon=True)
                    self._thread.start()
                self._cv.notify()  # an answer to decode, or contexts to free
            return context

    def answer(
        self, model: GGUFModel, lora: Path | None, prompt: str, params: GenerationParams, stops: tuple[str, ...],
        out: TextStream | None = None,
    ) -> Iterator[str]:  # fmt: skip
        """The answer's text chunks as they are decoded, cut at the first of `stops`; closing it frees its slot.
        `out`: the TextStream this feeds, told the number of tokens at the end."""
        ids = model.tokenize(prompt)
        answer = _Answer(ids, params, RowText(), _sampler(params), seen=list(ids))
        limit = min(self.capacity, model.llama.n_ctx_train())
        if answer.need > limit:
            raise FinetuneError(
                f"This conversation ({len(ids)} tokens, and {params.max_new_tokens} new) is longer than "
                f"{model.path.stem} reads here ({limit} tokens): clear the Arena and ask again."
            )
        answer.row.filter = StopFilter(stops)
        self.context(model, lora, answer)
        try:
            yield from answer.row.drain()
        finally:
            answer.row.closed = True
            if out is not None:
                out.tokens = answer.row.tokens

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (busy := [c for c in self._contexts.values() if c.busy]) and not self._retired:
                    self._cv.wait()
                retired, self._retired = self._retired, []
                for context in busy:
                    context.admit()
            for context in retired:
                context.close()
            threads = self.free_cores()
            for context in busy:
                try:
                    context.step(threads)
                except Exception as e:  # noqa: BLE001 (whatever breaks one context must not stop the others)
                    for a in context.active:
                        a.row.finish(e)


def lora_gguf(adapter: str | Path) -> Path:
    """The adapter as a GGUF LoRA for llama.cpp, exported once and cached (keyed by the adapter file's identity)."""
    from finetune.gguf_export import export_gguf_lora

    adapter = Path(adapter).resolve()
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise FinetuneError(f"No adapter_model.safetensors in {adapter}.")
    stat = weights.stat()
    key = hashlib.sha1(f"{adapter}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = model_cache() / "gguf-lora" / f"{key}.gguf"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
            os.replace(export_gguf_lora(adapter, tmp).gguf, cached)
    return cached


@dataclass
class LlamaBackend(Backend):
    """An Arena column on llama.cpp: a model's GGUF file, with the adapter as a GGUF LoRA, prompted with `template`."""

    gguf: Path
    source: str  # the model's name, as the transformers column names it (`column_label`)
    template: str = "qa"
    lora: Path | None = None  # the adapter as a GGUF LoRA (`lora_gguf`)
    adapter: str | Path | None = None  # the adapter folder it was exported from, for the label
    adapter_label: str | None = None
    llama: LlamaEngine | None = None  # default: the process's shared engine

    @property
    def label(self) -> str:
        return column_label(self.source, self.adapter, self.adapter_label)

    @property
    def engine(self) -> str:
        return "llama.cpp"

    def stream(self, messages: list[dict], params: GenerationParams) -> TextStream:
        def chunks(out: TextStream) -> Iterator[str]:
            engine = self.llama or LlamaEngine.shared()
            model = engine.model(self.gguf)  # on first read, in the column's own thread
            template = get_template(self.template)
            prompt = conversation_prompt(template, messages, model.tokenizer)
            yield from engine.answer(model, self.lora, prompt, params, template_stops(template, params), out)

        return TextStream(chunks)
