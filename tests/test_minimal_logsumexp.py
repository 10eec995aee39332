"""The teaching kernel of notebook 06 against the reference log-sum-exp, on shapes that no
block size divides (run on the CPU through the Triton interpreter, see conftest.py)."""

import math

import pytest
import torch

from fused.kernels.minimal_logsumexp import row_logsumexp
from reference.logsumexp import logsumexp

EPS = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37, 1000), (1, 1), (16, 128), (5, 3001)])
def test_row_logsumexp_matches_the_reference(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(shape, generator=gen) * 8).to(dtype)
    ours, ref = row_logsumexp(z), logsumexp(z.float())
    # Different summation orders: a few float32 ulps of the largest intermediate.
    tolerance = 8 * EPS * (z.float().abs().amax(dim=1) + math.log(shape[1]))
    assert ((ours - ref).abs() <= tolerance).all()


def test_row_logsumexp_of_huge_logits_does_not_overflow():
    z = torch.tensor([[1000.0, 1000.0, -1000.0], [-5.0, 0.0, 88.0]])
    torch.testing.assert_close(row_logsumexp(z, block_cols=2), logsumexp(z), rtol=1e-6, atol=0)


def test_row_logsumexp_takes_a_row_slice_of_a_wider_matrix():
    z = torch.randn(9, 50, generator=torch.Generator().manual_seed(1))[:, 3:41]
    ours = row_logsumexp(z, block_rows=4, block_cols=16)
    torch.testing.assert_close(ours, logsumexp(z), rtol=1e-6, atol=1e-6)


def test_row_logsumexp_rejects_columns_that_are_not_contiguous():
    with pytest.raises(ValueError, match="contiguous rows"):
        row_logsumexp(torch.randn(4, 6).t())
