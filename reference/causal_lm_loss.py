"""The causal-LM loss exactly as transformers computes it (``ForCausalLMLoss``).

A causal LM's logits at position ``t`` predict the token at ``t + 1``. transformers does
not slice the logits to pair them up; it shifts the labels left by one and pads the last
position with ``ignore_index``, so all ``B * T`` logit rows enter the cross entropy and the
last row of every sequence is ignored. The rules, as in transformers 4.57 to 5.23:

1. The logits are upcast to float32 first; the loss is a 0-d float32 tensor.
2. Targets are ``pad(labels, (0, 1), value=ignore_index)[..., 1:]``, unless
   ``shift_labels`` is given, which is used as is.
3. Logits and targets are flattened row-major; the targets move to the logits' device.
4. Without ``num_items_in_batch``: mean over non-ignored targets (NaN when there is none).
   With it: the sum divided by it literally: a tensor count is moved to the loss's device,
   a Python number stays a Python number. No recount, no clamping: a count of 0 gives
   +inf (or NaN when every target is ignored).
5. Other keyword arguments (``label_smoothing``, ``reduction``, ``cu_seq_lens_q`` ...)
   are accepted and ignored.

Built on ``F.cross_entropy`` over the same flattened tensors, the result and its gradient
are bit-for-bit those of transformers. Unlike transformers, bad inputs raise a clear
``TypeError``/``ValueError`` (labels out of ``[0, V)``, wrong shapes, empty batch), and
integer labels of any width are accepted (transformers needs int64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.input_checks import check_logits_and_targets, check_targets_dtype

IGNORE_INDEX = -100


def shift_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Next-token targets: ``out[..., t] = labels[..., t + 1]``, ``out[..., -1] = ignore_index``.

    ``labels (..., T)`` integer, at least 1-d; returns an int64 tensor of the same shape.
    """
    _check_labels(labels)
    return F.pad(labels.long(), (0, 1), value=ignore_index)[..., 1:].contiguous()


def count_target_tokens(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Number of target tokens of one causal-LM batch, after the shift.

    ``labels (..., T)`` integer. Position ``t`` predicts ``labels[..., t + 1]``, so the first
    label of each row is never a target: the count is over ``labels[..., 1:]``, as Trainer
    counts since transformers 5.10. Returns a 0-d int64 tensor on ``labels``' device.
    """
    _check_labels(labels)
    return labels[..., 1:].ne(ignore_index).sum()


def _check_labels(labels: Tensor) -> None:
    check_targets_dtype(labels, "labels")
    if labels.dim() == 0:
        raise ValueError("labels must have a sequence dimension, got a 0-d tensor")


# causal_lm_loss takes a parameter named shift_labels (transformers' signature), which
# hides the function of that name inside it.
_shift = shift_labels


def causal_lm_loss(
    logits: Tensor,
    labels: Tensor | None,
    vocab_size: int,
    num_items_in_batch: int | float | Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: Tensor | None = None,
    **kwargs,
) -> Tensor:
    """transformers' ``ForCausalLMLoss``: next-token cross entropy of ``logits`` against ``labels``.

    ``logits (B, T, V)`` (any ``(..., V)``) float16/bfloat16/float32/float64 with
    ``V == vocab_size``; ``labels`` integer, shaped ``logits.shape[:-1]``, values in
    ``[0, V)`` or ``ignore_index``, unshifted (the model's ``input_ids`` with ignored
    positions set to ``ignore_index``). ``shift_labels``, if given, replaces the shifted
    labels and ``labels`` is not read. ``num_items_in_batch``: the number of targets the
    summed loss is divided by (int, float or 0-d tensor), else the mean is taken.
    Unknown keyword arguments are ignored. Returns a 0-d float32 tensor.
    """
    given, name = (labels, "labels") if shift_labels is None else (shift_labels, "shift_labels")
    check_logits_and_targets(logits, given, ignore_index, vocab_size, name)
    logits = logits.float()
    targets = _shift(labels, ignore_index) if shift_labels is None else shift_labels.long()
    logits = logits.reshape(-1, vocab_size)
    targets = targets.reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="mean")
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
