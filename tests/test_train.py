"""Training: the answer-only loss, a real few-step LoRA run on a tiny model, stop, kill -9 + resume, CLI, DDP."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetune import FinetuneError
from finetune.callbacks import RunCallback
from finetune.config import RECIPES, DataConfig, ModelSpec, TrainConfig, load_train_config
from finetune.loss import answer_loss_sum
from finetune.runs import RunDir
from finetune.templates import IGNORE_INDEX
from finetune.train import (
    AnswerOnlyTrainer,
    build_model,
    check_config,
    data_vocab,
    encode_splits,
    pad_batch,
    steps_in_budget,
    train,
    training_arguments,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    rows = [
        {
            "question": f"What is item number {i} of the list?",
            "answer": f"Item {i} is a small blue {'box ' * (i % 4)}.",
        }
        for i in range(24)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tiny_config(model: str, data: str, **overrides) -> TrainConfig:
    values = dict(
        max_length=64,
        max_steps=4,
        batch_size=4,
        learning_rate=1e-2,
        save_steps=2,
        logging_steps=1,
        eval_rows=4,
        mixed_precision="no",
        lora_dropout=0.0,
    )
    values.update(overrides)
    return TrainConfig(model=ModelSpec(model, dtype="float32"), data=DataConfig(data, test_size=0.25), **values)


def test_label_mask_excludes_prompt(tiny_llama, qa_file, smol_tokenizer):
    data = encode_splits(tiny_config(tiny_llama, qa_file), smol_tokenizer)
    row = data.train[0]
    prompt_len = next(i for i, t in enumerate(row["labels"]) if t != IGNORE_INDEX)
    prompt = smol_tokenizer.decode(row["input_ids"][:prompt_len])
    assert "### Question:" in prompt and prompt.rstrip().endswith("### Answer:")
    assert row["labels"][prompt_len:] == row["input_ids"][prompt_len:]
    assert row["labels"][-1] == smol_tokenizer.eos_token_id
    assert row["length"] == len(row["input_ids"])


def test_pad_batch_pads_to_longest_row():
    batch = pad_batch([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def _batch(tokenizer, cfg):
    data = encode_splits(cfg, tokenizer)
    return pad_batch([data.train[i] for i in range(3)], tokenizer.pad_token_id)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_answer_only_loss_equals_reference_loss(tiny_llama, qa_file, smol_tokenizer, softcap, monkeypatch):
    """Projecting only answer positions (in chunks) gives the loss and gradients of the full causal-LM loss."""
    monkeypatch.setattr("finetune.loss.LOGITS_CHUNK", 7)  # several chunks, one of them partial
    cfg = tiny_config(tiny_llama, qa_file)
    model, tokenizer, _ = build_model(cfg)
    model.get_base_model().config.final_logit_softcapping = softcap  # Gemma's cap (Llama's forward ignores it)
    for p in model.parameters():  # LoRA B starts at zero; make the adapters matter
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    trainable = [p for p in model.parameters() if p.requires_grad]
    batch = _batch(tokenizer, cfg)
    total, count = answer_loss_sum(model, batch)
    ours = total / count
    grads = torch.autograd.grad(ours, trainable)

    out = model(**batch)
    logits = torch.tanh(out.logits / softcap) * softcap if softcap else out.logits
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    if softcap is None:
        torch.testing.assert_close(reference, out.loss)
    ref_grads = torch.autograd.grad(reference, trainable)
    assert count == (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_data_vocab_loss_is_the_softmax_over_those_tokens(tiny_llama, qa_file, smol_tokenizer):
    """`train_vocab: data`: the cross-entropy over the data's tokens only; every target is among them."""
    cfg = tiny_config(tiny_llama, qa_file)
    model, tokenizer, _ = build_model(cfg)
    data = encode_splits(cfg, tokenizer)
    vocab = data_vocab(data.train)
    assert vocab.tolist() == sorted({t for row in data.train["input_ids"] for t in row})
    batch = _batch(tokenizer, cfg)
    total, count = answer_loss_sum(model, batch, vocab)

    logits = model(**batch).logits[:, :-1][:, :, vocab]
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    targets = torch.searchsorted(vocab, labels[keep])
    assert torch.equal(vocab[targets], labels[keep])
    reference = torch.nn.functional.cross_entropy(logits[keep], targets, reduction="sum")
    torch.testing.assert_close(total, reference, rtol=1e-5, atol=1e-4)
    full, _ = answer_loss_sum(model, batch)
    assert total < full  # fewer tokens share the probability mass


