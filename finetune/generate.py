"""Streaming generation: text chunks from a model, and several streams merged into one for the UI.

for chunk in stream(model, tokenizer, "### Question:\\nWhat is Lamini?\\n\\n### Answer:\\n"):
    print(chunk, end="", flush=True)

for update in merge_streams({"base": stream(...), "reference": stream(...)}):
    update["base"].text  # everything that column has produced so far

Backends answer a conversation (`[{"role": "user", "content": ...}, ...]`) as a `TextStream`:
`LocalBackend` (a pooled transformers model, optionally with a LoRA adapter) and `OpenAIBackend`
(any OpenAI-compatible server, streamed through the `openai` SDK). `stream_all` starts several at once
and puts every local column that shares one loaded model into ONE batched `generate`, each row with its
own adapter (PEFT mixed-adapter batch), split back into per-column streams by `BatchStreamer`:

backends = {"base": LocalBackend(pool, spec, "qa"), "tuned": LocalBackend(pool, spec, "qa", adapter_dir),
            "reference": OpenAIBackend("http://127.0.0.1:8000/v1", "my-model")}
streams = stream_all(backends, {name: [{"role": "user", "content": "What is Lamini?"}] for name in backends}, params)
for update in merge_streams(streams, count_tokens=token_counters(streams)): ...
"""

from __future__ import annotations

