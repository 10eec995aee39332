"""The Triton kernels of fused/kernels one by one, in the interpreter without CUDA.

Tolerances, float32: the statistics kernel sums exponentials block by block, so its lse
differs from torch.logsumexp by a few ulps of ``max|z| + log V`` (held to 4); the target
logit is the transformed logit itself (tanh from exp: held to 4 ulps of ``max|z|``); the
logit sum adds ``V`` terms in another order (held to ``V`` ulps of ``max|z|``). Gradients of
a tile: rtol 1e-5 plus atol 2e-5 of the largest entry, as for the whole op.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from fused.kernels.launch import row_kernel_launch
from fused.kernels.logit_gradient import write_logit_gradient
from fused.kernels.logit_statistics import RowStatistics, accumulate_logit_statistics
from fused.kernels.logit_statistics_and_gradient import write_statistics_and_gradient
from fused.kernels import logits_product
from fused.kernels.logits_product import PARTIAL_COLUMNS, logit_gradient_tile, logits_with_statistics, partial_buffer
from fused.kernels.upstream_scale import scale_unless_one
from problems import DEVICE, random_like
from fused.plan import TilePlan
from fused.problem import tile_problem as loss_problem
from fused.tiles import TileDtypes, logits_tile, run_tiles
from reference.linear_cross_entropy import LossOptions, token_losses, transform_logits
from reference.per_token_outputs import entropy

# On a GPU machine these run the compiled kernels on CUDA tensors; elsewhere the kernels run
# on CPU tensors through Triton's interpreter (conftest switches it on). tests/gpu adds real
# shapes and 16-bit dtypes.

pytestmark = pytest.mark.usefixtures("on_the_suites_device")


EPS32 = torch.finfo(torch.float32).eps
TRANSFORMS = {
    "none": LossOptions(),
    "scale_and_cap": LossOptions(logit_scale=1.7, softcap=3.0, label_smoothing=0.1, z_loss=0.02),
}


def tile_problem(rows=6, vocab=70, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen, device="cpu") * 4).to(DEVICE)
    targets = torch.randint(0, vocab, (rows,), generator=gen, device="cpu").to(DEVICE)
    targets[1] = -100
    return logits, targets


@pytest.mark.parametrize("name", TRANSFORMS)
def test_statistics_carry_across_vocabulary_blocks(name):
    # Two blocks of 33 and 37 columns (neither a power of two): the second carries on from
    # the first's running max and sums, as the op does for one row chunk.
    options = TRANSFORMS[name]
    logits, targets = tile_problem()
    stats = RowStatistics(logits.shape[0], torch.float32, logits.device, sum_logits=True)
    rows = slice(0, logits.shape[0])
    for cols in (slice(0, 33), slice(33, 70)):
        accumulate_logit_statistics(logits[:, cols].contiguous(), cols.start, targets, stats, rows, options)
    z = transform_logits(logits, options)
    scale = z.abs().max().item()
    lse = stats.max + torch.log(stats.sumexp)
    torch.testing.assert_close(lse, torch.logsumexp(z, -1), rtol=0, atol=4 * EPS32 * (scale + math.log(70)))
    valid = targets != -100
    expected_target = z.gather(1, targets.clamp_min(0).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(stats.target_logit[valid], expected_target[valid], rtol=0, atol=4 * EPS32 * scale)
    assert stats.target_logit[~valid].eq(0).all()  # -100 lies in no block
    torch.testing.assert_close(stats.logit_sum, z.sum(-1), rtol=0, atol=70 * EPS32 * scale)


def test_statistics_of_a_row_subset():
    # A row chunk in the middle: only its rows' statistics move.
    logits, targets = tile_problem(rows=10)
    stats = RowStatistics(10, torch.float32, logits.device, sum_logits=False)
    rows = slice(3, 8)
    accumulate_logit_statistics(logits[rows].contiguous(), 0, targets, stats, rows, LossOptions())
    torch.testing.assert_close(stats.max[rows] + torch.log(stats.sumexp[rows]), torch.logsumexp(logits[rows], -1))
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[rows] = False
    assert stats.max[untouched].eq(-math.inf).all() and stats.sumexp[untouched].eq(0).all()


@pytest.mark.parametrize("name", TRANSFORMS)
def test_gradient_of_a_vocabulary_block(name):
    # The kernel's dL/dx on columns [20, 57) equals autograd's through the contract's own
    # transform and token_losses, for random upstream gradients of the loss and of the lse.
    options = TRANSFORMS[name]
    logits, targets = tile_problem()
    loss_grad, lse_grad = random_like((2, logits.shape[0]), seed=1)
    x = logits.clone().requires_grad_()
    losses, lse = token_losses(transform_logits(x, options), targets, options)
    (expected,) = torch.autograd.grad((losses * loss_grad).sum() + (lse * lse_grad).sum(), x)
    cols = slice(20, 57)
    tile = logits[:, cols].contiguous()
    rows = slice(0, logits.shape[0])
    write_logit_gradient(tile, cols.start, targets, lse.detach(), loss_grad, lse_grad, rows, logits.shape[1], options)
    torch.testing.assert_close(tile, expected[:, cols], rtol=1e-5, atol=2e-5 * expected.abs().max().item())


@pytest.mark.parametrize("name", TRANSFORMS)
def test_entropy_from_the_statistics_pass(name):
    # Rows 7, vocabulary 70 in blocks of 33 and 37 (neither a power of two; the second
    # rescales the first's weighted sum): lse - weighted_sum / sumexp against the
    # reference's -sum p log p of the same transformed logits. Both sums carry the error of
    # lse's (held to 8 ulps of max|z| + log V).
    options = TRANSFORMS[name]
    logits, targets = tile_problem(rows=7)
    stats = RowStatistics(logits.shape[0], torch.float32, logits.device, sum_logits=False, entropy=True)
    rows = slice(0, logits.shape[0])
    for cols in (slice(0, 33), slice(33, 70)):
        accumulate_logit_statistics(logits[:, cols].contiguous(), cols.start, targets, stats, rows, options)
    z = transform_logits(logits, options)
    lse = stats.max + torch.log(stats.sumexp)
    scale = z.abs().max().item() + math.log(70)
    expected = entropy(torch.log_softmax(z, -1))
    torch.testing.assert_close(stats.entropy_of(rows, lse), expected, rtol=0, atol=8 * EPS32 * scale)


def test_statistics_without_entropy_keep_no_weighted_sum():
    stats = RowStatistics(5, torch.float32, DEVICE, sum_logits=False)
    assert stats.weighted_sum.numel() == 1
    with pytest.raises(ValueError, match="without entropy=True"):
        stats.entropy_of(slice(0, 5), torch.zeros(5, device=DEVICE))


@pytest.mark.parametrize("name", TRANSFORMS)
def test_gradient_with_the_entropy_term(name):
    # dL/dx on columns [20, 57) of rows 7 with upstream gradients of the loss, the lse and the
    # entropy, against autograd through the contract's transform, token_losses and the
    # reference's entropy; an ignored row (row 1) gets no gradient from its entropy.
    options = TRANSFORMS[name]
    logits, targets = tile_problem(rows=7)
    loss_grad, lse_grad, entropy_grad = random_like((3, logits.shape[0]), seed=1)
    x = logits.clone().requires_grad_()
    z = transform_logits(x, options)
    losses, lse = token_losses(z, targets, options)
    row_entropy = entropy(torch.log_softmax(z, -1)).masked_fill(targets == -100, 0.0)
    objective = (losses * loss_grad).sum() + (lse * lse_grad).sum() + (row_entropy * entropy_grad).sum()
    (expected,) = torch.autograd.grad(objective, x)
    cols = slice(20, 57)
    tile = logits[:, cols].contiguous()
    write_logit_gradient(
        tile, cols.start, targets, lse.detach(), loss_grad, lse_grad, slice(0, 7), logits.shape[1], options,
        entropy=row_entropy.detach().contiguous(), entropy_grad=entropy_grad.contiguous(),
    )
    torch.testing.assert_close(tile, expected[:, cols], rtol=1e-5, atol=2e-5 * expected.abs().max().item())


def test_gradient_with_unit_upstream_and_broadcast_row_gradient():
    # loss_grad None means 1 on valid rows; a stride-0 loss_grad is one value for all rows.
    logits, targets = tile_problem()
    options = LossOptions()
    _, lse = token_losses(logits, targets, options)
    rows = slice(0, logits.shape[0])
    unit = logits.clone()
    write_logit_gradient(unit, 0, targets, lse, None, None, rows, logits.shape[1], options)
    broadcast = logits.clone()
    write_logit_gradient(broadcast, 0, targets, lse, torch.tensor(2.0).expand(6), None, rows, logits.shape[1], options)
    expected = torch.softmax(logits, -1) - torch.nn.functional.one_hot(targets.clamp_min(0), logits.shape[1])
    expected[targets == -100] = 0
    torch.testing.assert_close(unit, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(broadcast, 2 * expected, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("vocab", [70, 4100])  # one block of lanes; several (BLOCK_V = 2048)
def test_statistics_and_gradient_in_one_launch(name, vocab):
    # The one-launch kernel of whole-vocabulary tiles: the same statistics as the statistics
    # kernel, lse stored, and the gradient for an upstream gradient of 1 on valid rows.
    options = TRANSFORMS[name]
    logits, targets = tile_problem(rows=7, vocab=vocab)
    rows = slice(2, 7)  # a row chunk in the middle of the tokens
    separate = RowStatistics(7, torch.float32, logits.device, sum_logits=True)
    accumulate_logit_statistics(logits[rows].contiguous(), 0, targets, separate, rows, options)
    stats = RowStatistics(7, torch.float32, logits.device, sum_logits=True, overwritten=True)
    for t in stats.rows(slice(0, 7)):
        t.fill_(float("nan"))  # uninitialised: the kernel must write them, never read them
    lse = torch.full((7,), -1.0)
    tile = logits[rows].clone()
    write_statistics_and_gradient(tile, targets, stats, lse, rows, options)
    for got, want in zip(stats.rows(rows), separate.rows(rows)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(lse[rows], stats.max[rows] + torch.log(stats.sumexp[rows]), rtol=0, atol=0)
    assert lse[:2].eq(-1).all()  # rows outside the chunk untouched
    x = logits.clone().requires_grad_()
    losses, _ = token_losses(transform_logits(x, options), targets, options)
    (expected,) = torch.autograd.grad(losses.sum(), x)
    torch.testing.assert_close(tile, expected[rows], rtol=1e-5, atol=2e-5 * expected.abs().max().item())


@pytest.mark.parametrize("kernel", ["one_launch", "gradient", "statistics"])
def test_ignored_rows_are_skipped_where_nothing_needs_them(kernel):
    # An ignored row's logits are never read when its gradient is 0 and its lse unused: NaN
    # logits there would show in its gradient (zeros), its statistics (those of a row with no
    # logits) or its lse (-inf). The other rows are unchanged by the skip.
    options = TRANSFORMS["scale_and_cap"]
    logits, targets = tile_problem()
    ignored = targets == -100
    logits[ignored] = float("nan")
    rows = slice(0, logits.shape[0])
    stats = RowStatistics(logits.shape[0], torch.float32, logits.device, sum_logits=True)
    clean = RowStatistics(logits.shape[0], torch.float32, logits.device, sum_logits=True)
    accumulate_logit_statistics(logits, 0, targets, clean, rows, options)
    tile = logits.clone()
    if kernel == "one_launch":
        for t in stats.rows(rows):
            t.fill_(float("nan"))
        lse = torch.full((logits.shape[0],), float("nan"))
        write_statistics_and_gradient(tile, targets, stats, lse, rows, options)
        assert lse[ignored].eq(-math.inf).all()
        assert tile[ignored].eq(0).all() and not tile[~ignored].isnan().any()
    elif kernel == "gradient":
        lse = clean.max + torch.log(clean.sumexp)
        lse[ignored] = float("nan")
        write_logit_gradient(tile, 0, targets, lse, torch.randn(logits.shape[0]), None, rows, logits.shape[1], options)
        assert tile[ignored].eq(0).all() and not tile[~ignored].isnan().any()
        return
    else:
        accumulate_logit_statistics(logits, 0, targets, stats, rows, options, skip_ignored=True)
    max_, sumexp, target_logit, logit_sum = stats.rows(rows)
    assert max_[ignored].eq(-math.inf).all()
    for t in (sumexp, target_logit, logit_sum):
        assert t[ignored].eq(0).all()
    for got, want in zip(stats.rows(rows), clean.rows(rows)):
        torch.testing.assert_close(got[~ignored], want[~ignored], rtol=0, atol=0)


def test_statistics_lanes_rescale_when_the_max_moves_late():
    # Within a lane the max grows block after block (an increasing row), and one lane only
    # ever sees masked columns: the lanes' sums must still merge into logsumexp exactly.
    logits = torch.linspace(-30.0, 60.0, 2 * 2048 + 3).unsqueeze(0)
    targets = torch.tensor([2048 + 1])
    stats = RowStatistics(1, torch.float32, logits.device, sum_logits=False)
    accumulate_logit_statistics(logits, 0, targets, stats, slice(0, 1), LossOptions())
    lse = stats.max + torch.log(stats.sumexp)
    torch.testing.assert_close(lse, torch.logsumexp(logits.double(), -1).float(), rtol=0, atol=4 * EPS32 * 60)
    torch.testing.assert_close(stats.target_logit, logits[:, 2049], rtol=0, atol=0)


def test_row_kernel_launch():
    assert row_kernel_launch(1) == {"BLOCK_V": 1, "num_warps": 4}
    assert row_kernel_launch(101) == {"BLOCK_V": 128, "num_warps": 4}
    assert row_kernel_launch(4032) == {"BLOCK_V": 2048, "num_warps": 8}


@pytest.mark.parametrize("factor", [1.0, -2.5])
def test_upstream_scale_is_skipped_on_the_device_for_one(factor):
    grads = [torch.randn(5000), torch.randn(3, 7), torch.empty(0)]
    before = [g.clone() for g in grads]
    scaled = scale_unless_one(grads, torch.tensor(factor))
    assert int(scaled) == (factor != 1.0)
    for g, b in zip(grads, before):
        assert torch.equal(g, b * factor)  # exact: one rounding of an exact float64 product


# ---- the logits product with its epilogue (fused/kernels/logits_product.py) ------------------


def product_problem(rows=37, dim=24, vocab=400, seed=3):
    """Inputs in multiples of 1/4 below 2: every product and sum of products is exact in
    float32, so the Triton product's logits equal cuBLAS's (or torch's) bit for bit and the
    epilogue can be held to the row kernels' own results."""
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randint(-7, 8, (rows, dim), generator=gen, device="cpu") / 4).to(DEVICE)
    weight = (torch.randint(-7, 8, (vocab, dim), generator=gen, device="cpu") / 4).to(DEVICE)
    bias = (torch.randint(-7, 8, (vocab,), generator=gen, device="cpu") / 4).to(DEVICE)
    targets = torch.randint(0, vocab, (rows,), generator=gen, device="cpu").to(DEVICE)
    targets[::5] = -100
    return hidden, weight, bias, targets


