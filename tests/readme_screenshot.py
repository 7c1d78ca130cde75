"""Retakes docs/screenshot.png (the README's picture): not part of the test suite (its name keeps pytest away).

python -m pytest tests/readme_screenshot.py     # the guided path with the embedded models, in Chromium (~6 min)

What a learner sees after pressing "Fine-tune in 5 minutes": the Arena, the held-out question asked, the base
(Gemma-3-270M), tuned (+ the LoRA adapter just trained) and reference (SmolLM2) answers side by side, the tuned
column titled with the held-out loss before and after.
"""

from __future__ import annotations

import re
import shutil

from finetune.settings import Settings
from tests.test_browser import ARTIFACTS, ROOT, browser, home, open_page, running_app  # noqa: F401 (fixtures)

LAPTOP = {"width": 1366, "height": 768}


def test_readme_screenshot(browser, home, free_port):  # noqa: F811 (pytest fixtures imported above)
    from finetune.runner import Runner

    runner = Runner(home / "runs", poll_interval=0.5)
    with running_app(Settings(max_new_tokens=64), free_port, runner=runner) as url:
        page = open_page(browser, url, viewport=LAPTOP)
        page.locator("#guided-start").click()
        page.get_by_role("tab", name="Arena", selected=True).wait_for(timeout=900_000)
        page.get_by_text(re.compile(r"held-out loss \d+\.\d\d → \d+\.\d\d")).wait_for(timeout=300_000)
        page.wait_for_function(
            "() => (document.body.innerText.match(/tokens\\/s/g) || []).length >= 3", timeout=300_000
        )
        page.wait_for_function("() => !document.body.innerText.includes('streaming…')", timeout=300_000)
        page.screenshot(path=ARTIFACTS / "arena-embedded.png")
        shutil.copyfile(ARTIFACTS / "arena-embedded.png", ROOT / "docs" / "screenshot.png")
        page.context.close()
    runner.close()
