"""Train tab: a form for one LoRA/QLoRA run, Train/Stop/Resume, and a live view of the selected run.

Everything shown is read from the run folders (status.json, metrics.jsonl, train.log) on a `gr.Timer`, so a page
reload, a second browser or an app restart shows the same runs; the training itself runs in a subprocess started
by `finetune.runner.Runner`. Named API endpoints: train_start (returns the run id), train_status, train_stop, runs.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from finetune import FinetuneError
from finetune.config import RECIPES, AppSettings, DataConfig, TrainConfig, load_train_config
from finetune.data import BUNDLED
from finetune.models import EMBEDDED, ModelPool, has_cuda
from finetune.runner import RunInfo, Runner
from finetune.security import Limits
from finetune.templates import TEMPLATES
from finetune.train import ADAPTER_DIR, LOG_FILE, read_metrics

LOG_LINES = 40


def default_config() -> TrainConfig:
    """The form's starting values: the quick CPU recipe here, the QLoRA recipe on a GPU."""
    recipe = RECIPES / ("lamini_docs_qlora.yaml" if has_cuda() else "cpu_quick.yaml")
    return load_train_config(recipe if recipe.is_file() else None)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def status_markdown(status: dict) -> str:
    if not status:
        return "No run selected. Set up a run on the left and press **Train**."
    state = status.get("state", "?")
    parts = [f"**{state}**"]
    step, total = status.get("step") or 0, status.get("total")
    if total:
        parts.append(f"step {step}/{total} ({100 * step / total:.0f}%)")
    if state == "running" and status.get("eta_s") is not None:
        parts.append(f"ETA {_duration(status['eta_s'])}")
    if status.get("tokens_per_s"):
        parts.append(f"{status['tokens_per_s']:.0f} tokens/s")
    if status.get("loss") is not None:
        parts.append(f"loss {status['loss']:.3f}")
    if status.get("queue_position"):
        parts.append(f"position {status['queue_position']} in the queue")
    lines = [" · ".join(parts)]
    if status.get("message"):
        lines.append(status["message"])
    if status.get("summary") and status.get("summary") not in status.get("message", ""):
        lines.append(f"*{status['summary']}*")
    return "\n\n".join(lines)


def loss_frame(run_dir: Path | None) -> pd.DataFrame:
    """Train and held-out loss against step, long format for `gr.LinePlot(color="series")`."""
    rows = []
    for r in read_metrics(run_dir) if run_dir else []:
        if r.get("loss") is not None:
            rows.append({"step": r["step"], "loss": r["loss"], "series": "train"})
        if r.get("eval_loss") is not None:
            rows.append({"step": r["step"], "loss": r["eval_loss"], "series": "held-out"})
    # Typed even when empty: the chart keeps the axis types of its first value (object columns = categories).
    return pd.DataFrame(rows, columns=["step", "loss", "series"]).astype({"step": "int64", "loss": "float64"})


