"""The arena: base, tuned (base + LoRA adapter) and reference models answer side by side; blind votes; leaderboard.

    pool = ModelPool()
    setup = ArenaSetup(base_model="gemma-3-270m", adapter=list_adapters()[0].path)
    backends = make_backends(pool, setup)  # base and tuned share one model and one batched generate
    session = ArenaSession.start(blind=True)
    for columns in ask(backends, session, "What is Lamini?", GenerationParams(stop=())):
        print({role: col.text for role, col in columns.items()})
    VoteStore().add(session.vote("A"))  # "A", "B", "C", "tie" or "bad"
    votes = VoteStore().votes()
    for row in leaderboard(battles(votes), vote_counts(votes)): print(row)  # finetune.ratings.leaderboard

Votes live in SQLite (`$FINETUNE_HOME/arena.sqlite`, `finetune.votes`). Each vote becomes pairwise battles (the best
answer beats the two others; tie and all-bad are ties between every pair), which `finetune.ratings` rates, and
preference pairs (the best answer over each other one), which DPO learns from (`finetune.preferences`, `finetune.dpo`).
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import yaml

from finetune import FinetuneError, home, llamacpp
from finetune.backends import (
    Backend,
    BackendError,
    Hint,
    LocalBackend,
    OpenAIBackend,
    StreamState,
    merge_streams,
    stream_all,
    token_counters,
)
from finetune.config import DataConfig, GenerationParams, ModelSpec
from finetune.engine import ServeEngine, lora_name
from finetune.generate import TextStream
from finetune.hardware import inference_dtype_name, machine
from finetune.models import ModelPool, embedded_gguf, embedded_name
from finetune.ratings import Battle
from finetune.runs import ADAPTER_CONFIG, RunDir, adapter_label, is_adapter, list_runs, run_of_adapter
from finetune.security import check_upload_size, extract_zip, safe_name
from finetune.settings import Settings
from finetune.votes import ROLES, Vote

T = TypeVar("T")
LABELS = ("A", "B", "C")  # blind names, by display position
OUTCOMES = ("tie", "bad")  # votes that are not "this answer is best"
COURSE_QUESTIONS = ("What do you think of Mars?",)


# --- adapters on disk --------------------------------------------------------------------------------


@dataclass
class AdapterInfo:
    """A LoRA adapter the tuned column can use, and what it was trained with."""

    name: str  # run id (`<run id> · step N` for a checkpoint's), or the name of an uploaded adapter
    path: Path
    base_model: str  # ModelSpec source of the model it was trained on
    template: str  # the prompt template it was trained with
    origin: str  # "run", "checkpoint" or "upload"
    method: str = "sft"  # how its run trained it: "sft", or "dpo" (from votes: `finetune.dpo`)


def uploads_dir() -> Path:
    return home() / "adapters"


def _base_from_adapter_config(adapter: Path) -> str:
    source = json.loads((adapter / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or ""
    # Older adapters trained on an embedded model name its converted cache folder: map it back to the short name.
    return embedded_name(source) or source


def adapter_info(path: str | Path, name: str | None = None, origin: str = "upload") -> AdapterInfo:
    """Describe the adapter folder `path`; the config of the run it is in (its final adapter or a checkpoint's) gives
    its model and template."""
    path = Path(path)
    if not is_adapter(path):
        raise FinetuneError(f"No LoRA adapter in {path} (adapter_config.json is missing).")
    base_model, template, method = _base_from_adapter_config(path), "qa", "sft"
    found = run_of_adapter(path)
    if found:
        # Read as plain YAML, not as a TrainConfig: an adapter trained by another version still shows up.
        config = yaml.safe_load(found[0].config_file.read_text()) or {}
        base_model = (config.get("model") or {}).get("source") or base_model
        template = (config.get("data") or {}).get("template") or template
        method = config.get("method") or method
    default = _run_adapter_name(*found) if found else path.parent.name
    return AdapterInfo(name or default, path, base_model, template, origin, method)


def _run_adapter_name(run: RunDir, step: int | None) -> str:
    # The final adapter keeps the bare run id: the model label of the votes already cast with it.
    return run.run_id if step is None else adapter_label(run.run_id, step)


def list_adapters() -> list[AdapterInfo]:
    """Adapters of training runs (newest run first: its final adapter, then its checkpoints' newest first), then
    uploaded ones."""
    runs = []
    for i in list_runs():
        if i.has_adapter:
            runs.append(adapter_info(i.run.adapter_dir, i.run_id, "run"))
        for c in reversed(i.run.checkpoints()):
            runs.append(adapter_info(c.path, origin="checkpoint"))
    uploads = sorted(p for p in uploads_dir().glob("*") if is_adapter(p))
    return runs + [adapter_info(p, p.name, "upload") for p in uploads]


ADAPTER_FILES = (ADAPTER_CONFIG, "adapter_model.safetensors")


def install_adapter(files: list[str | Path], name: str) -> AdapterInfo:
    """Copy an uploaded adapter (a .zip, or its adapter_config.json + adapter_model.safetensors) to the uploads dir."""
    safe = safe_name(name, fallback="")
    if not safe:
        raise FinetuneError("Give the uploaded adapter a name (letters, digits, - or _).")
    target = uploads_dir() / safe
    taken = FinetuneError(f"An adapter named {safe!r} exists already: choose another name.")
    if target.exists():
        raise taken
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{safe}-", dir=target.parent))  # its own: two uploads at once never mix
    try:
        for f in map(Path, files):
            check_upload_size(f)
            if f.suffix == ".zip":
                # Member paths, links, file count and unpacked size are checked before anything is written.
                unpacked = extract_zip(f, tmp / "unpacked")
                for a in ADAPTER_FILES:
                    found = sorted(unpacked.rglob(a))
                    if found:
                        found[0].replace(tmp / a)
            elif f.name in ADAPTER_FILES or f.name.endswith(ADAPTER_FILES):
                shutil.copyfile(f, tmp / next(a for a in ADAPTER_FILES if f.name.endswith(a)))
        missing = [a for a in ADAPTER_FILES if not (tmp / a).is_file()]
        if missing:
            raise FinetuneError(
                f"The upload lacks {', '.join(missing)}: upload both files of a PEFT adapter or a .zip."
            )
        shutil.rmtree(tmp / "unpacked", ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:  # another participant's upload took the name meanwhile
            raise taken from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return adapter_info(target, safe, "upload")


def resolve_adapter(source: str | Path) -> AdapterInfo:
    """An adapter folder, or a Hub id like 'user/my-lora' downloaded once into the uploads dir."""
    path = Path(source).expanduser()
    if path.is_dir() or str(source).startswith(("/", ".", "~")) or str(source).count("/") != 1:
        return adapter_info(path)
    target = uploads_dir() / str(source).replace("/", "--")
    if not is_adapter(target):
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(str(source), local_dir=target, allow_patterns=list(ADAPTER_FILES))
        except Exception as e:  # noqa: BLE001 (offline, unknown repo, no access: all mean the same to the user)
            shutil.rmtree(target, ignore_errors=True)
            raise FinetuneError(f"Could not download adapter {source!r} from the Hub: {str(e).splitlines()[0]}") from e
    return adapter_info(target, target.name, "upload")


@lru_cache(maxsize=1)
def example_questions(n: int = 4) -> tuple[str, ...]:
    """The course's question plus the first held-out lamini_docs questions (never seen in training)."""
    from finetune.data import load_splits

    try:
        test = load_splits(DataConfig("lamini_docs"))["test"]["instruction"]
    except FinetuneError:
        test = []
    questions = [q for q in test if len(q.split()) >= 4]  # the data set also holds a few junk rows like "???"
    return COURSE_QUESTIONS + tuple(questions[:n])


# --- columns -----------------------------------------------------------------------------------------


@dataclass
class ArenaSetup:
    """Which model answers in each column."""

    base_model: str = "gemma-3-270m"
    adapter: str | Path | None = None  # adapter folder (or Hub id) for the tuned column
    template: str | None = None  # prompt template of base and tuned; None: the adapter's own
    reference_model: str = "smollm2-135m-instruct"  # used when no endpoint is given
    endpoint_url: str = ""  # an OpenAI-compatible server instead of the local reference model
    endpoint_model: str = ""
    api_key: str = field(default="", repr=False)  # never stored or shown
    serve_url: str = ""  # a serving engine (vLLM with LoRA) for base and tuned instead of this process
    serve_model: str = ""  # the base model's name on that server; empty: `base_model`
    serve_fallback: bool = False  # when the serving engine fails, base and tuned answer in this process
    engine: str = "auto"  # local columns on "llama.cpp", "transformers", or "auto" (`local_engine`)


class Unavailable(Backend):
    """A column that cannot run (e.g. no adapter chosen): its stream raises a message saying what to do, as an error
    or, with `hint`, as what the column shows in place of an answer."""

    def __init__(self, message: str, hint: bool = False):
        self.message, self.hint = message, hint

    @property
    def label(self) -> str:
        return "(none)"

    def stream(self, messages: list[dict], params: GenerationParams) -> TextStream:
        def fail(out: TextStream) -> Iterator[str]:
            raise (Hint if self.hint else FinetuneError)(self.message)
            yield  # a generator, so the error is raised in the reader's thread

        return TextStream(fail)


# Not an error: what the tuned column shows (in its place) before there is an adapter to answer with.
NO_ADAPTER = (
    "No tuned model yet: press **Fine-tune in 5 minutes** on the Start tab (or train one in the Train tab), "
    "or pick an adapter under *Models and settings*."
)


def measured_note(adapter: str | Path | None) -> str:
    """What the guided path measured of a run's final adapter, for the tuned column's title ("" when nothing was)."""
    found = run_of_adapter(adapter) if adapter else None
    guided = found[0].read_guided() if found and found[1] is None else None
    if not guided:
        return ""
    before, after = guided["loss_before"], guided["loss_after"]
    return f"held-out loss {before:.2f} → {after:.2f} ({-100 * guided['reduction']:+.0f}%)"


def _serve_engine(url: str, model: str = "") -> ServeEngine:
    """The serving engine at `url`, refusing adapters above its rank (FINETUNE_SERVE_MAX_LORA_RANK)."""
    return ServeEngine(url, model, max_lora_rank=Settings.current().serve_max_lora_rank)


def register_adapter(info: AdapterInfo, url: str) -> str:
    """Load `info` into the serving engine at `url`; returns its name there."""
    name = lora_name(info.name, info.path)
    _serve_engine(url).register(name, info.path)
    return name


def serve_finished_runs(url: str) -> Callable[[RunDir], str] | None:
    """`Runner(on_finished=...)`: each finished run's adapter is loaded into the serving engine at `url` at once, so
    the first Arena round with it does not wait; None without a serving engine."""
    if not url.strip():
        return None

    def register(run: RunDir) -> str:
        try:
            name = register_adapter(adapter_info(run.adapter_dir, run.run_id, "run"), url)
        except FinetuneError as e:
            return f"Not loaded into the serving engine: {e}"
        return f"Loaded into the serving engine as {name!r}."

    return register


def _served_columns(setup: ArenaSetup, info: AdapterInfo | None, template: str) -> tuple[dict[str, Backend], str]:
    """Base and tuned on the serving engine (the adapter registered unless the server lists it), and the first
    error ("" when none): a column that cannot be served says why."""
    engine = _serve_engine(setup.serve_url, setup.serve_model or setup.base_model)
    try:
        served = engine.models()
    except BackendError as e:
        return dict.fromkeys(("base", "tuned"), Unavailable(str(e))), str(e)
    columns: dict[str, Backend] = {"base": engine.backend(template), "tuned": Unavailable(NO_ADAPTER, hint=True)}
    if info is not None:
        name = lora_name(info.name, info.path)
        try:
            if name not in served:
                engine.register(name, info.path)
        except BackendError as e:
            columns["tuned"] = Unavailable(str(e))
            return columns, str(e)
        host = columns["base"].host
        columns["tuned"] = engine.backend(template, name, label=f"{engine.model} + {info.name} @ {host}")
    return columns, ""


ENGINES = ("auto", "llama.cpp", "transformers")


def local_engine(choice: str = "auto") -> str:
    """The engine of the Arena's local columns for `choice`: auto is llama.cpp where llama-cpp-python is installed
    and the app's models run on the CPU (on a GPU, transformers uses it), else transformers."""
    if choice not in ENGINES:
        raise FinetuneError(f"Unknown engine {choice!r}: use {', '.join(ENGINES)}.")
    if choice == "auto":
        return "llama.cpp" if llamacpp.available() and machine().app_device() == "cpu" else "transformers"
    if choice == "llama.cpp" and not llamacpp.available():
        raise FinetuneError(
            "llama.cpp is not installed here: `pip install llama-cpp-python` (it builds with a C compiler and "
            "cmake), or choose the transformers engine."
        )
    return choice


def arena_concurrency(settings: Settings) -> int:
    """Arena rounds answered at once: FINETUNE_GEN_CONCURRENCY, else as many as llama.cpp decodes together (it
    batches every open answer) when the base model answers on it, or 2 on transformers (two generations already
    share the cores)."""
    if settings.generation_concurrency > 0:
        return settings.generation_concurrency
    try:
        engine = local_engine(settings.arena_engine)
    except FinetuneError:  # llama.cpp asked for but missing: each round says so
        engine = "transformers"
    return llamacpp.SLOTS if engine == "llama.cpp" and embedded_gguf(settings.base_model) else 2


def _local_column(
    pool: ModelPool, source: str, template: str, engine: str, info: AdapterInfo | None = None,
    warn: Callable[[str], None] | None = None,
) -> Backend:  # fmt: skip
    """A local column on `engine`: llama.cpp where the model has a GGUF file (and the adapter exports to a GGUF
    LoRA), else transformers, `warn` told why when llama.cpp was asked for."""
    adapter, name = (info.path, info.name) if info is not None else (None, None)
    gguf = embedded_gguf(source) if engine == "llama.cpp" else None
    if gguf is not None:
        try:
            lora = llamacpp.lora_gguf(adapter) if adapter is not None else None
        except FinetuneError as e:
            if warn is not None:
                warn(f"The tuned column answers with transformers: {e}")
        else:
            return llamacpp.LlamaBackend(gguf, source, template, lora, adapter, name)
    return LocalBackend(pool, ModelSpec(source, dtype=inference_dtype_name()), template, adapter, name)


def make_backends(pool: ModelPool, setup: ArenaSetup, warn: Callable[[str], None] | None = None) -> dict[str, Backend]:
    """The three columns. Base and tuned use the adapter's training template; the reference its chat template.

    Local columns answer on llama.cpp or transformers (`setup.engine`, `local_engine`). With `setup.serve_url`, base
    and tuned come from that serving engine; `warn` hears when they fall back to this process
    (`setup.serve_fallback`)."""
    engine = local_engine(setup.engine)
    info = resolve_adapter(setup.adapter) if setup.adapter else None
    template = setup.template or (info.template if info else "qa")
    backends: dict[str, Backend] = {"base": _local_column(pool, setup.base_model, template, engine)}
    if info is None:
        backends["tuned"] = Unavailable(NO_ADAPTER, hint=True)
    else:
        backends["tuned"] = _local_column(pool, info.base_model, template, engine, info, warn)
    if setup.serve_url.strip():
        served, error = _served_columns(setup, info, template)
        if not error or not setup.serve_fallback:
            backends.update(served)
        elif warn is not None:
            warn(f"{error} Base and tuned answer in this app instead.")
    if setup.endpoint_url.strip():
        backends["reference"] = OpenAIBackend(setup.endpoint_url, setup.endpoint_model, setup.api_key or None)
    else:
        backends["reference"] = _local_column(pool, setup.reference_model, "chat", engine)
    return backends


# --- a session: per-user histories, blind order --------------------------------------------------------


@dataclass
class ArenaSession:
    """One user's arena state (kept in `gr.State`, never in module globals)."""

    histories: dict[str, list[dict]] = field(default_factory=lambda: {r: [] for r in ROLES})
    order: list[str] = field(default_factory=lambda: list(ROLES))  # display position -> role
    blind: bool = False
    voted: bool = False
    models: dict[str, str] = field(default_factory=dict)  # role -> model label of the current round
    notes: dict[str, str] = field(default_factory=dict)  # role -> what was measured of it, shown beside its name
    params: dict = field(default_factory=dict)

    @classmethod
    def start(cls, blind: bool = False, rng: random.Random | None = None) -> ArenaSession:
        order = list(ROLES)
        if blind:
            (rng or random.Random()).shuffle(order)
        return cls(order=order, blind=blind)

    def reveal(self, label: str) -> str:
        """The role behind a blind name ("A", "B", "C")."""
        try:
            return self.order[LABELS.index(label)]
        except ValueError:
            raise FinetuneError(f"Unknown answer {label!r}: vote A, B, C, tie or bad.") from None

    @property
    def question(self) -> str:
        users = [m["content"] for h in self.histories.values() for m in h if m["role"] == "user"]
        return users[-1] if users else ""

    def vote(self, choice: str) -> Vote:
        """Record the user's choice ("A"/"B"/"C", or "tie"/"bad") for the current round; names are then revealed."""
        if self.voted:
            raise FinetuneError("You already voted on this round: ask a new question.")
        if not self.question:
            raise FinetuneError("Ask a question before voting.")
        winner = choice if choice in OUTCOMES else self.reveal(choice)
        answers = {r: _last_answer(h) for r, h in self.histories.items() if r in self.models}
        history = {r: h for r, h in self.histories.items() if r in self.models}
        self.voted = True
        return Vote(winner, self.question, answers, dict(self.models), self.params, list(self.order), history)


def _last_answer(messages: list[dict]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), "")


def ask(
    backends: dict[str, Backend],
    session: ArenaSession,
    question: str,
    params: GenerationParams,
) -> Iterator[dict[str, StreamState]]:
    """Stream every column's answer to `question` (each with its own history); the session keeps the answers."""
    question = question.strip()
    if not question:
        raise FinetuneError("Type a question first.")
    if session.voted:  # a vote ends a blind round: the next question starts a fresh one
        fresh = ArenaSession.start(session.blind)
        session.histories, session.order, session.voted = fresh.histories, fresh.order, False
    conversations = {r: session.histories[r] + [{"role": "user", "content": question}] for r in backends}
    session.models = {r: b.label for r, b in backends.items()}
    session.params = asdict(params)
    streams = stream_all(backends, conversations, params)
    engines = {role: backend.engine for role, backend in backends.items()}
    for columns in merge_streams(streams, token_counters(streams), engines):
        # The histories always hold what is on screen, so a follow-up question continues each column's own thread.
        for role, messages in conversations.items():
            session.histories[role] = messages + [{"role": "assistant", "content": columns[role].text.strip()}]
        yield columns


class RoundClock:
    """How long the last rounds took (question to last column done), for the wait shown to users in the queue."""

    def __init__(self, keep: int = 20):
        self._times: deque[float] = deque(maxlen=keep)
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self._times.append(seconds)

    def average_s(self) -> tuple[float, int] | None:
        """(mean seconds, rounds it is the mean of); None before the first round."""
        with self._lock:
            times = list(self._times)
        return (sum(times) / len(times), len(times)) if times else None


_NOTHING = object()


class Pace:
    """How often the Arena's rounds in flight update their screens: together at most `per_s` updates a second, so each
    of N rounds waits N / per_s seconds between two (the last state of a round is always sent). One update costs the
    app's Python about 15 ms (the three chats built, diffed and sent): 16 rounds streaming every token took more of
    2 cores than llama.cpp's decoding of them (`bench/workshop.py`)."""

    def __init__(self, per_s: float = 20.0, clock: Callable[[], float] = time.monotonic):
        self.per_s, self.clock = per_s, clock
        self.rounds = 0
        self._lock = threading.Lock()

    def paced(self, updates: Iterator[T]) -> Iterator[T]:
        """`updates` thinned to this round's share; the first and the last always pass."""
        with self._lock:
            self.rounds += 1
        try:
            last, held = float("-inf"), _NOTHING
            for update in updates:
                now = self.clock()
                if now - last >= self.rounds / self.per_s:
                    last, held = now, _NOTHING
                    yield update
                else:
                    held = update
            if held is not _NOTHING:
                yield held
        finally:
            with self._lock:
                self.rounds -= 1


# --- votes as battles ---------------------------------------------------------------------------------


def battles(votes: list[Vote]) -> list[Battle]:
    """Pairwise battles of a list of votes: the best answer beats each other one; tie and all-bad tie every pair."""
    out: list[Battle] = []
    for v in votes:
        roles = [r for r in ROLES if r in v.models]
        for i, a in enumerate(roles):
            for b in roles[i + 1 :]:
                if v.models[a] == v.models[b]:
                    continue  # the same model in two columns: no information
                outcome = "a" if v.winner == a else "b" if v.winner == b else "tie"
                if v.winner in (a, b) or v.winner in OUTCOMES:
                    out.append((v.models[a], v.models[b], outcome))
    return out


def vote_counts(votes: list[Vote]) -> dict[str, dict[str, int]]:
    """Per model label: the votes it took part in, and how often it was the best answer."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"votes": 0, "best": 0})
    for v in votes:
        for role, model in v.models.items():
            counts[model]["votes"] += 1
            counts[model]["best"] += v.winner == role
    return dict(counts)
