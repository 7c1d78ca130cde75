import pytest

from finetune.settings import Settings
from finetune.ui import build_app


@pytest.fixture
def tiny_settings(tiny_llama):
    return Settings(base_model=tiny_llama, reference_model=tiny_llama, max_new_tokens=32)


def test_build_app_has_the_four_tabs(tiny_settings):
    app = build_app(tiny_settings)
    labels = {b.label for b in app.blocks.values() if type(b).__name__ == "Tab"}
    assert {"Data", "Train", "Evaluate", "Arena"} <= labels


def test_arena_endpoint_streams_every_column(tiny_settings, free_port):
    from gradio_client import Client

    app = build_app(tiny_settings).queue()
    app.launch(server_name="127.0.0.1", server_port=free_port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{free_port}/", verbose=False)
        job = client.submit("What is Lamini?", 32, api_name="/arena")
        updates = list(job)
        result = job.result()
    finally:
        app.close()
    chats, stats = result[:3], result[3:6]
    assert len(updates) > 2  # streamed, not one final answer
    assert all([m["role"] for m in chat] == ["user", "assistant"] for chat in chats)
    assert all(_text(chat[0]) == "What is Lamini?" for chat in chats)
    assert _text(chats[0][1]).strip()  # the base model answered
    assert "No tuned model yet" in _text(chats[1][1])  # no run yet: a hint in the column, not an error
    assert "32 tokens" in stats[0] and "32 tokens" in stats[2] and "tokens/s" in stats[2]


def _text(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)
