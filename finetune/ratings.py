"""Ratings from pairwise battles: online Elo and Bradley-Terry (maximum likelihood), both with bootstrap 95%
intervals, as LMSYS's Chatbot Arena (FastChat) does; and the leaderboard table they make.

    fights = [("tuned", "base", "a"), ("tuned", "reference", "tie")]  # (model a, model b, winner: a, b or tie)
    print(compute_elo(fights), bradley_terry(fights))
    rows = leaderboard(fights, {"tuned": {"votes": 2, "best": 1}})  # `finetune.arena` makes both from votes
"""

from __future__ import annotations

import csv
import io
import math
import random
from collections import defaultdict
from collections.abc import Callable

import numpy as np

Battle = tuple[str, str, str]  # (model a, model b, winner: "a", "b" or "tie")


def compute_elo(battles: list[Battle], k: float = 32, scale: float = 400, base: float = 10, init: float = 1000):
    """Online Elo in battle order (FastChat's `compute_online_elo`); k=32 suits the few votes of a local arena."""
    ratings: dict[str, float] = defaultdict(lambda: init)
    for a, b, winner in battles:
        expected_a = 1 / (1 + base ** ((ratings[b] - ratings[a]) / scale))
        score_a = {"a": 1.0, "b": 0.0, "tie": 0.5}[winner]
        ratings[a] += k * (score_a - expected_a)
        ratings[b] -= k * (score_a - expected_a)
    return dict(ratings)


def bradley_terry(
    battles: list[Battle], scale: float = 400, base: float = 10, init: float = 1000, prior: float = 1.0
) -> dict[str, float]:
    """Bradley-Terry ratings on the Elo scale, by maximum likelihood (Hunter's MM iterations).

    A tie counts half a win for each side. `prior` adds that many virtual ties to every pair that met,
    so a model that never lost (or never won) still gets a finite rating.
    """
    models = sorted({m for a, b, _ in battles for m in (a, b)})
    if not models:
        return {}
    index = {m: i for i, m in enumerate(models)}
    wins = np.zeros((len(models), len(models)))
    for a, b, winner in battles:
        i, j = index[a], index[b]
        w = {"a": 1.0, "b": 0.0, "tie": 0.5}[winner]
        wins[i, j] += w
        wins[j, i] += 1 - w
    games = wins + wins.T
    played = games > 0
    wins = wins + prior / 2 * played
    games = games + prior * played
    p = np.ones(len(models))
    for _ in range(10_000):
        denom = (games / (p[:, None] + p[None, :])).sum(axis=1)
        new = np.where(denom > 0, wins.sum(axis=1) / np.where(denom > 0, denom, 1), 1.0)
        new /= np.exp(np.log(new).mean())  # fix the scale: geometric mean 1, so the mean rating is `init`
        if np.abs(new - p).max() < 1e-10:
            p = new
            break
        p = new
    return {m: init + scale * math.log(p[index[m]], base) for m in models}


def bootstrap_intervals(
    battles: list[Battle], rate: Callable[[list[Battle]], dict[str, float]], rounds: int = 200, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """95% intervals of `rate` over `rounds` resamples (with replacement) of the battles."""
    rng = random.Random(seed)
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(rounds if battles else 0):
        for model, rating in rate(rng.choices(battles, k=len(battles))).items():
            samples[model].append(rating)
    return {m: (float(np.percentile(s, 2.5)), float(np.percentile(s, 97.5))) for m, s in samples.items()}


def leaderboard(fights: list[Battle], counts: dict[str, dict[str, int]], rounds: int = 200) -> list[dict]:
    """One row per model, best first: Elo and Bradley-Terry with 95% bootstrap intervals, and `counts` (per model:
    votes, best)."""
    elo, bt = compute_elo(fights), bradley_terry(fights)
    elo_ci, bt_ci = (
        bootstrap_intervals(fights, compute_elo, rounds),
        bootstrap_intervals(fights, bradley_terry, rounds),
    )
    rows = [
        {
            "model": m,
            "elo": round(elo[m], 1),
            "elo_95_low": round(elo_ci.get(m, (elo[m],) * 2)[0], 1),
            "elo_95_high": round(elo_ci.get(m, (elo[m],) * 2)[1], 1),
            "bradley_terry": round(bt[m], 1),
            "bt_95_low": round(bt_ci.get(m, (bt[m],) * 2)[0], 1),
            "bt_95_high": round(bt_ci.get(m, (bt[m],) * 2)[1], 1),
            "battles": sum(m in (a, b) for a, b, _ in fights),
            **counts.get(m, {"votes": 0, "best": 0}),
        }
        for m in bt
    ]
    return sorted(rows, key=lambda r: -r["bradley_terry"])


LEADERBOARD_COLUMNS = (
    "model",
    "elo",
    "elo_95_low",
    "elo_95_high",
    "bradley_terry",
    "bt_95_low",
    "bt_95_high",
    "battles",
    "votes",
    "best",
)


def leaderboard_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=LEADERBOARD_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
