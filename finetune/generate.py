"""Streaming generation: text chunks from a model, several rows of one model in one batched `generate`.

for chunk in stream(model, tokenizer, "### Question:\\nWhat is Lamini?\\n\\n### Answer:\\n"):
    print(chunk, end="", flush=True)

`stream_batch` runs one `generate` over several prompts (each row with its own LoRA adapter: PEFT mixed-adapter
batch) and splits it back into one `TextStream` per row with `BatchStreamer`. The Arena's backends and the merging of
their streams for display are `finetune.backends`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from finetune.config import GenerationParams
from finetune.hardware import GEMV_SHAPE, machine
from finetune.models import LoadedModel
from finetune.templates import pad_id


def prompt_inputs(tokenizer, prompts: str | list[str], device) -> dict:
    """Tokenize prompts, adding BOS only where the text does not already start with a special token."""
    prompts = [prompts] if isinstance(prompts, str) else prompts
    special = tuple(t for t in tokenizer.all_special_tokens if t)
    add = not any(p.startswith(special) for p in prompts) if special else True
    # Padded here, on the left (decoder-only batches must end with the prompt's last token), not by the tokenizer:
    # the tokenizer is shared by the app's threads, and `padding=True` sets its backend's padding state for the
    # call, which another thread's call can reset mid-way (seen: an unpadded, ragged batch).
    ids = tokenizer(prompts, add_special_tokens=add)["input_ids"]
    pad = pad_id(tokenizer)
    width = max(len(row) for row in ids)
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids], device=device)
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=device)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in mixed-adapter batches

CPU_THREADS = torch.get_num_threads()  # intra-op threads at start: one per core unless the user set it


def threads_per_generation(concurrent: int) -> int:
    """Intra-op threads for each of `concurrent` generations running at once, so that together they fill the cores.

    Decoding multiplies small matrices: a second thread gains little there, and threads outnumbering the cores
    wait on each other at every operation (measured on 2 cores: 2 generations x 2 threads decode ~10x slower).
    """
    return max(1, CPU_THREADS // max(1, concurrent))


def generate_kwargs(tokenizer, params: GenerationParams, model=None, adapter_names: list[str] | None = None) -> dict:
    """Keyword arguments for `model.generate`. On a PEFT model every row names its adapter (or the base)."""
    kwargs = dict(
        max_new_tokens=params.max_new_tokens,
        do_sample=not params.greedy,
        pad_token_id=pad_id(tokenizer),
        repetition_penalty=params.repetition_penalty,
    )
    if params.greedy:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=None)
    if adapter_names is not None or hasattr(model, "peft_config"):
        kwargs["adapter_names"] = adapter_names or [BASE_ADAPTER]
    return kwargs


DECODE_ROWS = 4  # rows of a product with the output layer that count as decoding (a few sequences, one position)


def prepare_head(model) -> None:
    """Ready the output layer for generation (once per model; the first call patches it).

    - Its input is made contiguous: `generate` feeds it only each row's last position, a strided view, and for more
      than one row in bfloat16 torch's CPU matmul then copied the whole weight once per row (Gemma's 262k x 640
      output layer: 4.5 s instead of 0.07 s).
    - A float32 output layer on a CPU whose bfloat16 matrix-vector products are faster (`Probe.bf16_gemv_fast`, an
      AVX2 CPU: 27 ms instead of 90 ms for base and tuned through Gemma's) decodes with a bfloat16 copy of its
      weight; products of more rows (a held-out loss over answer positions) keep the exact float32 weight.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "_prepared", False):
        return
    head._prepared = True
    head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
    probe, weight = machine().probe, head.weight
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or probe is None or not probe.bf16_gemv_fast:
        return
    if weight.numel() < GEMV_SHAPE[1] * GEMV_SHAPE[2]:
        return  # smaller than what the probe measured: cache-resident, not worth a second copy
    low = weight.detach().to(torch.bfloat16)
    full = head.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() > DECODE_ROWS:
            return full(x)
        bias = head.bias.to(torch.bfloat16) if head.bias is not None else None
        return torch.nn.functional.linear(x.to(torch.bfloat16), low, bias).float()

    head.forward = forward


def first_stop(text: str, stops: tuple[str, ...]) -> int:
    """Where the first of `stops` starts in `text`, or -1."""
    return min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    cut = first_stop(text, stops)
    return text[:cut] if cut >= 0 else text