import json
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from transformers import StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from finetune import FinetuneError
from finetune.config import GenerationParams, ModelSpec
from finetune.hardware import GEMV_SHAPE, machine
from finetune.models import LoadedModel, ModelPool
from finetune.templates import Template, build_prompt, chat_prompt, get_template, pad_id


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


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[: min(cuts)] if cuts else text


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
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
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
            while (item := row.queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
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


# --- backends --------------------------------------------------------------------------------------


class BackendError(FinetuneError):
    """A backend could not answer (server down, refused key, timeout, broken stream); shown in its column."""


def conversation_prompt(template: Template, messages: list[dict], tokenizer=None) -> str:
    """The prompt for a conversation that ends with the user's turn, in `template`'s format.

    A chat template (the model's, or the `tools` one) renders the whole message list; a text template (Q/A, Alpaca)
    repeats its question/answer block for each earlier turn, so a base model sees the history as in training.
    """
    if not messages or messages[-1]["role"] != "user":
        raise FinetuneError("A conversation must end with the user's question.")
    if template.chat or template.chat_template:
        return chat_prompt(template, messages, tokenizer)
    text, question = "", None
    for m in messages:
        if m["role"] == "user":
            question = m["content"]
        elif m["role"] == "assistant" and question is not None:
            text += build_prompt(template, question) + m["content"].strip() + "\n\n"
            question = None
    return text + build_prompt(template, messages[-1]["content"])


class Backend(ABC):
    """Answers a conversation (`[{"role": ..., "content": ...}, ...]`, ending with the user's turn) as a stream."""

    @property
    @abstractmethod
    def label(self) -> str:
        """The model's name as shown to users and stored with votes."""

    @abstractmethod
    def stream(self, messages: list[dict], params: GenerationParams) -> TextStream: ...


@dataclass
class LocalBackend(Backend):
    """A transformers model from the shared pool, optionally with a LoRA adapter, prompted with `template`."""

    pool: ModelPool
    spec: ModelSpec
    template: str = "qa"  # a name from templates.TEMPLATES (or a custom template's text)
    adapter: str | Path | None = None  # folder of a PEFT LoRA adapter for `spec`'s model
    adapter_label: str | None = None

    @property
    def label(self) -> str:
        if self.adapter is None:
            return self.spec.source
        return f"{self.spec.source} + {self.adapter_label or Path(self.adapter).name}"

    def stream(self, messages: list[dict], params: GenerationParams) -> TextStream:
        return stream_all({"answer": self}, {"answer": messages}, params)["answer"]


def _build_local_job(
    backends: list[LocalBackend], conversations: list[list[dict]], params: GenerationParams
) -> BatchJob:
    """A `build_job` for `stream_batch`: loads the shared model, attaches adapters, builds each row's prompt."""
    pool, spec = backends[0].pool, backends[0].spec
    entry = pool.get(spec)
    job = BatchJob(entry, [None] * len(backends), params, [None] * len(backends), [()] * len(backends))
    for i, (backend, messages) in enumerate(zip(backends, conversations)):
        try:  # a broken adapter or template fails its own row only
            if backend.adapter is not None:
                job.adapter_names[i] = pool.get_with_adapter(spec, backend.adapter)[1]
            template = get_template(backend.template)
            job.prompts[i] = conversation_prompt(template, messages, entry.tokenizer)
            job.stops[i] = tuple(dict.fromkeys(template.stop + params.stop)) if not template.chat else ()
        except Exception as e:  # noqa: BLE001 (whatever breaks one row's adapter must not fail the others)
            job.errors[i] = e
    return job


def api_root(url: str) -> str:
    """An OpenAI-compatible server's API root (`.../v1`) from its address with or without `/v1`."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise FinetuneError(f"Endpoint {url!r} must start with http:// or https://.")
    return url if url.endswith("/v1") else url + "/v1"


class OpenAIBackend(Backend):
    """Any OpenAI-compatible server (vLLM, TGI, llama.cpp, `transformers serve`, OpenAI): streamed completions.

    `base_url` is the API root, e.g. `http://127.0.0.1:8000/v1` (`/v1` is added when missing). Spoken to through
    the official `openai` SDK. The API key is sent as a bearer token and kept out of `repr`, logs and error
    messages; without one, no credential from the environment (OPENAI_API_KEY...) is sent either.
    `template`: a text template (qa, alpaca...) prompts the model as the local column does, through the completions
    API; None or chat: the chat completions API. `label`: the name shown and stored with votes (default model @ host).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        template: str | None = None,
        label: str | None = None,
    ):
        if not model.strip():
            raise FinetuneError("Give the endpoint's model name (see its /v1/models).")
        self.base_url = api_root(base_url)
        self.model = model.strip()
        self._api_key = api_key or None
        self.timeout_s = timeout_s
        # A text template goes to /v1/completions as the very prompt the local column builds. As a chat message it
        # would be wrapped in the server's chat template, which a base model lacks (transformers serve then fails, and
        # vLLM refuses chat requests without one); both serve /v1/completions, with stop strings.
        chosen = get_template(template) if template else None
        self.template = chosen if chosen is not None and not chosen.chat else None
        self._label = label

    def __repr__(self) -> str:
        return f"OpenAIBackend({self.base_url!r}, {self.model!r})"

    @property
    def label(self) -> str:
        return self._label or f"{self.model} @ {self.host}"

    @property
    def host(self) -> str:
        return self.base_url.split("://", 1)[1].removesuffix("/v1")

    def stream(self, messages: list[dict], params: GenerationParams) -> TextStream:
        return TextStream(lambda out: self._chunks(out, messages, params))

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _chunks(self, out: TextStream, messages: list[dict], params: GenerationParams) -> Iterator[str]:
        import openai  # imported on first use: ~0.5 s the app's start-up does not need to pay

        sampling: dict = {"temperature": 0.0 if params.greedy else params.temperature}
        if not params.greedy:
            sampling["top_p"] = params.top_p
        if params.seed is not None:
            sampling["seed"] = params.seed
        # The SDK fills whatever is not given from the environment (OPENAI_API_KEY, OPENAI_ORG_ID,
        # OPENAI_PROJECT_ID, an Authorization in OPENAI_CUSTOM_HEADERS): none of that may reach a third-party
        # server. A placeholder key when the user gave none (the SDK refuses no key), and these per-request
        # headers win over everything the client was built with.
        headers = {
            "Authorization": f"Bearer {self._api_key or 'EMPTY'}",
            "OpenAI-Organization": openai.Omit(),
            "OpenAI-Project": openai.Omit(),
        }
        client = openai.OpenAI(
            api_key=self._api_key or "EMPTY",
            base_url=self.base_url,
            timeout=openai.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s)),
            max_retries=0,  # a retry would double the wait in the arena before the column shows the error
        )
        request = dict(
            model=self.model,
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=params.max_new_tokens,  # not max_completion_tokens: older servers know only this one
            extra_headers=headers,
            **sampling,
        )
        deltas, finished = 0, False
        try:
            if self.template is None:
                stops = StopFilter(params.stop)
                chunks = client.chat.completions.create(messages=messages, **request)
            else:  # the server stops at the template's next header too, so it stops spending time on the answer
                stops = StopFilter(tuple(dict.fromkeys(self.template.stop + params.stop)))
                prompt = conversation_prompt(self.template, messages)
                stop = {"stop": list(stops.stops)} if stops.stops else {}
                chunks = client.completions.create(prompt=prompt, **stop, **request)
            with chunks:
                for chunk in chunks:
                    if not hasattr(chunk, "choices"):  # the SDK hands over whatever JSON the server sent
                        raise BackendError(f"Malformed stream from the endpoint (not an object): {chunk!r:.80}")
                    if chunk.usage:
                        out.tokens, finished = chunk.usage.completion_tokens, True
                    for choice in chunk.choices or []:
                        finished = finished or bool(choice.finish_reason)
                        content = _choice_text(choice)
                        if content:
                            deltas += 1
                            if text := stops.push(content):
                                yield text
                            if stops.stopped:
                                return
            if not finished:
                # Servers end an answer with a finish reason (and usage); a stream without either was cut off,
                # or was not Server-Sent Events at all (an HTML page, a proxy's error), which the SDK skips.
                raise BackendError("Malformed stream from the endpoint: it ended before the answer was finished.")
            if rest := stops.flush():
                yield rest
        except openai.APITimeoutError:  # before APIConnectionError: it is one
            raise BackendError(f"{self.base_url} did not answer within {self.timeout_s:g} s.") from None
        except openai.APIConnectionError as e:
            cause = e.__cause__ or e
            raise BackendError(
                self._redact(f"Could not connect to {self.base_url}: is the server running? ({cause})")
            ) from None
        except openai.APIStatusError as e:
            # The SDK has parsed the error's body as JSON where it could: back to text for the message.
            body = e.body if isinstance(e.body, str) else json.dumps(e.body) if e.body is not None else e.message
            raise BackendError(self._http_error(e.status_code, body)) from None
        except openai.APIError as e:  # an error event in the stream (`data: {"error": ...}`)
            detail = e.body if e.body is not None else e.message
            raise BackendError(self._redact(f"The endpoint reported an error: {detail}")) from None
        except json.JSONDecodeError as e:
            raise BackendError(f"Malformed stream from the endpoint (bad JSON): {e.doc[:80]!r}") from None
        except openai.OpenAIError as e:
            raise BackendError(self._redact(f"The connection to {self.base_url} failed: {e}")) from None
        finally:
            client.close()
            if out.tokens is None and deltas:
                out.tokens = deltas  # servers without usage in the stream send about one token per delta

    def _http_error(self, status: int, body: str) -> str:
        detail = self._redact(" ".join(body.split())[:300])
        if status in (401, 403):
            return f"The endpoint refused the API key (HTTP {status}): check the key. {detail}"
        if status == 404:
            return f"No such endpoint or model (HTTP 404): check the base URL and model name. {detail}"
        return f"The endpoint answered HTTP {status}: {detail}"


