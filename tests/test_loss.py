"""The chunked loss on its own: gradients worked out chunk by chunk equal plain autograd (float32 and fp16)."""

from __future__ import annotations

import pytest
import torch

from finetune.loss import ChunkedLoss


def test_chunked_loss_gradients_under_fp16_autocast_match_float32(monkeypatch):
    """float16 (GPUs below compute capability 8): the softmax gradient over a big vocabulary is mostly below fp16's
    normal range; kept in float32 until the loss scale multiplies it, the gradients match a float32 reference."""
    monkeypatch.setattr("finetune.loss.LOGITS_CHUNK", 16)
    torch.manual_seed(0)
    vocab, width, rows = 65_536, 64, 40
    weight = torch.randn(vocab, width) * 0.05
    hidden = torch.randn(rows, width, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,))
    reference = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    (ref_grad,) = torch.autograd.grad(reference / rows, hidden)
    scale = 2.0**16  # what a GradScaler multiplies the loss by
    with torch.autocast("cpu", dtype=torch.float16):
        ours = ChunkedLoss.apply(hidden, targets, weight, None, None)
    (grad,) = torch.autograd.grad(ours / rows * scale, hidden)
    assert grad.dtype == torch.float32  # the input's dtype
    torch.testing.assert_close(ours, reference, rtol=2e-3, atol=0)
    torch.testing.assert_close(grad / scale, ref_grad, rtol=0, atol=2e-4)


@pytest.mark.parametrize("cap", [None, 2.0])
def test_chunked_loss_gradients_include_a_trainable_output_layer(monkeypatch, cap):
    """Gradients worked out chunk by chunk in forward equal plain autograd, for the inputs and the layer's weights."""
    monkeypatch.setattr("finetune.loss.LOGITS_CHUNK", 3)
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50)
    hidden = torch.randn(10, 8, requires_grad=True)
    targets = torch.randint(0, 50, (10,))

    ours = ChunkedLoss.apply(hidden, targets, head.weight, head.bias, cap) * 0.5
    grads = torch.autograd.grad(ours, [hidden, *head.parameters()])
    logits = torch.tanh(head(hidden) / cap) * cap if cap else head(hidden)
    reference = torch.nn.functional.cross_entropy(logits, targets, reduction="sum") * 0.5
    ref_grads = torch.autograd.grad(reference, [hidden, *head.parameters()])
    torch.testing.assert_close(ours, reference)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("cap", [None, 5.0])
def test_answer_loss_rows_equal_full_logits_cross_entropy_per_row_and_sum_to_the_training_loss(
    tiny_llama, monkeypatch, cap
):
    """The one held-out loss (trainer's eval, Evaluate tab, guided path): per row, in chunks, Gemma's softcap
    honoured; `answer_loss_sum` without gradients is its sum, and with gradients (`ChunkedLoss`) the same value."""
    from conftest import QA

    from finetune.config import ModelSpec
    from finetune.loss import answer_loss_rows, answer_loss_sum
    from finetune.models import load_model
    from finetune.templates import IGNORE_INDEX, TEMPLATES, encode_row
    from finetune.train import pad_batch

    monkeypatch.setattr("finetune.loss.LOGITS_CHUNK", 5)  # chunks that span two rows
    model, tok = load_model(ModelSpec(tiny_llama, dtype="float32"))
    model.config.final_logit_softcapping = cap  # Gemma's cap (Llama's forward ignores it)
    encoded = [encode_row(tok, TEMPLATES["qa"], {"instruction": q, "output": a}) for q, a in QA[:4]]
    batch = pad_batch(encoded, 0)  # right-padded, as in training and in `evaluate.answer_losses`
    with torch.no_grad():
        sums, counts = answer_loss_rows(model, batch)
        total, count = answer_loss_sum(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    logits = torch.tanh(logits / cap) * cap if cap else logits
    labels = batch["labels"][:, 1:]
    reference = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none").sum(1)
    assert counts.tolist() == (labels != IGNORE_INDEX).sum(1).tolist() and count == sum(counts.tolist())
    torch.testing.assert_close(sums, reference, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(total, reference.sum(), rtol=1e-5, atol=1e-4)
    model.requires_grad_(False).get_output_embeddings().weight.requires_grad_(True)  # a graph for ChunkedLoss
    trained, _ = answer_loss_sum(model, batch)
    torch.testing.assert_close(trained.detach(), total, rtol=1e-5, atol=1e-4)
