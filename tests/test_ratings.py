"""Ratings: Elo and Bradley-Terry against hand-computed values; the leaderboard of a vote list."""

from __future__ import annotations

import math

import pytest

from finetune.arena import battles, vote_counts
from finetune.ratings import bootstrap_intervals, bradley_terry, compute_elo, leaderboard, leaderboard_csv
from finetune.votes import Vote


def test_elo_over_a_fixed_vote_list_gives_the_hand_computed_ratings():
    # k=32, all start at 1000.
    # 1. x beats y: expected 0.5 -> x = 1016, y = 984.
    # 2. x beats y: E_x = 1 / (1 + 10^(-32/400)) = 0.545922 -> x += 32 * 0.454078 = 14.5305 -> 1030.5305,
    #    y = 969.4695.
    # 3. y ties z: E_y = 1 / (1 + 10^(30.5305/400)) = 0.456189 -> y += 32 * 0.043811 = 1.4020 -> 970.8715,
    #    z = 998.5980.
    elo = compute_elo([("x", "y", "a"), ("x", "y", "a"), ("y", "z", "tie")], k=32)
    assert elo == pytest.approx({"x": 1030.5305, "y": 970.8715, "z": 998.5980}, abs=1e-3)


def test_bradley_terry_matches_the_closed_form_for_two_models():
    # x wins 3 of 4: p_x / p_y = 3, so the ratings differ by 400 * log10(3) and average 1000.
    bt = bradley_terry([("x", "y", "a")] * 3 + [("x", "y", "b")], prior=0)
    assert bt["x"] - bt["y"] == pytest.approx(400 * math.log10(3), abs=1e-6)
    assert (bt["x"] + bt["y"]) / 2 == pytest.approx(1000)
    # With the default prior a model that never lost still gets a finite rating.
    assert math.isfinite(bradley_terry([("x", "y", "a")])["x"])


def test_leaderboard_has_intervals_counts_and_csv():
    models = {"base": "b", "tuned": "t", "reference": "r"}
    votes = [Vote("tuned", "", {}, models, {}) for _ in range(6)] + [Vote("reference", "", {}, models, {})]
    rows = leaderboard(battles(votes), vote_counts(votes), rounds=50)
    assert [r["model"] for r in rows] == ["t", "r", "b"]
    top = rows[0]
    assert top["elo_95_low"] <= top["elo"] <= top["elo_95_high"]
    assert top["bt_95_low"] <= top["bradley_terry"] <= top["bt_95_high"]
    assert (top["votes"], top["best"], top["battles"]) == (7, 6, 13)
    csv = leaderboard_csv(rows).splitlines()
    assert csv[0].startswith("model,elo,elo_95_low") and csv[1].startswith("t,")
    assert bootstrap_intervals([], compute_elo) == {}
