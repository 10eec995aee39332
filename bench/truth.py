"""The float32 truth each method's loss and gradients are compared with.

The project's definition, ``reference.linear_cross_entropy``, applied to float32 copies of
the benchmark's inputs, in full float32 matmul precision (no TF32). Its logits would not fit
in memory at the larger shapes, so it runs over blocks of rows with ``reduction='sum'`` and
divides by the number of valid labels at the end: the mean the methods compute, with the
same gradients up to float32 rounding.
"""

from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from bench.problems import IGNORE_INDEX, Problem
from reference.linear_cross_entropy import linear_cross_entropy

# Float32 logits per block of rows; autograd keeps a few tensors of this size.
BLOCK_LOGIT_BYTES = 1 << 30


@dataclass(frozen=True)
class Truth:
    """Float32 mean loss (0-d) and gradients of hidden ``(N, D)`` and weight ``(V, D)``."""

    loss: Tensor
    grad_hidden: Tensor
    grad_weight: Tensor


@contextmanager
def _highest_matmul_precision() -> Iterator[None]:
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def float32_truth(problem: Problem, block_logit_bytes: int = BLOCK_LOGIT_BYTES) -> Truth:
    """Loss and gradients of ``problem`` in float32, ``block_logit_bytes`` of logits at a time."""
    hidden = problem.hidden.detach().float()
    weight = problem.weight.detach().float().requires_grad_()
    labels = problem.labels
    rows = max(1, block_logit_bytes // (weight.shape[0] * 4))
    grad_hidden = torch.empty_like(hidden)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    with _highest_matmul_precision():
        for start in range(0, hidden.shape[0], rows):
            block = hidden[start : start + rows].clone().requires_grad_()
            loss = linear_cross_entropy(block, weight, labels[start : start + rows], reduction="sum")
            loss.backward()
            grad_hidden[start : start + rows] = block.grad
            total += loss.detach()
    count = (labels != IGNORE_INDEX).sum()
    return Truth(total / count, grad_hidden.div_(count), weight.grad.div_(count))


def relative_error(approx: Tensor, truth: Tensor) -> float:
    """``||approx - truth|| / ||truth||`` (L2 over all elements), computed in float32."""
    return ((approx.float() - truth).norm() / truth.norm()).item()
