"""Data tab: pretraining vs fine-tuning data, then load, map, template, tokens, stats, split, export, hand-off.

`build_data_tab(settings)` wires `finetune.data` to components and returns the few components other
tabs need (`DataTabOutputs`): above all `prepared`, a `gr.State` holding the DataConfig (as a dict) the user
handed to training with "Use for training".
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import gradio as gr
import pandas as pd
from gradio.utils import get_upload_folder

from finetune import FinetuneError, data, readers, views
from finetune.config import DataConfig, ModelSpec
from finetune.models import load_tokenizer
from finetune.settings import Settings
from finetune.templates import IGNORE_INDEX, get_template, render
from finetune.ui.common import user_errors

MAPPED = data.CANONICAL  # the mapping dropdowns, in this order
TEMPLATE_CHOICES = [
    ("Q/A: ### Question / ### Answer", "qa"),
    ("Alpaca: with or without input, per row", "alpaca"),
    ("The model's chat template", "chat"),
    ("Conversations and tool calls, plain ### turns (any model)", "tools"),
    ("Plain text: train on the whole text", "text"),
    ("Custom, with {column} placeholders", "custom"),
]
PAGE_SIZE = 20
CELL_CHARS = 300  # table cells are shortened; the template preview shows a row in full
TOKEN_COLORS = {  # green: trained on; red: cut; a conversation's other turns each in their own colour
    views.PROMPT_TOKEN: "#d1d5db",
    views.ANSWER_TOKEN: "#86efac",
    views.SYSTEM_TOKEN: "#e9d5ff",
    views.USER_TOKEN: "#d1d5db",
    views.TOOL_TOKEN: "#bfdbfe",
    views.ASSISTANT_TOKEN: "#86efac",
    views.CUT_TOKEN: "#fca5a5",
}


@dataclass
class DataTabOutputs:
    """Components other tabs read or fill (the lesson note's "try this" fills dataset, template, max_length)."""

    prepared: gr.State  # dict of DataConfig fields once "Use for training" was pressed, else None
    source: gr.Textbox  # the loaded source (bundled name, file path or Hub id)
    dataset: gr.Dropdown  # bundled name or Hub id to load
    template: gr.Dropdown
    max_length: gr.Slider
    tokenizer_model: gr.Dropdown


def _check_servable(source: str) -> None:
    """Web users may read bundled sets, Hub ids, uploads and uploads kept for training, not any server path."""
    if source in data.BUNDLED or (data.is_hub_id(source) and not Path(source).exists()):
        return
    path = Path(source).resolve()
    if not any(path.is_relative_to(Path(root).resolve()) for root in (get_upload_folder(), data.kept_dir())):
        raise FinetuneError("Choose a bundled data set or a Hub id, or upload a file.")


def _cell(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= CELL_CHARS else text[:CELL_CHARS] + "…"


def _frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{k: _cell(v) for k, v in row.items()} for row in rows])


def _stats_markdown(stats: dict, lengths: dict | None) -> str:
    chars = stats["length_chars"]
    lines = [
        f"**{stats['rows']:,} rows** · {stats['empty_rows']:,} with an empty answer · "
        f"{stats['duplicate_rows']:,} exact duplicates",
        f"Characters per row: median {chars.get('p50', 0):,.0f}, 90% under {chars.get('p90', 0):,.0f}, "
        f"longest {chars.get('max', 0):,.0f}",
    ]
    if lengths and lengths["length_tokens"]:
        tokens = lengths["length_tokens"]
        lines.append(
            f"Tokens per row (first {lengths['rows_measured']:,} rows): median {tokens['p50']:,.0f}, "
            f"p95 {tokens['p95']:,.0f}, longest {tokens['max']:,.0f} · **{lengths['truncated_rows']:,} rows longer "
            f"than max length {lengths['max_length']}** would be cut"
        )
    return "\n\n".join(lines)


