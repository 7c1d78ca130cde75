"""Preference pairs from the Arena's blind votes, in TRL's preference format: what DPO (`finetune.dpo`) learns from.

    python -m finetune votes --out pairs.jsonl        # prints "12 votes -> 18 pairs; 2 ties and 1 all-bad left out"
    python -m finetune train --config recipes/dpo_votes.yaml   # DPO on every vote's pairs (data source arena_votes)

    from finetune.preferences import preference_pairs
    pairs = preference_pairs(VoteStore().votes())
    pairs.summary, pairs.pairs[0]  # {"prompt": the question, "chosen": the winner's answer, "rejected": another}

The data source `arena_votes` (`finetune.data.VOTES_SOURCE`) is the pairs of every vote in the store, written to
`exports/arena_votes.jsonl` when it is read; the Data tab shows them side by side and the Train tab trains on them
with `method: dpo`. The prompt is the question as asked: training renders it with the run's template, as the Arena
did. No torch here (the Data tab reads pairs without loading the Arena).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from finetune import FinetuneError
from finetune.runs import exports_dir, write_text_atomic
from finetune.votes import Vote, VoteStore

VOTES_FILE = "arena_votes.jsonl"


@dataclass
class PairSet:
    """The pairs of some votes, and how many votes gave none."""

    pairs: list[dict] = field(default_factory=list)  # {"prompt", "chosen", "rejected"}
    votes: int = 0
    ties: int = 0
    bad: int = 0
    same: int = 0  # pairs left out because both answers were the same text: nothing to prefer

    @property
    def summary(self) -> str:
        text = f"{self.votes} votes -> {len(self.pairs)} pairs; {self.ties} ties and {self.bad} all-bad left out"
        return text + (f"; {self.same} pairs of identical answers skipped" if self.same else "")


def preference_pairs(votes: list[Vote]) -> PairSet:
    """The preference pairs of blind votes.

    A best-of-three vote says the winner beat each of the two other answers, and nothing about those two: it yields
    two pairs, (prompt, winner, other) for each other answer. A tie or an all-bad vote prefers no answer to another
    (the ratings count it as a tie; DPO has nothing to learn from it): left out, and counted. The prompt is the
    last question of the round: earlier turns of a follow-up are not kept.
    """
    out = PairSet(votes=len(votes))
    for vote in votes:
        if vote.winner in ("tie", "bad"):
            out.ties += vote.winner == "tie"
            out.bad += vote.winner == "bad"
            continue
        chosen = vote.answers.get(vote.winner, "")
        for role, answer in vote.answers.items():
            if role == vote.winner:
                continue
            if answer.strip() == chosen.strip():
                out.same += 1
                continue
            out.pairs.append({"prompt": vote.prompt, "chosen": chosen, "rejected": answer})
    return out


def adapter_votes(votes: list[Vote], adapter: str) -> list[Vote]:
    """The votes whose tuned column was the adapter named `adapter` (a run id; the column's label is
    `<base model> + <adapter name>`)."""
    return [v for v in votes if v.models.get("tuned", "").endswith(f" + {adapter}")]


def write_pairs(pairs: PairSet, path: str | Path) -> Path:
    """The pairs as JSONL, one {"prompt", "chosen", "rejected"} object per line (TRL's preference format).

    Rewritten only when the pairs changed: data sets are cached by the file's modification time.
    """
    path = Path(path)
    text = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs.pairs)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
    return path


def votes_file(store: VoteStore | None = None) -> Path:
    """`exports/arena_votes.jsonl`: the pairs of every vote in the store (default: the Arena's), written now."""
    pairs = preference_pairs((store or VoteStore()).votes())
    if not pairs.pairs:
        raise FinetuneError(
            f"The Arena's votes give no preference pairs yet ({pairs.summary}): vote A, B or C in blind mode first."
        )
    return write_pairs(pairs, exports_dir() / VOTES_FILE)