@pytest.fixture(params=[1, 2], ids=["block_n_128", "block_n_256"])
def product_block(request, monkeypatch):
    """The product with one partial per block of columns, and with two (BLOCK_N = 256; at
    most 128 rows, so that the GPU's shared memory holds the wider block's pipeline)."""
    monkeypatch.setitem(logits_product.LAUNCH, "BLOCK_N", request.param * PARTIAL_COLUMNS)
    if request.param > 1:
        monkeypatch.setitem(logits_product.LAUNCH, "BLOCK_M", min(logits_product.LAUNCH["BLOCK_M"], 128))


@pytest.mark.parametrize("name", TRANSFORMS)
def test_statistics_in_the_product_epilogue_equal_the_row_kernels(name, product_block):
    # Two vocabulary blocks, the second narrower than a partial and off the block grid, carried
    # into the same running statistics; a row chunk in the middle of the tokens; targets in
    # either block, outside both, and ignored (skipped).
    options = TRANSFORMS[name]
    hidden, weight, bias, targets = product_problem()
    rows = slice(5, 37)
    h = hidden[rows]
    blocks = [slice(50, 351), slice(351, 397)]
    expected = RowStatistics(37, torch.float32, hidden.device, sum_logits=True)
    got = RowStatistics(37, torch.float32, hidden.device, sum_logits=True)
    buffer = torch.empty(32 * 301)
    partials = partial_buffer(32, 301, torch.float32, hidden.device)
    for cols in blocks:
        logits = logits_tile(torch.empty(32 * 301), h, weight, bias, cols)
        accumulate_logit_statistics(logits, cols.start, targets, expected, rows, options, skip_ignored=True)
        stored = logits_with_statistics(
            buffer, h, weight, bias, cols, targets, got, rows, options, partials, store=True, skip_ignored=True
        )
        assert torch.equal(stored, logits)
    assert logits_with_statistics(
        buffer, h, weight, bias, blocks[0], targets, RowStatistics(37, torch.float32, hidden.device, sum_logits=True),
        rows, options, partials, store=False, skip_ignored=True,
    ) is None
    scale = (expected.max[rows].abs() + math.log(347)).max().item()
    valid = targets[rows] != -100
    lse, expected_lse = (s.max[rows] + torch.log(s.sumexp[rows]) for s in (got, expected))
    torch.testing.assert_close(lse[valid], expected_lse[valid], rtol=0, atol=4 * EPS32 * scale)
    torch.testing.assert_close(got.max, expected.max, rtol=0, atol=0)  # skipped rows: still -inf
    torch.testing.assert_close(got.target_logit, expected.target_logit, rtol=0, atol=0)
    torch.testing.assert_close(got.logit_sum[rows][valid], expected.logit_sum[rows][valid], rtol=0,
                               atol=347 * EPS32 * expected.max[rows][valid].abs().max().item())


