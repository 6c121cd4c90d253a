"""Next-token cross-entropy over the target tokens, in float32, fused for training.

Shapes: T target tokens, V vocabulary.

``F.cross_entropy(logits.float(), targets)`` with its backward makes six passes over a ``[T, V]`` tensor
(the float32 copy, log-softmax, the gradient's zero fill, log-softmax backward, the cast back), takes the
exponential twice and allocates three ``[T, V]`` tensors per step; freshly allocated tensors that large are
page-faulted in on every step (about 2 GB/s here). On the CPU bench configuration that was a fifth of the
16-bit train step. :class:`FusedCrossEntropy` computes the loss and its gradient with respect to the logits
in one sweep over blocks of rows that fit in cache, one exponential per logit, and writes the gradient into
the logits tensor itself (which nothing needs after the loss); the backward only scales it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# float32 elements per block of rows (2 MiB): a block stays in cache between its passes
BLOCK_ELEMENTS = 1 << 19


class FusedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``logits`` ``[T, V]`` (any float dtype) against ``targets`` ``[T]``, computed
    in float32 as ``max + log(sum(exp(z - max))) - z[target]`` per row (log-softmax's formula).

    The forward overwrites ``logits`` with the unscaled gradient ``softmax(z) - onehot(target)`` (rounded to
    the logits' dtype) and returns it as a second output (``mark_dirty``); the backward multiplies it in
    place by the incoming gradient. A second backward through the same graph therefore fails (autograd
    reports the in-place change); nothing in training needs one.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor):
        rows, vocab = logits.shape
        step = max(1, BLOCK_ELEMENTS // vocab)
        block = torch.empty(min(step, rows), vocab, dtype=torch.float32, device=logits.device)
        losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
        for start in range(0, rows, step):
            z = logits[start : start + step]  # (C, V) in the logits' dtype
            t = targets[start : start + step, None]  # (C, 1)
            p = block[: z.shape[0]]
            p.copy_(z)
            top = p.amax(dim=1, keepdim=True)  # (C, 1)
            picked = p.gather(1, t)  # (C, 1)
            p.sub_(top).exp_()
            total = p.sum(dim=1, keepdim=True)  # (C, 1)
            losses[start : start + step] = (top + total.log() - picked).squeeze(1)
            p.div_(total)  # softmax
            p.scatter_add_(1, t, p.new_full(t.shape, -1.0))  # softmax - onehot
            z.copy_(p)
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
