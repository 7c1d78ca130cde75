"""Compare runs in a real browser: pick two runs in the Train tab's "Compare runs", see two lines on one chart and the
settings that differ.

Uses the browser fixtures of tests/test_browser.py (Debian's Chromium through Playwright); the two runs are folders
made here (config + metrics), as training leaves them.
"""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from finetune.config import DataConfig, ModelSpec, TrainConfig
from finetune.runner import Runner
from finetune.runs import RunDir
from finetune.settings import Settings
from tests.test_browser import ARTIFACTS, browser, home, open_page  # noqa: F401 (fixtures)
from tests.test_workshop import running_app

pytestmark = pytest.mark.browser

# Vega draws each line of a `color`-split line chart as its own path in a `mark-line` group.
LINES = "() => document.querySelectorAll('#compare-chart .mark-line path').length"


def test_two_runs_compared_are_two_lines_on_one_chart(browser, home, tiny_llama, free_port):  # noqa: F811
    cfg = TrainConfig(model=ModelSpec(tiny_llama), data=DataConfig("lamini_docs"), max_steps=4)
    for run_id, name, run_cfg, losses in (
        ("run-a", "alpha", cfg, [3.0, 2.6, 2.3, 2.1]),
        ("run-b", "beta", replace(cfg, learning_rate=1e-4), [3.0, 2.9, 2.85, 2.8]),
    ):
        run = RunDir(home / "runs" / run_id)
        run.path.mkdir(parents=True)
        run.write_config(run_cfg)
        run.update_status(state="finished", name=name, step=4, total=4)
        for step, loss in enumerate(losses, 1):
            run.append_metrics({"step": step, "loss": loss, "tokens": 64 * step})
    runner = Runner(home / "runs", poll_interval=0.2)
    settings = Settings(base_model=tiny_llama, reference_model=tiny_llama, max_new_tokens=32)
    try:
        with running_app(settings, free_port, runner=runner) as url:
            page = open_page(browser, url)
            page.get_by_role("tab", name="Train").click()
            page.get_by_role("button", name=re.compile(r"^Compare runs")).click()  # open the accordion
            picker = page.get_by_label("Runs to compare (two or more)")
            for label in ("alpha · finished · run-a", "beta · finished · run-b"):
                picker.click()
                page.get_by_role("option", name=label).click()
            page.wait_for_function(f"() => ({LINES})() === 2")
            page.get_by_role("gridcell", name="learning_rate", exact=True).wait_for()  # the one setting that differs
            page.get_by_role("radio", name="tokens").check()  # the other x axis (to 256 tokens): still both runs
            page.wait_for_function(
                """() => [...document.querySelectorAll('#compare-chart [aria-roledescription="axis"]')]
                         .some(a => /titled 'tokens' .* to 2\\d\\d$/.test(a.getAttribute('aria-label')))"""
            )
            assert page.evaluate(LINES) == 2
            page.screenshot(path=ARTIFACTS / "browser-compare.png", full_page=True)
            page.context.close()
    finally:
        runner.close()
