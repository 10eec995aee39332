"""Log-sum-exp with max subtraction, and the cross entropy built on it.

For any constant ``m``,

    log sum_j exp(z_j) = m + log sum_j exp(z_j - m).

With ``m = max_j z_j`` every ``exp(z_j - m)`` lies in ``(0, 1]`` and the largest is exactly
1, so the sum lies in ``[1, V]``: no overflow, and no ``log 0``. The cross entropy of one
row then needs no softmax at all:

    -log softmax(z)_y = logsumexp(z) - z_y.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference.input_checks import check_logits_and_targets

REDUCTIONS = ("mean", "sum", "none")


def logsumexp(x: Tensor, dim: int = -1) -> Tensor:
    """``log(sum(exp(x), dim))`` without overflow, in ``x``'s dtype; ``dim`` is removed.

    A row of all ``-inf`` gives ``-inf`` (``log 0``), a row holding ``+inf`` gives ``+inf``,
    a row holding NaN gives NaN, as ``torch.logsumexp`` does.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point torch.Tensor")
    # The identity holds for any constant, so the shift carries no gradient. A row whose
    # max is +-inf would give inf - inf = nan; shifting such a row by 0 keeps it exact.
    m = x.detach().amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (x - m).exp().sum(dim=dim, keepdim=True).log().add(m).squeeze(dim)


def cross_entropy(
    logits: Tensor,
    targets: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Cross entropy as ``logsumexp(z) - z[target]``, computed in float32.

    ``logits (N, V)`` of any floating dtype (upcast to float32 first, as transformers does;
    float64 is rounded to float32 too), ``targets (N,)`` integer, values in ``[0, V)`` or
    ``ignore_index`` (any leading shape works with ``targets.shape == logits.shape[:-1]``).
    Ignored targets contribute 0. Returns float32: for ``reduction='none'`` the per-row
    losses shaped like ``targets``, for ``'sum'`` their 0-d sum, for ``'mean'`` the sum
    divided by the number of non-ignored targets (NaN when there is none, like
    ``F.cross_entropy``).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_logits_and_targets(logits, targets, ignore_index)
    logits = logits.float()
    targets = targets.long()
    valid = targets != ignore_index
    # gather needs an index inside [0, V) even on ignored rows; their value is dropped below.
    target_logit = logits.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    losses = torch.where(valid, logsumexp(logits) - target_logit, torch.zeros_like(target_logit))
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / valid.sum()
