"""The tile planner (fused/plan.py): every plan fits its memory by the stated formula, the
default plan is the default budget's, explicit knobs are honoured and capped, and the
chunked reference path gets its rows from the same arithmetic."""

import math

import pytest
import torch

import fused
from fused.plan import (
    COLUMN_ALIGNMENT,
    DEFAULT_MEMORY_BUDGET,
    FEW_WHOLE_VOCABULARY_ROWS,
    FULL_VOCABULARY_TILE_BYTES,
    MAX_CHUNK_ROWS,
    MIN_BUDGET_COLS,
    VOCABULARY_BLOCK,
    PlanSizes,
    TilePlan,
    chunk_rows,
    held_bytes,
    plan_for_budget,
    reference_chunk_rows,
    statistics_bytes,
    tile_plan,
)

MiB = 2**20


@pytest.mark.parametrize("n,d,v", [(8192, 2048, 128256), (8192, 2304, 256000), (16384, 4096, 151936), (4096, 4096, 32000)])
@pytest.mark.parametrize("budget", [4 * MiB, 32 * MiB, 64 * MiB, 150 * MiB, 512 * MiB])
def test_plan_fits_the_budget(n, d, v, budget):
    plan = plan_for_budget(PlanSizes(n, v, d, 2), budget)
    assert PlanSizes(n, v, d, 2).plan_bytes(plan) <= budget
    assert 1 <= plan.rows <= n and min(v, MIN_BUDGET_COLS) <= plan.cols <= v
    if plan.cols < v:  # whole-vocabulary tiles were not affordable with enough rows
        rows = min(n, FEW_WHOLE_VOCABULARY_ROWS)
        assert held_bytes(rows * v * 2) + statistics_bytes(n) > budget


def test_plan_prefers_whole_vocabulary_tiles():
    assert plan_for_budget(PlanSizes(4096, 32000, 4096, 2), 512 * MiB) == TilePlan(rows=4096, cols=32000)


def test_plan_prefers_vocabulary_blocks_of_at_least_vocabulary_block_columns():
    # 2048 x 3008 tiles would fit too; wider blocks of fewer rows were faster where measured.
    assert plan_for_budget(PlanSizes(8192, 128256, 2048, 2), 30 * MiB) == TilePlan(rows=1024, cols=10048)
    # No room for VOCABULARY_BLOCK columns at MIN_WHOLE_VOCABULARY_ROWS rows: the most rows
    # that leave room for MIN_BUDGET_COLS (the 1 MiB accumulator needs no slack).
    assert plan_for_budget(PlanSizes(8192, 128256, 2048, 2), 4 * MiB) == TilePlan(rows=128, cols=6976)


def test_plan_takes_384_whole_vocabulary_rows_when_512_do_not_fit():
    # 512 x 151936 bf16 logits take 148.4 MiB, 149.4 as the allocator may hold them, and the
    # statistics of 16384 tokens 0.6 MiB: 149.95 MiB in all.
    assert plan_for_budget(PlanSizes(16384, 151936, 4096, 2), 149 * MiB) == TilePlan(rows=384, cols=151936)
    assert plan_for_budget(PlanSizes(16384, 151936, 4096, 2), 150 * MiB) == TilePlan(rows=512, cols=151936)


def test_too_small_budget_names_the_minimum():
    with pytest.raises(ValueError, match=r"memory_budget=1000 bytes is too small .* at least \d+ bytes"):
        plan_for_budget(PlanSizes(4096, 32000, 4096, 2), 1000)


def test_default_plan_is_the_default_budget_plan():
    for n, v, d in [(37, 101, 16), (8192, 128256, 2048), (16384, 256000, 2304), (10**6, 1000, 64)]:
        budget = DEFAULT_MEMORY_BUDGET + statistics_bytes(n)
        assert tile_plan(PlanSizes(n, v, d, 2)) == plan_for_budget(PlanSizes(n, v, d, 2), budget)
    assert tile_plan(PlanSizes(37, 101, 16, 4)) == TilePlan(rows=37, cols=101)
    # 512 MiB of bf16 logits hold 2093 rows of 128256: four chunks of 2048 of 8192 tokens.
    assert tile_plan(PlanSizes(8192, 128256, 2048, 2)) == TilePlan(rows=2048, cols=128256)


def test_chunk_size_takes_the_whole_vocabulary_when_it_fits():
    assert tile_plan(PlanSizes(37, 101, 16, 4), chunk_size=10, vocab_chunk_size=1000) == TilePlan(rows=10, cols=101)  # capped by the problem
    rows = FULL_VOCABULARY_TILE_BYTES // (32000 * 2)
    assert tile_plan(PlanSizes(rows + 5, 32000, 64, 2), chunk_size=rows) == TilePlan(rows=rows, cols=32000)


@pytest.mark.parametrize("vocab", [128256, 151936, 256000, 262144])
def test_chunk_size_cuts_a_large_vocabulary_into_equal_aligned_blocks(vocab):
    plan = tile_plan(PlanSizes(8192, vocab, 2048, 2), chunk_size=8192)
    blocks = math.ceil(vocab / plan.cols)
    assert plan.rows == 8192 and plan.cols % COLUMN_ALIGNMENT == 0
    assert VOCABULARY_BLOCK // 2 < plan.cols <= VOCABULARY_BLOCK + COLUMN_ALIGNMENT
    assert vocab - (blocks - 1) * plan.cols >= plan.cols / 2  # no sliver of a last block
    assert plan.rows * plan.cols * 2 <= FULL_VOCABULARY_TILE_BYTES  # bounded, whatever N * V


