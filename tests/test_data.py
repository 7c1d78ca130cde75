import copy
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import assert_trained_exactly  # tests/ is on sys.path

from finetune import FinetuneError, home
from finetune.chats import normalize_messages
from finetune.config import DataConfig
from finetune.data import (
    canonicalize,
    detect_format,
    detect_mapping,
    export_splits,
    finetuning_sample,
    load_dataset_source,
    load_rows,
    load_splits,
    persist_and_split,
    persist_source,
    pretraining_sample,
    stream_hub_texts,
)
from finetune.readers import MAX_NESTING, read_file
from finetune.templates import IGNORE_INDEX, TEMPLATES, encode_row
from finetune.views import (
    ANSWER_TOKEN,
    ASSISTANT_TOKEN,
    CUT_TOKEN,
    PROMPT_TOKEN,
    SYSTEM_TOKEN,
    TOOL_TOKEN,
    USER_TOKEN,
    length_histogram,
    length_summary,
    page_rows,
    row_stats,
    token_lengths,
    token_view,
)

QA = [{"question": "What is Lamini?", "answer": "An LLM engine."}, {"question": "Is it free?", "answer": "Partly."}]
# SmolLM2 ids of "### Question:\nWhat is Lamini?\n\n### Answer:\n" and of "An LLM engine." (see test_templates).
QA_PROMPT_IDS = [3757, 15232, 42, 198, 1780, 314, 450, 2576, 89, 47, 198, 198, 3757, 19842, 42, 198]
QA_ANSWER_IDS = [2089, 450, 34519, 2327, 30]


def write(tmp_path, name: str, content: str | bytes):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# --- loaders, one per format ---------------------------------------------------------------------


def test_jsonl(tmp_path):
    ds = read_file(write(tmp_path, "qa.jsonl", jsonl(QA) + "\n"))  # a trailing blank line is fine
    assert ds.to_list() == QA
    assert ds.cache_files == []  # parsed in memory: nothing written to the datasets cache


def test_jsonl_text_may_hold_line_separator_characters(tmp_path):
    rows = [{"question": "a\u2028b", "answer": "c\x1cd"}]  # json.dumps(ensure_ascii=False) leaves these raw
    path = write(tmp_path, "qa.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    assert read_file(path).to_list() == rows


def test_json_array_and_json_lines_saved_as_json(tmp_path):
    assert read_file(write(tmp_path, "qa.json", json.dumps(QA, indent=2))).to_list() == QA
    assert read_file(write(tmp_path, "lines.json", jsonl(QA))).to_list() == QA


def test_csv_with_quotes_newlines_and_byte_order_mark(tmp_path):
    text = '\ufeffquestion,answer\n"Why, Lamini?","Line one\nline two"\nIs it free?,Partly.\n'
    assert read_file(write(tmp_path, "qa.csv", text)).to_list() == [
        {"question": "Why, Lamini?", "answer": "Line one\nline two"},
        {"question": "Is it free?", "answer": "Partly."},
    ]


def test_csv_with_semicolons(tmp_path):
    assert read_file(write(tmp_path, "qa.csv", "question;answer\nWhat is Lamini?;An LLM engine.\n")).to_list() == [
        QA[0]
    ]


def test_parquet(tmp_path):
    path = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist(QA), path)
    assert read_file(path).to_list() == QA


def test_bundled_sets():
    assert len(load_dataset_source("lamini_docs")) == 1400
    assert load_dataset_source("alpaca_sample").column_names == ["instruction", "input", "output"]
    assert len(pretraining_sample(3)) == 3 and all(isinstance(t, str) and t for t in pretraining_sample(3))
    assert set(finetuning_sample(2)[0]) == {"question", "answer"}


def test_hub_id_offline_says_so():
    # conftest sets HF_HUB_OFFLINE=1
    with pytest.raises(FinetuneError, match="Hugging Face Hub is not reachable"):
        load_dataset_source("someone/some_set")
    with pytest.raises(FinetuneError, match="Hugging Face Hub is not reachable"):
        stream_hub_texts("allenai/c4:en")


def test_an_edited_file_is_read_again(tmp_path):
    path = write(tmp_path, "qa.jsonl", jsonl(QA[:1]))
    assert len(load_dataset_source(str(path))) == 1
    path.write_text(jsonl(QA))
    assert len(load_dataset_source(str(path))) == 2


