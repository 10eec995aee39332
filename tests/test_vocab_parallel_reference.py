"""The vocabulary-parallel combination of per-shard statistics (reference.vocab_parallel),
in one process, against the contract (reference.linear_cross_entropy) on the whole weight.

Tolerances: float64 inputs, so the contract computes its float32 logits from float64
matmuls; the shards' logits are the same matmul's columns, bit for bit. What differs is
the order of the sums over the vocabulary (per shard, then across shards) and the
``max``-shifted exponentials: a few float32 ulps of ``max|z| + log V`` per token
(``forward_atols``) for losses and lse; gradients rtol 1e-5 plus 1e-5 of the largest entry.
"""

from __future__ import annotations

import pytest
import torch

from loss_tolerances import forward_atols
from problems import IGNORE, LOSS_OPTIONS
from reference.chunked_cross_entropy import _logit_grad_
from reference.linear_cross_entropy import LossOptions, linear_cross_entropy, transform_logits
from reference.vocab_parallel import (
    combine_statistics,
    shard_logit_gradient,
    shard_offsets,
    shard_statistics,
    vocab_parallel_linear_cross_entropy,
)

OPTIONS = {**LOSS_OPTIONS, "shift": {"shift": True}}
# Shard sizes of a vocabulary of 13: torch's Shard(0) over 2, 3 and 5 ranks (ceil(13 / R)
# rows each, the last ranks short or empty) and a layout with an empty shard in the middle.
SHARDINGS = {"2": [7, 6], "3": [5, 5, 3], "5": [3, 3, 3, 3, 1], "empty": [6, 0, 7]}


def problem(seed=0, bias=False, vocab=13):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 9, 8, generator=gen, dtype=torch.float64).requires_grad_()
    weight = (torch.randn(vocab, 8, generator=gen, dtype=torch.float64) * 3 / 8**0.5).requires_grad_()
    b = torch.randn(vocab, generator=gen, dtype=torch.float64).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, (2, 9), generator=gen)
    labels[torch.rand(2, 9, generator=gen) < 0.25] = IGNORE
    return hidden, weight, b, labels


@pytest.mark.parametrize("sizes", SHARDINGS.values(), ids=SHARDINGS.keys())
@pytest.mark.parametrize("kwargs", OPTIONS.values(), ids=OPTIONS.keys())
def test_combined_shards_equal_the_contract(kwargs, sizes):
    hidden, weight, bias, labels = problem(bias=True)
    loss, lse = linear_cross_entropy(hidden, weight, labels, bias=bias, return_lse=True, **kwargs)
    expected = torch.autograd.grad(loss.sum() + lse.sum(), (hidden, weight, bias))
    loss_atol, lse_atol = forward_atols(hidden, weight, bias, labels, kwargs)
    got_loss, got_lse = vocab_parallel_linear_cross_entropy(
        hidden, list(weight.split(sizes)), labels, bias_shards=list(bias.split(sizes)), return_lse=True, **kwargs
    )
    torch.testing.assert_close(got_loss, loss, rtol=1e-6, atol=loss_atol)
    torch.testing.assert_close(got_lse, lse, rtol=1e-6, atol=lse_atol)
    got = torch.autograd.grad(got_loss.sum() + got_lse.sum(), (hidden, weight, bias))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


def test_a_shard_without_any_target_adds_only_to_the_normaliser():
    hidden, weight, _, labels = problem()
    labels = torch.where(labels >= 7, 0, labels)  # rows 7..12 (the second shard) hold no target
    options = LossOptions()
    z = transform_logits(torch.nn.functional.linear(hidden.reshape(-1, 8), weight).float(), options)
    targets = labels.reshape(-1)
    stats = [shard_statistics(z[:, :7], targets, 0, IGNORE), shard_statistics(z[:, 7:], targets, 7, IGNORE)]
    assert torch.equal(stats[1].target_logit, torch.zeros(18))
    combined = combine_statistics(stats)
    torch.testing.assert_close(combined.lse, torch.logsumexp(z, dim=1), rtol=1e-6, atol=1e-5)
    valid = labels.reshape(-1) != IGNORE
    picked = z.gather(1, labels.reshape(-1, 1).clamp(min=0)).squeeze(1)
    torch.testing.assert_close(combined.target_logit[valid], picked[valid], rtol=0, atol=0)


def test_an_empty_shard_contributes_nothing():
    z = torch.randn(4, 0)
    stats = shard_statistics(z, torch.tensor([0, 1, IGNORE, 2]), 5, IGNORE)
    assert torch.equal(stats.max, torch.full((4,), -torch.inf))
    other = shard_statistics(torch.randn(4, 5), torch.tensor([0, 1, IGNORE, 2]), 0, IGNORE)
    combined = combine_statistics([other, stats])
    alone = combine_statistics([other])
    assert torch.equal(combined.lse, alone.lse) and torch.equal(combined.target_logit, alone.target_logit)


@pytest.mark.parametrize("kwargs", OPTIONS.values(), ids=OPTIONS.keys())
def test_shard_gradients_are_columns_of_the_whole_gradient(kwargs):
    """The per-shard logit gradient, concatenated over shards, is the chunked reference's
    whole-vocabulary gradient (float64 throughout: equal to rounding)."""
    options = LossOptions(
        label_smoothing=kwargs.get("label_smoothing", 0.0), softcap=kwargs.get("softcap"),
        logit_scale=kwargs.get("logit_scale"), z_loss=kwargs.get("z_loss", 0.0),
    )
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 11, generator=gen, dtype=torch.float64) * 3
    targets = torch.tensor([0, 10, IGNORE, 4, 5, 7])
    z = transform_logits(x, options)
    lse = torch.logsumexp(z, dim=1)
    grad_loss = torch.where(targets != IGNORE, torch.rand(6, generator=gen, dtype=torch.float64), 0)
    grad_lse = torch.rand(6, generator=gen, dtype=torch.float64)
    whole = _logit_grad_(z.clone(), targets, lse, grad_loss, grad_lse, options)
    sizes = [4, 4, 3]
    parts = [
        shard_logit_gradient(zk, targets, offset, 11, lse, grad_loss, grad_lse, options)
        for zk, offset in zip(z.split(sizes, dim=1), shard_offsets(sizes))
    ]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-12, atol=1e-12)
