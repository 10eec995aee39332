"""The benchmark's inputs: shapes, and the uniform and peaked data every method is fed.

Both kinds of data follow ../shared/bench/README.md, drawn in the same order from the same
seed as its ``anchor_bench.py``, so a shape gets the very same tensors on the same device:

* ``uniform``: ``hidden ~ N(0, 1)``, ``weight ~ N(0, (0.5 / sqrt(D))**2)``: logits of std
  about 0.5, a nearly flat softmax; labels uniform over the vocabulary.
* ``peaked``: weight std ``4 / sqrt(D)``, logits of std about 4; each label is drawn from
  the model's own softmax, as a trained model's targets would look (losses of a few nats).

In both, about 10% of the labels are ``IGNORE_INDEX``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100
DATA_KINDS = ("uniform", "peaked")
LOGIT_STD = {"uniform": 0.5, "peaked": 4.0}
IGNORED_FRACTION = 0.1
# Rows per block when sampling peaked labels: bounds the float32 softmax to 1024 x V.
SAMPLING_ROWS = 1024


@dataclass(frozen=True)
class Shape:
    """A problem size: ``tokens`` rows of ``hidden`` width, a vocabulary of ``vocab``."""

    tokens: int
    hidden: int
    vocab: int

    def __post_init__(self) -> None:
        for name in ("tokens", "hidden", "vocab"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"shape {name} must be a positive int, got {value!r}")

    def __str__(self) -> str:
        return f"{self.tokens}x{self.hidden}x{self.vocab}"

    @property
    def matmul_flops(self) -> int:
        """FLOPs of the three matmuls forward+backward needs: logits, grad of hidden, of weight."""
        return 6 * self.tokens * self.hidden * self.vocab

    def gradient_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of the gradients of hidden ``(N, D)`` and weight ``(V, D)`` in ``dtype``:
        memory every method must hold at its peak."""
        return (self.tokens + self.vocab) * self.hidden * dtype.itemsize


def parse_shape(text: str) -> Shape:
    """``"8192x2048x128256"`` (tokens x hidden x vocab) -> ``Shape``; ValueError otherwise."""
    parts = text.strip().lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"a shape is TOKENSxHIDDENxVOCAB of positive integers, got {text!r}")
    return Shape(*(int(p) for p in parts))


@dataclass(frozen=True)
class Problem:
    """One benchmark input: ``hidden (N, D)`` and ``weight (V, D)`` leaf tensors that require
    grad, in the benchmark dtype, and int64 ``labels (N,)`` with ``IGNORE_INDEX`` entries."""

    shape: Shape
    data: str
    hidden: Tensor
    weight: Tensor
    labels: Tensor

    def clear_grads(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None


def make_problem(shape: Shape, data: str, *, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> Problem:
    """Draw the ``data`` kind ('uniform' or 'peaked') of problem at ``shape`` on ``device``."""
    if data not in DATA_KINDS:
        raise ValueError(f"data must be one of {DATA_KINDS}, got {data!r}")
    n, d, v = shape.tokens, shape.hidden, shape.vocab
    torch.manual_seed(seed)
    hidden = torch.randn(n, d, device=device, dtype=dtype)
    weight = torch.randn(v, d, device=device, dtype=dtype) * (LOGIT_STD[data] * d**-0.5)
    if data == "uniform":
        labels = torch.randint(0, v, (n,), device=device)
    else:
        with torch.no_grad():
            labels = torch.cat(
                [
                    torch.multinomial(torch.softmax((hidden[i : i + SAMPLING_ROWS] @ weight.t()).float(), -1), 1).squeeze(1)
                    for i in range(0, n, SAMPLING_ROWS)
                ]
            )
    labels[torch.rand(n, device=device) < IGNORED_FRACTION] = IGNORE_INDEX
    return Problem(shape, data, hidden.requires_grad_(), weight.requires_grad_(), labels)
