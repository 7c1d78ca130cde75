"""The chunked answer-only loss: next-token cross-entropy at answer positions only, projected to the vocabulary
in chunks, with gradients worked out chunk by chunk (see `finetune.train`, which trains with it). The one held-out
loss too: `answer_loss_rows` gives it per row, for the trainer's eval and for `finetune.evaluate.answer_losses`
(Evaluate tab, guided path).

    python -m pytest tests/test_loss.py tests/test_train.py -k loss    # equals the full causal-LM loss and gradients
    python -m pytest tests/test_evaluate.py -k answer_losses           # per row, in chunks, base and adapter rows

Speed: prompt labels are -100, so the vocabulary projection (262k columns for Gemma-3, most of the compute of a
small model) runs only at answer positions, in chunks, instead of at every position as
`model(**batch, labels=...)` does; the loss value is the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune import FinetuneError
from finetune.templates import IGNORE_INDEX

NO_LOGITS = torch.empty(0, dtype=torch.long)  # `logits_to_keep` that projects no position
LOGITS_CHUNK = 128  # answer positions per vocabulary projection: bounds the logits memory (chunk x vocab floats)


def causal_lm(model):
    """The transformers model inside DDP / PEFT wrappers (its modules carry the LoRA layers)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def answer_loss_sum(model, batch: dict, vocab: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over answer positions, number of those positions).

    `sum / count` equals `model(**batch, labels=labels).loss`. With gradients enabled (training) the loss is a
    `ChunkedLoss`, whose gradients are worked out chunk by chunk; without, it is the sum of `answer_loss_rows`. With
    `vocab` (sorted token ids containing every target), the softmax runs over those tokens only: a sampled-softmax
    approximation, much cheaper for a big vocabulary and a small-domain data set.
    """
    if not torch.is_grad_enabled():
        sums, counts = answer_loss_rows(model, batch, vocab)
        return sums.sum(), int(counts.sum())
    lm, hidden, keep = answer_hidden(model, batch)
    targets = batch["labels"][:, 1:].to(keep.device)[keep]
    weight, bias, targets = _output_layer(lm, targets, vocab)
    return ChunkedLoss.apply(hidden, targets, weight, bias, softcap(lm)), len(targets)


def answer_loss_rows(
    model, batch: dict, vocab: torch.Tensor | None = None, **forward_kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token cross-entropy over each row's answer positions, float32 on the model's device; the number
    of those positions per row, on the labels' device), without gradients: the held-out loss.

    `batch` has `input_ids`, `attention_mask` and `labels` (-100 where not an answer token), right-padded.
    `forward_kwargs` go to the model's forward (PEFT's `adapter_names`: row i runs with adapter i). At most
    LOGITS_CHUNK positions x vocabulary logits exist at a time (Gemma-3's 262k vocabulary at every answer
    position of 4 rows of 512 tokens was ~5 GB), softmax in float32, softcapped like Gemma's.
    """
    with torch.no_grad():
        lm, hidden, keep = answer_hidden(model, batch, **forward_kwargs)
        labels = batch["labels"][:, 1:]
        weight, bias, targets = _output_layer(lm, labels.to(keep.device)[keep], vocab)
        cap = softcap(lm)
        per_position = torch.zeros(keep.shape, dtype=torch.float32, device=hidden.device)
        losses = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        for i in range(0, len(targets), LOGITS_CHUNK):
            part = slice(i, i + LOGITS_CHUNK)
            losses[part] = chunk_cross_entropy(hidden[part], targets[part], weight, bias, cap)[0]
        # Spread back to (row, position) and summed per row: deterministic, unlike an index_add_ on CUDA.
        per_position[keep] = losses
        return per_position.sum(1), (labels != IGNORE_INDEX).sum(1)


