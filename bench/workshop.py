"""Workshop capacity: how many participants one machine serves in the Arena, with the real embedded models.

    python bench/workshop.py [--quick] [--users 1,2,4,8,16,24,32] [--engines llama.cpp,transformers]

For each engine of the Arena's local columns (`FINETUNE_ARENA_ENGINE`: llama.cpp, the GGUF files as shipped, all open
answers decoded together; transformers, `FINETUNE_GEN_CONCURRENCY` answers at once), starts the app as `python app.py`
does (its own process, a fresh data dir, the embedded Gemma-3-270M base and SmolLM2-135M-Instruct reference) on
127.0.0.1, then for each N drives N simulated participants, each a gradio_client like a browser in the room: ask a
held-out lamini_docs question in blind mode, wait for the streamed answer of all three columns, vote. The N ask at the
same moment (the host says "go"), each `--answers` // N questions in a row (at least one), so every N is measured on
about the same number of answers.

Prints per N: answers per minute, p50/p95 time to the first token and to the full answer (as a participant waits:
the queue included), errors; then per engine the largest N whose p95 full answer stays under 30 s (an engine stops at
the first N past it: more participants only wait longer). `--quick`: N = 1, 2, 4 and 16 new tokens (a few minutes).
The tuned column uses the newest run trained on Gemma, or a random LoRA (r=16).
With FINETUNE_SERVE_URL set (see README, "A workshop room"), base and tuned come from that serving engine.
The simulated participants run on the same cores as the app: their share is small (a poll every 50 ms each) but
not zero, and the load average printed with the table says what else was running.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from common import ROOT, load_note, machine, p50, per_cpu_class, percentile, pick_adapter, table

LIMIT_S = 30.0  # a participant who waits longer than this for an answer stops following the workshop
POLL_S = 0.05


@dataclass
class Answer:
    """One participant's round, timed from the click on Ask."""

    first_s: float | None = None  # first token of any column on screen
    full_s: float | None = None  # every column done
    error: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def app_server(env: dict[str, str], timeout_s: float = 300.0) -> Iterator[str]:
    """`python app.py` on a free loopback port with `env` added to this process's; yields its URL once it serves."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    cmd = [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)]
    with tempfile.TemporaryDirectory(prefix="workshop-app-") as tmp, open(Path(tmp) / "app.log", "w+") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url, timeout=2).status_code == 200:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the app did not start:\n{(Path(tmp) / 'app.log').read_text()[-3000:]}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False, analytics_enabled=False, download_files=False)


def _text(content) -> str:
    """A chat message's text: gradio 6 gives it as a string or a list of typed parts."""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict)) if isinstance(content, list) else ""


def _answered(output) -> bool:
    """Whether an `/arena` update shows answer text in any of its three chats."""
    for chat in output[:3]:
        messages = chat.get("value", []) if isinstance(chat, dict) else chat  # the first update sets the titles too
        if any(m.get("role") == "assistant" and _text(m.get("content")).strip() for m in messages or []):
            return True
    return False


def ask_and_vote(browser, question: str, max_new_tokens: int, adapter: str) -> Answer:
    """One round as a participant does it: ask (blind), watch the answer stream in, vote."""
    t0 = time.perf_counter()
    job = browser.submit(
        question=question, max_new_tokens=max_new_tokens, greedy=True, blind=True, adapter=adapter, api_name="/arena"
    )
    answer = Answer()
    while not job.done():
        if answer.first_s is None and any(_answered(o) for o in job.outputs()):
            answer.first_s = time.perf_counter() - t0
        time.sleep(POLL_S)
    try:
        result = job.result()
    except Exception as e:  # noqa: BLE001 (counted as this round's error)
        answer.error = f"{type(e).__name__}: {e}"
        return answer
    answer.full_s = time.perf_counter() - t0
    answer.first_s = answer.first_s if answer.first_s is not None else answer.full_s
    failed = [s for s in result[3:6] if "Error" in s]
    if failed:
        answer.error = failed[0]
        return answer
    try:
        browser.predict("A", api_name="/vote")
    except Exception as e:  # noqa: BLE001
        answer.error = f"vote: {type(e).__name__}: {e}"
    return answer


