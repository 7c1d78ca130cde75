"""The Train tab's checkpoints of the shown run: each with its step, training and held-out loss; resume from any of
them or download its adapter. The Evaluate and Arena tabs list them too (`run · step N`). "Show the code": the run as
one standalone Python file and notebook (`finetune.runcode`). "Take it home": the tuned model as a GGUF file with an
Ollama Modelfile, or the adapter alone as a GGUF LoRA (`finetune.gguf_export`). Named API endpoints: train_resume_from,
train_show_code, train_export_gguf, train_export_gguf_lora.
"""

from __future__ import annotations

import gradio as gr
import pandas as pd

from finetune import FinetuneError
from finetune.gguf_export import KINDS, export_gguf, export_gguf_lora
from finetune.runcode import write_run_code
from finetune.runner import Runner
from finetune.runs import RunDir, exports_dir
from finetune.ui.common import current_user, user_errors

COLUMNS = ["step", "train loss", "held-out loss", "note"]


def checkpoint_frame(run: RunDir | None) -> pd.DataFrame:
    """The run's checkpoints, newest first; the note marks the one with the lowest held-out loss."""
    infos = run.checkpoint_infos() if run is not None else []
    scored = [c for c in infos if c.eval_loss is not None]
    best = min(scored, key=lambda c: c.eval_loss).step if scored else None
    rows = [
        [c.step, c.loss, c.eval_loss, "lowest held-out loss" if c.step == best else ""] for c in reversed(infos)
    ]
    return pd.DataFrame(rows, columns=COLUMNS).round(4)


def build_checkpoints_panel(runner: Runner, run: gr.Dropdown, timer: gr.Timer) -> None:
    """Under the tab's chart; follows the tab's run picker `run` and refreshes on `timer` while a run trains."""
    with gr.Accordion("Checkpoints", open=False):
        table = gr.Dataframe(pd.DataFrame(columns=COLUMNS), interactive=False, show_label=False)
        with gr.Row():
            step = gr.Dropdown([], label="Checkpoint", scale=2)
            resume = gr.Button("Resume from this checkpoint", scale=1)
            download = gr.DownloadButton("Download its adapter (.zip)", visible=False, scale=1)
        notice = gr.Markdown(
            "Every checkpoint holds a usable adapter: the Evaluate and Arena tabs list them as *run · step N*, and "
            "`python -m finetune export runs/<id> OUT --checkpoint N` merges one into its base model."
        )
        with gr.Row():
            show_code = gr.Button("Show the code", scale=1)
            code_files = gr.File(label="This run as code: script and notebook", file_count="multiple", visible=False,
                                 scale=3)  # fmt: skip
        code = gr.Code(language="python", label="This run as code (python -m finetune code runs/<id>)", visible=False,
                       interactive=False)  # fmt: skip
        with gr.Row():
            gguf_kind = gr.Dropdown(list(KINDS), value="q8_0", label="Take it home: GGUF type", scale=1)
            gguf = gr.Button("Export for llama.cpp and Ollama", scale=1)
            gguf_lora = gr.Button("Export the adapter as a GGUF LoRA", scale=1)
        gguf_files = gr.File(label="GGUF files", file_count="multiple", visible=False)
        gguf_howto = gr.Markdown(visible=False)

    def _open(run_id: str | None) -> RunDir | None:
        try:
            return runner.open(run_id) if run_id else None
        except FinetuneError:  # a typed name that is no run (the tab's picker takes any value)
            return None

    def show(run_id: str | None, current: int | None):
        found = _open(run_id)
        frame = checkpoint_frame(found)
        steps = frame["step"].tolist()
        return frame, gr.update(choices=steps, value=current if current in steps else (steps[0] if steps else None))

    @user_errors
    def zipped(run_id: str | None, at: int | None):
        found = _open(run_id)
        archive = found.adapter_zip(int(at)) if found is not None and at is not None else None
        return gr.update(value=str(archive) if archive else None, visible=archive is not None)

    @user_errors
    def resume_from(run_id: str | None, at: int | None, request: gr.Request | None = None) -> str:
        if not run_id or at is None:
            raise gr.Error("Pick a run and one of its checkpoints first.")
        runner.resume(run_id, user=current_user(request), checkpoint=int(at))
        return f"Queued to resume from step {int(at)}: the steps after it are trained again."

    @user_errors
    def as_code(run_id: str | None):
        """The shown run as a Python file (shown) and a notebook (both to download)."""
        if not run_id:
            raise gr.Error("Pick a run first.")
        script, notebook = write_run_code(runner.open(run_id).path)
        return (gr.update(value=script.read_text(encoding="utf-8"), visible=True),
                gr.update(value=[str(script), str(notebook)], visible=True))  # fmt: skip

    def take_home(run_id: str | None, kind: str, lora: bool, progress: gr.Progress):
        """The run's adapter as GGUF files to download, and the commands that run them."""
        if not run_id:
            raise gr.Error("Pick a run first.")
        found = runner.open(run_id)
        if not found.has_adapter:
            raise gr.Error(f"{run_id} has no adapter yet: export it once it has saved one.")
        out = exports_dir() / "gguf" / found.run_id
        progress(0.1, desc="merging the adapter and writing the GGUF (a minute for a 270M model)")
        result = export_gguf_lora(found.path, out) if lora else export_gguf(found.path, out, kind)
        files = [result.gguf, *([result.modelfile] if result.modelfile else [])]
        howto = f"Written to `{out}`. Run it:\n```\n{result.commands()}\n```"
        return gr.update(value=[str(f) for f in files], visible=True), gr.update(value=howto, visible=True)

    gr.on([run.change, timer.tick], show, [run, step], [table, step], api_visibility="private", show_progress="hidden",
          queue=False)  # fmt: skip
    step.change(zipped, [run, step], download, api_visibility="private", show_progress="hidden")
    resume.click(resume_from, [run, step], notice, api_name="train_resume_from")
    show_code.click(as_code, run, [code, code_files], api_name="train_show_code")

    @user_errors
    def export_model(run_id: str | None, kind: str, progress=gr.Progress()):
        return take_home(run_id, kind, False, progress)

    @user_errors
    def export_lora(run_id: str | None, kind: str, progress=gr.Progress()):
        return take_home(run_id, kind, True, progress)

    gguf.click(export_model, [run, gguf_kind], [gguf_files, gguf_howto], api_name="train_export_gguf")
    gguf_lora.click(export_lora, [run, gguf_kind], [gguf_files, gguf_howto], api_name="train_export_gguf_lora")