def generate_batch(
    model,
    tokenizer,
    prompts: list[str],
    params: GenerationParams | None = None,
    adapter_names: list[str] | None = None,
) -> list[str]:
    """Complete several prompts in one batched `generate`; on a PEFT model, row i uses `adapter_names[i]`."""
    params = params or GenerationParams()
    inputs = prompt_inputs(tokenizer, prompts, model.device)
    prepare_head(model)
    if params.seed is not None:
        torch.manual_seed(params.seed)
    # Stop strings end each row in generate itself, so a batch stops once every row reached one.
    stops = {"stop_strings": list(params.stop), "tokenizer": tokenizer} if params.stop else {}
    with torch.inference_mode():
        out = model.generate(**inputs, **generate_kwargs(tokenizer, params, model, adapter_names), **stops)
    texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [cut_at_stop(t, params.stop) for t in texts]


class StopFilter:
    """Cuts text at the first stop string, holding back a tail that might be the start of one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.text = ""  # everything released so far
        self._pending = ""
        self.stopped = False

    def push(self, chunk: str) -> str:
        if self.stopped:
            return ""
        buf = self._pending + chunk
        cut = first_stop(buf, self.stops)
        if cut >= 0:
            self.stopped, self._pending = True, ""
            return self._release(buf[:cut])
        hold = max((len(s) - 1 for s in self.stops), default=0)
        # Hold back only a suffix that is really a prefix of some stop string.
        candidates = range(min(hold, len(buf)), 0, -1)
        keep = next((k for k in candidates if any(s.startswith(buf[-k:]) for s in self.stops)), 0)
        self._pending = buf[len(buf) - keep :]
        return self._release(buf[: len(buf) - keep])

    def flush(self) -> str:
        rest, self._pending = self._pending, ""
        return "" if self.stopped else self._release(rest)

    def _release(self, text: str) -> str:
        self.text += text
        return text


class TextStream:
    """An iterator of text chunks that, once finished, knows how many tokens it produced (`tokens`, None: unknown).

    `make(self)` returns the chunk iterator; a generator can fill in `self.tokens` as it ends.
    """

    def __init__(self, make: Callable[[TextStream], Iterator[str]]):
        self.tokens: int | None = None
        self._chunks = make(self)

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._chunks)

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close:
            close()


_END = object()  # a row's queue ends with this


class RowText:
    """One row of a batched generation as seen by its reader: text chunks arrive in `queue`, then `_END`.

    An exception in the queue is raised by the reader. `done`: no more text will come (EOS, stop string,
    error); `closed`: the reader went away, so generating this row is wasted work.
    """

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.filter = StopFilter(())
        self.ids: list[int] = []  # tokens of the current line (decoded together, see BatchStreamer.put)
        self.offset = 0  # characters of decode(ids) already pushed
        self.tokens = 0
        self.done = False
        self.closed = False

    def push(self, text: str) -> None:
        if out := self.filter.push(text):
            self.queue.put(out)
        if self.filter.stopped:
            self.finish()

    def drain(self) -> Iterator[str]:
        """The row's text chunks as they arrive; an error put in the queue is raised here, in the reader's thread."""
        while (item := self.queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    def finish(self, error: BaseException | None = None) -> None:
        if self.done:
            return
        self.done = True
        if error is not None:
            self.queue.put(error)
        elif rest := self.filter.flush():
            self.queue.put(rest)
        self.queue.put(_END)


class BatchStreamer(BaseStreamer):
    """A streamer for a whole batch: each step's token ids (one per row) become one text stream per row.

    Each row ends on its own, at an EOS token or at one of its stop strings; `RowsDone` tells `generate`
    which rows are done so it stops as soon as all are (or all readers went away).
    """

    def __init__(self, tokenizer, rows: list[RowText], eos_ids: set[int]):
        self.tokenizer, self.rows, self.eos_ids = tokenizer, rows, eos_ids
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate hands over the prompt ids first
            self._prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist()):
            if row.done or row.closed:
                continue
            if token in self.eos_ids:
                row.finish()
                continue
            row.ids.append(token)
            row.tokens += 1
            text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                continue
            row.push(text[row.offset :])
            row.offset = len(text)
            if text.endswith("\n"):  # decode line by line, as TextStreamer does, so a step stays cheap
                row.ids, row.offset = [], 0

    def end(self) -> None:
        for row in self.rows:
            row.finish()


class RowsDone:
    """Stopping criteria: per row, whether its stream has ended or its reader is gone."""

    def __init__(self, rows: list[RowText]):
        self.rows = rows

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        done = [row.done or row.closed for row in self.rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class CoreShare:
    """Local generations running at once in this process; at every decoding step each takes its share of the
    cores, so when one column finishes, the others speed up (`torch.set_num_threads` is per calling thread)."""

    def __init__(self):
        self.lock, self.active = threading.Lock(), 0

    @contextmanager
    def running(self) -> Iterator[None]:
        with self.lock:
            self.active += 1
        try:
            yield
        finally:
            with self.lock:
                self.active -= 1

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        """A stopping criterion that stops nothing: `generate` calls it once per step, in its own thread."""
        threads = threads_per_generation(self.active)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


CORES = CoreShare()


@dataclass
class ModelHandle:
    """A model with its tokenizer and the lock held while generating with it (a pooled `models.LoadedModel` has
    these fields too, and is passed in its place).

    `model` is read only while holding `lock`: attaching an adapter to a pooled model swaps it for a PeftModel.
    """

    model: object
    tokenizer: object
    lock: AbstractContextManager = field(default_factory=nullcontext)


@dataclass
class BatchJob:
    """What one batched `generate` needs: made by `stream_batch`'s `build_job`, in the generation thread."""

    handle: ModelHandle | LoadedModel
    prompts: list[str | None]  # one per row; None for a row whose prompt failed (see `errors`)
    params: GenerationParams
    adapter_names: list[str | None] | None = None  # per row; None: the base model without adapter
    stops: list[tuple[str, ...]] | None = None  # per row; default params.stop
    errors: dict[int, BaseException] = field(default_factory=dict)  # rows that fail alone


def eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def _run_batch(job: BatchJob, rows: list[RowText]) -> None:
    for i, error in job.errors.items():
        rows[i].finish(error)
    live = [i for i, p in enumerate(job.prompts) if p is not None and i not in job.errors]
    if not live:
        return
    stops = job.stops or [job.params.stop] * len(rows)
    for i in live:
        rows[i].filter = StopFilter(stops[i])
    live_rows = [rows[i] for i in live]
    # One generation per model at a time; other requests for it queue here (not counted as running).
    with job.handle.lock, CORES.running():
        model, tokenizer = job.handle.model, job.handle.tokenizer
        names = None
        if hasattr(model, "peft_config"):
            names = [(job.adapter_names or [None] * len(rows))[i] or BASE_ADAPTER for i in live]
        inputs = prompt_inputs(tokenizer, [job.prompts[i] for i in live], model.device)
        prepare_head(model)
        if job.params.seed is not None:
            torch.manual_seed(job.params.seed)
        with torch.inference_mode():
            model.generate(
                **inputs,
                **generate_kwargs(tokenizer, job.params, model, names),
                streamer=BatchStreamer(tokenizer, live_rows, eos_ids(model, tokenizer)),
                stopping_criteria=StoppingCriteriaList([RowsDone(live_rows), CORES]),
            )


def stream_batch(build_job: Callable[[], BatchJob], n_rows: int, threads: int | None = None) -> list[TextStream]:
    """`n_rows` text streams fed by one batched `generate`, which starts when any stream is first read.

    `build_job` runs in the generation thread, so loading a model blocks no caller; an exception there or in
    `generate` ends every row's stream with that exception. Closing every stream stops generation.
    `threads`: torch intra-op threads of this generation at its start (default: all, `CPU_THREADS`); from the
    first step on it takes its share of the cores (`CORES`).
    """
    rows = [RowText() for _ in range(n_rows)]
    state: dict = {}
    start = threading.Lock()

    def run() -> None:
        torch.set_num_threads(threads or CPU_THREADS)  # counts per calling thread (OpenMP)
        try:
            _run_batch(build_job(), rows)
        except BaseException as e:  # raised again in each reader's thread
            for row in rows:
                row.finish(e)
        finally:
            for row in rows:
                row.finish()
            torch.set_num_threads(CPU_THREADS)  # threads started later start with the last count set: restore it

    def read(i: int, out: TextStream) -> Iterator[str]:
        with start:
            if "thread" not in state:
                state["thread"] = threading.Thread(target=run, daemon=True)
                state["thread"].start()
        row = rows[i]
        try:
            yield from row.drain()
        finally:
            row.closed = True
            out.tokens = row.tokens
            if all(r.closed for r in rows):
                state["thread"].join()

    return [TextStream(lambda out, i=i: read(i, out)) for i in range(n_rows)]


def stream_rows(
    model,
    tokenizer,
    prompts: list[str],
    params: GenerationParams | None = None,
    adapter_names: list[str | None] | None = None,
    stops: list[tuple[str, ...]] | None = None,
) -> list[TextStream]:
    """One text stream per prompt, all from one batched `generate` (row i with adapter `adapter_names[i]`)."""
    job = BatchJob(ModelHandle(model, tokenizer), list(prompts), params or GenerationParams(), adapter_names, stops)
    return stream_batch(lambda: job, len(prompts))


def stream(
    model, tokenizer, prompt: str, params: GenerationParams | None = None, adapter_name: str | None = None
) -> Iterator[str]:
    """Yield the model's continuation of `prompt` chunk by chunk; closing the generator stops generation.

    On a PEFT model, `adapter_name` picks the adapter (None: the base model without any adapter).
    """
    (row,) = stream_rows(model, tokenizer, [prompt], params, [adapter_name])
    try:
        yield from row
    finally:
        row.close()
