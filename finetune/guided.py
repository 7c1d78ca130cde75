"""The guided path, "Fine-tune in 5 minutes": one click from a fresh start to a tuned model in the Arena.

    from finetune.guided import run_guided
    for step in run_guided(runner, pool):          # prepare -> train -> evaluate -> arena
        print(step.step, step.message)
    step.result  # {"loss_before": ..., "loss_after": ..., "reduction": ..., "adapter": ..., "question": ...}
    # ... the user votes blind in the Arena on 10 answers of the guided adapter, then:
    for step in Guide(runner, pool).learn_from_votes(step.run_id):   # vote: a short DPO run on those votes
        print(step.step, step.message)

or `python bench/quickstart.py`, which times it. Every step uses the manual path's own parts: `check_config` and
`load_splits` (Data tab), `Runner.submit` (the Train tab's train_start), the pooled base model with the adapter
attached and `finetune.evaluate.answer_losses` (Evaluate tab), and the adapter folder the Arena lists.

Everything needed to resume is on disk: the run's status tells the step, the measured losses are kept in the run
folder (`RunDir.read_guided`), and the vote step's DPO run names the guided run as its `base_adapter`, so
`follow(run_id)` picks a guided run up again after a page reload or an app restart, with the training still
running in its own process.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from finetune import FinetuneError
from finetune.config import RECIPES, TrainConfig, load_train_config
from finetune.hardware import Machine, machine
from finetune.models import ModelPool
from finetune.plan import estimate_run, forward_seconds
from finetune.preferences import adapter_votes, preference_pairs, write_pairs
from finetune.runner import Runner
from finetune.runs import ACTIVE_STATES, RunDir, exports_dir
from finetune.settings import Settings
from finetune.spaces import gpu
from finetune.votes import VoteStore

RECIPE = RECIPES / "quickstart_cpu.yaml"
DPO_RECIPE = RECIPES / "dpo_votes.yaml"
STEPS = ("prepare", "train", "evaluate", "arena", "vote")
VOTES_NEEDED = 10  # blind votes on the guided adapter before the vote step trains on them
STEP_TITLES = {
    "prepare": "Prepare the data",
    "train": "Train a LoRA adapter",
    "evaluate": "Measure held-out loss",
    "arena": "Compare in the Arena",
    "vote": f"Vote on {VOTES_NEEDED} answers, then train on your votes",
}
HELDOUT_QUESTIONS = 40  # a fixed subset (the first 40) of the 140 held-out lamini_docs questions
TOTAL_MINUTES = 5.0  # from the click to the adapter in the Arena
SETUP_SECONDS = 20.0  # processes, imports, model and data loads, polling: 15 s measured on a 2-core CPU
BUDGET_MARGIN = 1.15  # the estimates are within 10-15% (bench/eta.py)
MEASURE_GPU_SECONDS = 60  # ZeroGPU budget of the held-out measurement (80 short rows: seconds on a GPU)


@dataclass
class GuidedStep:
    """Where a guided run is: `step` is one of STEPS; `done` once the Arena is ready (and again once the vote step's
    DPO adapter is), `error` when it failed. `run_id` is the guided (SFT) run's; `status` the run training now."""

    step: str
    message: str
    run_id: str | None = None
    status: dict = field(default_factory=dict)  # the training run's status
    result: dict | None = None  # held-out losses and the adapter, from the evaluate step on
    done: bool = False
    error: bool = False

    @property
    def index(self) -> int:
        return STEPS.index(self.step)


def guided_config(**overrides) -> TrainConfig:
    """The quickstart recipe, its training minutes fitted to this machine (`fit_budget`); `overrides` replace
    top-level fields (tests: model, max_steps)."""
    cfg = load_train_config(RECIPE)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg.name = cfg.name or "quickstart"
    return fit_budget(cfg)


