"""Problems the equivalence tests share, built on the device the suite runs on: the GPU
where there is one (the Triton kernels compiled), else the CPU (the kernels in Triton's
interpreter, which conftest switches on)."""

from __future__ import annotations

import torch

IGNORE = -100
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Each loss option alone, a reduction other than the mean, a count, and all transforms at once.
LOSS_OPTIONS = {
    "plain": {},
    "softcap": {"softcap": 4.0},
    "logit_scale": {"logit_scale": 0.6},
    "label_smoothing": {"label_smoothing": 0.2},
    "z_loss": {"z_loss": 0.05},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "count_int": {"num_items_in_batch": 7},
    "all": {"softcap": 3.0, "logit_scale": 1.7, "label_smoothing": 0.1, "z_loss": 0.01},
}


def make_problem(
    shape=(2, 9),
    dim=8,
    vocab=13,
    *,
    dtype=torch.float32,
    bias=False,
    ignore_frac=0.25,
    logit_std=3.0,
    seed=0,
    requires_grad=True,
    device=DEVICE,
):
    """``(hidden shape + (dim,), weight (vocab, dim), bias (vocab,) or None, labels shape)``.

    Drawn in float64 on the CPU from ``seed`` (the same numbers on every device), then cast
    to ``dtype`` on ``device``. Logits come out about N(0, logit_std**2); a fraction
    ``ignore_frac`` of the labels is ``IGNORE``.
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, dim, generator=gen, dtype=torch.float64, device="cpu")
    weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64, device="cpu") * (logit_std / dim**0.5)
    b = torch.randn(vocab, generator=gen, dtype=torch.float64, device="cpu") if bias else None
    labels = torch.randint(0, vocab, shape, generator=gen, device="cpu")
    labels[torch.rand(shape, generator=gen, device="cpu") < ignore_frac] = IGNORE
    tensors = [
        t.to(device, dtype).requires_grad_(requires_grad) if t is not None else None for t in (hidden, weight, b)
    ]
    return (*tensors, labels.to(device))


def random_like(shape, seed: int, dtype=torch.float32, device=DEVICE) -> torch.Tensor:
    """Standard normal numbers drawn on the CPU from ``seed``, placed on ``device``."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype, device="cpu").to(device)
