"""Models that run elsewhere: adapters and merged exports carry a chat template that prompts them as trained."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import make_run, transformers_serve  # tests/ is on sys.path

from finetune.__main__ import main
from finetune.backends import OpenAIBackend
from finetune.config import GenerationParams, ModelSpec
from finetune.generate import prompt_inputs, stream
from finetune.models import load_model, load_tokenizer
from finetune.serving import serving_chat_template, write_chat_template
from finetune.templates import TEMPLATES, conversation, conversation_prompt, custom_template, encode_row, render

GREEDY = GenerationParams(max_new_tokens=16, stop=())
QUESTION = [{"role": "user", "content": "What is Lamini?"}]
HISTORY = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": " Hello! "},
    {"role": "user", "content": "What is Lamini?"},
]
TOOL_ROW = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "content": "22 C"},
        {"role": "assistant", "content": "22 C in Paris."},
    ],
    "tools": json.dumps([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]),
}


def served(tokenizer, name: str):
    """A copy of `tokenizer` with the chat template a server would get for the `name` template."""
    tok = copy.copy(tokenizer)
    tok.chat_template = serving_chat_template(TEMPLATES[name], tokenizer)
    return tok


def app_ids(tokenizer, prompt: str) -> list[int]:
    return prompt_inputs(tokenizer, prompt, "cpu")["input_ids"][0].tolist()


@pytest.fixture(scope="module", params=["smollm2-135m-instruct", "gemma-3-270m"])
def tokenizer(request):
    """SmolLM2 adds no BOS to a text, Gemma does: the served template must start the same way as training."""
    return load_tokenizer(ModelSpec(request.param))


@pytest.mark.parametrize("name", ["qa", "alpaca"])
def test_text_templates_are_served_as_the_app_prompts_and_as_training_rendered(tokenizer, name):
    tok, template = served(tokenizer, name), TEMPLATES[name]
    for messages in (QUESTION, HISTORY):  # the prompt of a question, and of a conversation (the Arena's history)
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        assert ids == app_ids(tokenizer, conversation_prompt(template, messages, tokenizer))
    row = {"instruction": "What is Lamini?", "output": "An LLM engine."}
    trained = tok.apply_chat_template(conversation(row)[0])["input_ids"]
    assert trained == encode_row(tokenizer, template, row)["input_ids"]  # the answer ends with EOS, as trained


def test_the_tools_template_is_served_as_trained(tokenizer):
    tok, template = served(tokenizer, "tools"), TEMPLATES["tools"]
    messages, tools = conversation(TOOL_ROW)
    assert (
        tok.apply_chat_template(messages, tools=tools)["input_ids"]
        == encode_row(tokenizer, template, TOOL_ROW)["input_ids"]
    )
    asked = tok.apply_chat_template(messages[:1], tools=tools, add_generation_prompt=True)["input_ids"]
    assert asked == app_ids(
        tokenizer, render(template, {**TOOL_ROW, "messages": TOOL_ROW["messages"][:1]}, tokenizer)[0]
    )


def test_chat_runs_keep_the_models_template_and_custom_columns_write_none(smol_tokenizer, tmp_path):
    assert serving_chat_template(TEMPLATES["chat"], smol_tokenizer) == smol_tokenizer.chat_template
    custom = serving_chat_template(custom_template("Q: {question}\nA: "), smol_tokenizer)
    assert custom is None and write_chat_template(tmp_path, custom) is None and not any(tmp_path.iterdir())


def test_training_saves_the_chat_template_with_the_adapter(tiny_llama, tmp_path, smol_tokenizer):
    """The adapter folder of a real (one-step) run holds the template it was trained with."""
    from finetune.config import load_train_config
    from finetune.train import train

    run = make_run(tmp_path, tiny_llama, adapter=False)
    adapter = train(load_train_config(run / "config.yaml", ["max_steps=1", "eval_rows=0"]), run)
    assert (adapter / "chat_template.jinja").read_text() == serving_chat_template(TEMPLATES["qa"], smol_tokenizer)


@pytest.mark.slow
def test_merged_export_served_by_transformers_serve_answers_with_the_training_template(
    tiny_llama, tmp_path, capsys, smol_tokenizer
):
    run = make_run(tmp_path, tiny_llama)  # trained with the Q/A template
    out = tmp_path / "merged"
    assert main(["export", str(run), str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"transformers serve {out} --port 8000\ncurl http://localhost:8000/v1/chat/completions" in printed
    assert json.loads(printed.rsplit(" -d ", 1)[1].strip().strip("'"))["model"] == str(out)

    model, tok = load_model(ModelSpec(str(out)))
    app_prompt = render(TEMPLATES["qa"], {"instruction": "What is Lamini?", "output": ""}, smol_tokenizer)[0]
    assert tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False) == app_prompt
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == tok.chat_template

    with transformers_serve(out, tmp_path) as url:
        answer = "".join(OpenAIBackend(url, str(out)).stream(QUESTION, GREEDY))
    # Greedy answers of a random model agree only when the prompts do, token for token.
    assert answer == "".join(stream(model, tok, app_prompt, GREEDY))
    base_format = smol_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert answer != "".join(stream(model, tok, base_format, GREEDY))
