from finetune.lessons import lesson_names, load_lesson


def test_every_tab_has_a_short_lesson_with_a_suggestion():
    assert {"start", "data", "train", "evaluate", "arena"} <= set(lesson_names())
    for name in lesson_names():
        lesson = load_lesson(name)
        assert lesson.title and lesson.body and lesson.try_label and lesson.try_values, name
        assert len(lesson.body.split()) < 200, f"{name}: lesson notes stay short"
        assert "---" not in lesson.body


def test_front_matter_is_parsed(tmp_path):
    (tmp_path / "x.md").write_text("---\ntitle: T\ntry_label: Go\ntry: {a: 1}\n---\nBody text.\n")
    lesson = load_lesson("x", tmp_path)
    assert (lesson.title, lesson.body, lesson.try_label, lesson.try_values) == ("T", "Body text.", "Go", {"a": 1})
