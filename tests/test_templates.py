import pytest
from conftest import assert_trained_exactly, trained_spans  # tests/ is on sys.path

from finetune import FinetuneError
from finetune.templates import (
    IGNORE_INDEX,
    TEMPLATES,
    build_prompt,
    custom_template,
    encode,
    encode_row,
    render,
    validate,
)

ROW = {"instruction": "What is Lamini?", "input": "", "output": "An LLM engine."}


def test_qa_template_text():
    prompt, answer = render(TEMPLATES["qa"], ROW)
    assert prompt == "### Question:\nWhat is Lamini?\n\n### Answer:\n"
    assert answer == "An LLM engine."


def test_alpaca_chooses_variant_per_row():
    without, _ = render(TEMPLATES["alpaca"], ROW)
    with_input, _ = render(TEMPLATES["alpaca"], {**ROW, "input": "Lamini docs"})
    assert "### Input:" not in without and without.endswith("### Instruction:\nWhat is Lamini?\n\n### Response:\n")
    assert "### Input:\nLamini docs\n\n### Response:\n" in with_input
    assert "paired with an input" in with_input and "paired with an input" not in without


def test_qa_token_ids_and_mask_exact(smol_tokenizer):
    enc = encode_row(smol_tokenizer, TEMPLATES["qa"], ROW)
    # "### Question:\nWhat is Lamini?\n\n### Answer:\n" then "An LLM engine." + <|im_end|> (EOS)
    prompt_ids = [3757, 15232, 42, 198, 1780, 314, 450, 2576, 89, 47, 198, 198, 3757, 19842, 42, 198]
    answer_ids = [2089, 450, 34519, 2327, 30, smol_tokenizer.eos_token_id]
    assert enc["input_ids"] == prompt_ids + answer_ids
    assert enc["labels"] == [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    assert enc["prompt_length"] == len(prompt_ids)
    # Separate tokenization matches tokenizing the whole text at once.
    assert smol_tokenizer("".join(render(TEMPLATES["qa"], ROW)))["input_ids"] == enc["input_ids"][:-1]


def test_chat_template_mask_covers_answer_and_end_of_turn(smol_tokenizer):
    enc = encode_row(smol_tokenizer, TEMPLATES["chat"], ROW)
    trained = [t for t, label in zip(enc["input_ids"], enc["labels"]) if label != IGNORE_INDEX]
    assert smol_tokenizer.decode(trained) == "An LLM engine.<|im_end|>\n"
    assert enc["input_ids"].count(smol_tokenizer.bos_token_id) == 3  # system, user, assistant turns; none added


SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def test_multi_turn_chat_trains_every_assistant_turn(smol_tokenizer):
    row = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "What is Lamini?"},
            {"role": "assistant", "content": "An LLM engine."},
        ]
    }
    enc = encode_row(smol_tokenizer, TEMPLATES["chat"], row)
    assert_trained_exactly(
        smol_tokenizer,
        enc,
        [
            (SMOL_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
            ("Hello!<|im_end|>\n", True),
            ("<|im_start|>user\nWhat is Lamini?<|im_end|>\n<|im_start|>assistant\n", False),
            ("An LLM engine.<|im_end|>\n", True),
        ],
    )
    assert enc["prompt_length"] == trained_spans(enc)[0][0]
    # Each token's turn, for the Data tab's colours (the template's own system prompt comes with the first user turn).
    assert enc["kinds"] == ["assistant" if label != IGNORE_INDEX else "user" for label in enc["labels"]]
    # A data set's own template overrides nothing: messages rows with a text template use the model's chat template.
    assert encode_row(smol_tokenizer, TEMPLATES["qa"], row) == enc
    # The prompt and answer shown in the Data tab: the answer is the last turn.
    assert render(TEMPLATES["chat"], row, smol_tokenizer)[1] == "An LLM engine.<|im_end|>\n"


def test_truncation_cuts_the_answer_never_the_prompt(smol_tokenizer):
    full = encode_row(smol_tokenizer, TEMPLATES["qa"], ROW)
    cut = encode_row(smol_tokenizer, TEMPLATES["qa"], ROW, max_length=18)
    assert cut["input_ids"] == full["input_ids"][:18]
    assert sum(label != IGNORE_INDEX for label in cut["labels"]) == 2
    none_left = encode(smol_tokenizer, *render(TEMPLATES["qa"], ROW), max_length=10)
    assert all(label == IGNORE_INDEX for label in none_left["labels"])


def test_custom_template_validated_against_columns():
    template = custom_template("Q: {question}\nA: ", answer_field="answer")
    validate(template, ["question", "answer"])
    with pytest.raises(FinetuneError, match=r"\{context\} are not columns"):
        validate(custom_template("{question} {context}", answer_field="answer"), ["question", "answer"])
    with pytest.raises(FinetuneError, match="not valid"):
        custom_template("Q: {question")
    assert render(template, {"question": "Why?", "answer": "Because."}) == ("Q: Why?\nA: ", "Because.")


def test_chat_template_needs_a_tokenizer_with_one():
    with pytest.raises(FinetuneError, match="no chat template"):
        build_prompt(TEMPLATES["chat"], "Hi")