def fit_budget(cfg: TrainConfig, m: Machine | None = None) -> TrainConfig:
    """The training minutes that leave room, on this machine, for the rest of the path (set-up, the held-out
    measurement before and after), so that it all ends within TOTAL_MINUTES; the recipe's max_minutes is the most.
    The run's own set-up (competitor tokens, the timed step) is inside its minutes: it plans its steps on what is left.
    Unchanged where there is no estimate (a GPU: fast anyway)."""
    m = m or machine()
    estimate = estimate_run(cfg, m)
    if estimate.step_s is None or estimate.shape is None:
        return cfg
    rows = 2 * HELDOUT_QUESTIONS  # base and tuned rows of the data's mean length, logits over the whole vocabulary
    measure = 0.0  # on a GPU (ZeroGPU: the app's models, beside training on the CPU), seconds
    if m.gpu_for(m.app_device()) is None:
        measure = forward_seconds(m, estimate.shape, rows * estimate.row_tokens, rows * estimate.row_answers,
                                  estimate.shape.vocab, m.inference_dtype())  # fmt: skip
    other = BUDGET_MARGIN * (SETUP_SECONDS + measure)
    cfg.max_minutes = round(max(0.5, min(cfg.max_minutes, (TOTAL_MINUTES * 60 - other) / 60)), 2)
    return cfg


def check_and_split(cfg: TrainConfig) -> str:
    """Load lamini_docs with the Q/A template and split it, as the Data tab does; a sentence for the user."""
    from finetune.data import load_splits
    from finetune.train import check_config

    check_config(cfg)  # the same checks as the Train button: a bad setup fails here, before any process starts
    splits = load_splits(cfg.data)
    return (
        f"{cfg.data.source} with the {cfg.data.template} template: {len(splits['train'])} training pairs, "
        f"{len(splits['test'])} held out; rows cut at {cfg.max_length} tokens."
    )


def start(runner: Runner, cfg: TrainConfig, owner: str | None = None, limits: Settings | None = None) -> str:
    """Queue the training run exactly as the Train tab does (owner, per-user limits); returns the run id."""
    return runner.submit(cfg, owner=owner, limits=limits)


def heldout_losses(run_id_or_path: str | Path, pool: ModelPool, limit: int = HELDOUT_QUESTIONS) -> dict:
    """Answer-token loss of the base model and of base + the run's adapter on the first `limit` held-out rows.

    Both come from the same batched forward passes on the pooled base model the Arena serves (so this also
    loads the Arena's model). Kept in the run folder, and read from there next time.
    """
    from finetune.data import load_splits
    from finetune.evaluate import answer_losses, eval_spec, eval_target, mean_loss
    from finetune.generate import BASE_ADAPTER
    from finetune.templates import encode_row, get_template

    target = eval_target(run_id_or_path)
    run = target.run
    cached = run.read_guided()
    if cached and cached.get("adapter_mtime") == _mtime(run.adapter_dir):
        return cached
    test = load_splits(target.data)["test"]
    rows = list(test.select(range(min(limit, len(test)))))
    if not rows:
        raise FinetuneError("The test split is empty: raise test_size in the data settings.")
    template = get_template(target.data.template)
    entry, adapter = pool.get_with_adapter(eval_spec(target.spec), run.adapter_dir)
    encoded = [encode_row(entry.tokenizer, template, r, target.max_length) for r in rows]
    # Rows of similar length in one batch: little padding, and logits from nearly the first answer token only.
    order = sorted(range(len(rows)), key=lambda i: (encoded[i]["prompt_length"], len(encoded[i]["input_ids"])))
    batch = [encoded[i] for i in order]
    with entry.lock:  # one user of the pooled model at a time (the Arena shares it)
        names = [BASE_ADAPTER] * len(rows) + [adapter] * len(rows)
        losses = answer_losses(entry.model, entry.tokenizer, batch + batch, names, batch_size=4)
    before, after = mean_loss(losses[: len(rows)]), mean_loss(losses[len(rows) :])
    result = {
        "run_id": run.run_id,
        "adapter": str(run.adapter_dir),
        "adapter_mtime": _mtime(run.adapter_dir),
        "questions": len(rows),
        "answer_tokens": sum(n for _, n in losses[: len(rows)]),
        "loss_before": before,
        "loss_after": after,
        "reduction": 1 - after / before if before else None,
        # The Arena opens with a held-out question (the data set has a few junk rows like "???").
        "question": next((r["instruction"] for r in rows if len(str(r.get("instruction", "")).split()) >= 4), ""),
    }
    run.write_guided(result)
    return result


def _mtime(path: Path) -> int:
    return max((p.stat().st_mtime_ns for p in Path(path).glob("adapter_model.*")), default=0)


