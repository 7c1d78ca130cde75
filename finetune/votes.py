"""The Arena's blind votes: one SQLite store that the Arena writes and the data loader reads (as preference pairs,
`finetune.preferences`), knowing neither.

    from finetune.votes import VoteStore
    store = VoteStore()              # $FINETUNE_HOME/arena.sqlite
    store.add(vote); store.votes()   # any thread: one connection per call
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetune import home

ROLES = ("base", "tuned", "reference")  # the Arena's columns


@dataclass
class Vote:
    winner: str  # a role, "tie" or "bad"
    prompt: str
    answers: dict[str, str]  # role -> answer
    models: dict[str, str]  # role -> model label
    settings: dict  # GenerationParams as a dict
    order: list[str] = field(default_factory=lambda: list(ROLES))  # blind display order (A, B, C)
    history: dict[str, list[dict]] = field(default_factory=dict)  # role -> conversation
    time: float = field(default_factory=time.time)
    id: int | None = None


class VoteStore:
    """Votes in SQLite. One connection per call, so any Gradio worker thread can use the same store."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else home() / "arena.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS votes (id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, "
                "winner TEXT NOT NULL, prompt TEXT NOT NULL, answers TEXT NOT NULL, models TEXT NOT NULL, "
                "settings TEXT NOT NULL, display_order TEXT NOT NULL, history TEXT NOT NULL)"
            )

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def add(self, vote: Vote) -> int:
        row = (vote.time, vote.winner, vote.prompt) + tuple(
            json.dumps(x) for x in (vote.answers, vote.models, vote.settings, vote.order, vote.history)
        )
        db = self._connect()
        try:
            with db:  # commits, or rolls back on error
                cur = db.execute(
                    "INSERT INTO votes (time, winner, prompt, answers, models, settings, display_order, history) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
            vote.id = cur.lastrowid
        finally:
            db.close()
        return vote.id

    def votes(self) -> list[Vote]:
        db = self._connect()
        try:
            rows = db.execute(
                "SELECT id, time, winner, prompt, answers, models, settings, display_order, history "
                "FROM votes ORDER BY id"
            ).fetchall()
        finally:
            db.close()
        return [
            Vote(winner, prompt, *map(json.loads, (answers, models, settings, order, history)), time=t, id=i)
            for i, t, winner, prompt, answers, models, settings, order, history in rows
        ]
