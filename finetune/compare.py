"""Compare training runs: their loss curves on one chart, the settings that differ, and their results side by side.

    python -m finetune compare RUN RUN...     # run ids or folders: the settings that differ, then the results

    from finetune.compare import compare_runs, loss_curves
    runs = [open_run("<id-1>"), open_run("<id-2>")]
    compare_runs(runs).settings   # [{"setting": "learning_rate", "<id-1>": 0.001, "<id-2>": 0.0005}, ...]
    compare_runs(runs).results    # final training and held-out loss, and the evaluation numbers where there are any
    loss_curves(runs, x="tokens") # long rows, one line per run and series (train, held-out)

Configs are compared flat, nested keys dotted (`model.dtype`), after `TrainConfig` filled in its defaults: a key one
recipe leaves out and another sets to the same default does not differ. The Train tab's "Compare runs" shows the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune import FinetuneError
from finetune.runs import RunDir, losses_at

X_AXES = ("step", "tokens")  # training tokens seen: runs with other batch sizes or lengths line up


def flatten(values: dict, prefix: str = "") -> dict[str, object]:
    """{"model": {"dtype": "auto"}} -> {"model.dtype": "auto"}: nested sections become dotted keys."""
    flat: dict[str, object] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differing_settings(configs: dict[str, dict]) -> list[dict]:
    """One row per dotted key whose value is not the same in every config: {"setting": key, <name>: value, ...}.

    `configs` maps a column name (a run id) to its nested config; a key missing from one config counts as None.
    """
    flats = {name: flatten(values) for name, values in configs.items()}
    keys = list(dict.fromkeys(k for flat in flats.values() for k in flat))
    rows = []
    for key in keys:
        values = {name: flat.get(key) for name, flat in flats.items()}
        if len({repr(v) for v in values.values()}) > 1:
            rows.append({"setting": key, **values})
    return rows


TRAINING_RESULTS = ("steps", "tokens seen", "last training loss", "last held-out loss",
                    "held-out loss before (guided path)", "held-out loss after (guided path)")  # fmt: skip


def training_results(run: RunDir) -> dict[str, object]:
    """The `TRAINING_RESULTS` of a run, from its metrics."""
    rows = run.read_metrics()
    step = max((r["step"] for r in rows if isinstance(r.get("step"), int)), default=0)
    held_out = [p["loss"] for p in run.loss_curve() if p["series"] == "held-out"]
    guided = run.read_guided() or {}  # the guided path measures base and tuned on the same held-out questions
    return dict(zip(TRAINING_RESULTS, (
        step,
        max((r["tokens"] for r in rows if isinstance(r.get("tokens"), int)), default=None),
        losses_at(rows, step)[0],
        held_out[-1] if held_out else None,
        guided.get("loss_before"),
        guided.get("loss_after"),
    )))  # fmt: skip


def results(runs: list[RunDir]) -> list[dict]:
    """One row per result, one column per run: `TRAINING_RESULTS`, then the evaluation numbers of the runs that have
    an evaluation (their eval.json), tuned then base."""
    from finetune.evaluate import COLUMNS, METRIC_LABELS  # loads torch: only once the table is wanted

    trained = {run.run_id: training_results(run) for run in runs}
    table = [{"result": key, **{i: t[key] for i, t in trained.items()}} for key in TRAINING_RESULTS]
    evals = {run.run_id: run.read_eval() or {} for run in runs}
    if any(evals.values()):
        table.append({"result": "evaluated questions", **{i: e.get("questions") for i, e in evals.items()}})
        for column in reversed(COLUMNS):  # tuned first: the runs differ there
            for key, label in METRIC_LABELS.items():
                values = {i: e.get("summary", {}).get(column, {}).get(key) for i, e in evals.items()}
                table.append({"result": f"{label} ({column})", **values})
    return table


@dataclass
class Comparison:
    runs: list[RunDir]
    settings: list[dict]  # the settings that differ: `differing_settings`
    results: list[dict]  # `results`


def compare_runs(runs: list[RunDir]) -> Comparison:
    """The settings that differ and the results of two or more runs (each column named by its run id)."""
    if len(runs) < 2:
        raise FinetuneError("Pick two or more runs to compare.")
    if len({r.run_id for r in runs}) < len(runs):
        raise FinetuneError("A run is picked twice: pick different runs to compare.")
    # What each run trained with: `auto` as it decided it on its machine (dtype, batch size, steps).
    configs = {run.run_id: run.read_decided_config().to_dict() for run in runs}
    return Comparison(runs, differing_settings(configs), results(runs))


def loss_curves(runs: list[RunDir], x: str = "step") -> list[dict]:
    """Training and held-out loss of every run as long rows {x, loss, run, series, line}: one line per run and
    series (`line` = "<run id> · <series>"). With x="tokens", the points of runs that did not record the tokens seen
    (trained before they were recorded) are left out."""
    if x not in X_AXES:
        raise FinetuneError(f"The x axis is one of {', '.join(X_AXES)} (got {x!r}).")
    return [
        {x: p[x], "loss": p["loss"], "run": run.run_id, "series": p["series"], "line": f"{run.run_id} · {p['series']}"}
        for run in runs
        for p in run.loss_curve()
        if x in p
    ]


def format_table(rows: list[dict]) -> str:
    """Plain text columns (the CLI's output): numbers to 4 significant digits, missing values as a dash."""
    if not rows:
        return "(none)"
    columns = list(rows[0])

    def cell(value: object) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    cells = [columns] + [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(text.ljust(w) for text, w in zip(line, widths)).rstrip() for line in cells)


def format_comparison(comparison: Comparison) -> str:
    settings = format_table(comparison.settings) if comparison.settings else "(the same settings)"
    return f"Settings that differ:\n{settings}\n\nResults:\n{format_table(comparison.results)}"
