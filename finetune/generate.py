"""Streaming generation: text chunks from a model, and several streams merged into one for the UI.

for chunk in stream(model, tokenizer, "### Question:\\nWhat is Lamini?\\n\\n### Answer:\\n"):
    print(chunk, end="", flush=True)

for update in merge_streams({"base": stream(...), "reference": stream(...)}):
    update["base"].text  # everything that column has produced so far
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from finetune.config import GenerationParams


class _CancelCriteria:
    """Stops `generate` between two steps once the consumer is gone or a stop string was seen."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def prompt_inputs(tokenizer, prompts: str | list[str], device) -> dict:
    """Tokenize prompts, adding BOS only where the text does not already start with a special token."""
    prompts = [prompts] if isinstance(prompts, str) else prompts
    special = tuple(t for t in tokenizer.all_special_tokens if t)
    add = not any(p.startswith(special) for p in prompts) if special else True
    tokenizer.padding_side = "left"  # decoder-only batches must end with the prompt's last token
    return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add).to(device)


BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in mixed-adapter batches


def generate_kwargs(tokenizer, params: GenerationParams, model=None, adapter_names: list[str] | None = None) -> dict:
    """Keyword arguments for `model.generate`. On a PEFT model every row names its adapter (or the base)."""
    kwargs = dict(
        max_new_tokens=params.max_new_tokens,
        do_sample=not params.greedy,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        repetition_penalty=params.repetition_penalty,
    )
    if params.greedy:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=None)
    if adapter_names is not None or hasattr(model, "peft_config"):
        kwargs["adapter_names"] = adapter_names or [BASE_ADAPTER]
    return kwargs


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
    if params.seed is not None:
        torch.manual_seed(params.seed)
    with torch.inference_mode():
        out = model.generate(**inputs, **generate_kwargs(tokenizer, params, model, adapter_names))
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


def stream(
    model, tokenizer, prompt: str, params: GenerationParams | None = None, adapter_name: str | None = None
) -> Iterator[str]:
    """Yield the model's continuation of `prompt` chunk by chunk; closing the generator stops generation.

    On a PEFT model, `adapter_name` picks the adapter (None: the base model without any adapter).
    """
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    params = params or GenerationParams()
    inputs = prompt_inputs(tokenizer, prompt, model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    cancel = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            if params.seed is not None:
                torch.manual_seed(params.seed)
            with torch.inference_mode():
                model.generate(
                    **inputs,
                    **generate_kwargs(tokenizer, params, model, [adapter_name] if adapter_name else None),
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_CancelCriteria(cancel)]),
                )
        except BaseException as e:  # re-raised in the consumer's thread
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    stops = StopFilter(params.stop)
    try:
        for chunk in streamer:
            out = stops.push(chunk)
            if out:
                yield out
            if stops.stopped:
                cancel.set()
                break
        else:
            if out := stops.flush():
                yield out
    finally:
        cancel.set()
        thread.join()
    if errors:
        raise errors[0]


def generate_text(model, tokenizer, prompt: str, params: GenerationParams | None = None) -> str:
    return "".join(stream(model, tokenizer, prompt, params))


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
                col.error = f"{type(item).__name__}: {item}"
            else:
                col.text += item
                col.chunks += 1
                col.elapsed_s = now
                if col.first_token_s is None:
                    col.first_token_s = now
            yield columns
    finally:
        stop.set()