def test_unknown_source_and_type(tmp_path):
    with pytest.raises(FinetuneError, match="No data set"):
        load_dataset_source(str(tmp_path / "missing.csv"))
    with pytest.raises(FinetuneError, match="unsupported file type"):
        read_file(write(tmp_path, "qa.txt", "hello"))


# --- column detection ----------------------------------------------------------------------------

DETECTION = [
    (["question", "answer"], {"instruction": "question", "output": "answer"}, "qa"),
    (["Question", "Answer"], {"instruction": "Question", "output": "Answer"}, "qa"),
    (
        ["instruction", "input", "output"],
        {"instruction": "instruction", "input": "input", "output": "output"},
        "alpaca",
    ),
    (["instruction", "output"], {"instruction": "instruction", "output": "output"}, "alpaca"),
    (["instruction", "response"], {"instruction": "instruction", "output": "response"}, "alpaca"),
    (
        ["instruction", "context", "response", "category"],
        {"instruction": "instruction", "input": "context", "output": "response"},
        "alpaca",
    ),
    (["question", "answer", "context"], {"instruction": "question", "input": "context", "output": "answer"}, "alpaca"),
    (["input", "output"], {"instruction": "input", "output": "output"}, "qa"),
    (["prompt", "completion"], {"instruction": "prompt", "output": "completion"}, "qa"),
    (["prompt", "response"], {"instruction": "prompt", "output": "response"}, "qa"),
    (["id", "messages"], {"messages": "messages"}, "chat"),
    (["conversations"], {"messages": "conversations"}, "chat"),
    (["text", "messages"], {"messages": "messages"}, "chat"),
    (["text", "url"], {"text": "text"}, "text"),
]


@pytest.mark.parametrize(("columns", "mapping", "template"), DETECTION)
def test_detection(columns, mapping, template):
    found = detect_format(columns)
    assert found.mapping == mapping and found.template == template
    assert detect_mapping(columns) == mapping


def test_no_usable_column_pair(tmp_path):
    with pytest.raises(FinetuneError, match=r"Could not find a prompt/answer column pair among: a, b; rename"):
        detect_mapping(["a", "b"])
    path = write(tmp_path, "ab.csv", "a,b\n1,2\n")
    with pytest.raises(FinetuneError, match="Could not find a prompt/answer column pair"):
        load_rows(DataConfig(str(path)))


def test_mapping_override(tmp_path):
    path = write(tmp_path, "ab.csv", "a,b\nWhat is Lamini?,An LLM engine.\n")
    ds = load_rows(DataConfig(str(path), mapping={"instruction": "a", "output": "b"}))
    assert ds[0]["instruction"] == "What is Lamini?" and ds[0]["output"] == "An LLM engine." and ds[0]["a"]
    with pytest.raises(FinetuneError, match="column 'c', which this data set does not have"):
        load_rows(DataConfig(str(path), mapping={"instruction": "a", "output": "c"}))
    with pytest.raises(FinetuneError, match="Map a column to output"):
        load_rows(DataConfig(str(path), mapping={"instruction": "a"}))


def test_sharegpt_conversations_become_messages(tmp_path):
    row = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "What is Lamini?"},
            {"from": "gpt", "value": "An LLM engine."},
        ]
    }
    ds = load_rows(DataConfig(str(write(tmp_path, "chat.jsonl", jsonl([row]))), template="chat", test_size=0))
    assert ds[0]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is Lamini?"},
        {"role": "assistant", "content": "An LLM engine."},
    ]
    assert (ds[0]["instruction"], ds[0]["output"]) == ("What is Lamini?", "An LLM engine.")


def test_openai_messages_are_normalized():
    parts = [{"type": "text", "text": "An LLM "}, {"type": "text", "text": "engine."}]
    assert normalize_messages(
        [{"role": "User", "content": "Hi", "name": "x"}, {"role": "assistant", "content": parts}]
    ) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "An LLM engine."},
    ]
    assert normalize_messages('[{"role": "user", "content": "Hi"}]') == [{"role": "user", "content": "Hi"}]  # CSV
    assert normalize_messages(None) == []  # no chat in this row: counted as an empty row
    with pytest.raises(FinetuneError, match="Row 7: unknown chat role 'robot'"):
        normalize_messages([{"role": "robot", "content": "Hi"}], 7)