def test_trainer_evaluates_over_the_full_vocabulary(tiny_llama, qa_file, tmp_path):
    cfg = tiny_config(tiny_llama, qa_file)
    model, tokenizer, _ = build_model(cfg)
    data = encode_splits(cfg, tokenizer)
    trainer = AnswerOnlyTrainer(model=model, args=training_arguments(cfg, tmp_path, has_eval=False))
    trainer.vocab = data_vocab(data.train)
    batch = _batch(tokenizer, cfg)
    full, count = answer_loss_sum(model, batch)
    model.eval()
    torch.testing.assert_close(trainer.compute_loss(model, batch), full / count)
    model.train()
    assert trainer.compute_loss(model, batch) < full / count


def test_few_steps_train_lora_only_and_adapter_reloads(tiny_llama, qa_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(tiny_llama, qa_file, max_steps=3)
    model, tokenizer, summary = build_model(cfg)
    assert "trainable parameters" in summary and "MB" in summary
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = encode_splits(cfg, tokenizer)
    trainer = AnswerOnlyTrainer(
        model=model,
        args=training_arguments(cfg, tmp_path, has_eval=False),
        data_collator=lambda f: pad_batch(f, tokenizer.pad_token_id),
        train_dataset=data.train,
    )
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    for name, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == ("lora_" in name), name  # every LoRA weight moved, no base weight did
    model.save_pretrained(tmp_path / "adapter")
    model.eval()
    batch = pad_batch([data.test[0]], tokenizer.pad_token_id)
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)
        reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected)


