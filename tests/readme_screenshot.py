"""Retakes docs/screenshot.png (the README's picture): not part of the test suite (its name keeps pytest away).

python -m pytest tests/readme_screenshot.py          # trains recipes/cpu_quick.yaml first
UPDATE_SCREENSHOT_RUN=/path/to/runs/<id> python -m pytest tests/readme_screenshot.py
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from finetune.settings import Settings
from tests.test_browser import ARTIFACTS, ROOT, browser, home, open_page, running_app  # noqa: F401 (fixtures)


def test_readme_screenshot(browser, home, free_port):  # noqa: F811 (pytest fixtures imported above)
    """docs/screenshot.png: the Arena with Gemma-3-270M, a LoRA adapter trained here, and SmolLM2 answering."""
    from finetune.config import RECIPES, load_train_config
    from finetune.runner import Runner

    runner = Runner(home / "runs", poll_interval=0.5)
    reuse = os.environ.get("UPDATE_SCREENSHOT_RUN")  # a finished Gemma run folder, instead of training one here
    if reuse:
        shutil.copytree(reuse, home / "runs" / Path(reuse).name)
    else:
        run_id = runner.submit(load_train_config(RECIPES / "cpu_quick.yaml"))
        assert runner.wait(run_id, timeout=3600)["state"] == "finished"
    with running_app(Settings(max_new_tokens=64), free_port, runner=runner) as url:
        page = open_page(browser, url)
        page.get_by_role("tab", name="Arena").click()
        page.get_by_role("textbox", name="Question").fill("What is the capital of France?")
        page.get_by_role("button", name="Ask", exact=True).click()
        page.wait_for_function(
            "() => (document.body.innerText.match(/tokens\\/s/g) || []).length >= 3", timeout=300_000
        )
        page.wait_for_function("() => !document.body.innerText.includes('streaming…')", timeout=300_000)
        page.get_by_role("heading", name="Fine-tuning Workbench").scroll_into_view_if_needed()
        page.locator('[role="log"]').first.scroll_into_view_if_needed()
        page.screenshot(path=ARTIFACTS / "arena-embedded.png")
        shutil.copyfile(ARTIFACTS / "arena-embedded.png", ROOT / "docs" / "screenshot.png")
        page.context.close()
    runner.close()