def test_chat_rows_train_on_the_last_assistant_turn(tmp_path, smol_tokenizer):
    row = {
        "messages": [
            {"role": "user", "content": "What is Lamini?"},
            {"role": "assistant", "content": "An LLM engine."},
        ]
    }
    ds = load_rows(DataConfig(str(write(tmp_path, "chat.jsonl", jsonl([row]))), template="chat"))
    enc = encode_row(smol_tokenizer, TEMPLATES["chat"], ds[0])
    trained = [t for t, label in zip(enc["input_ids"], enc["labels"]) if label != IGNORE_INDEX]
    assert smol_tokenizer.decode(trained) == "An LLM engine.<|im_end|>\n"


def test_chat_rows_need_a_tokenizer_with_a_chat_template():
    class NoChatTemplate:
        chat_template = None

    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    with pytest.raises(FinetuneError, match="need a model with a chat template.*smollm2-135m-instruct"):
        token_view(NoChatTemplate(), TEMPLATES["qa"], row)


# --- tool calls: ShareGPT function_call/observation and OpenAI tool_calls/tool, with a `tools` column ----------


WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CLOCK = {
    "name": "get_time",
    "description": "Time in a zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}},
}
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
SHAREGPT_TOOLS = [  # LLaMA-Factory's sharegpt format: calls and results are turns, tools a JSON text column
    {
        "conversations": [
            {"from": "system", "value": "Use the tools."},
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": json.dumps(CALL)},
            {"from": "observation", "value": "22 C, sunny"},
            {"from": "gpt", "value": "It is 22 C and sunny."},
        ],
        "tools": json.dumps([WEATHER, CLOCK]),
    },
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}], "tools": "[]"},
]
OPENAI_TOOLS = [  # OpenAI's chat format: calls on assistant turns (arguments: JSON text or an object), `tool` replies
    {
        "messages": [
            {"role": "system", "content": "Use the tools."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {**CALL, "arguments": '{"city": "Paris"}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"},
            {"role": "assistant", "content": "It is 22 C and sunny."},
        ],
        "tools": [{"type": "function", "function": WEATHER}, {"type": "function", "function": CLOCK}],
    },
    {
        "messages": [
            {"role": "user", "content": "Time in Paris?"},
            {
                "role": "assistant",
                "tool_calls": [{"type": "function", "function": {"name": "get_time", "arguments": {"zone": "CET"}}}],
            },
        ],
        "tools": [{"type": "function", "function": CLOCK}],
    },
]
TOOLS_BLOCK = f"### Tools:\n{json.dumps(WEATHER)}\n{json.dumps(CLOCK)}\n\n"
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
# A ChatML template with tools in the Hermes style (as Qwen2.5's), small enough to read.
HERMES_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\\n<tools>' }}"
    "{%- for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}{{ '\\n</tools><|im_end|>\\n' }}{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}{{ '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + (m.content or '') }}"
    "{%- for call in m.tool_calls or [] %}"
    "{{ '<tool_call>\\n' + ({'name': call.function.name, 'arguments': call.function.arguments} | tojson) }}"
    "{{ '\\n</tool_call>' }}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _without_ids(messages: list[dict]) -> list[dict]:
    """Messages without the call ids that OpenAI rows have and ShareGPT rows have not."""
    out = [{k: v for k, v in m.items() if k != "tool_call_id"} for m in messages]
    for m in out:
        m["tool_calls"] = m["tool_calls"] and [{k: v for k, v in c.items() if k != "id"} for c in m["tool_calls"]]
    return out


def test_sharegpt_tool_calls_load_render_and_mask_exactly(tmp_path, smol_tokenizer):
    path = write(tmp_path, "tools.jsonl", jsonl(SHAREGPT_TOOLS))
    found = detect_format(["conversations", "tools"])
    assert (found.mapping, found.template) == ({"messages": "conversations", "tools": "tools"}, "tools")
    ds = load_rows(DataConfig(str(path), template="tools", test_size=0))
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}, "id": None}
    assert ds[0]["messages"][1:3] == [
        {"role": "user", "content": "Weather in Paris?", "tool_calls": None, "tool_call_id": None},
        {"role": "assistant", "content": "", "tool_calls": [call], "tool_call_id": None},
    ]
    assert json.loads(ds[0]["tools"]) == [{"type": "function", "function": t} for t in (WEATHER, CLOCK)]
    assert (ds[0]["output"], ds[1]["tools"]) == ("It is 22 C and sunny.", "")

    # The plain `tools` template: both assistant turns trained (the call and the answer, each ending with EOS).
    enc = encode_row(smol_tokenizer, TEMPLATES["tools"], ds[0])
    assert_trained_exactly(
        smol_tokenizer,
        enc,
        [
            (TOOLS_BLOCK + "### System:\nUse the tools.\n\n### User:\nWeather in Paris?\n\n### Assistant:\n", False),
            (CALL_TEXT + "<|im_end|>", True),
            ("\n\n### Tool:\n22 C, sunny\n\n### Assistant:\n", False),
            ("It is 22 C and sunny.<|im_end|>", True),
        ],
    )
    # The Data tab colours each turn (the header that asks for an answer goes with the turn before it).
    view = token_view(smol_tokenizer, TEMPLATES["tools"], ds[0])
    kinds = [kind for _, kind in view.pieces]
    system = kinds.index(USER_TOKEN)
    assert kinds[:system] == [SYSTEM_TOKEN] * system and set(kinds) == {
        SYSTEM_TOKEN,
        USER_TOKEN,
        ASSISTANT_TOKEN,
        TOOL_TOKEN,
    }
    assert [k == ASSISTANT_TOKEN for k in kinds] == [label != IGNORE_INDEX for label in view.labels]
    assert (
        "".join(text for text, kind in view.pieces if kind == TOOL_TOKEN)
        == "\n\n### Tool:\n22 C, sunny\n\n### Assistant:\n"
    )