def build_data_tab(settings: Settings) -> DataTabOutputs:
    def tokenizer_for(source: str):
        # Parsed once per process and shared with the loaded models (no model, no GPU needed here).
        return load_tokenizer(ModelSpec(source))

    # Exports are served from the app's data dir as they are, not copied into gradio's cache.
    gr.set_static_paths([data.exports_dir()])

    # (Room for the lesson note, added above this tab by the lessons feature.)
    with gr.Accordion("Pretraining data vs fine-tuning data, side by side", open=False):
        gr.Markdown(
            "Left: web text a base model is **pretrained** on, no labels, it just learns to continue text. "
            "Right: **fine-tuning** pairs, a question and the answer we want."
        )
        with gr.Row(equal_height=True):
            pretraining = gr.Dataframe(
                pd.DataFrame({"text": [_cell(t) for t in data.pretraining_sample()]}),
                label="Pretraining: C4 web text",
                wrap=True,
                interactive=False,
                max_height=420,
            )
            finetuning = gr.Dataframe(
                _frame(data.finetuning_sample()),
                label="Fine-tuning: lamini_docs question/answer pairs",
                column_widths=["40%", "60%"],
                wrap=True,
                interactive=False,
                max_height=420,
            )
        with gr.Row():
            more = gr.Button("Other rows", size="sm")
            hub_pretraining = gr.Textbox(
                "allenai/c4:en", label="Hub pretraining set (online only)", info="id, or id:config", scale=2
            )
            stream = gr.Button("Stream 5 rows from the Hub", size="sm")
        offset = gr.State(0)

    gr.Markdown("### 1. Load a data set")
    with gr.Row():
        dataset = gr.Dropdown(
            [*data.BUNDLED, data.VOTES_SOURCE],
            value="lamini_docs",
            allow_custom_value=True,
            label="Bundled data set, the Arena's votes (arena_votes), or a Hub id (online)",
            info="e.g. owner/name or owner/name:config",
        )
        upload = gr.File(
            label=f"…or upload .jsonl, .json, .csv or .parquet (up to {readers.max_upload_mb():g} MB)",
            file_types=list(readers.FILE_TYPES),
            height=110,
        )
        with gr.Column(min_width=140):
            load = gr.Button("Load", variant="primary")
            max_rows = gr.Number(0, precision=0, label="Use first N rows (0 = all)", minimum=0)
    source = gr.Textbox("lamini_docs", label="Loaded", interactive=False)
    detected = gr.Markdown()
    with gr.Row():
        mapping = [gr.Dropdown([("(none)", "")], value="", label=f"{field} ←", min_width=120) for field in MAPPED]

    gr.Markdown("### 2. Prompt template")
    with gr.Row():
        template = gr.Dropdown(TEMPLATE_CHOICES, value="qa", label="Template")
        custom = gr.Textbox(
            "### Question:\n{instruction}\n\n### Answer:\n",
            label="Custom template: {placeholders} are columns (or instruction, input); the answer is output",
            lines=3,
            visible=False,
        )
        row = gr.Number(0, precision=0, minimum=0, label="Row (or click one in the table)")
    with gr.Row():
        prompt_text = gr.Textbox(
            label="Prompt: what the model is given (a conversation's earlier assistant turns are trained on too)",
            lines=8,
            interactive=False,
        )
        answer_text = gr.Textbox(
            label="Answer: what the model learns to write (a conversation's last turn)", lines=8, interactive=False
        )
        rejected_text = gr.Textbox(
            label="Rejected: the answer the vote liked less (a preference pair: DPO learns the one on its left)",
            lines=8,
            interactive=False,
            visible=False,
        )

    gr.Markdown("### 3. Tokens")
    with gr.Row():
        tokenizer_model = gr.Dropdown(
            list(dict.fromkeys([settings.base_model, settings.reference_model])),
            value=settings.base_model,
            allow_custom_value=True,
            label="Tokenizer (the base model's)",
        )
        max_length = gr.Slider(32, 2048, value=256, step=32, label="Max length (tokens)")
    tokens = gr.HighlightedText(
        label="Tokens of this row", color_map=TOKEN_COLORS, show_legend=True, show_inline_category=False
    )
    token_info = gr.Markdown()
    histogram = gr.BarPlot(
        x="tokens",
        y="rows",
        color="fits",
        color_map={"fits": "#22c55e", "truncated": "#ef4444"},
        x_title="tokens per row",
        y_title="rows",
        x_label_angle=-45,
        height=280,
        label="Sequence lengths",
    )
    lengths = gr.State(None)

    gr.Markdown("### 4. Stats and rows")
    stats_text = gr.Markdown()
    with gr.Accordion("Stats as JSON", open=False):
        stats_json = gr.JSON()
        recompute = gr.Button("Recompute", size="sm")
    with gr.Row():
        search = gr.Textbox(label="Search", placeholder="a word in any text column", scale=3)
        page = gr.Number(1, precision=0, minimum=1, label="Page", min_width=100)
        page_info = gr.Markdown()
    table = gr.Dataframe(interactive=False, wrap=True, max_height=520, label="Rows")

    gr.Markdown("### 5. Split, export, train")
    with gr.Row():
        test_size = gr.Slider(0.0, 0.5, value=0.1, step=0.05, label="Test fraction (held out)")
        seed = gr.Number(123, precision=0, label="Split seed")
        clean = gr.Checkbox(False, label="Drop empty and duplicate rows")
    with gr.Row():
        export = gr.Button("Split and export JSONL")
        use = gr.Button("Use for training", variant="primary")
    split_info = gr.Markdown()
    files = gr.File(label="Exported splits", file_count="multiple", interactive=False)
    prepared_json = gr.JSON(label="Handed to the Train tab")
    prepared = gr.State(None)

    # The settings that make a DataConfig, passed by name (also the API's parameter names).
    config = {
        "source": source,
        **dict(zip(MAPPED, mapping)),
        "template": template,
        "custom_template": custom,
        "test_size": test_size,
        "seed": seed,
        "max_rows": max_rows,
        "clean": clean,
    }

    def make_config(values: dict) -> DataConfig:
        if not values["source"]:
            raise FinetuneError("Load a data set first.")
        _check_servable(values["source"])
        custom_text = (values["custom_template"] or "").strip() and values["custom_template"]
        if values["template"] == "custom" and not custom_text:
            raise FinetuneError("Write the custom template first, e.g. 'Question: {instruction} Answer: '.")
        return DataConfig(
            source=values["source"],
            mapping={f: values[f] for f in MAPPED if values[f]} or None,
            template=custom_text if values["template"] == "custom" else values["template"],
            test_size=float(values["test_size"]),
            seed=int(values["seed"]),
            max_rows=int(values["max_rows"] or 0) or None,
            clean=bool(values["clean"]),
        )

    def wire(after, fn, extra: dict, outputs, api_name: str | None = None):
        """Run `fn(**extra, **config values)` on `after` (a list of triggers, or an event to follow once it
        succeeded); only named endpoints are public API."""
        register = functools.partial(gr.on, after) if isinstance(after, list) else after.success
        return register(
            user_errors(fn),
            inputs_kwargs={**extra, **config},
            outputs=outputs,
            api_name=api_name,
            api_visibility="public" if api_name else "private",
        )

    # --- pretraining vs fine-tuning ---
    def other_rows(start: int):
        start += 5
        texts = pd.DataFrame({"text": [_cell(t) for t in data.pretraining_sample(5, start)]})
        return texts, _frame(data.finetuning_sample(5, start)), start

    def hub_rows(hub_id: str):
        return pd.DataFrame({"text": [_cell(t) for t in data.stream_hub_texts(hub_id.strip())]})

    more.click(other_rows, offset, [pretraining, finetuning, offset], api_visibility="private")
    stream.click(user_errors(hub_rows), hub_pretraining, pretraining, api_visibility="private")

    # --- load and detect ---
    def on_source(src: str):
        columns = data.load_dataset_source(src).column_names
        choices = [("(none)", "")] + [(c, c) for c in columns]
        try:
            found = data.detect_format(columns)
        except FinetuneError:  # the rows step says it once, as an error; here we only hint
            found = None
        note = f"Columns: {', '.join(f'`{c}`' for c in columns)}. " + (
            f"Detected **{found.format}**; proposed template **{found.template}**."
            if found
            else "No known column layout: choose which column is the prompt (instruction) and the answer (output)."
        )
        updates = [gr.update(choices=choices, value=found.mapping.get(f, "") if found else "") for f in MAPPED]
        return note, *updates, (found.template if found else gr.update())

    # --- rows, preview, tokens, stats ---
    def rows_view(search: str, page: int, **values):
        cfg = make_config(values)
        ds = data.load_rows(cfg)
        try:
            shown = views.page_rows(ds, page or 1, PAGE_SIZE, search or "")
        except FinetuneError as e:  # an empty search result is a hint, not a failure
            gr.Warning(str(e))
            return pd.DataFrame(), "0 matching rows", gr.update(maximum=len(ds) - 1)
        # The file's own columns; the canonical fields it was mapped to show in the template preview.
        columns = ["row", *data.load_dataset_source(cfg.source).column_names]
        info = f"{shown.matches:,} rows · page {shown.page} of {shown.pages}"
        frame = _frame([{c: r[c] for c in columns} for r in shown.rows])
        widths = ["6%"] + [f"{94 // (len(columns) - 1)}%"] * (len(columns) - 1)  # text columns share the width
        return gr.Dataframe(frame, column_widths=widths), info, gr.update(maximum=len(ds) - 1)

    def pick(ds, row: int) -> dict:
        return ds[min(max(int(row or 0), 0), len(ds) - 1)]

    def preview(row: int, tokenizer_model: str, max_length: int, **values):
        """The row rendered with the template (prompt, answer) and its tokens marked prompt/answer/cut."""
        cfg = make_config(values)
        ds = data.load_rows(cfg)
        example = pick(ds, row)
        template, tokenizer = get_template(cfg.template), tokenizer_for(tokenizer_model)
        view = views.token_view(tokenizer, template, example, int(max_length))
        prompt, answer = render(template, example, tokenizer)
        info = (
            f"**{len(view.input_ids)} tokens** go into training: {view.prompt_tokens} prompt tokens (label "
            f"{IGNORE_INDEX}: no loss) and {view.answer_tokens} answer tokens (trained on)"
            + (f" · **{view.cut_tokens} tokens cut** by max length {int(max_length)}" if view.cut_tokens else "")
            + f"\n\n<details><summary>input_ids</summary>\n\n`{view.input_ids}`\n\n</details>"
        )
        if data.is_preference(ds):
            info = f"**Preference pairs: shown side by side**; the tokens are the chosen answer's.\n\n{info}"
        return prompt, answer, view.pieces, info

    def pair_view(row: int, **values):
        """The rejected answer beside the chosen one, for preference pairs; hidden for other data sets."""
        ds = data.load_rows(make_config(values))
        if not data.is_preference(ds):
            return gr.Textbox(value="", visible=False)
        return gr.Textbox(value=pick(ds, row)["rejected"], visible=True)

    def measure(tokenizer_model: str, **values):
        cfg = make_config(values)
        return views.token_lengths(data.load_rows(cfg), tokenizer_for(tokenizer_model), get_template(cfg.template))

    def stats_view(lengths, max_length: int, **values):
        stats = views.row_stats(data.load_rows(make_config(values)))
        summary = views.length_summary(lengths, int(max_length)) if lengths is not None else None
        bins = views.length_histogram(lengths, int(max_length)) if lengths is not None else []
        # Category labels give wide bars (numbers give hairlines on a long axis); padded with spaces, which sort
        # before digits, so the plot's alphabetical order is numeric order (changing `sort` in an update is ignored).
        digits = len(str(bins[-1]["tokens"])) if bins else 0
        labelled = [{**b, "tokens": f"≤{b['tokens']:>{digits}}"} for b in bins]
        bars = pd.DataFrame(labelled, columns=["tokens", "rows", "fits"])
        plot = gr.BarPlot(bars, title=f"max length {int(max_length)}: red bars are cut")
        return _stats_markdown(stats, summary), {**stats, **(summary or {})}, plot

    def dataset_stats(tokenizer_model: str, max_length: int, **values):
        """Rows, empty and duplicate rows, length percentiles (characters and tokens), rows truncated."""
        return stats_view(measure(tokenizer_model, **values), max_length, **values)[1]

    def pick_row(evt: gr.SelectData) -> int:
        return int(evt.row_value[0])  # the table's first column is the row index

    table_args = {"search": search, "page": page}
    preview_args = {"row": row, "tokenizer_model": tokenizer_model, "max_length": max_length}
    preview_outputs = [prompt_text, answer_text, tokens, token_info]
    stats_args = {"lengths": lengths, "max_length": max_length}
    stats_outputs = [stats_text, stats_json, histogram]

    def show_rows(after) -> None:
        """The table, then the row's preview and tokens, then token lengths, then the stats that use them."""
        shown = wire(after, rows_view, table_args, [table, page_info, row])
        for fn, args, outputs in (
            (preview, preview_args, preview_outputs),
            (pair_view, {"row": row}, rejected_text),
            (measure, {"tokenizer_model": tokenizer_model}, lengths),
            (stats_view, stats_args, stats_outputs),
        ):
            shown = wire(shown, fn, args, outputs)

    def use_source(name: str) -> str:
        """Read the set before switching to it, so a bad file is reported and the current set stays."""
        name = (name or "").strip()
        _check_servable(name)
        data.load_dataset_source(name)
        return name

    for trigger, component in ((load.click, dataset), (dataset.change, dataset), (upload.upload, upload)):
        trigger(user_errors(use_source), component, source, api_visibility="private")
    detect = gr.on(None, user_errors(on_source), source, [detected, *mapping, template], api_visibility="private")
    show_rows(detect)  # `detect` also runs when the page opens
    template.change(lambda t: gr.update(visible=t == "custom"), template, custom, api_visibility="private")
    show_rows(
        [m.input for m in mapping]
        + [template.input, custom.blur, max_rows.submit, max_rows.blur, clean.input, tokenizer_model.change]
    )
    wire([search.submit, page.submit], rows_view, table_args, [table, page_info, row])
    wire([row.submit, max_length.release], preview, preview_args, preview_outputs, api_name="dataset_preview")
    wire([row.submit], pair_view, {"row": row}, rejected_text)
    wire([max_length.release], stats_view, stats_args, stats_outputs)
    picked = table.select(pick_row, None, row, api_visibility="private")
    wire(wire(picked, preview, preview_args, preview_outputs), pair_view, {"row": row}, rejected_text)
    lengths_args = {"tokenizer_model": tokenizer_model, "max_length": max_length}
    wire([recompute.click], dataset_stats, lengths_args, stats_json, api_name="dataset_stats")

    # --- split, export, hand-off ---
    def dataset_export(tokenizer_model: str, **values):
        """Split, then write train.jsonl and test.jsonl (a `text` field plus the original fields)."""
        cfg = make_config(values)
        paths = data.export_splits(cfg, tokenizer_for(tokenizer_model))  # chat rows render with its chat template
        splits = data.load_splits(cfg)
        info = " · ".join(f"{name}: {len(splits[name]):,} rows" for name in paths)
        return [str(p) for p in paths.values()], f"Exported to `{next(iter(paths.values())).parent}`: {info}"

    def dataset_prepare(tokenizer_model: str, **values):
        """Check the whole set splits and renders, and hand its DataConfig to the Train tab."""
        ready, splits = data.persist_and_split(make_config(values), tokenizer_for(tokenizer_model))
        counts = f"{len(splits['train']):,} train / {len(splits['test']):,} test rows"
        gr.Info(f"Ready for training: {counts}.")
        return asdict(ready), asdict(ready), f"Handed to the Train tab: **{counts}**."

    model_arg = {"tokenizer_model": tokenizer_model}
    wire([export.click], dataset_export, model_arg, [files, split_info], api_name="dataset_export")
    wire([use.click], dataset_prepare, model_arg, [prepared, prepared_json, split_info], api_name="dataset_prepare")

    return DataTabOutputs(
        prepared=prepared,
        source=source,
        dataset=dataset,
        template=template,
        max_length=max_length,
        tokenizer_model=tokenizer_model,
    )
