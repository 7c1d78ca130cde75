"""The guided start in a real browser: one click, the steps advance, a reload lands on the same run, the Arena opens.

Uses the browser fixtures of tests/test_browser.py (Debian's Chromium through Playwright) and a tiny model.
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from finetune.config import ModelSpec
from finetune.guided import Guide, guided_config
from finetune.models import ModelPool
from finetune.runner import Runner
from finetune.settings import Settings
from tests.test_browser import ARTIFACTS, TRAIN_TIMEOUT_MS, browser, home, open_page  # noqa: F401 (fixtures)
from tests.test_workshop import running_app

pytestmark = pytest.mark.browser

STATE = "#guided-steps li[data-step='{}'][data-state='{}']"


def test_guided_start_advances_survives_a_reload_and_opens_the_arena(browser, home, tiny_llama, free_port):  # noqa: F811
    def config():
        # Enough steps that the page can be reloaded while the run trains; a tiny model does them in seconds.
        cfg = guided_config(model=ModelSpec(tiny_llama), max_steps=30, batch_size=2, max_length=64, save_steps=10)
        cfg.mixed_precision, cfg.logging_steps, cfg.data.max_rows = "no", 1, 60
        return cfg

    settings = Settings(base_model=tiny_llama, reference_model=tiny_llama, max_new_tokens=32)
    runner, pool = Runner(home / "runs", poll_interval=0.2), ModelPool()
    guide = Guide(runner, pool, config, poll_interval=0.2)
    with running_app(settings, free_port, runner=runner, pool=pool, guide=guide) as url:
        page = open_page(browser, url)
        assert page.get_by_role("tab", selected=True).inner_text() == "Start"  # the first tab a user sees
        page.get_by_text("Lesson: Why fine-tune instead of prompting?").wait_for()
        page.locator(STATE.format("prepare", "todo")).wait_for()

        page.locator("#guided-start").click()
        page.locator(STATE.format("prepare", "done")).wait_for()
        page.locator(STATE.format("train", "current")).wait_for()
        page.screenshot(path=ARTIFACTS / "browser-guided-training.png")

        page.reload()  # mid-way: the run id is in this browser's storage, the training goes on in its process
        page.get_by_role("heading", name="Fine-tuning Workbench").wait_for()
        page.locator(f"{STATE.format('prepare', 'done')}").wait_for()

        # Ready: the Arena tab opens (so the Start tab's indicator is attached but hidden).
        page.locator(STATE.format("arena", "done")).wait_for(state="attached", timeout=TRAIN_TIMEOUT_MS)
        page.get_by_role("tab", name="Arena", selected=True).wait_for()
        expect(page.locator("#guided-message")).to_contain_text("lower")  # the held-out loss before and after
        (run,) = runner.runs()  # one run: the reload started nothing new
        held_out = run.run.read_guided()["question"]  # a held-out question, filled in and asked
        expect(page.locator('[role="log"]').first).to_contain_text(held_out[:40], timeout=TRAIN_TIMEOUT_MS)
        # ... and asked: three answers stream, the tuned column (its adapter) titled with the held-out loss the path
        # measured.
        measured = r" · held-out loss \d+\.\d\d → \d+\.\d\d \([-+]\d+%\)"
        page.get_by_text(re.compile(rf"Tuned · .*{re.escape(run.run_id)}{measured}")).wait_for()
        page.wait_for_function(
            "() => (document.body.innerText.match(/tokens\\/s/g) || []).length >= 3", timeout=TRAIN_TIMEOUT_MS
        )
        assert all(log.locator('[data-testid="bot"]').count() == 1 for log in page.locator('[role="log"]').all())
        page.screenshot(path=ARTIFACTS / "browser-guided-arena.png")