def test_openai_tool_calls_load_render_and_mask_exactly(tmp_path, smol_tokenizer):
    ds = load_rows(DataConfig(str(write(tmp_path, "tools.jsonl", jsonl(OPENAI_TOOLS))), template="chat", test_size=0))
    sharegpt = load_rows(
        DataConfig(str(write(tmp_path, "sg.jsonl", jsonl(SHAREGPT_TOOLS))), template="tools", test_size=0)
    )
    assert (
        _without_ids(ds[0]["messages"]) == _without_ids(sharegpt[0]["messages"])
        and ds[0]["tools"] == sharegpt[0]["tools"]
    )
    assert ds[0]["messages"][3]["tool_call_id"] == "call_1" and ds[0]["messages"][2]["tool_calls"][0]["id"] == "call_1"
    # An object as arguments is kept as JSON text; each row keeps its own tool schemas (no keys of the others).
    assert ds[1]["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"zone": "CET"}'
    assert json.loads(ds[1]["tools"]) == [{"type": "function", "function": CLOCK}]
    assert ds[1]["output"] == 'get_time({"zone": "CET"})'  # a call as the last turn: searchable, not an empty row

    # A model whose chat template knows tools renders them with it, calls included, and trains on both turns.
    hermes = copy.copy(smol_tokenizer)
    hermes.chat_template = HERMES_TEMPLATE
    tools = "".join("\n" + json.dumps({"type": "function", "function": t}) for t in (WEATHER, CLOCK))
    assert_trained_exactly(
        hermes,
        encode_row(hermes, TEMPLATES["chat"], ds[0]),
        [
            (
                f"<|im_start|>system\n<tools>{tools}\n</tools><|im_end|>\n"
                "<|im_start|>system\nUse the tools.<|im_end|>\n"
                "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n",
                False,
            ),
            (CALL_TEXT + "<|im_end|>\n", True),
            (
                "<|im_start|>user\n<tool_response>\n22 C, sunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
                False,
            ),
            ("It is 22 C and sunny.<|im_end|>\n", True),
        ],
    )
    # The plain template renders the OpenAI file exactly as the ShareGPT one.
    assert encode_row(smol_tokenizer, TEMPLATES["tools"], ds[0]) == encode_row(
        smol_tokenizer, TEMPLATES["tools"], sharegpt[0]
    )


def test_a_chat_template_without_tools_names_the_template_that_works(tmp_path, smol_tokenizer):
    ds = load_rows(DataConfig(str(write(tmp_path, "tools.jsonl", jsonl(OPENAI_TOOLS))), template="chat", test_size=0))
    with pytest.raises(
        FinetuneError,
        match=r"^smollm2-135m-instruct's chat template has no tool support: choose the `tools` plain template\.$",
    ):
        encode_row(smol_tokenizer, TEMPLATES["chat"], ds[0])
    no_template = type("NoChatTemplate", (), {"chat_template": None})()
    with pytest.raises(FinetuneError, match=r"^This model has no chat template: choose the `tools` plain template\.$"):
        encode_row(no_template, TEMPLATES["chat"], ds[0])
    with pytest.raises(FinetuneError, match=r"need a model with a chat template.*or the `tools` plain template"):
        token_view(no_template, TEMPLATES["chat"], ds[0])
    # The `tools` template needs no chat template of the model's (a base model like Gemma-3-270M has none).
    base = copy.copy(smol_tokenizer)
    base.chat_template = None
    assert (
        token_view(base, TEMPLATES["tools"], ds[0]).labels
        == encode_row(smol_tokenizer, TEMPLATES["tools"], ds[0])["labels"]
    )
    with pytest.raises(FinetuneError, match=r"Row 1: a tool call must be JSON like"):
        normalize_messages([{"from": "function_call", "value": "get_weather(Paris)"}])


# --- templates and the loss mask on loaded rows --------------------------------------------------


def test_csv_to_tokens_exact_ids(tmp_path, smol_tokenizer):
    ds = load_rows(DataConfig(str(write(tmp_path, "qa.csv", "question,answer\nWhat is Lamini?,An LLM engine.\n"))))
    enc = encode_row(smol_tokenizer, TEMPLATES["qa"], ds[0])
    eos = smol_tokenizer.eos_token_id
    assert enc["input_ids"] == QA_PROMPT_IDS + QA_ANSWER_IDS + [eos]
    assert enc["labels"] == [IGNORE_INDEX] * len(QA_PROMPT_IDS) + QA_ANSWER_IDS + [eos]


def test_plain_text_rows_train_on_everything(tmp_path, smol_tokenizer):
    ds = load_rows(DataConfig(str(write(tmp_path, "c4.jsonl", jsonl([{"text": "An LLM engine."}]))), template="text"))
    enc = encode_row(smol_tokenizer, TEMPLATES["text"], ds[0])
    assert enc["input_ids"] == enc["labels"] == QA_ANSWER_IDS + [smol_tokenizer.eos_token_id]
    with pytest.raises(FinetuneError, match=r"\{instruction\}, \{output\} are not columns"):
        load_rows(DataConfig(str(tmp_path / "c4.jsonl"), template="qa"))


def test_token_view_marks_prompt_answer_and_cut(smol_tokenizer):
    row = {"instruction": "What is Lamini?", "input": "", "output": "An LLM engine."}
    view = token_view(smol_tokenizer, TEMPLATES["qa"], row, max_length=18)
    kinds = [kind for _, kind in view.pieces]
    assert kinds == [PROMPT_TOKEN] * 16 + [ANSWER_TOKEN] * 2 + [CUT_TOKEN] * 4
    assert "".join(text for text, _ in view.pieces[:16]) == "### Question:\nWhat is Lamini?\n\n### Answer:\n"
    assert view.input_ids == QA_PROMPT_IDS + QA_ANSWER_IDS[:2]
    assert view.labels == [IGNORE_INDEX] * 16 + QA_ANSWER_IDS[:2]
    assert (view.prompt_tokens, view.answer_tokens, view.cut_tokens) == (16, 2, 4)


def test_custom_template_over_original_columns(tmp_path):
    path = write(tmp_path, "qa.jsonl", jsonl(QA))
    ds = load_rows(DataConfig(str(path), template="Q: {question}\nA: "))
    assert ds[0]["question"] == "What is Lamini?"
    with pytest.raises(FinetuneError, match=r"Template placeholder\(s\) \{nope\} are not columns"):
        load_rows(DataConfig(str(path), template="Q: {nope}\nA: "))


# --- bad input: one clear sentence each ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", b"", "empty.jsonl is empty"),
        ("blank.csv", b"\n \n", "blank.csv is empty"),
        ("latin1.csv", "question,answer\ncaf\xe9,ok\n".encode("latin-1"), "is not UTF-8 text"),
        ("bad.jsonl", jsonl(QA) + '{"question": "x", "answer": }\n', "invalid JSON on line 3"),
        ("bad.json", '[\n {"question": "x"},\n {"question": \n]', "invalid JSON on line 4"),
        ("notobj.jsonl", '["question", "answer"]\n', "line 1 is not a JSON object"),
        ("obj.json", '{"question": "x"}', "must hold a JSON array of objects"),
        ("mixed.jsonl", jsonl([{"question": "a", "answer": "b"}, {"question": 2, "answer": "c"}]), "mixes types"),
        ("ragged.csv", "question,answer\na,b\nc,d,e\n", "line 3 has 3 fields but the header has 2"),
        ("none.json", "[]", "none.json has no rows"),
        ("header.csv", "question,answer\n", "header.csv has no rows"),
        ("broken.parquet", b"PAR1 not really", "not a valid Parquet file"),
    ],
)
def test_bad_files(tmp_path, name, content, message):
    with pytest.raises(FinetuneError, match=message) as e:
        read_file(write(tmp_path, name, content))
    assert str(e.value).endswith(".") and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["deep.json", "deep.jsonl"])
