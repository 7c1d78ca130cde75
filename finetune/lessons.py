"""The course's lesson notes, one markdown file per tab in `assets/lessons/`, editable without touching code.

Each file has YAML front matter: `title`, and a "try this" suggestion (`try_label`, `try`: control -> value).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from finetune import ASSETS

LESSONS_DIR = ASSETS / "lessons"


@dataclass
class Lesson:
    title: str
    body: str
    try_label: str = ""
    try_values: dict = field(default_factory=dict)


def load_lesson(name: str, directory: Path = LESSONS_DIR) -> Lesson:
    text = (directory / f"{name}.md").read_text(encoding="utf-8")
    meta: dict = {}
    if text.startswith("---\n"):
        head, _, text = text[4:].partition("\n---\n")
        meta = yaml.safe_load(head) or {}
    return Lesson(meta.get("title", name.title()), text.strip(), meta.get("try_label", ""), meta.get("try") or {})


def lesson_names(directory: Path = LESSONS_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.md"))