def answer_hidden(model, batch: dict, **forward_kwargs) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(the causal LM, its final hidden states at the positions whose next token is an answer token, row after row,
    the boolean (rows, length - 1) mask of those positions on the hidden states' device).

    Runs the model through its normal forward (so DDP hooks and PEFT adapters apply) keeping no logits at all, and
    captures the decoder's output.
    """
    lm = causal_lm(model)
    captured = {}

    def keep_hidden(_module, _inputs, output) -> None:  # returns None: the output itself is left unchanged
        captured["h"] = output[0]

    hook = lm.get_decoder().register_forward_hook(keep_hidden)
    try:
        # No positions kept: even `logits_to_keep=1` made torch's CPU matmul copy Gemma's 262k x 640 output
        # weight once per row in bfloat16 (measured: 6.2 s and 2.7 GB of a 8-row step).
        model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            logits_to_keep=NO_LOGITS,
            use_cache=False,
            **forward_kwargs,
        )
    finally:
        hook.remove()
    hidden = captured["h"][:, :-1]
    keep = (batch["labels"][:, 1:] != IGNORE_INDEX).to(hidden.device)  # position t predicts token t + 1
    return lm, hidden[keep], keep


def softcap(lm) -> float | None:
    """Gemma's `final_logit_softcapping` (logits -> cap * tanh(logits / cap)), None where the model has none."""
    return getattr(lm.config, "final_logit_softcapping", None)


def _output_layer(lm, targets: torch.Tensor, vocab: torch.Tensor | None):
    """(weight, bias, targets) of the vocabulary projection: the whole output layer, or its `vocab` rows only, with
    the targets renumbered into them."""
    head = lm.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if vocab is not None:
        if any(p.requires_grad for p in head.parameters()):
            raise FinetuneError("train_vocab: data cannot train the output layer (lm_head); use train_vocab: full.")
        vocab = vocab.to(weight.device)
        weight, bias = weight[vocab], bias[vocab] if bias is not None else None
        targets = torch.searchsorted(vocab, targets)
    return weight, bias, targets


def chunk_cross_entropy(
    hidden: torch.Tensor, targets: torch.Tensor, weight, bias, cap: float | None, grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, torch.dtype]:
    """(cross-entropy of each of `targets` under logits `hidden @ weight.T + bias`, softcapped like Gemma's; with
    `grad` its gradient w.r.t. those logits, in float32; the dtype the projection computed in).

    Worked out in place in one float32 chunk x vocab buffer: autograd's cross-entropy keeps three such buffers.
    """
    logits = F.linear(hidden, weight, bias)
    dtype, logits = logits.dtype, logits.float()
    if cap:
        tanh = logits.div_(cap).tanh_()
        logits = tanh.mul(cap)
    rows = torch.arange(len(targets), device=logits.device)
    picked = logits[rows, targets]
    peak = logits.amax(-1, keepdim=True)
    exp = logits.sub_(peak).exp_()
    norm = exp.sum(-1, keepdim=True)
    loss = peak.squeeze(-1) + norm.squeeze(-1).log() - picked
    if not grad:
        return loss, None, dtype
    softmax = exp.div_(norm)
    softmax[rows, targets] -= 1  # d loss / d logits = softmax - one-hot
    if cap:  # d (cap tanh(z / cap)) / dz = 1 - tanh^2
        softmax.mul_(tanh.square_().neg_().add_(1))
    return loss, softmax, dtype


# float16 keeps 10 bits above 6e-5 only: a softmax over 262k tokens is mostly ~4e-6 there. Scaled by 2^12 before the
# cast (|softmax - one-hot| <= 1, so no overflow), unscaled in float32 after the product.
FP16_GRAD_SCALE = 2.0**12


class ChunkedLoss(torch.autograd.Function):
    """Summed cross-entropy over row chunks, whose gradients are worked out chunk by chunk in forward.

    Only one chunk's logits (chunk x vocab floats) is ever alive; the gradients are kept in float32 until backward
    scales them (by 1 / answer tokens, and by the GradScaler's factor under float16), then cast to the inputs' dtype.
    """

    @staticmethod
    def forward(ctx, hidden, targets, weight, bias, cap):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        want_weight, want_bias = ctx.needs_input_grad[2], bias is not None and ctx.needs_input_grad[3]
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None
        for i in range(0, len(targets), LOGITS_CHUNK):
            h = hidden[i : i + LOGITS_CHUNK]
            loss, grad, dtype = chunk_cross_entropy(h, targets[i : i + LOGITS_CHUNK], weight, bias, cap, grad=True)
            total += loss.sum()
            scale = FP16_GRAD_SCALE if dtype == torch.float16 else 1.0
            low = grad.mul_(scale).to(dtype)  # the projection's dtype: bfloat16 / float16 products run natively
            grad_hidden[i : i + LOGITS_CHUNK] = (low @ weight.to(dtype)).float().div_(scale)
            if grad_weight is not None:
                grad_weight += (low.T @ h.to(dtype)).float().div_(scale)
            if grad_bias is not None:
                grad_bias += grad.sum(0).div_(scale)
        ctx.grads = grad_hidden, grad_weight, grad_bias
        ctx.dtypes = hidden.dtype, weight.dtype, bias.dtype if bias is not None else None
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias = (
            (g * grad_total).to(dtype) if g is not None else None for g, dtype in zip(ctx.grads, ctx.dtypes)
        )
        return grad_hidden, None, grad_weight, grad_bias, None
