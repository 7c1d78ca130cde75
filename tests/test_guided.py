"""Guided path: prepare -> train -> evaluate -> arena with a tiny model, resumable from the files on disk."""

from __future__ import annotations

import time

import pytest

from finetune.arena import list_adapters
from finetune.config import ModelSpec
from finetune.guided import STEPS, Guide, current_step, guided_config
from finetune.models import ModelPool
from finetune.runner import Runner
from finetune.runs import RunDir


def tiny_cfg(model: str, **overrides):
    values = dict(max_steps=2, batch_size=2, max_length=64, save_steps=1, logging_steps=1, mixed_precision="no")
    cfg = guided_config(model=ModelSpec(model), **{**values, **overrides})
    cfg.data.max_rows = 60  # 54 training rows, 6 held out: the same lamini_docs and template, in seconds
    return cfg


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path))  # list_adapters (the Arena's) looks under home()/runs
    r = Runner(poll_interval=0.1)
    yield r
    r.close()


def test_the_quickstart_recipe_is_the_course_setup():
    cfg = guided_config()
    assert (cfg.model.source, cfg.data.source, cfg.data.template) == ("gemma-3-270m", "lamini_docs", "qa")
    assert cfg.target_modules == "all-linear" and cfg.max_minutes > 0 and cfg.data.test_size == 0.1


def test_guided_run_goes_through_every_step(runner, tiny_llama):
    guide = Guide(runner, ModelPool(), guided_config, poll_interval=0.1)
    steps = list(guide.run(tiny_cfg(tiny_llama)))
    seen = list(dict.fromkeys(s.step for s in steps))
    assert seen == list(STEPS[:-1])  # the last step (vote, then train on the votes) waits for the user's votes
    assert not any(s.error for s in steps)
    last = steps[-1]
    assert last.done and last.status["state"] == "finished" and last.status["step"] == 2
    result = last.result
    assert result["questions"] == 6 and result["answer_tokens"] > 0
    assert result["loss_before"] > 0 and result["loss_after"] > 0
    assert result["reduction"] == pytest.approx(1 - result["loss_after"] / result["loss_before"])
    assert result["question"]  # the held-out question the Arena opens with
    assert result["adapter"] in [str(a.path) for a in list_adapters()]  # the Arena lists the new adapter
    # A reloaded page finds the same place from the files alone; the measurement is not repeated.
    again = current_step(runner, last.run_id)
    assert again.step == "arena" and again.done and again.result == RunDir(runner.root / last.run_id).read_guided()


def test_a_reloaded_page_lands_on_the_training_step(runner, tiny_llama):
    guide = Guide(runner, ModelPool(), guided_config, poll_interval=0.1)
    steps = guide.run(tiny_cfg(tiny_llama, max_steps=200, save_steps=100))
    assert next(steps).step == "prepare"
    training = next(steps)
    assert training.step == "train" and training.run_id
    steps.close()  # the page goes away; the training process does not
    assert current_step(runner, training.run_id).step == "train"
    deadline = time.monotonic() + 120
    while (runner.status(training.run_id).get("step") or 0) < 1:
        assert time.monotonic() < deadline, "no training step"
        time.sleep(0.05)
    runner.stop(training.run_id)  # stopping saves an adapter: the guided path goes on from there
    last = list(guide.follow(training.run_id))[-1]
    assert last.done and last.result["questions"] == 6


def test_a_failed_run_ends_the_guided_path_with_its_reason(runner, tiny_llama):
    guide = Guide(runner, ModelPool(), guided_config, poll_interval=0.1)
    cfg = tiny_cfg(tiny_llama)
    run_id = runner.submit(cfg)
    runner.wait(run_id)
    (runner.root / run_id / "adapter" / "adapter_config.json").unlink()
    last = list(guide.follow(run_id))[-1]
    assert last.error and last.step == "train"


# --- the app: lesson notes on every tab, the guided start as an API endpoint -----------------------------------


@pytest.fixture
def tiny_app(runner, tiny_llama):
    from finetune.settings import Settings
    from finetune.ui import build_app

    settings = Settings(base_model=tiny_llama, reference_model=tiny_llama, max_new_tokens=32)
    pool = ModelPool()
    guide = Guide(runner, pool, lambda: tiny_cfg(tiny_llama), poll_interval=0.1)
    return build_app(settings, pool, runner, guide)


def test_every_tab_opens_with_its_lesson_note_and_a_try_button(tiny_app):
    from finetune.lessons import load_lesson

    tabs = {b.id: b for b in tiny_app.blocks.values() if type(b).__name__ == "Tab"}
    assert list(tabs) == ["start", "data", "train", "evaluate", "arena"]  # the guided start is the first tab
    for name, tab in tabs.items():
        note = tab.children[0]
        lesson = load_lesson(name)
        assert type(note).__name__ == "Accordion" and note.label == f"Lesson: {lesson.title}", name
        markdown, button = note.children
        assert markdown.value == lesson.body and button.value == f"Try this: {lesson.try_label}"
        wired = [d for d in tiny_app.fns.values() if (button._id, "click") in [(t[0], t[1]) for t in d.targets]]
        assert wired, f"{name}: the try button does something"
        if name != "start":  # start's button starts the guided run; the others fill every control they name
            filled = {o._id for d in wired for o in d.outputs}
            assert len(filled) == len(lesson.try_values), name


