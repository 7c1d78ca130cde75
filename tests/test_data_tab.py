import gradio as gr
import pytest

from finetune.settings import Settings
from finetune.ui import build_app
from finetune.ui.data_tab import DataTabOutputs, build_data_tab


@pytest.fixture
def tiny_settings(tiny_llama):
    return Settings(base_model=tiny_llama, reference_model=tiny_llama, max_new_tokens=32)


def test_build_app_includes_the_data_tab(tiny_settings):
    app = build_app(tiny_settings)
    names = {d.api_name for d in app.fns.values() if d.api_visibility == "public"}
    assert {"dataset_preview", "dataset_stats", "dataset_export", "dataset_prepare"} <= names


@pytest.fixture
def client(tiny_settings, free_port):
    from gradio_client import Client

    with gr.Blocks() as app:
        outputs = build_data_tab(tiny_settings)
    assert isinstance(outputs, DataTabOutputs) and isinstance(outputs.prepared, gr.State)
    app.queue().launch(server_name="127.0.0.1", server_port=free_port, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{free_port}/", verbose=False)
    finally:
        app.close()


def test_endpoints(client, tiny_llama):
    prompt, answer, tokens, info = client.predict(
        row=0, tokenizer_model=tiny_llama, max_length=32, source="lamini_docs", api_name="/dataset_preview"
    )
    assert prompt.startswith("### Question:\n") and prompt.endswith("### Answer:\n") and answer
    kinds = {piece["class_or_confidence"] for piece in tokens}
    assert {"prompt (not trained on)", "answer (trained on)"} <= kinds
    assert "tokens** go into training" in info

    stats = client.predict(
        tokenizer_model=tiny_llama, max_length=64, source="alpaca_sample", template="alpaca", api_name="/dataset_stats"
    )
    assert (stats["rows"], stats["duplicate_rows"], stats["rows_measured"]) == (999, 14, 999)
    assert 0 < stats["truncated_rows"] < 999

    # The gr.State output (what the Train tab reads) is not part of the API result; its JSON twin is.
    config, note = client.predict(tokenizer_model=tiny_llama, source="lamini_docs", api_name="/dataset_prepare")
    assert config["source"] == "lamini_docs" and config["mapping"] == {"instruction": "question", "output": "answer"}
    assert "1,260 train / 140 test rows" in note


def test_tool_call_rows_show_each_turn(client, tiny_llama):
    import json

    from finetune.data import kept_dir

    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    turns = [
        ("human", "Weather in Paris?"),
        ("function_call", json.dumps(call)),
        ("observation", "22 C"),
        ("gpt", "22 C."),
    ]
    row = {
        "conversations": [{"from": f, "value": v} for f, v in turns],
        "tools": json.dumps([{"name": "get_weather"}]),
    }
    path = kept_dir() / "tool-calls.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row) + "\n")
    prompt, answer, tokens, _ = client.predict(  # columns detected: conversations -> messages, tools -> tools
        row=0,
        tokenizer_model=tiny_llama,
        max_length=256,
        source=str(path),
        template="tools",
        api_name="/dataset_preview",
    )
    assert prompt.endswith("### Tool:\n22 C\n\n### Assistant:\n") and answer == "22 C.<|im_end|>"
    kinds = [piece["class_or_confidence"] for piece in tokens]
    assert {"user (not trained on)", "assistant (trained on)", "tool (not trained on)"} == set(kinds)
    called = "".join(piece["token"] for piece in tokens if piece["class_or_confidence"] == "assistant (trained on)")
    call_text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert called == f"{call_text}<|im_end|>22 C.<|im_end|>"


def test_errors_are_one_sentence_for_the_user(client, tiny_llama):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=r"Template placeholder\(s\) \{nope\} are not columns"):
        client.predict(
            tokenizer_model=tiny_llama,
            source="lamini_docs",
            template="custom",
            custom_template="Q: {nope}",
            api_name="/dataset_stats",
        )
    # A web user cannot make the app read an arbitrary file on the server.
    with pytest.raises(AppError, match="Choose a bundled data set or a Hub id, or upload a file"):
        client.predict(tokenizer_model=tiny_llama, source="/etc/hosts.csv", api_name="/dataset_stats")


def test_preference_pairs_preview_side_by_side(client, tiny_llama, tmp_path, monkeypatch):
    from finetune.votes import Vote, VoteStore

    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path))  # the Arena's votes of this test only
    models = {"base": "m", "tuned": "m + run-1", "reference": "ref"}
    VoteStore().add(Vote("tuned", "What is Lamini?", {"base": "A llama.", "tuned": "An LLM engine."}, models, {}))
    prompt, answer, tokens, info = client.predict(
        row=0, tokenizer_model=tiny_llama, max_length=64, source="arena_votes", api_name="/dataset_preview"
    )
    assert prompt == "### Question:\nWhat is Lamini?\n\n### Answer:\n" and answer == "An LLM engine."  # the chosen one
    assert "Preference pairs: shown side by side" in info