def _choice_text(choice) -> str | None:
    """The new text of a streamed choice: `delta.content` from chat completions, `text` from completions."""
    delta = getattr(choice, "delta", None)
    return delta.content if delta is not None else getattr(choice, "text", None)


def stream_all(
    backends: dict[str, Backend], conversations: dict[str, list[dict]], params: GenerationParams
) -> dict[str, TextStream]:
    """One stream per column. Local columns on the same model share one batched `generate` (mixed adapters)."""
    streams: dict[str, TextStream] = {}
    groups: dict[tuple, list[str]] = {}
    for name, backend in backends.items():
        if isinstance(backend, LocalBackend):
            groups.setdefault((id(backend.pool), backend.spec.key), []).append(name)
        else:
            streams[name] = backend.stream(conversations[name], params)
    threads = threads_per_generation(len(groups))  # local generations run at once: share the cores
    for names in groups.values():
        build_job = partial(_build_local_job, [backends[n] for n in names], [conversations[n] for n in names], params)
        streams.update(zip(names, stream_batch(build_job, len(names), threads)))
    return {name: streams[name] for name in backends}


def token_counters(streams: dict[str, TextStream]) -> dict[str, Callable[[str], int | None]]:
    """`count_tokens` for `merge_streams`: each stream's own count of the tokens it produced."""
    return {name: (lambda _text, s=s: s.tokens) for name, s in streams.items()}


@dataclass
class Column:
    """What one stream has produced so far, for display."""

    text: str = ""
    done: bool = False
    error: str | None = None
    chunks: int = 0
    started: float = 0.0
    first_token_s: float | None = None  # time to first token
    elapsed_s: float = 0.0
    tokens: int | None = None  # set at the end when the caller gave a token counter

    @property
    def tokens_per_s(self) -> float | None:
        if self.tokens is None or self.first_token_s is None:
            return None
        decode_s = self.elapsed_s - self.first_token_s
        return self.tokens / decode_s if decode_s > 0 else None


_DONE = object()


def merge_streams(
    streams: dict[str, Iterator[str]],
    count_tokens: dict[str, Callable[[str], int]] | None = None,
) -> Iterator[dict[str, Column]]:
    """Run each stream in its own thread and yield the state of every column after each new chunk.

    A stream that raises shows its error in its own column; the other columns keep streaming.
    """
    events: queue.Queue = queue.Queue()
    columns = {name: Column(started=time.perf_counter()) for name in streams}
    stop = threading.Event()

    def pump(name: str, it: Iterator[str]) -> None:
        try:
            for chunk in it:
                if stop.is_set():
                    break
                events.put((name, chunk))
        except Exception as e:
            events.put((name, e))
        finally:
            close = getattr(it, "close", None)
            if close:
                close()
            events.put((name, _DONE))

    threads = [threading.Thread(target=pump, args=item, daemon=True) for item in streams.items()]
    for t in threads:
        t.start()
    running = len(threads)
    try:
        while running:
            name, item = events.get()
            col = columns[name]
            now = time.perf_counter() - col.started
            if item is _DONE:
                running -= 1
                col.done, col.elapsed_s = True, now
                if count_tokens and name in count_tokens and col.error is None:
                    col.tokens = count_tokens[name](col.text)
            elif isinstance(item, Exception):
                # Our own errors already say what to do; anything else also needs its type to make sense.
                col.error = str(item) if isinstance(item, FinetuneError) else f"{type(item).__name__}: {item}"
            else:
                col.text += item
                col.chunks += 1
                col.elapsed_s = now
                if col.first_token_s is None:
                    col.first_token_s = now
            yield columns
    finally:
        stop.set()
