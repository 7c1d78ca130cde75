"""Answers from several models at once: backends for the Arena's columns, and their streams merged for display.

Backends answer a conversation (`[{"role": "user", "content": ...}, ...]`) as a `TextStream`:
`LocalBackend` (a pooled transformers model, optionally with a LoRA adapter) and `OpenAIBackend`
(any OpenAI-compatible server, streamed through the `openai` SDK). `stream_all` starts several at once
and puts every local column that shares one loaded model into ONE batched `generate` (`finetune.generate`), each row
with its own adapter (PEFT mixed-adapter batch), split back into per-column streams:

backends = {"base": LocalBackend(pool, spec, "qa"), "tuned": LocalBackend(pool, spec, "qa", adapter_dir),
            "reference": OpenAIBackend("http://127.0.0.1:8000/v1", "my-model")}
streams = stream_all(backends, {name: [{"role": "user", "content": "What is Lamini?"}] for name in backends}, params)
for states in merge_streams(streams, count_tokens=token_counters(streams)):
    states["base"].text  # everything that column has produced so far
"""

from __future__ import annotations

import json
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from finetune import FinetuneError
from finetune.config import GenerationParams, ModelSpec
from finetune.generate import BatchJob, StopFilter, TextStream, stream_batch, threads_per_generation
from finetune.models import ModelPool
from finetune.templates import Template, conversation_prompt, get_template


class Hint(FinetuneError):
    """Not an error: what a column says in place of an answer it cannot give yet (no tuned model: train one)."""


class BackendError(FinetuneError):
    """A backend could not answer (server down, refused key, timeout, broken stream); shown in its column."""


class Backend(ABC):
    """Answers a conversation (`[{"role": ..., "content": ...}, ...]`, ending with the user's turn) as a stream."""

    @property
    @abstractmethod
    def label(self) -> str:
        """The model's name as shown to users and stored with votes."""

    @abstractmethod
    def stream(self, messages: list[dict], params: GenerationParams) -> TextStream: ...

    @property
    def engine(self) -> str:
        """What computes the answers, for the stats line ("transformers", "llama.cpp", a server's host)."""
        return ""


def column_label(source: str, adapter: str | Path | None, adapter_label: str | None = None) -> str:
    """A local column's model name: the model, plus the adapter's name. The same whichever engine answers, so votes
    for a model add up on one leaderboard row."""
    return source if adapter is None else f"{source} + {adapter_label or Path(adapter).name}"


def template_stops(template: Template, params: GenerationParams) -> tuple[str, ...]:
    """Where a text template's answer ends (its next header, and the caller's stops); a chat template's ends at the
    model's end-of-turn token instead."""
    return () if template.chat else tuple(dict.fromkeys(template.stop + params.stop))


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
        return column_label(self.spec.source, self.adapter, self.adapter_label)

    @property
    def engine(self) -> str:
        return "transformers"

    def stream(self, messages: list[dict], params: GenerationParams) -> TextStream:
        return stream_all({"answer": self}, {"answer": messages}, params)["answer"]


def _local_job(
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
            job.stops[i] = template_stops(template, params)
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
    def engine(self) -> str:
        return self.host

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
        build_job = partial(_local_job, [backends[n] for n in names], [conversations[n] for n in names], params)
        streams.update(zip(names, stream_batch(build_job, len(names), threads)))
    return {name: streams[name] for name in backends}


def token_counters(streams: dict[str, TextStream]) -> dict[str, Callable[[str], int | None]]:
    """`count_tokens` for `merge_streams`: each stream's own count of the tokens it produced."""
    return {name: (lambda _text, s=s: s.tokens) for name, s in streams.items()}


@dataclass
class StreamState:
    """What one stream has produced so far, for display."""

    text: str = ""
    done: bool = False
    error: str | None = None
    hint: str | None = None  # not an error: what the column says in place of an answer (`Hint`)
    chunks: int = 0
    started: float = 0.0
    engine: str = ""  # what answered ("transformers", "llama.cpp", a server's host): `Backend.engine`
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
    engines: dict[str, str] | None = None,
) -> Iterator[dict[str, StreamState]]:
    """Run each stream in its own thread and yield the state of every column after each new chunk.

    A stream that raises shows its error in its own column; the other columns keep streaming. `engines`: what
    answers in each column (`Backend.engine`), kept in its state.
    """
    events: queue.Queue = queue.Queue()
    started = time.perf_counter()
    columns = {name: StreamState(started=started, engine=(engines or {}).get(name, "")) for name in streams}
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
            elif isinstance(item, Hint):
                col.hint = str(item)
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