def at_once(target, calls: list[tuple]) -> float:
    """Seconds until `target(*args)` has returned for every args of `calls`, each started in its own thread at once."""
    threads = [threading.Thread(target=target, args=args) for args in calls]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def measure(url: str, n: int, questions: list[str], max_new_tokens: int, adapter: str, rounds: int = 1) -> dict:
    """N participants ask at the same moment, `rounds` questions each, one after the other; one table row."""
    browsers = [client(url) for _ in range(n)]  # connected before the clock starts, as open browser tabs are
    answers: list[Answer] = []
    lock, go = threading.Lock(), threading.Barrier(n)

    def participant(i: int) -> None:
        go.wait()
        for r in range(rounds):
            answer = ask_and_vote(browsers[i], questions[(i * rounds + r) % len(questions)], max_new_tokens, adapter)
            with lock:
                answers.append(answer)

    wall = at_once(participant, [(i,) for i in range(n)])
    served = [a for a in answers if a.error is None]
    first, full = [a.first_s for a in served], [a.full_s for a in served]
    return {
        "participants": n,
        "answers": len(served),
        "errors": len(answers) - len(served),
        "answers/min": 60 * len(served) / wall,
        "first token p50 s": p50(first),
        "first token p95 s": percentile(first, 0.95),
        "full answer p50 s": p50(full),
        "full answer p95 s": percentile(full, 0.95),
        "wall s": wall,
        "first error": next((a.error for a in answers if a.error), "")[:120],
    }


def capacity(rows: list[dict], limit_s: float = LIMIT_S) -> int | None:
    """The largest N served without errors whose p95 full answer stays under `limit_s`."""
    fits = [r["participants"] for r in rows if not r["errors"] and r["full answer p95 s"] <= limit_s]
    return max(fits, default=None)


def engine_alone(n: int, questions: list[str], max_new_tokens: int, adapter: str) -> dict:
    """N rounds (base, tuned and reference answers, greedy) asked of the llama.cpp engine at once, in this process:
    no web server, no participants; what decoding alone takes."""
    from finetune import llamacpp
    from finetune.backends import template_stops
    from finetune.config import GenerationParams
    from finetune.generate import TextStream
    from finetune.models import BASE_MODEL, REFERENCE_MODEL, embedded_gguf
    from finetune.templates import conversation_prompt, get_template

    engine = llamacpp.LlamaEngine()
    base, ref = engine.model(embedded_gguf(BASE_MODEL)), engine.model(embedded_gguf(REFERENCE_MODEL))
    lora = llamacpp.lora_gguf(adapter)
    params = GenerationParams(max_new_tokens=max_new_tokens, stop=())
    tokens = []

    def column(model, lora_, question: str, template: str) -> None:
        chosen = get_template(template)
        prompt = conversation_prompt(chosen, [{"role": "user", "content": question}], model.tokenizer)
        stops = template_stops(chosen, params)
        stream = TextStream(lambda out: engine.answer(model, lora_, prompt, params, stops, out))
        "".join(stream)
        tokens.append(stream.tokens)

    columns = [(m, lo, questions[i % len(questions)], t) for i in range(n)
               for m, lo, t in ((base, None, "qa"), (base, lora, "qa"), (ref, None, "chat"))]  # fmt: skip
    column(base, lora, "Warm up", "qa")
    tokens.clear()
    wall = at_once(column, columns)
    return {"rounds": n, "s": wall, "tokens/s": sum(tokens) / wall}


def held_out_questions() -> list[str]:
    from finetune.config import DataConfig
    from finetune.data import load_splits

    test = load_splits(DataConfig("lamini_docs"))["test"]["instruction"]
    return [q for q in test if len(q.split()) >= 4]  # the data set also holds a few junk rows like "???"


