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