def current_step(runner: Runner, run_id: str) -> GuidedStep:
    """The step a guided run is at, from its files on disk alone (what a reloaded page shows)."""
    run, status = runner.open(run_id), runner.status(run_id)
    training = _training("train", run, status, run_id)
    if training is not None:
        return training
    result = run.read_guided()
    if result is None:
        return GuidedStep("evaluate", "Measuring the held-out loss before and after training", run_id, status)
    dpo = _dpo_run(runner, run_id)
    if dpo is None:
        return GuidedStep("arena", arena_message(result), run_id, status, result, done=True)
    status = runner.status(dpo.run_id)
    training = _training("vote", dpo, status, run_id, result)
    if training is not None:
        return training
    result = {**result, "adapter": str(dpo.adapter_dir), "dpo_run_id": dpo.run_id}
    return GuidedStep("vote", vote_message(dpo), run_id, status, result, done=True)


def _training(step: str, run: RunDir, status: dict, run_id: str, result: dict | None = None) -> GuidedStep | None:
    """The `step` while `run` trains, or after it failed; None once it has its adapter."""
    state = status.get("state")
    if state in ACTIVE_STATES:
        return GuidedStep(step, _train_message(status), run_id, status, result)
    if state == "failed" or not run.has_adapter:
        why = status.get("message") or f"The training run ended ({state}) without an adapter."
        return GuidedStep(step, why, run_id, status, result, error=True)
    return None


def _dpo_run(runner: Runner, run_id: str) -> RunDir | None:
    """The newest DPO run that started from the guided run's adapter: the vote step's."""
    for info in runner.runs():
        cfg = info.run.read_config() if info.run.config_file.is_file() else None
        if cfg is not None and cfg.method == "dpo" and cfg.base_adapter == run_id:
            return info.run
    return None


def _train_message(status: dict) -> str:
    step, total = status.get("step") or 0, status.get("total")
    parts = [status.get("message") or status.get("state", "")]
    if total:
        parts.insert(0, f"step {step}/{total}")
    if status.get("loss") is not None:
        parts.append(f"training loss {status['loss']:.3f}")
    if status.get("state") == "running" and status.get("eta_s") is not None:
        eta = status["eta_s"]
        parts.append(f"about {math.ceil(eta / 60)} min left" if eta >= 60 else f"about {eta:.0f} s left")
    return " · ".join(p for p in parts if p)


def arena_message(result: dict) -> str:
    return (
        f"Held-out loss on {result['questions']} test questions: {result['loss_before']:.3f} (base) -> "
        f"{result['loss_after']:.3f} (tuned), {100 * result['reduction']:.0f}% lower. "
        f"The Arena now has your adapter: ask a held-out question. Then vote blind on {VOTES_NEEDED} answers and "
        "train on your votes."
    )


def vote_message(dpo: RunDir) -> str:
    """What the vote step's DPO run did, from its metrics: on held-out pairs when it had some, else training pairs."""
    rows = dpo.read_metrics()
    held = [r for r in rows if "eval_reward_accuracy" in r]
    if len(held) >= 2:
        first, last = held[0], held[-1]
        what = (f"on held-out pairs of your votes, DPO loss {first['eval_loss']:.3f} -> "
                f"{last['eval_loss']:.3f}; the tuned adapter now prefers the voted answer in "
                f"{100 * last['eval_reward_accuracy']:.0f}% of them (reward margin {last['eval_reward_margin']:.3f})")
    else:
        last = next((r for r in reversed(rows) if "reward_accuracy" in r), None)
        what = (f"on the pairs of your votes, it prefers the voted answer more than before in "
                f"{100 * last['reward_accuracy']:.0f}% of the last batch (reward margin {last['reward_margin']:.3f})"
                if last else "no step was logged")
    return (f"Trained on your votes (DPO, {dpo.read_status().get('step', 0)} steps): {what}. The Arena lists the new "
            "adapter, marked (DPO): compare it with the one you voted on.")  # fmt: skip