@pytest.mark.parametrize("upstream", ["unit", "per_token_and_lse"])
@pytest.mark.parametrize("name", TRANSFORMS)
def test_gradient_in_the_product_epilogue_equals_the_gradient_kernel(name, upstream, product_block):
    # What the tile holds after logits_tile and write_logit_gradient: the same elementwise
    # formula (one jit function) on the same logits, so equal to rounding of fused operations.
    options = TRANSFORMS[name]
    hidden, weight, bias, targets = product_problem()
    rows, cols = slice(5, 37), slice(50, 351)
    lse = torch.randn(37) + 8
    if upstream == "unit":
        loss_grad = lse_grad = None
        lse[targets == -100] = -math.inf  # a forward computing the gradients leaves them so
    else:
        loss_grad, lse_grad = torch.randn(37), torch.randn(37)
    expected = logits_tile(torch.empty(32 * 301), hidden[rows], weight, bias, cols)
    write_logit_gradient(expected, cols.start, targets, lse, loss_grad, lse_grad, rows, 400, options)
    got = logit_gradient_tile(
        torch.empty(32 * 301), hidden[rows], weight, bias, cols, targets, lse, loss_grad, lse_grad, rows, options
    )
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


def test_epilogue_kernels_refuse_what_they_do_not_compute():
    hidden, weight, bias, targets = product_problem()
    options = LossOptions()
    stats = RowStatistics(37, torch.float64, hidden.device, sum_logits=False)
    with pytest.raises(ValueError, match="16- or 32-bit inputs, not float64"):
        logits_with_statistics(
            torch.empty(37 * 400, dtype=torch.float64), hidden.double(), weight.double(), None, slice(0, 400), targets,
            stats, slice(0, 37), options, partial_buffer(37, 400, torch.float64, hidden.device), store=False,
            skip_ignored=False,
        )
    with pytest.raises(ValueError, match="contiguous"):
        logit_gradient_tile(torch.empty(37 * 400), hidden.t().contiguous().t(), weight, None, slice(0, 400), targets,
                            torch.zeros(37), None, None, slice(0, 37), options)
    problem = loss_problem(hidden, weight, targets, None, options, shift=False, num_items_in_batch=None)
    dtypes = TileDtypes(torch.float32, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="epilogue tile plan keeps no per-token outputs"):
        run_tiles(problem, options, TilePlan(37, 400, epilogue=True), dtypes, entropy=True)
