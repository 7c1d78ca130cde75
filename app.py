"""Start the Fine-tuning Workbench: `python app.py [--host 127.0.0.1] [--port 7860] [--share]`.

A Space's entry point (README front matter: `app_file: app.py`); after `pip install .` the same app starts with
`finetune-workbench`. Everything lives in `finetune.launch`; the names below are what tests and benches import.
"""

from finetune.launch import create_app, launch_kwargs, main, preload

__all__ = ["create_app", "launch_kwargs", "main", "preload"]

if __name__ == "__main__":
    main()
