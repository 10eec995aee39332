"""Input checks shared by the reference losses: what makes ``(logits, targets)`` a valid
cross-entropy input, with errors that name the offending argument."""

from __future__ import annotations

import torch
from torch import Tensor


def check_targets_dtype(targets: Tensor, name: str = "targets") -> None:
    """Raise ``TypeError`` unless ``targets`` is a tensor of an integer dtype (not bool)."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(targets).__name__}")
    dtype = targets.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class indices, got dtype {dtype}")


def check_logits_and_targets(
    logits: Tensor,
    targets: Tensor,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    name: str = "targets",
) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``(logits, targets)`` is a valid cross-entropy input.

    Valid: ``logits (..., V)`` floating point with ``V > 0`` (and ``V == vocab_size`` when
    given), at least one row; ``targets`` of an integer dtype with shape ``logits.shape[:-1]``
    and every value either ``ignore_index`` or in ``[0, V)``. Out-of-range targets are an
    error, never clamped. ``name`` is the caller's name for ``targets`` in the messages.
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got dtype {logits.dtype}")
    check_targets_dtype(targets, name)
    if logits.dim() == 0:
        raise ValueError("logits must have a last (vocabulary) dimension, got a 0-d tensor")
    vocab = logits.shape[-1]
    if vocab_size is not None and vocab != vocab_size:
        raise ValueError(f"logits' last dimension is {vocab}, but vocab_size is {vocab_size}")
    if vocab == 0:
        raise ValueError("logits have an empty vocabulary dimension (V = 0)")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"{name} has shape {tuple(targets.shape)}, but logits' leading dimensions are "
            f"{tuple(logits.shape[:-1])}"
        )
    if targets.numel() == 0:
        raise ValueError(f"empty batch: logits have shape {tuple(logits.shape)}, no rows to score")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        raise ValueError(
            f"{name} holds {int(bad.sum())} value(s) outside [0, {vocab}) that are not "
            f"ignore_index={ignore_index}, e.g. {int(targets[bad][0])}"
        )


def check_size(name: str, value: int) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``name`` unless ``value`` is a positive int."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