def dpo_config(sft: TrainConfig, run_id: str, pairs: Path) -> TrainConfig:
    """The vote step's run: the dpo_votes recipe (a couple of minutes) from the guided run's adapter, on the pairs of
    its votes, with its model, template and length."""
    cfg = load_train_config(DPO_RECIPE)
    cfg.model, cfg.base_adapter, cfg.max_length = sft.model, run_id, sft.max_length
    cfg.data = replace(cfg.data, source=str(pairs), template=sft.data.template)
    cfg.mixed_precision, cfg.name = sft.mixed_precision, f"{sft.name or 'quickstart'} DPO"
    return cfg


class Guide:
    """Runs the guided path for the app; one evaluation per run at a time, however many pages follow it."""

    def __init__(
        self,
        runner: Runner,
        pool: ModelPool,
        config: Callable[[], TrainConfig] = guided_config,
        poll_interval: float = 1.0,
        store: VoteStore | None = None,
    ):
        self.runner, self.pool, self.config, self.poll_interval = runner, pool, config, poll_interval
        self.store = store  # the Arena's votes; None: the default store, opened when the vote step reads it
        self._lock = threading.Lock()

    def run(
        self, cfg: TrainConfig | None = None, owner: str | None = None, limits: Settings | None = None
    ) -> Iterator[GuidedStep]:
        """Prepare, start and follow a new guided run."""
        cfg = cfg or self.config()
        yield GuidedStep("prepare", f"Loading {cfg.data.source} and splitting it into training and test rows")
        summary = check_and_split(cfg)
        run_id = start(self.runner, cfg, owner, limits)
        yield GuidedStep("train", f"{summary} Training started.", run_id, self.runner.status(run_id))
        yield from self.follow(run_id)

    def learn_from_votes(
        self, run_id: str, owner: str | None = None, limits: Settings | None = None
    ) -> Iterator[GuidedStep]:
        """The vote step: once VOTES_NEEDED blind votes judged the guided run's adapter, a short DPO run from that
        adapter on their preference pairs; yields its steps until it reports what it learned."""
        sft = self.runner.open(run_id)
        if not sft.has_adapter:
            raise FinetuneError("The guided run has no adapter yet: let it reach the Arena first.")
        votes = adapter_votes((self.store or VoteStore()).votes(), run_id)
        if len(votes) < VOTES_NEEDED:
            raise FinetuneError(
                f"{len(votes)} of {VOTES_NEEDED} blind votes on this adapter so far: turn on blind mode in the Arena "
                f"and vote on {VOTES_NEEDED - len(votes)} more answers, then train on your votes."
            )
        pairs = preference_pairs(votes)
        if not pairs.pairs:
            raise FinetuneError(f"{pairs.summary}: no answer beat another yet; vote A, B or C on a few more answers.")
        path = write_pairs(pairs, exports_dir() / f"votes-{run_id}.jsonl")
        dpo_id = start(self.runner, dpo_config(sft.read_config(), run_id, path), owner, limits)
        yield GuidedStep("vote", f"{pairs.summary}. Training on them (DPO).", run_id, self.runner.status(dpo_id))
        yield from self.follow(run_id)

    def follow(self, run_id: str) -> Iterator[GuidedStep]:
        """Yield the run's step until the Arena is ready (or it failed); measures the loss when training ends."""
        while True:
            step = current_step(self.runner, run_id)
            yield step
            if step.done or step.error:
                return
            if step.step == "evaluate":
                try:
                    with self._lock:  # ZeroGPU: a GPU for the measurement only
                        gpu(duration=MEASURE_GPU_SECONDS)(heldout_losses)(self.runner.open(run_id).path, self.pool)
                except FinetuneError as e:
                    yield GuidedStep("evaluate", str(e), run_id, step.status, error=True)
                    return
                continue
            time.sleep(self.poll_interval)


def run_guided(runner: Runner, pool: ModelPool, cfg: TrainConfig | None = None, owner: str | None = None):
    """`Guide(runner, pool).run(cfg, owner)`: the steps of one guided run, for scripts and tests."""
    return Guide(runner, pool, poll_interval=0.2).run(cfg, owner)


def app_guide(runner: Runner, pool: ModelPool, base_model: str) -> Guide:
    """The app's guide: the quickstart recipe on the app's base model."""

    def config() -> TrainConfig:
        cfg = guided_config()
        cfg.model.source = base_model
        return cfg

    return Guide(runner, pool, config)