def test_deeply_nested_json_is_refused_with_a_sentence(tmp_path, name):
    with pytest.raises(FinetuneError) as e:  # not a RecursionError out of the JSON decoder
        read_file(write(tmp_path, name, "[" * 100_000))
    assert str(e.value).startswith(f"{name} nests too deeply to be a data set (more than {MAX_NESTING} levels")
    assert str(e.value).endswith(".") and "\n" not in str(e.value)


def test_nesting_up_to_the_limit_loads(tmp_path):
    def row(levels: int) -> dict:  # the row's object is the first level
        value = "x"
        for _ in range(levels - 1):
            value = [value]
        return {"question": "q", "answer": "a", "extra": value}

    assert read_file(write(tmp_path, "ok.jsonl", jsonl([row(MAX_NESTING)])))[0]["extra"] == row(MAX_NESTING)["extra"]
    with pytest.raises(FinetuneError, match=f"more than {MAX_NESTING} levels in row 2"):
        read_file(write(tmp_path, "deep.jsonl", jsonl([row(1), row(MAX_NESTING + 1)])))
    with pytest.raises(FinetuneError, match="Row 3's chat nests too deeply"):
        normalize_messages("[" * 100_000, 3)  # a chat stored as JSON text (CSV)


def test_mixed_types_message_names_column_and_rows(tmp_path):
    path = write(tmp_path, "mixed.jsonl", jsonl([{"question": "a", "answer": "b"}, {"question": 2, "answer": "c"}]))
    with pytest.raises(FinetuneError, match=r"column 'question' mixes types \(text in row 1, number in row 2\)"):
        read_file(path)