def test_train_writes_run_folder(tiny_llama, qa_file, tmp_path):
    run_dir = tmp_path / "run"
    adapter = train(tiny_config(tiny_llama, qa_file), run_dir)
    assert adapter == RunDir(run_dir).adapter_dir and (adapter / "adapter_model.safetensors").is_file()
    status = RunDir(run_dir).read_status()
    assert status["state"] == "finished" and status["step"] == status["total"] == 4
    assert "trainable parameters" in status["summary"]
    assert status["decided"] == {"dtype": "float32", "mixed_precision": "no", "batch_size": 4}  # what `auto` became
    metrics = RunDir(run_dir).read_metrics()
    losses = [r["loss"] for r in metrics if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    evals = [r for r in metrics if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]  # before training, and at each checkpoint (keep_best)
    assert all(r["tokens_per_s"] > 0 for r in metrics if "loss" in r and r["step"] > 1)
    tokens = [r["tokens"] for r in metrics]  # training tokens seen by each row's step: an x axis to compare runs by
    assert tokens[0] == 0 and tokens == sorted(tokens) and tokens[-1] > 0
    assert load_train_config(run_dir / "config.yaml") == tiny_config(tiny_llama, qa_file)
    assert RunDir(run_dir).latest_checkpoint().path.name == "checkpoint-4"


def test_auto_steps_fit_what_the_set_up_left_of_the_budget(tmp_path):
    """The run's clock starts before its set-up (model, data, competitor tokens, the timed step: 30 s on a 2-core AVX2
    CPU), so the steps are planned on what is left; planned on the whole budget, the clock ended the run early with
    its learning-rate schedule unfinished (seen: 1 of 8 planned steps in a 30-second run)."""
    cfg = TrainConfig(max_steps="auto", max_minutes=1.0, num_epochs=100)
    (tmp_path / "run").mkdir(), (tmp_path / "late").mkdir()
    run = RunDir(tmp_path / "run")
    left = steps_in_budget(cfg, 10_000, run, True, lambda: 1.0, lambda: 20.0)
    assert left == int((20.0 - 3) * 0.95)  # 3 slow first steps and 5% to spare, of the 20 s left (not 60 s)
    assert run.read_status()["planned_steps"] == left
    assert steps_in_budget(cfg, 10_000, run, True, lambda: 1.0, lambda: 50.0) == left  # a resume keeps the plan
    assert steps_in_budget(cfg, 10_000, RunDir(tmp_path / "late"), True, lambda: 1.0, lambda: -5.0) == 1


def test_stop_file_saves_adapter_at_current_step(tiny_llama, qa_file, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    begin = RunCallback.on_train_begin

    def begin_then_ask_to_stop(self, args, state, control, **kwargs):
        begin(self, args, state, control, **kwargs)
        self.run.request_stop()  # what the runner's Stop does

    monkeypatch.setattr(RunCallback, "on_train_begin", begin_then_ask_to_stop)
    train(tiny_config(tiny_llama, qa_file, max_steps=50), run_dir)
    status = RunDir(run_dir).read_status()
    assert status["state"] == "stopped" and status["step"] == 1
    assert (RunDir(run_dir).adapter_dir / "adapter_config.json").is_file()
    assert RunDir(run_dir).latest_checkpoint().path.name == "checkpoint-1"  # so Resume continues from step 1


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "finetune", *args]


def test_kill9_then_resume_continues_from_checkpoint(tiny_llama, qa_file, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [f"model.source={tiny_llama}", f"data.source={qa_file}", "data.test_size=0.25", "max_length=64"]
    overrides += ["max_steps=100000", "save_steps=3", "logging_steps=1", "eval_rows=0", "mixed_precision=no"]
    sets = [a for o in overrides for a in ("--set", o)]
    proc = subprocess.Popen(_cli("train", "--run-dir", str(run_dir), *sets), cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        run = RunDir(run_dir)
        while run.latest_checkpoint() is None or run.latest_checkpoint().path.name == "checkpoint-3":
            assert proc.poll() is None and time.monotonic() < deadline, "the trainer should still be running"
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert RunDir(run_dir).read_status()["state"] == "running"  # killed: nobody wrote a final state
    step = int(RunDir(run_dir).latest_checkpoint().path.name.split("-")[1])
    cfg = load_train_config(run_dir / "config.yaml", [f"max_steps={step + 2}"])
    train(cfg, run_dir, resume=True)
    status = RunDir(run_dir).read_status()
    assert status["state"] == "finished" and status["step"] == step + 2
    steps = [r["step"] for r in RunDir(run_dir).read_metrics() if "loss" in r]
    # Rows written after the checkpoint by the killed process were dropped; training went on from `step`.
    assert steps == sorted(set(steps)) and steps[-3:] == [step, step + 1, step + 2]


def test_report_to_tensorboard_writes_event_files(tiny_llama, qa_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = RunDir(tmp_path / "run")
    train(tiny_config(tiny_llama, qa_file, max_steps=3, save_steps=10, report_to="tensorboard"), run.path)
    assert list(run.tensorboard_dir.glob("events.out.tfevents.*"))  # in the run folder, not under checkpoints/
    events = EventAccumulator(str(run.tensorboard_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 3]  # the evaluation after training too
    logged = {r["step"]: r["loss"] for r in run.read_metrics() if "loss" in r}
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([logged[s] for s in (1, 2, 3)])


def test_a_missing_or_unknown_tracker_is_a_clear_error(tiny_llama, qa_file, monkeypatch):
    with pytest.raises(FinetuneError, match="report_to must be one of none, tensorboard, trackio"):
        check_config(tiny_config(tiny_llama, qa_file, report_to="wandb"))
    real = importlib.util.find_spec
    missing = lambda name, *args: None if name == "tensorboard" else real(name, *args)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", missing)
    with pytest.raises(FinetuneError, match="needs the tensorboard package: pip install tensorboard"):
        check_config(tiny_config(tiny_llama, qa_file, report_to="tensorboard"))


def test_the_train_form_offers_the_trackers_in_a_dropdown():
    import gradio as gr

    from finetune.ui.forms import form_config, more_settings

    with gr.Blocks():
        form = more_settings(TrainConfig(), placed={})
    choices = [value for _, value in form["report_to"].choices]
    assert isinstance(form["report_to"], gr.Dropdown) and choices == ["none", "tensorboard", "trackio"]
    assert isinstance(form["keep_best"], gr.Checkbox) and form["keep_best"].value is True
    assert form_config({"report_to": "tensorboard"}, TrainConfig()).report_to == "tensorboard"


def test_keep_best_measures_each_checkpoint_and_keeps_the_newest_and_the_best(tiny_llama, qa_file, tmp_path):
    run = RunDir(tmp_path / "run")
    train(tiny_config(tiny_llama, qa_file, max_steps=6, save_steps=1, save_total_limit=2), run.path)
    held_out = {r["step"]: r["eval_loss"] for r in run.read_metrics() if "eval_loss" in r}
    assert sorted(held_out) == [0, 1, 2, 3, 4, 5, 6]  # at the start, then at every checkpoint
    best = min((s for s in held_out if s > 0), key=held_out.get)
    assert [c.step for c in run.checkpoints()] == sorted({best, 5, 6})
    assert {c.step: c.eval_loss for c in run.checkpoint_infos()} == {s: held_out[s] for s in {best, 5, 6}}


def test_check_config_rejects_bad_configs_with_a_sentence(tiny_llama, qa_file, tmp_path):
    check_config(tiny_config(tiny_llama, qa_file))
    with pytest.raises(FinetuneError, match="neither an embedded model"):
        check_config(tiny_config("/no/such/model", qa_file))
    empty = tmp_path / "empty.csv"
    empty.write_text("question,answer\n")
    with pytest.raises(FinetuneError, match="no rows"):
        check_config(tiny_config(tiny_llama, str(empty)))
    with pytest.raises(FinetuneError, match="max_length=8 is not above the prompt length"):
        check_config(tiny_config(tiny_llama, qa_file, max_length=8))
    with pytest.raises(FinetuneError, match="batch_size"):
        check_config(tiny_config(tiny_llama, qa_file, batch_size=0))
    with pytest.raises(FinetuneError, match="train_vocab must be one of auto, full, data"):
        check_config(tiny_config(tiny_llama, qa_file, train_vocab="dataset"))


def test_cli_train_and_bad_override(tiny_llama, qa_file, tmp_path):
    env = {**os.environ, "FINETUNE_HOME": str(tmp_path)}
    bad = subprocess.run(_cli("train", "--set", "no_such_key=1"), cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "Unknown setting no_such_key" in bad.stderr
    sets = [f"model.source={tiny_llama}", f"data.source={qa_file}", "max_length=64", "max_steps=2", "eval_rows=0"]
    args = ["train", "--config", str(RECIPES / "cpu_quick.yaml")] + [a for s in sets for a in ("--set", s)]
    ok = subprocess.run(_cli(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    run_dir = Path(ok.stdout.split("run folder: ")[1].splitlines()[0])
    assert run_dir.parent == tmp_path / "runs"
    assert RunDir(run_dir).read_status()["state"] == "finished"
    assert "step 2/2" in (run_dir / "train.log").read_text()


def test_export_merges_adapter_into_base(tiny_llama, qa_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from finetune.export import export_merged

    run_dir = tmp_path / "run"
    train(tiny_config(tiny_llama, qa_file, max_steps=2, eval_rows=0), run_dir)
    out = export_merged(run_dir, tmp_path / "merged")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert not torch.equal(
        merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight
    )


# Two processes of DDP on the CPU (gloo), as `accelerate launch --num_processes 2` starts them on GPUs: torch's own
# launcher, which accelerate's multi-GPU launcher calls. (`accelerate launch --cpu --num_processes 2` starts one
# process: without mpirun, its CPU launcher is the single-process one.)
TWO_CPU_PROCESSES = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


def test_accelerate_launch_two_cpu_processes(tiny_llama, qa_file, tmp_path):
    """The same command under DDP: two processes train together and one writes the run folder."""
    run_dir = tmp_path / "ddp"
    sets = [f"model.source={tiny_llama}", f"data.source={qa_file}", "data.test_size=0.25", "max_length=64"]
    sets += ["max_steps=3", "batch_size=2", "eval_rows=4", "mixed_precision=no", "save_steps=2", "logging_steps=1"]
    sets += ["eval_steps=1"]  # the last step evaluates: no process may evaluate once more alone after it
    cmd = TWO_CPU_PROCESSES + ["-m", "finetune", "train", "--run-dir", str(run_dir)]
    cmd += [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-3000:]
    status = RunDir(run_dir).read_status()
    assert status["state"] == "finished" and status["step"] == 3
    # Both processes decide the final evaluation alike (it is a collective): rank 1 used to see no evaluation at all
    # (recorded by rank 0's logging alone) and evaluate again while rank 0 saved and left.
    decisions = sorted(line.split("final evaluation: ")[1] for line in done.stderr.splitlines()
                       if "final evaluation: " in line)  # fmt: skip
    assert decisions == ["no, done at the last step (process 0)", "no, done at the last step (process 1)"], decisions
    assert (RunDir(run_dir).adapter_dir / "adapter_model.safetensors").is_file()
    assert sum(1 for r in RunDir(run_dir).read_metrics() if "loss" in r) == 3  # one writer, not two


@pytest.mark.parametrize(
    "env",
    [{"SPACE_ID": "someone/workbench", "SPACES_ZERO_GPU": "true"},  # a ZeroGPU Space's child: no GPU of its own
     {"FINETUNE_APP_DEVICE": "cuda:1"}],  # the app's models on a second GPU: not the child's device  # fmt: skip
    ids=["zero-gpu-space", "app-device-elsewhere"],
)
def test_a_training_process_trains_and_evaluates_on_its_own_device(tiny_llama, qa_file, tmp_path, env):
    """The runner's child inherits the app's variables. On ZeroGPU it used to train on the Space's `cuda:0` ("Torch not
    compiled with CUDA enabled" here, no GPU in a subprocess there); with FINETUNE_APP_DEVICE its evaluation at the end
    asked for the app's device. Both now run where the process trains: here, the CPU."""
    run_dir = tmp_path / "run"
    sets = [f"model.source={tiny_llama}", f"data.source={qa_file}", "data.test_size=0.25", "max_length=64"]
    sets += ["max_steps=2", "batch_size=2", "eval_rows=4", "eval_at_end=true", "save_steps=100"]
    cmd = [sys.executable, "-m", "finetune", "train", "--run-dir", str(run_dir)]
    cmd += [a for s in sets for a in ("--set", s)]
    env = {**os.environ, **env, "FINETUNE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    status = RunDir(run_dir).read_status()
    assert done.returncode == 0 and status["state"] == "finished", status.get("message") or done.stderr[-2000:]
    assert " · cpu: " in status["summary"], status["summary"]  # the decided line: where it trained
    assert RunDir(run_dir).read_eval()["questions"] > 0  # eval_at_end ran, on the CPU


def test_training_arguments_refuse_data_parallel(tiny_llama, qa_file, tmp_path, monkeypatch):
    """With two GPUs visible and no `accelerate launch`, the Trainer would wrap the model in nn.DataParallel and the
    answer-only loss would fail at the first held-out loss (IndexError): a sentence instead, before any step."""
    from transformers import TrainingArguments

    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))
    with pytest.raises(FinetuneError, match="sees 2 GPUs: train on several with `accelerate launch"):
        training_arguments(tiny_config(tiny_llama, qa_file), tmp_path, has_eval=True)


def test_accelerate_agrees_on_one_folder_and_on_the_time_budget(tiny_llama, qa_file, tmp_path):
    """Two processes without --run-dir write one run folder; rank 1's clock runs 50x fast (a skewed start), so it
    reaches max_minutes first: both stop at the same step instead of one waiting forever in the next all-reduce."""
    skew = tmp_path / "skew"
    skew.mkdir()
    (skew / "sitecustomize.py").write_text(
        "import os, time\n"
        "if os.environ.get('RANK') == '1':\n"
        "    _real = time.time; _t0 = _real()\n"
        "    time.time = lambda: _t0 + (_real() - _t0) * 50\n"
    )
    home = tmp_path / "home"
    sets = [f"model.source={tiny_llama}", f"data.source={qa_file}", "data.test_size=0.25", "max_length=64"]
    sets += ["max_steps=100000", "max_minutes=0.1", "batch_size=2", "eval_rows=0", "mixed_precision=no"]
    sets += ["save_steps=100000", "logging_steps=1"]
    cmd = TWO_CPU_PROCESSES + ["-m", "finetune", "train"]
    cmd += [a for s in sets for a in ("--set", s)]
    path = os.pathsep.join([str(skew), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FINETUNE_HOME": str(home), "PYTHONPATH": path}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-3000:]
    (run_dir,) = (home / "runs").iterdir()
    status = RunDir(run_dir).read_status()
    assert status["state"] == "finished" and 0 < status["step"] < 100000
    assert "time budget" in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_embedded_gemma_trains_with_4bit_on_cpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = TrainConfig(
        model=ModelSpec("gemma-3-270m", quantization="4bit"),
        data=DataConfig("lamini_docs", max_rows=12),
        max_length=48,
        max_steps=2,
        batch_size=2,
        eval_rows=0,
        save_steps=10,
    )
    train(cfg, tmp_path / "run")
    status = RunDir(tmp_path / "run").read_status()
    assert status["state"] == "finished" and status["step"] == 2
    assert "4bit" in status["summary"]
    assert all(math.isfinite(r["loss"]) for r in RunDir(tmp_path / "run").read_metrics() if "loss" in r)


def test_4bit_keeps_the_vocabulary_layers_in_the_compute_dtype(tiny_llama, qa_file):
    # prepare_model_for_kbit_training casts them to float32: double memory, and autocast re-casts per projection.
    pytest.importorskip("bitsandbytes")
    cfg = tiny_config(tiny_llama, qa_file)
    cfg.model = ModelSpec(tiny_llama, dtype="bfloat16", quantization="4bit")
    model, _, _ = build_model(cfg)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    assert not model.get_output_embeddings().weight.requires_grad


def test_word_settings_take_the_words_their_types_allow():
    """One place for the allowed values (the config's Literal types): `--set mixed_precision=no` was YAML's False."""
    assert load_train_config(None, ["mixed_precision=no"]).mixed_precision == "no"
    assert load_train_config(None, ["report_to=tensorboard", "method=dpo"]).report_to == "tensorboard"
    with pytest.raises(FinetuneError, match=r"mixed_precision must be one of auto, bf16, fp16, no \(got 'bf17'\)"):
        load_train_config(None, ["mixed_precision=bf17"])


def test_the_train_command_shows_itself_one_gpu(monkeypatch):
    """`python -m finetune train` started by hand on a 2-GPU box (no accelerate): one GPU, never DataParallel."""
    import argparse

    from finetune.__main__ import _cmd_train

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,4")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(FinetuneError, match="Give --config"):  # fails after pinning, before anything loads
        _cmd_train(argparse.Namespace(run_dir=None, config=None, set=[], resume=False, checkpoint=None))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