def log_tail(run_dir: Path | None, lines: int = LOG_LINES) -> str:
    try:
        with open(run_dir / LOG_FILE, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except (OSError, TypeError):
        return ""
    # Progress bars redraw with carriage returns: keep what each line finally showed.
    shown = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join([line for line in shown if line.strip()][-lines:])


def runs_frame(infos: list[RunInfo]) -> pd.DataFrame:
    rows = [
        {
            "run": i.run_id,
            "name": i.name,
            "state": i.state + (f" (#{i.queue_position})" if i.queue_position else ""),
            "step": f"{i.step}/{i.total}" if i.total else str(i.step),
            "loss": round(i.loss, 3) if i.loss is not None else None,
            "adapter": "yes" if i.adapter_dir else "",
            "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(i.created)) if i.created else "",
        }
        for i in infos
    ]
    return pd.DataFrame(rows, columns=["run", "name", "state", "step", "loss", "adapter", "started"])


def adapter_zip(run_dir: Path) -> str | None:
    """adapter.zip of a run (rebuilt when the adapter is newer), or None while there is no adapter."""
    adapter = run_dir / ADAPTER_DIR
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    target = run_dir / f"{run_dir.name}-adapter.zip"
    if not target.is_file() or target.stat().st_mtime < weights.stat().st_mtime:
        tmp = shutil.make_archive(str(run_dir / ".adapter-zip"), "zip", adapter)
        Path(tmp).replace(target)
    return str(target)


def build_train_tab(
    settings: AppSettings, pool: ModelPool, runner: Runner, data_state: gr.State | None = None
) -> dict[str, gr.components.Component]:
    """Builds the tab; returns the controls the lesson note's "try this" can fill, by name."""
    defaults = default_config()
    gr.Markdown(
        "Train a **LoRA adapter** on top of a base model: only the small adapter matrices learn, on the answer "
        "tokens only. 4-bit quantization (QLoRA) shrinks the frozen base for big models on a GPU. "
        "Training runs in the background: you can reload the page or close the browser."
    )
    with gr.Row():
        with gr.Column(scale=2):
            model_choices = list(dict.fromkeys([settings.base_model, *EMBEDDED]))
            model = gr.Dropdown(
                model_choices, value=settings.base_model, allow_custom_value=True, label="Base model",
                info="Embedded name, Hub id or local folder.",
            )  # fmt: skip
            with gr.Row():
                data_source = gr.Dropdown(
                    list(BUNDLED), value=defaults.data.source, allow_custom_value=True, label="Data set",
                    info="Bundled name or file path; 'Use for training' in the Data tab fills this.",
                )  # fmt: skip
                template = gr.Dropdown(
                    list(TEMPLATES), value=defaults.data.template, allow_custom_value=True, label="Template"
                )
            quantization = gr.Radio(
                ["none", "4bit", "8bit"], value=defaults.model.quantization or "none", label="Quantization",
                info="4bit = QLoRA (NF4). On a CPU, none is faster for small models.",
            )  # fmt: skip
            with gr.Row():
                max_steps = gr.Number(defaults.max_steps, label="Steps", precision=0, minimum=1)
                learning_rate = gr.Number(defaults.learning_rate, label="Learning rate", minimum=0)
                batch_size = gr.Number(defaults.batch_size, label="Batch size", precision=0, minimum=1)
            with gr.Row():
                max_length = gr.Number(defaults.max_length, label="Max length (tokens)", precision=0, minimum=8)
                lora_r = gr.Number(defaults.lora_r, label="LoRA rank r", precision=0, minimum=1)
            with gr.Accordion("Advanced", open=False):
                with gr.Row():
                    lora_alpha = gr.Number(defaults.lora_alpha, label="LoRA alpha", precision=0)
                    lora_dropout = gr.Number(defaults.lora_dropout, label="LoRA dropout", minimum=0, maximum=1)
                    grad_accum = gr.Number(defaults.grad_accum, label="Gradient accumulation", precision=0, minimum=1)
                with gr.Row():
                    eval_rows = gr.Number(defaults.eval_rows or 0, label="Held-out rows for the loss", precision=0)
                    eval_steps = gr.Number(defaults.eval_steps, label="Eval every N steps (0: start+end)", precision=0)
                    save_steps = gr.Number(defaults.save_steps, label="Checkpoint every N steps", precision=0)
                with gr.Row():
                    max_rows = gr.Number(None, label="Use only the first N rows", precision=0)
                    seed = gr.Number(defaults.seed, label="Seed", precision=0)
                    dtype = gr.Dropdown(["auto", "float32", "bfloat16", "float16"], value=defaults.model.dtype,
                                        label="Weights dtype")  # fmt: skip
                target_modules = gr.Textbox(
                    defaults.target_modules if isinstance(defaults.target_modules, str) else
                    ", ".join(defaults.target_modules), label="LoRA target modules",
                    info="all-linear, or names separated by commas (q_proj, v_proj).",
                )  # fmt: skip
                with gr.Row():
                    eval_at_end = gr.Checkbox(defaults.eval_at_end, label="Evaluate base vs tuned when done")
                    checkpointing = gr.Checkbox(
                        defaults.gradient_checkpointing, label="Gradient checkpointing",
                        info="Recompute activations in backward: much less memory, 20-30% more time per step.",
                    )  # fmt: skip
            with gr.Row():
                train_btn = gr.Button("Train", variant="primary")
                stop_btn = gr.Button("Stop", variant="stop")
                resume_btn = gr.Button("Resume")
            notice = gr.Markdown()
            started = gr.Textbox(visible=False)  # the new run's id: what the train_start endpoint returns
        with gr.Column(scale=3):
            with gr.Row():
                # A callable value is evaluated on each page load: a reload shows the run that is training.
                run = gr.Dropdown(_run_choices(runner), value=lambda: _latest(runner), label="Run",
                                  allow_custom_value=True, scale=4)  # fmt: skip
                download = gr.DownloadButton("Download adapter (.zip)", visible=False, scale=1)
            status_md = gr.Markdown(status_markdown({}))
            chart = gr.LinePlot(loss_frame(None), x="step", y="loss", color="series", label="Loss", height=260)
            log = gr.Textbox(label="Log (last lines)", lines=10, max_lines=10, autoscroll=True, interactive=False)
    runs_table = gr.Dataframe(runs_frame([]), label="Runs (click one to show it)", interactive=False, wrap=True)
    timer = gr.Timer(2.0)

    form = [model, data_source, template, quantization, max_steps, learning_rate, batch_size, max_length, lora_r]
    form += [lora_alpha, lora_dropout, grad_accum, eval_rows, eval_steps, save_steps, max_rows, seed, dtype]
    form += [target_modules, eval_at_end, checkpointing]
    prepared = [data_state] if data_state is not None else []

    def start(request: gr.Request, *values):  # first: gradio finds a Request only among positional parameters
        values, data_dict = (values[:-1], values[-1]) if prepared else (values, None)
        names = ["model", "data", "template", "quantization", "max_steps", "learning_rate", "batch_size"]
        names += ["max_length", "lora_r", "lora_alpha", "lora_dropout", "grad_accum", "eval_rows", "eval_steps"]
        names += ["save_steps", "max_rows", "seed", "dtype", "target_modules", "eval_at_end", "gradient_checkpointing"]
        v = dict(zip(names, values))
        cfg = default_config()
        data = DataConfig(**data_dict) if data_dict and data_dict.get("source") == v["data"] else DataConfig()
        data.source, data.template = str(v["data"] or "").strip(), str(v["template"] or "qa")
        if v["max_rows"]:
            data.max_rows = int(v["max_rows"])
        cfg.data = data
        cfg.model.source, cfg.model.dtype = str(v["model"] or "").strip(), v["dtype"]
        cfg.model.quantization = None if v["quantization"] == "none" else v["quantization"]
        targets = [t.strip() for t in str(v["target_modules"] or "all-linear").split(",") if t.strip()]
        cfg.target_modules = targets[0] if targets == ["all-linear"] else targets
        for key in ("max_steps", "batch_size", "max_length", "lora_r", "lora_alpha", "grad_accum", "eval_steps"):
            setattr(cfg, key, int(v[key] or 0))
        cfg.save_steps, cfg.seed = int(v["save_steps"] or cfg.save_steps), int(v["seed"] or 0)
        cfg.eval_rows = int(v["eval_rows"] or 0)
        cfg.learning_rate, cfg.lora_dropout = float(v["learning_rate"] or 0), float(v["lora_dropout"] or 0)
        cfg.eval_at_end, cfg.gradient_checkpointing = bool(v["eval_at_end"]), bool(v["gradient_checkpointing"])
        try:
            run_id = runner.submit(cfg, owner=_user(request), limits=Limits.from_env())
        except FinetuneError as e:
            raise gr.Error(str(e)) from e
        return run_id, ""

    def stop(run_id: str | None, request: gr.Request | None = None) -> str:
        if not run_id:
            raise gr.Error("Pick a run first.")
        try:
            return runner.stop(run_id, user=_user(request))
        except FinetuneError as e:
            raise gr.Error(str(e)) from e

    def resume(run_id: str | None, request: gr.Request | None = None) -> str:
        if not run_id:
            raise gr.Error("Pick a run first.")
        try:
            runner.resume(run_id, user=_user(request))
        except FinetuneError as e:
            raise gr.Error(str(e)) from e
        return "Queued to resume."

    def show(run_id: str | None):
        infos = runner.runs()
        if not run_id or not (runner.root / run_id).is_dir():
            return status_markdown({}), loss_frame(None), "", runs_frame(infos), gr.update(visible=False)
        run_dir = runner.root / run_id
        status = runner.status(run_id)
        zipped = adapter_zip(run_dir) if status.get("state") not in ("running", "stopping", "queued") else None
        button = gr.update(value=zipped, visible=zipped is not None)
        return status_markdown(status), loss_frame(run_dir), log_tail(run_dir), runs_frame(infos), button

    def pick(event: gr.SelectData, table: pd.DataFrame):
        row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
        return gr.update(choices=_run_choices(runner), value=table.iloc[row]["run"])

    view = [status_md, chart, log, runs_table, download]
    train_btn.click(start, form + prepared, [started, notice], api_name="train_start", concurrency_limit=1).success(
        lambda run_id: gr.update(choices=_run_choices(runner), value=run_id), started, run, api_visibility="private"
    )
    stop_btn.click(stop, run, notice, api_name="train_stop")
    resume_btn.click(resume, run, notice, api_name="train_resume")
    run.change(show, run, view, api_visibility="private", show_progress="hidden")
    timer.tick(show, run, view, api_visibility="private", show_progress="hidden", queue=False)
    runs_table.select(pick, runs_table, run, api_visibility="private")

    def train_status(run_id: str) -> dict:
        """status.json of a run, with its queue position."""
        try:
            return runner.status(run_id)
        except FinetuneError as e:
            raise gr.Error(str(e)) from e

    def runs() -> list[dict]:
        """All runs, newest first."""
        return [
            {k: v for k, v in vars(i).items() if k != "run_dir"} | {"adapter": str(i.adapter_dir or "")}
            for i in runner.runs()
        ]

    gr.api(train_status, api_name="train_status")
    gr.api(runs, api_name="runs")

    if data_state is not None:

        def use_prepared(data: dict | None):
            if not data:
                return gr.update(), gr.update()
            return gr.update(value=data.get("source")), gr.update(value=data.get("template"))

        data_state.change(use_prepared, data_state, [data_source, template], api_visibility="private")
    return {"dataset": data_source, "template": template, "quantization": quantization, "max_steps": max_steps}


def _user(request: gr.Request | None) -> str | None:
    """The logged-in name (FINETUNE_AUTH), None without login: it owns the runs it starts."""
    return getattr(request, "username", None) if request is not None else None


def _run_choices(runner: Runner) -> list[tuple[str, str]]:
    return [(f"{i.name} · {i.state} · {i.run_id[:15]}", i.run_id) for i in runner.runs()]


def _latest(runner: Runner) -> str | None:
    """The run to show on page load: the one training, else the newest."""
    infos = runner.runs()
    active = next((i for i in infos if i.state in ("running", "stopping")), None)
    return (active or (infos[0] if infos else None)).run_id if infos else None