def test_plan_caps_the_rows_of_a_chunk():
    rows = tile_plan(PlanSizes(10**6, 1000, 64, 2)).rows
    assert rows <= MAX_CHUNK_ROWS and math.ceil(10**6 / rows) == math.ceil(10**6 / MAX_CHUNK_ROWS)
    assert tile_plan(PlanSizes(100, 1000, 64, 2), chunk_size=4096).rows == 100


@pytest.mark.parametrize("n,max_rows,expected", [(8192, 2093, 2048), (8192, 8192, 8192), (5000, 9000, 5000),
                                                 (16384, 1766, 1024), (16384, 515, 512), (100, 40, 32)])
def test_chunk_rows(n, max_rows, expected):
    assert chunk_rows(n, max_rows) == expected


@pytest.mark.parametrize("compute_itemsize", [4, 8])
def test_default_plan_counts_the_bias_and_the_statistics_dtype(compute_itemsize):
    # The default plan's tile gets DEFAULT_MEMORY_BUDGET whatever the fixed buffers take.
    sizes = PlanSizes(8192, 128256, 2048, 2, compute_itemsize=compute_itemsize, has_bias=True)
    plan = tile_plan(sizes)
    assert plan == plan_for_budget(sizes, DEFAULT_MEMORY_BUDGET + sizes.fixed_bytes())
    assert sizes.plan_bytes(plan) - sizes.fixed_bytes() <= DEFAULT_MEMORY_BUDGET
    assert sizes.fixed_bytes() == statistics_bytes(8192, compute_itemsize) + 2 * held_bytes(128256 * compute_itemsize)


@pytest.mark.parametrize("budget", [32 * MiB, 150 * MiB, 512 * MiB])
def test_float32_logits_and_weight_sums_are_counted(budget):
    # A float32 tile for 16-bit inputs costs 4 + 2 bytes a logit (the tile, and its gradient
    # rounded for the products); a float32 grad_weight sum, V x D x 4 bytes once.
    stock = PlanSizes(8192, 128256, 2048, 2)
    wide = PlanSizes(8192, 128256, 2048, 2, logits_itemsize=4, weight_accumulator=True)
    assert wide.tile_bytes_per_logit == 6 and stock.tile_bytes_per_logit == 2
    assert wide.fixed_bytes() == stock.fixed_bytes() + held_bytes(128256 * 2048 * 4)
    plan = plan_for_budget(wide, budget + wide.fixed_bytes() - stock.fixed_bytes())
    assert wide.plan_bytes(plan) <= budget + wide.fixed_bytes() - stock.fixed_bytes()
    assert plan.rows * plan.cols < plan_for_budget(stock, budget).rows * plan_for_budget(stock, budget).cols


def test_a_budget_plan_takes_the_budget_not_the_default():
    assert tile_plan(PlanSizes(4096, 32000, 4096, 2), memory_budget=32 * MiB) == plan_for_budget(PlanSizes(4096, 32000, 4096, 2), 32 * MiB)


@pytest.mark.parametrize("compute_itemsize", [4, 8])
def test_reference_rows_count_the_compute_dtype(compute_itemsize):
    # Two chunks of logits in the compute dtype fit beside the statistics.
    n, v, budget = 1000, 5000, 8 * MiB
    rows = reference_chunk_rows(n, v, budget, compute_itemsize=compute_itemsize)
    assert statistics_bytes(n, compute_itemsize) + 2 * rows * v * compute_itemsize <= budget
    assert statistics_bytes(n, compute_itemsize) + 2 * (rows + 1) * v * compute_itemsize > budget


def test_vocab_chunk_size_is_refused_on_the_reference_path():
    h, w, y = torch.randn(4, 8), torch.randn(16, 8), torch.randint(0, 16, (4,))
    with pytest.raises(ValueError, match="vocab_chunk_size sets the Triton kernels' tile"):
        fused.linear_cross_entropy(h, w, y, vocab_chunk_size=8, backend="reference")


def test_an_epilogue_plan_pays_for_its_partial_statistics():
    # Three float32 partials (max, sum of exponentials, logit sum) per row and 128 columns.
    sizes = PlanSizes(8192, 128256, 2048, 2)
    plain, epilogue = TilePlan(2048, 128256), TilePlan(2048, 128256, epilogue=True)
    assert sizes.partial_bytes(plain) == 0
    assert sizes.partial_bytes(epilogue) == 3 * 2048 * 1002 * 4
    assert sizes.plan_bytes(epilogue) - sizes.plan_bytes(plain) == held_bytes(3 * 2048 * 1002 * 4)
    assert PlanSizes(8192, 128256, 2048, 2, compute_itemsize=8).partial_bytes(epilogue) == 3 * 2048 * 1002 * 8


@pytest.mark.parametrize("compute_itemsize", [4, 8])
def test_per_token_outputs_add_their_bytes_and_leave_the_default_tile(compute_itemsize):
    # fused.per_token: with entropy, 2 statistics a token (the entropies, a second temporary);
    # with top1, one more and a boolean flag (tests/test_fused_memory_budget.py measures them).
    n, v, d = 8192, 128256, 2048
    loss = PlanSizes(n, v, d, 2, compute_itemsize=compute_itemsize)
    entropy = PlanSizes(n, v, d, 2, compute_itemsize=compute_itemsize, entropy=True)
    both = PlanSizes(n, v, d, 2, compute_itemsize=compute_itemsize, entropy=True, top1=True)
    assert entropy.fixed_bytes() - loss.fixed_bytes() == 2 * compute_itemsize * n
    assert both.fixed_bytes() - loss.fixed_bytes() == (3 * compute_itemsize + 1) * n
    assert tile_plan(both) == tile_plan(loss)  # the default budget is for the tile, beyond these
    # A budget that holds the loss's default tile holds a smaller one with the outputs.
    budget = loss.plan_bytes(tile_plan(loss))
    assert plan_for_budget(both, budget).rows < tile_plan(loss).rows
