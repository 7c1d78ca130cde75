"""Arena tab: base, tuned and reference answers streamed side by side; blind votes and a leaderboard.

Named API endpoints (gradio_client): `/arena` (question + settings -> three streamed chats), `/vote`
(A/B/C/tie/bad for the last blind round), `/leaderboard` (table + CSV file), `/arena_clear`.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from finetune import FinetuneError
from finetune.arena import (
    ENGINES,
    LABELS,
    ROLES,
    ArenaSession,
    ArenaSetup,
    Pace,
    RoundClock,
    arena_concurrency,
    ask,
    battles,
    example_questions,
    install_adapter,
    make_backends,
    measured_note,
    register_adapter,
    vote_counts,
)
from finetune.backends import StreamState
from finetune.config import GenerationParams
from finetune.models import EMBEDDED, ModelPool
from finetune.preferences import VOTES_FILE, preference_pairs, write_pairs
from finetune.ratings import LEADERBOARD_COLUMNS, leaderboard, leaderboard_csv
from finetune.security import saving
from finetune.settings import Settings
from finetune.spaces import gpu
from finetune.templates import TEMPLATES
from finetune.ui.common import adapter_choices, user_errors
from finetune.votes import VoteStore

AUTO_TEMPLATE = "auto (the adapter's)"
VOTES = [("A is best", "A"), ("B is best", "B"), ("C is best", "C"), ("Tie", "tie"), ("All bad", "bad")]


def _model_choice(default: str, label: str) -> gr.Dropdown:
    """A model picker: the configured default and the embedded models, or any Hub id or folder typed in."""
    return gr.Dropdown(list(dict.fromkeys([default, *EMBEDDED])), value=default, allow_custom_value=True, label=label)


def _stats(col: StreamState | None) -> str:
    if col is None:
        return ""
    if col.hint:
        return ""  # the column itself says what to do
    if col.error:
        return f"**Error:** {col.error}"
    parts = []
    if col.first_token_s is not None:
        parts.append(f"first token {col.first_token_s:.2f} s")
    if col.done and col.tokens is not None:
        parts.append(f"{col.tokens} tokens")
    if col.tokens_per_s is not None:
        parts.append(f"{col.tokens_per_s:.1f} tokens/s")
    if col.engine:
        parts.append(col.engine)
    return " · ".join(parts) + ("" if col.done else " · streaming…")


def _settings_line(p: GenerationParams) -> str:
    decoding = "greedy" if p.greedy else f"temperature {p.temperature:g}, top-p {p.top_p:g}"
    return f"Settings (shared by all columns): {decoding}, at most {p.max_new_tokens} new tokens."


def _label(session: ArenaSession, position: int) -> str:
    role = session.order[position]
    name = session.models.get(role, "")
    if session.blind and not session.voted:
        return f"Answer {LABELS[position]}"
    prefix = f"{LABELS[position]} = " if session.blind else ""
    title = " · ".join(part for part in (role.title(), name, session.notes.get(role, "")) if part)
    return prefix + title


def _chats(session: ArenaSession, columns: dict[str, StreamState] | None = None, labels: bool = True) -> list:
    """Chatbot and stats values in display order (A, B, C); `labels`: also set the chatbots' titles.

    Titles change only when a round starts or names are revealed; plain message lists otherwise keep the
    `/arena` API's result simple (three chats, three stats lines).
    """
    chats, stats = [], []
    for position, role in enumerate(session.order):
        messages = list(session.histories[role])
        col = (columns or {}).get(role)
        if col is not None and col.hint:  # where the answer would be, not an error
            messages = [*messages[:-1], {"role": "assistant", "content": col.hint}]
        elif col is not None and col.error and messages:
            messages[-1] = {"role": "assistant", "content": f"{col.text.strip()}\n\n*Error: {col.error}*".strip()}
        chats.append(gr.Chatbot(value=messages, label=_label(session, position)) if labels else messages)
        stats.append(_stats(col))
    return chats + stats


def _wait_line(clock: RoundClock, concurrency: int) -> str:
    """What a place in the queue costs here, measured (gradio's queue shows each waiting user's place)."""
    measured = clock.average_s()
    if measured is None:
        return ""
    seconds, rounds = measured
    return (
        f"A round takes about {seconds:.0f} s here (average of the last {rounds}); {concurrency} at a time are "
        f"answered, so each place ahead of you in the queue adds about {seconds / concurrency:.0f} s."
    )


def _leaderboard(store: VoteStore):
    votes = store.votes()
    rows = leaderboard(battles(votes), vote_counts(votes))
    path = os.path.join(tempfile.mkdtemp(prefix="arena-"), "arena_leaderboard.csv")
    with open(path, "w", newline="") as f:
        f.write(leaderboard_csv(rows))
    return pd.DataFrame(rows, columns=list(LEADERBOARD_COLUMNS)), path


def _pairs(store: VoteStore):
    """The votes as preference pairs (a JSONL file to download, or none yet) and their counts."""
    pairs = preference_pairs(store.votes())
    path = write_pairs(pairs, Path(tempfile.mkdtemp(prefix="arena-")) / VOTES_FILE) if pairs.pairs else None
    note = (f"Preference pairs for DPO (`arena_votes` in the Data and Train tabs): {pairs.summary}. "
            "Each best answer beats the two others.")  # fmt: skip
    return gr.DownloadButton(value=path, visible=path is not None), note


def build_arena_tab(
    settings: Settings, pool: ModelPool, store: VoteStore | None = None, tab: gr.Tab | None = None
) -> dict[str, gr.components.Component]:
    """Builds the tab; returns the controls the lesson note and the guided path fill, by name.

    `tab`: the Tab it sits in; opening it picks up adapters trained (and votes cast) since the page loaded.
    """
    store = store or VoteStore()
    clock, pace = RoundClock(), Pace()
    concurrency = arena_concurrency(settings)
    adapters = adapter_choices()
    gr.Markdown(
        "Ask one question; the **base** model (pretrained), the **tuned** model (the same base + your LoRA "
        "adapter) and a **reference** instruct model answer side by side, each column's line saying what answered "
        "(llama.cpp or transformers). Turn on **blind mode** to vote without seeing names."
    )
    session = gr.State(None)
    # The question and the three columns fit the first screen (1366x768); models and settings are folded below.
    with gr.Row(equal_height=True):
        question = gr.Textbox("", label="Question", placeholder="Ask something...", scale=4, lines=1, max_lines=4)
        send = gr.Button("Ask", variant="primary", scale=1, min_width=100)
        clear = gr.Button("Clear", scale=0, min_width=80)
        blind = gr.Checkbox(value=False, label="Blind mode (A/B/C, then vote)", scale=1)
    with gr.Row(equal_height=True):
        chats, stats = [], []
        for role in ROLES:
            with gr.Column():
                chats.append(gr.Chatbot(label=role.title(), height=300))
                stats.append(gr.Markdown())
    with gr.Group(visible=False) as vote_box:
        with gr.Row():
            choice = gr.Radio(VOTES, label="Which answer is best?", scale=4)
            vote = gr.Button("Vote", variant="primary", scale=1)
        verdict = gr.Markdown()
    settings_line = gr.Markdown()
    wait_line = gr.Markdown(lambda: _wait_line(clock, concurrency))
    gr.Examples([[q] for q in example_questions()], inputs=question, label="Examples (lamini_docs test questions)")
    with gr.Accordion("Models and settings", open=False):
        with gr.Row():
            base_model = _model_choice(settings.base_model, "Base: model (embedded name, Hub id or local folder)")
            adapter = gr.Dropdown(
                adapters,
                value=adapters[0][1] if adapters else "",
                allow_custom_value=True,
                label="Tuned: LoRA adapter (training runs, uploads, a folder or a Hub id)",
            )
            template = gr.Dropdown(
                [AUTO_TEMPLATE, *(t for t in TEMPLATES if t != "chat")],
                value=AUTO_TEMPLATE,
                label="Prompt template of base and tuned",
            )
        with gr.Row():
            refresh = gr.Button("Refresh adapters", size="sm")
            upload = gr.File(label="Upload an adapter (.zip, or both adapter files)", file_count="multiple")
            upload_name = gr.Textbox(label="Name of the uploaded adapter", placeholder="my-adapter")
            add = gr.Button("Add adapter", size="sm")
        with gr.Row():
            reference_model = _model_choice(settings.reference_model, "Reference: local model (chat template)")
            endpoint_url = gr.Textbox(
                "", label="…or an OpenAI-compatible endpoint (base URL)", placeholder="http://127.0.0.1:8000/v1"
            )
            endpoint_model = gr.Textbox("", label="Endpoint model name")
            key_env = gr.Textbox(value="OPENAI_API_KEY", label="API key from env var")
            api_key = gr.Textbox("", type="password", label="…or API key (never stored)")
        with gr.Row():
            serve_url = gr.Textbox(
                settings.serve_url,
                label="Base and tuned on a serving engine (vLLM with --enable-lora; empty: this app)",
                placeholder="http://127.0.0.1:8000",
            )
            serve_model = gr.Textbox(
                settings.serve_model, label="Base model's name on that server", placeholder="the base model above"
            )
            serve_fallback = gr.Checkbox(value=False, label="If the server fails, answer base and tuned in this app")
            engine = gr.Radio(
                list(ENGINES),
                value=settings.arena_engine,
                label="Local columns on (auto: llama.cpp where it is installed and the app runs on a CPU)",
            )
        with gr.Row():
            max_new_tokens = gr.Slider(
                16, settings.max_new_tokens, value=min(128, settings.max_new_tokens), step=16, label="Max new tokens"
            )
            greedy = gr.Checkbox(value=True, label="Greedy")
            temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="Temperature (when not greedy)")
            top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p (when not greedy)")
    with gr.Accordion("Leaderboard (blind votes)", open=False):
        board = gr.Dataframe(headers=list(LEADERBOARD_COLUMNS), interactive=False)
        with gr.Row():
            refresh_board = gr.Button("Refresh", size="sm")
            csv_file = gr.DownloadButton("Export CSV", size="sm")
            pairs_file = gr.DownloadButton("Preference pairs (JSONL)", size="sm", visible=False)
        pairs_note = gr.Markdown()

    # The names are the `/arena` API's parameters, in this order: question and settings first, so a caller can pass
    # just those: client.predict("What is Lamini?", 64, api_name="/arena"), or by name: question=..., greedy=False.
    form = dict(
        question=question, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, greedy=greedy,
        blind=blind, base_model=base_model, adapter=adapter, template=template, reference_model=reference_model,
        endpoint_url=endpoint_url, endpoint_model=endpoint_model, api_key_env=key_env, api_key=api_key,
        serve_url=serve_url, serve_model=serve_model, serve_fallback=serve_fallback, engine=engine, state=session,
    )  # fmt: skip

    @user_errors
    def run(
        *,
        question: str,
        max_new_tokens: float,
        temperature: float,
        top_p: float,
        greedy: bool,
        blind: bool,
        base_model: str,
        adapter: str | None,
        template: str | None,
        reference_model: str,
        endpoint_url: str | None,
        endpoint_model: str | None,
        api_key_env: str | None,
        api_key: str | None,
        serve_url: str | None,
        serve_model: str | None,
        serve_fallback: bool,
        engine: str | None,
        state: ArenaSession | None,
    ):
        if state is None or state.blind != blind:
            state = ArenaSession.start(blind)
        state.notes = {"tuned": measured_note(adapter)}
        env_key = os.environ.get(api_key_env.strip(), "") if api_key_env and api_key_env.strip() else ""
        setup = ArenaSetup(
            base_model=base_model,
            adapter=adapter or None,
            template=None if template in (None, AUTO_TEMPLATE) else template,
            reference_model=reference_model,
            endpoint_url=endpoint_url or "",
            endpoint_model=endpoint_model or "",
            api_key=api_key or env_key,
            serve_url=serve_url or "",
            serve_model=serve_model or "",
            serve_fallback=bool(serve_fallback),
            engine=engine or "auto",
        )
        params = GenerationParams(
            max_new_tokens=max(1, min(int(max_new_tokens), settings.max_new_tokens)),
            temperature=0.0 if greedy else float(temperature),
            top_p=float(top_p),
            stop=(),  # each column stops at its own template's header (see backends.LocalBackend)
        )
        backends = make_backends(pool, setup, warn=gr.Warning)
        for i, columns in enumerate(ask(backends, state, question or "", params)):
            chats_and_stats = _chats(state, columns, labels=i == 0)
            # Plain values only: on ZeroGPU each one is pickled back from the worker (an update, not a component).
            yield *chats_and_stats, state, _settings_line(params), "", gr.update(visible=state.blind), ""

    answer = gpu(duration=60)(run)  # ZeroGPU: a GPU for the length of one answer, in a forked worker; elsewhere `run`

    @functools.wraps(run)
    def timed_round(**form_values):
        # The round clock stays in this process: a ZeroGPU worker would time its own copy of it.
        started, waiting = time.perf_counter(), _wait_line(clock, concurrency)
        for values in pace.paced(answer(**form_values)):  # a room of rounds shares the updates the app can send
            yield *values, waiting
        clock.add(time.perf_counter() - started)

    answers = [*chats, *stats, session, settings_line, question, vote_box, verdict, wait_line]
    queued = dict(concurrency_limit=concurrency, concurrency_id="arena")
    gr.on([send.click, question.submit], timed_round, None, answers, inputs_kwargs=form, api_name="arena", **queued)

    def asked_if_filled(asked: str, **form_values):
        # Only what `event` filled in: the page load's resume also ends here with nothing (no run), and a question
        # typed meanwhile is the participant's, asked when they press Ask (asked here too, it was then empty).
        if (asked or "").strip():
            yield from timed_round(**form_values)

    def answer_after(event, asked: gr.Textbox) -> None:
        """Ask the question in the box once `event` has filled it with `asked` (the guided path opening the Arena)."""
        inputs = {**form, "asked": asked}
        event.then(asked_if_filled, None, answers, inputs_kwargs=inputs, api_visibility="private", **queued)

    def reset(blind_: bool):
        state = ArenaSession.start(blind_)
        return *_chats(state), state, gr.Group(visible=False), ""

    clear.click(reset, blind, [*chats, *stats, session, vote_box, verdict], api_name="arena_clear")
    blind.change(reset, blind, [*chats, *stats, session, vote_box, verdict], api_visibility="private")

    @user_errors
    def cast(choice_: str | None, state: ArenaSession | None):
        if state is None or not state.blind:
            raise gr.Error("Votes are for blind mode: turn it on and ask a question.")
        if not choice_:
            raise gr.Error("Pick the best answer (or tie / all bad) first.")
        ballot = state.vote(choice_)
        try:
            with saving("your vote"):
                store.add(ballot)
        except FinetuneError:
            state.voted = False  # not saved: the same vote can be cast again once the disk is fixed
            raise
        names = ", ".join(f"**{LABELS[i]}** = {r} ({state.models.get(r, '')})" for i, r in enumerate(state.order))
        thanks = f"Thanks! {names}. Ask a new question for the next round."
        return *_chats(state)[:3], state, thanks, *_leaderboard(store)

    pairs_view = (lambda: _pairs(store), None, [pairs_file, pairs_note])
    voted = vote.click(cast, [choice, session], [*chats, session, verdict, board, csv_file], api_name="vote")
    voted.success(*pairs_view, api_visibility="private")
    board_shown = refresh_board.click(lambda: _leaderboard(store), None, [board, csv_file], api_name="leaderboard")
    board_shown.then(*pairs_view, api_visibility="private")

    @user_errors
    def add_adapter(files, name, serve_url_: str | None):
        if not files:
            raise gr.Error("Choose the adapter files (or a .zip) to upload.")
        with saving("the adapter"):
            info = install_adapter([getattr(f, "name", f) for f in files], name or "")
        if serve_url_ and serve_url_.strip():
            try:
                register_adapter(info, serve_url_)
            except FinetuneError as e:  # installed all the same: the next round tries the server again
                gr.Warning(f"Adapter {info.name!r} is added, but not to the serving engine: {e}")
        return gr.Dropdown(choices=adapter_choices(), value=str(info.path)), None

    add.click(add_adapter, [upload, upload_name, serve_url], [adapter, upload], api_visibility="private")

    def refresh_adapters(current: str | None):
        """New choices; with none chosen yet, the newest adapter (a participant's first trained run)."""
        choices = adapter_choices()
        return gr.Dropdown(choices=choices, value=current or (choices[0][1] if choices else ""))

    refresh.click(refresh_adapters, adapter, adapter, api_visibility="private")
    if tab is not None:
        tab.select(refresh_adapters, adapter, adapter, api_visibility="private")
        tab.select(lambda: _leaderboard(store), None, [board, csv_file], api_visibility="private")
        tab.select(
            lambda: _wait_line(clock, concurrency), None, wait_line, api_visibility="private"
        )
        tab.select(*pairs_view, api_visibility="private")
    return {"question": question, "adapter": adapter, "answer_after": answer_after}
