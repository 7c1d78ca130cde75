"""A fine-tuning workbench for small LLMs.

The core is plain Python, usable from a notebook or the CLI (`python -m finetune --help`);
`finetune.ui` wraps it in a Gradio app (`python app.py`).
"""

from __future__ import annotations

from pathlib import Path

from finetune.settings import Settings

__version__ = "0.1.0"

_HERE = Path(__file__).resolve().parent
# The bundled data sets and lesson notes: the repository's top-level assets/ in a checkout (a Space, an editable
# install), the package's own finetune/assets/ in a wheel (pyproject.toml maps one onto the other).
ASSETS = _HERE / "assets" if (_HERE / "assets").is_dir() else _HERE.parent / "assets"


class FinetuneError(Exception):
    """An error the user can fix; its message says how. The UI shows it as `gr.Error`."""


def home() -> Path:
    """The app's data dir: model cache, runs, votes. `FINETUNE_HOME` overrides the default."""
    path = Settings.current().home
    path.mkdir(parents=True, exist_ok=True)
    return path
