"""Start the Fine-tuning Workbench: `finetune-workbench [--host 127.0.0.1] [--port 7860] [--share]`.

The same as `python app.py` in the repository (a Space's entry point, README front matter: `app_file: app.py`).
`FINETUNE_AUTH` turns on login (see README, "Deploy to Spaces"); limits come from `FINETUNE_MAX_*` env vars
(`finetune.settings.Settings`). This module imports gradio only inside `create_app`, after the Space's install step,
so `finetune-workbench --help` is quick and the core stays importable without gradio.
"""

from __future__ import annotations

import argparse
import logging
import threading
from pathlib import Path

from finetune import home
from finetune.runs import runs_root
from finetune.security import parse_auth
from finetune.settings import Settings
from finetune.spaces import ensure_nodeps_requirements

log = logging.getLogger(__name__)


def launch_kwargs(share: bool = False) -> dict:
    """Arguments of `launch()` that keep a shared box safe; tests start the app with the same ones."""
    runs, exports = runs_root(), home() / "exports"
    exports.mkdir(parents=True, exist_ok=True)
    users = parse_auth()
    return {
        "share": share,
        "auth": users or None,
        "auth_message": "Log in with the name and password the workshop host gave you." if users else None,
        # Only run outputs (adapters, eval tables) and exported splits may be served; not the model cache or votes.
        "allowed_paths": [str(runs), str(exports)],
        "max_file_size": f"{Settings.current().max_upload_mb:g}mb",
    }


def create_app(settings=None, **parts):
    """The app with its queue: events without their own limit run 4 at a time (the Arena has its own).

    `parts` go to `build_app` (tests pass their own `pool` or `runner`).
    """
    from finetune.ui import build_app  # imports gradio and torch: after the Space's install step

    return build_app(settings, **parts).queue(default_concurrency_limit=4)


def preload() -> None:
    """While the page is served: parse the tokenizers and import the model code of the base and reference models,
    which the Data tab and the Arena need first."""
    from finetune.config import ModelSpec
    from finetune.models import EMBEDDED, import_model_code, load_tokenizer

    settings = Settings.current()
    for source in (settings.base_model, settings.reference_model):
        if source not in EMBEDDED and not Path(source).expanduser().is_dir():
            continue  # a Hub model: no network waits (under the load lock) before anyone asked for it
        try:
            load_tokenizer(ModelSpec(source))
            import_model_code(ModelSpec(source))
        except Exception as e:  # noqa: BLE001 - the tab that needs it reports the error where the user sees it
            log.info("preloading %s failed: %s", source, e)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    settings = Settings.current()
    parser.add_argument("--host", default=settings.server_name)
    parser.add_argument("--port", type=int, default=settings.server_port)
    parser.add_argument("--share", action="store_true", help="Open a public gradio.live link (off by default).")
    args = parser.parse_args(argv)
    ensure_nodeps_requirements()  # before the UI imports the embedded models' packages
    app = create_app()
    threading.Thread(target=preload, daemon=True).start()  # after the app's imports: transformers' are lazy
    app.launch(server_name=args.host, server_port=args.port, **launch_kwargs(args.share))


if __name__ == "__main__":
    main()
