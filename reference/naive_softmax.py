"""Softmax and cross entropy straight from the textbook formulas, and where they break.

    softmax(z)_j = exp(z_j) / sum_k exp(z_k)          loss = -log softmax(z)_y

Computed literally, ``exp`` overflows long before the loss is large: float32 and bfloat16
overflow for logits above about 88.7, float16 already above about 11.1 (its largest value
is 65504). The overflowed ``inf`` turns into ``inf / inf = nan`` or ``log 0 = -inf``. For
small logits the formulas are exact up to rounding. ``reference.logsumexp`` fixes this.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference.input_checks import check_logits_and_targets


def naive_softmax(logits: Tensor) -> Tensor:
    """``exp(z) / sum exp(z)`` over the last dimension, with no max subtraction.

    ``logits (..., V)`` of any floating dtype; returns the same shape and dtype, computed in
    that dtype: ``inf``/``nan`` once some ``exp(z)`` overflows.
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError("logits must be a floating-point torch.Tensor")
    exp = logits.exp()
    return exp / exp.sum(dim=-1, keepdim=True)


def naive_cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean of ``-log naive_softmax(logits)[target]`` over the targets that are not ignored.

    ``logits (N, V)`` floating point, ``targets (N,)`` integer (any leading shape works,
    as long as ``targets.shape == logits.shape[:-1]``). Computed in the logits' dtype, no
    upcast; returns a 0-d tensor of that dtype, NaN when every target is ignored.
    """
    check_logits_and_targets(logits, targets, ignore_index)
    targets = targets.long()
    valid = targets != ignore_index
    # gather needs an index inside [0, V) even on ignored rows; their value is dropped below.
    index = torch.where(valid, targets, 0).unsqueeze(-1)
    target_prob = naive_softmax(logits).gather(-1, index).squeeze(-1)
    return -target_prob.log()[valid].mean()
