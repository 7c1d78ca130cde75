"""Start the Fine-tuning Workbench: `python app.py [--host 127.0.0.1] [--port 7860]`."""

import argparse
import os

from finetune.ui import build_app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="Open a public gradio.live link (off by default).")
    args = parser.parse_args()
    build_app().queue(default_concurrency_limit=4).launch(
        server_name=args.host, server_port=args.port, share=args.share
    )


if __name__ == "__main__":
    main()