def main() -> None:
    if not per_cpu_class():  # ran once per CPU class, each in its own child (--cpu-class native,avx2)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 1, 2, 4; 16 new tokens; 4 answers per N.")
    parser.add_argument("--users", default="1,2,4,8,16,24,32", help="The N to measure, comma-separated.")
    parser.add_argument("--engines", default="llama.cpp,transformers", help="Engines of the local columns.")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--answers", type=int, default=8, help="Answers per N at least (N participants ask N).")
    parser.add_argument("--adapter", help="Adapter folder for the tuned column (default: newest run, else random).")
    args = parser.parse_args()
    users = [int(n) for n in args.users.split(",") if n.strip()]
    if args.quick:
        users, args.max_new_tokens, args.answers = [n for n in users if n <= 4], 16, 4

    from finetune.arena import arena_concurrency
    from finetune.config import ModelSpec
    from finetune.models import BASE_MODEL, load_model
    from finetune.settings import Settings

    print(f"machine: {machine()}; {load_note()} at start")
    questions = held_out_questions()
    serving = os.environ.get("FINETUNE_SERVE_URL") or "this app's process"
    rows, headlines, alone = [], [], []
    with tempfile.TemporaryDirectory(prefix="workshop-") as tmp:
        adapter, note = pick_adapter(BASE_MODEL, lambda: load_model(ModelSpec(BASE_MODEL))[0], tmp, args.adapter)
        for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
            if engine == "llama.cpp":  # decoding alone, before any server or participant: one round, and the most
                alone = [engine_alone(k, questions, args.max_new_tokens, str(adapter.path)) for k in (1, max(users))]
            env = {"FINETUNE_HOME": str(Path(tmp) / engine), "GRADIO_ANALYTICS_ENABLED": "False",
                   "FINETUNE_ARENA_ENGINE": engine}  # fmt: skip
            env["FINETUNE_MODEL_CACHE"] = os.environ.get("FINETUNE_MODEL_CACHE") or str(
                Path.home() / ".cache" / "finetune-workbench" / "models"
            )  # the converted models stay where they are
            concurrency = arena_concurrency(Settings.from_env({**os.environ, **env}))
            started = time.perf_counter()
            with app_server(env) as url:
                print(f"{engine}: app served in {time.perf_counter() - started:.1f} s; tuned column: {note}")
                warm = ask_and_vote(client(url), "What is Lamini?", args.max_new_tokens, str(adapter.path))
                if warm.error:  # loads both models and the adapter, off the clock
                    sys.exit(f"warm-up round failed: {warm.error}")
                measured = []
                for n in users:
                    rounds = max(1, args.answers // n)
                    row = measure(url, n, questions, args.max_new_tokens, str(adapter.path), rounds)
                    measured.append({"engine": engine, "answered at once": concurrency, **row})
                    print(f"{engine} N={n}: {row['answers']} answers, {row['errors']} errors", flush=True)
                    if row["errors"] or row["full answer p95 s"] > LIMIT_S:
                        break  # more participants only wait longer
            rows += measured
            fits = capacity(measured)
            worst = next((r for r in measured if r["participants"] == fits), None)
            bound = "at least " if fits is not None and fits == max(users) else ""  # the largest N measured fits
            at = f" ({worst['full answer p95 s']:.1f} s p95, {worst['answers/min']:.1f} answers/min)" if worst else ""
            headlines.append(f"{engine} {bound}{fits or 0} participants{at}")
    print(
        f"\n{args.max_new_tokens} new tokens at most, greedy, blind rounds with a vote; base and tuned on {serving}; "
        "'answered at once': Arena rounds the app serves together, the others queued"
    )
    print(table(rows, "Workshop: N participants ask the Arena at once"))
    print(f"{load_note()} at end")
    if alone:
        print(table(alone, "llama.cpp alone: N rounds asked of the engine at once in one process (no server)"))
    print(f"headline: capacity (largest N with p95 full answer <= {LIMIT_S:.0f} s): {'; '.join(headlines)}")


if __name__ == "__main__":
    main()