def test_oversized_upload(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_MAX_UPLOAD_MB", "0.001")
    with pytest.raises(FinetuneError, match=r"big.jsonl is 0.0 MB, over the 0.001 MB upload limit"):
        read_file(write(tmp_path, "big.jsonl", jsonl(QA * 20)))


def test_zero_rows_after_filtering(tmp_path):
    path = write(
        tmp_path, "empty_answers.jsonl", jsonl([{"question": "a", "answer": ""}, {"question": "b", "answer": " "}])
    )
    with pytest.raises(FinetuneError, match="No rows left after dropping empty and duplicate rows"):
        load_rows(DataConfig(str(path), clean=True))
    with pytest.raises(FinetuneError, match="Every row has an empty answer"):
        load_rows(DataConfig(str(path)))


def test_too_few_rows_to_split(tmp_path):
    path = write(tmp_path, "one.jsonl", jsonl(QA[:1]))
    with pytest.raises(FinetuneError, match="1 rows are too few for a test split of 0.1"):
        load_splits(DataConfig(str(path)))
    assert len(load_splits(DataConfig(str(path), test_size=0))["train"]) == 1


# --- stats, lengths, table -----------------------------------------------------------------------


def test_stats_find_empty_and_duplicate_rows():
    stats = row_stats(load_rows(DataConfig("lamini_docs")))
    assert (stats["rows"], stats["empty_rows"], stats["duplicate_rows"]) == (1400, 1, 4)
    assert stats["length_chars"]["p50"] <= stats["length_chars"]["p90"] <= stats["length_chars"]["max"]
    assert len(load_rows(DataConfig("lamini_docs", clean=True))) == 1395


def test_lengths_summary_and_histogram(tmp_path, smol_tokenizer):
    ds = load_rows(DataConfig(str(write(tmp_path, "qa.jsonl", jsonl(QA)))))
    lengths = token_lengths(ds, smol_tokenizer, TEMPLATES["qa"])
    assert lengths[0] == len(QA_PROMPT_IDS) + len(QA_ANSWER_IDS) + 1
    summary = length_summary(lengths, max_length=20)
    assert summary["truncated_rows"] == int((lengths > 20).sum()) == 1
    assert summary["length_tokens"]["max"] == lengths.max()

    many = np.array([5, 10, 64, 65, 100, 300])
    bars = length_histogram(many, max_length=64, bins=10)
    assert sum(b["rows"] for b in bars) == len(many)
    assert sum(b["rows"] for b in bars if b["fits"] == "fits") == 3  # 64 fits exactly, 65 does not
    assert all(b["tokens"] <= 64 for b in bars if b["fits"] == "fits")


def test_paging_and_search():
    ds = load_rows(DataConfig("lamini_docs"))
    page = page_rows(ds, page=2, page_size=10)
    assert (page.matches, page.pages, page.page) == (1400, 140, 2)
    assert [r["row"] for r in page.rows] == list(range(10, 20)) and page.rows[0]["question"] == ds[10]["question"]
    found = page_rows(ds, query="PERPLEXITY", page_size=1000)
    assert 0 < found.matches < 1400
    assert all("perplexity" in (r["question"] + r["answer"]).lower() for r in found.rows)
    assert page_rows(ds, page=999, page_size=10).page == 140  # clamped
    with pytest.raises(FinetuneError, match="No rows match 'zzzqqq'"):
        page_rows(ds, query="zzzqqq")


# --- split, export, hand-off ---------------------------------------------------------------------


def test_split_is_reproducible_with_the_seed():
    first = load_splits(DataConfig("lamini_docs"))
    again = load_splits(DataConfig("lamini_docs"))
    other = load_splits(DataConfig("lamini_docs", seed=124))
    assert (len(first["train"]), len(first["test"])) == (1260, 140)  # the course's split
    assert first["test"]["question"] == again["test"]["question"]
    assert first["test"]["question"] != other["test"]["question"]


def test_export_writes_text_plus_original_fields(tmp_path):
    cfg = DataConfig(str(write(tmp_path, "qa.jsonl", jsonl(QA * 5))), test_size=0.2)
    paths = export_splits(cfg, out_dir=tmp_path / "out")
    assert set(paths) == {"train", "test"}
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert len(rows) == 8 and set(rows[0]) == {"text", "question", "answer"}
    assert all(r["text"] == f"### Question:\n{r['question']}\n\n### Answer:\n{r['answer']}" for r in rows)
    default = export_splits(cfg)
    assert default["test"].parent.parent == home() / "exports"


def test_persist_and_split_copies_an_upload_into_the_data_dir(tmp_path):
    upload = write(tmp_path, "mine.csv", "question,answer\n" + "".join(f"q{i},a{i}\n" for i in range(10)))
    ready, splits = persist_and_split(DataConfig(str(upload)))
    assert ready.source.startswith(str(home() / "datasets")) and ready.source.endswith("-mine.csv")
    assert Path(ready.source).read_text() == upload.read_text()
    assert ready.mapping == {"instruction": "question", "output": "answer"}
    assert (len(splits["train"]), len(splits["test"])) == (9, 1)
    upload.unlink()  # gradio deletes its temp files; training still finds the data
    assert len(load_splits(ready)["train"]) == 9
    assert persist_source(ready.source) == ready.source and persist_source("lamini_docs") == "lamini_docs"
    odd = write(tmp_path, "my data (1).CSV", "question,answer\nq,a\n")
    assert Path(persist_source(str(odd))).name.endswith("-my-data-1.csv")


def test_canonicalize_keeps_original_columns():
    ds = canonicalize(
        load_dataset_source("lamini_docs").select(range(2)), {"instruction": "question", "output": "answer"}
    )
    assert ds.column_names == ["question", "answer", "instruction", "input", "output"]
    assert ds[0]["input"] == ""