def test_the_arena_asks_by_itself_only_what_the_guided_path_filled_in(tiny_app):
    """Each page load's resume ends in the Arena's ask-once-filled step too: a question the participant had typed by
    then was asked behind their back, and its round cleared the box under their own Ask ("Type a question first",
    seen in the browser tests on a busy machine)."""
    auto = [d for d in tiny_app.fns.values() if getattr(d.fn, "__name__", "") == "asked_if_filled"]
    assert len(auto) == 4  # the run's end, a reload's resume, the vote step, "Open the Arena"
    for d in auto:
        assert list(d.fn(asked="", question="Typed meanwhile: is it asked?")) == []


def test_guided_start_endpoint_streams_the_steps_and_the_manual_endpoints_see_the_run(tiny_app, free_port):
    from gradio_client import Client

    app = tiny_app.queue()
    app.launch(server_name="127.0.0.1", server_port=free_port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{free_port}/", verbose=False)
        job = client.submit(None, api_name="/guided_start")
        updates = list(job)
        run_id, steps, message, chart, adapter, question = job.result()[:6]  # (buttons' updates are no values)
        status = client.predict(run_id, api_name="/train_status")  # the Train tab's endpoints
        runs = client.predict(api_name="/runs")
    finally:
        app.close()
    marker = 'data-state="current"'
    shown = [next(v for v in u if str(v).startswith("<ol")) for u in updates]  # the step indicator of each update
    current = [html.split(marker)[0].count("data-step") for html in shown if marker in html]  # 1-based step
    assert current == sorted(current) and len(set(current)) >= 3  # the indicator advanced step by step
    assert steps.count('data-state="done"') == len(STEPS) - 1  # all but the vote step
    assert "lower" in message and question and adapter.endswith("adapter")
    # The Start tab's chart: the loss of the run, step by step.
    assert chart["visible"] and chart["value"]["columns"] == ["step", "loss", "series"]
    assert len({step for step, _, series in chart["value"]["data"] if series == "train"}) >= 2, chart
    assert status["state"] == "finished" and [(r["run_id"], r["adapter"]) for r in runs] == [(run_id, adapter)]


def test_a_zero_gpu_space_fits_the_quick_start_to_its_cpu():
    """ZeroGPU trains on the CPU: the 5-minute path fits its training to the CPU's measured step, and leaves no time
    for a held-out measurement on the CPU (it runs on the Space's GPU); a GPU machine keeps the recipe's minutes."""
    from finetune.config import load_train_config
    from finetune.guided import RECIPE, fit_budget
    from finetune.hardware import GPU, Machine, Probe

    slow_cpu = Probe(float32=20.0, bfloat16=1.0)  # a slow 2-core CPU: the 4.2 training minutes do not all fit
    zero = Machine(isa=("avx2",), gpus=(GPU(0, "ZeroGPU", 70.0, (9, 0)),), zero_gpu=True, probe=slow_cpu)
    cpu = Machine(isa=("avx2",), probe=slow_cpu)
    minutes = load_train_config(RECIPE).max_minutes
    on_zero, on_cpu = fit_budget(load_train_config(RECIPE), zero), fit_budget(load_train_config(RECIPE), cpu)
    assert on_cpu.max_minutes < on_zero.max_minutes <= minutes  # the CPU also pays for the measurement
    assert fit_budget(load_train_config(RECIPE), Machine(gpus=(GPU(0, "L4", 22.0, (8, 9)),))).max_minutes == minutes


def test_the_estimate_counts_what_the_machine_is_busy_with(tiny_llama, monkeypatch):
    """A browser on the same 2 cores took 25% of them and stretched a 0.9 s step to 1.21 s, and the 269 steps the
    line promised became 164: with the CPU busy, the line gives the busy machine's numbers beside the idle one's."""
    from finetune.hardware import Machine, Probe
    from finetune.plan import estimate_run
    from finetune.ui import common

    m = Machine(isa=("avx2",), probe=Probe(float32=20.0, bfloat16=1.0))
    cfg = tiny_cfg(tiny_llama, max_steps="auto", max_minutes=1.0, num_epochs=100)
    idle, busy = estimate_run(cfg, m), estimate_run(cfg, m, busy=0.25)
    assert idle.step_s == busy.step_s and "busy" not in idle.line and f"{idle.steps} steps fit" in idle.line
    low, high = (float(x) for x in busy.line.split("about ")[1].split(" s per step")[0].split("-"))
    assert (low, high) == (round(idle.step_s, 1), round(idle.step_s / 0.75, 1)) and "25% busy now" in busy.line
    fewer = int(busy.line.split(" steps fit")[0].split(" · ")[-1].split("-")[0])
    assert fewer < idle.steps and f"{fewer}-{idle.steps} steps fit in the 1-minute budget" in busy.line
    assert estimate_run(cfg, m, busy=0.05).line == idle.line  # a little background work changes nothing
    monkeypatch.setattr(common, "cpu_busy", lambda: 0.5)
    monkeypatch.setattr(common, "machine", lambda: m)
    monkeypatch.setattr("finetune.plan.machine", lambda: m)
    assert "50% busy now" in common.machine_line(cfg)  # what the Start and Train tabs show


def test_the_training_step_says_the_minutes_left():
    from finetune.guided import _train_message

    running = {"state": "running", "step": 30, "total": 180, "loss": 1.9964, "eta_s": 250.0, "message": "training"}
    assert _train_message(running) == "step 30/180 · training · training loss 1.996 · about 5 min left"
    assert _train_message({**running, "eta_s": 42.0}).endswith("about 42 s left")
    assert "left" not in _train_message({**running, "state": "queued"})
