"""The lesson note at the top of each tab: a collapsible accordion with the course's note and a "try this" button.

    with gr.Tab("Train"):
        note = lesson_note("train")                    # first, so it sits at the top of the tab
        controls = build_train_tab(...)                # the tab returns its controls by name
        note.fill(controls)                            # "try this" sets those controls from the note's `try` values

The notes are markdown files in `assets/lessons/` (see `finetune.lessons`).
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from finetune.lessons import Lesson, load_lesson


@dataclass
class LessonNote:
    lesson: Lesson
    accordion: gr.Accordion
    button: gr.Button

    def fill(self, controls: dict[str, gr.components.Component]) -> None:
        """Wire "try this": each `try` key names a control of the tab; keys the tab does not have are skipped."""
        keys = [k for k in self.lesson.try_values if k in controls]
        values = [self.lesson.try_values[k] for k in keys]
        self.button.click(
            lambda: values[0] if len(values) == 1 else values,
            None,
            [controls[k] for k in keys],
            api_visibility="private",
        )


def lesson_note(name: str, open: bool = True) -> LessonNote:
    lesson = load_lesson(name)
    with gr.Accordion(f"Lesson: {lesson.title}", open=open, elem_classes="lesson-note") as accordion:
        gr.Markdown(lesson.body)
        button = gr.Button(f"Try this: {lesson.try_label}", size="sm", variant="secondary")
    return LessonNote(lesson, accordion, button)
