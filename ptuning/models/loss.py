"""The language-model loss of every family: next-token cross-entropy over the target tokens, in float32, fused
for training.

Every family's ``forward`` ends in :func:`project_and_loss`: with labels and ``return_logits=False`` (the
training loop's call) only the T positions that predict a target are projected and the loss is
:func:`cross_entropy` (:class:`FusedCrossEntropy` when gradients flow); otherwise the logits of every position
are formed and the loss is :func:`causal_lm_loss` (``F.cross_entropy`` on a float32 copy).

Shapes: B batch, S tokens, H hidden size, T target tokens, V vocabulary.

``F.cross_entropy(logits.float(), targets)`` with its backward makes six passes over a ``[T, V]`` tensor
(the float32 copy, log-softmax, the gradient's zero fill, log-softmax backward, the cast back), takes the
exponential twice and allocates three ``[T, V]`` tensors per step; freshly allocated tensors that large are
page-faulted in on every step (about 2 GB/s here). On the CPU bench configuration that was a fifth of the
16-bit train step. :class:`FusedCrossEntropy` computes the loss and its gradient with respect to the logits
in one sweep over blocks of rows, one exponential per logit and four passes per block, and writes the
gradient into the logits tensor itself (which nothing needs after the loss); the backward only scales it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100

# float32 elements per block of rows (8 MiB): few enough blocks that each op is a large one, which matters
# more than cache fit on a busy 2-core machine (every op is a parallel region both threads must reach)
BLOCK_ELEMENTS = 1 << 21


class FusedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``logits`` ``[T, V]`` (any float dtype) against ``targets`` ``[T]``, in float32.

    Per block of rows: ``p = softmax(z)`` in float32 (one exponential per logit), and the loss
    ``max(z) - z[target] + log(sum(exp(z - max)))`` (log-softmax's formula), the log of the sum read off the
    largest probability (``1 / sum``), so it stays exact where ``p[target]`` underflows. The forward overwrites
    ``logits`` with the unscaled gradient ``p - onehot(target)`` (rounded to the logits' dtype) and returns it as
    a second output (``mark_dirty``); the backward multiplies it in place by the incoming gradient. A second
    backward through the same graph therefore fails (autograd reports the in-place change); nothing in
    training needs one.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor):
        rows, vocab = logits.shape
        step = max(1, BLOCK_ELEMENTS // vocab)
        losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
        for start in range(0, rows, step):
            z = logits[start : start + step]  # (C, V) in the logits' dtype
            t = targets[start : start + step, None]  # (C, 1)
            p = torch.softmax(z, dim=1, dtype=torch.float32)  # (C, V)
            top = z.amax(dim=1, keepdim=True).float()  # (C, 1)
            log_sum = -p.amax(dim=1, keepdim=True).log()  # p at the max is exp(0) / sum
            losses[start : start + step] = (top + log_sum - z.gather(1, t).float()).squeeze(1)
            p.scatter_add_(1, t, torch.full(t.shape, -1.0, device=p.device))  # p - onehot
            z.copy_(p)
            del p  # before the next block's two float32 tensors exist
        ctx.mark_dirty(logits)
        ctx.save_for_backward(logits)
        ctx.set_materialize_grads(False)
        return losses.sum(), logits

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_logits):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_loss), None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``logits`` ``[T, V]`` against ``targets`` ``[T]`` (no ignored entries), float32.

    With gradients enabled and ``logits`` requiring them this is :class:`FusedCrossEntropy`, which
    **consumes** ``logits`` (overwritten by its gradient): pass a tensor nothing else reads, such as the
    output of the projection made for this loss. Otherwise ``F.cross_entropy`` on a float32 copy.

    Args:
        reduction: ``mean`` or ``sum`` over the T targets.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: expected 'mean' or 'sum'")
    if not (torch.is_grad_enabled() and logits.requires_grad) or logits.shape[0] == 0:
        return F.cross_entropy(logits.float(), targets, reduction=reduction)
    total, _ = FusedCrossEntropy.apply(logits, targets)
    return total / logits.shape[0] if reduction == "mean" else total


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits ``[B, S, V]`` at 0..S-2 against labels ``[B, S]`` at 1..S-1, in float32, over
    every non-ignored (-100) token of the batch: their mean, or their sum."""
    shift_logits = logits[:, :-1].float()  # (B, S-1, V)
    shift_labels = labels[:, 1:].to(logits.device)  # (B, S-1)
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def target_token_loss(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"):
    """:func:`causal_lm_loss` from the final hidden states ``[B, S, H]``, projecting only the T positions whose
    next label is a target; the loss is :func:`cross_entropy` (fused when training)."""
    targets = labels[:, 1:].to(hidden.device)  # (B, S-1)
    keep = targets != IGNORE_INDEX
    logits = lm_head(hidden[:, :-1][keep])  # (T, V), read only by the loss
    return cross_entropy(logits, targets[keep], reduction)


def project_and_loss(
    lm_head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor | None = None,
    reduction: str = "mean",
    *,
    return_logits: bool = True,
    logits_to_keep: int | torch.Tensor = 0,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The end of every family's ``forward``: ``(logits, loss)`` from the final hidden states ``[B, S, H]``.

    Args:
        labels: ``[B, S]`` (-100 = ignored) or None (no loss).
        reduction: ``mean`` or ``sum`` over the targets.
        return_logits: False with labels: no logits, the output projection only where a target is predicted
            (:func:`target_token_loss`).
        logits_to_keep: without labels, as transformers: the last ``logits_to_keep`` positions (an int, 0 =
            all) or the positions a 1D index tensor names.

    Returns:
        ``logits`` ``[B, S or kept, V]`` in the head's dtype (None with ``return_logits=False`` and labels) and
        the float32 ``loss`` (None without labels).

    Raises:
        ValueError: ``reduction`` is neither ``mean`` nor ``sum``.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction={reduction!r}: expected 'mean' or 'sum'")
    if labels is not None and not return_logits:
        return None, target_token_loss(lm_head, hidden, labels, reduction)
    if labels is None and isinstance(logits_to_keep, torch.Tensor):
        hidden = hidden[:, logits_to_keep]
    elif labels is None and logits_to_keep:
        hidden = hidden[:, -logits_to_keep:]
    logits = lm_head(hidden)  # (B, S, V)
    loss = causal_lm_loss(logits, labels, reduction) if labels is not None else None
    return logits, loss
