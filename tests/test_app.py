import pytest

from finetune.config import AppSettings
from finetune.ui import build_app


@pytest.fixture
def tiny_settings(tiny_llama):
    return AppSettings(base_model=tiny_llama, reference_model=tiny_llama, max_new_tokens=32)


def test_build_app_has_the_four_tabs(tiny_settings):
    app = build_app(tiny_settings)
    labels = {b.label for b in app.blocks.values() if type(b).__name__ == "Tab"}
    assert {"Data", "Train", "Evaluate", "Arena"} <= labels


def test_arena_endpoint_streams_both_columns(tiny_settings, free_port):
    from gradio_client import Client

    app = build_app(tiny_settings).queue()
    app.launch(server_name="127.0.0.1", server_port=free_port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{free_port}/", verbose=False)
        job = client.submit("What is Lamini?", 32, api_name="/arena")
        updates = list(job)
        base, reference = job.result()
    finally:
        app.close()
    assert len(updates) > 2  # streamed, not one final answer
    assert base.strip() and reference.strip()
    assert "tokens/s" in base and "tokens/s" in reference
