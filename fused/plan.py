"""The tile plan: how many tokens (``rows``) and vocabulary entries (``cols``) one tile of
logits holds, and the exact memory arithmetic behind it.

One planner serves every path: ``tile_plan`` for the Triton tile loop (no knob, a
``memory_budget``, or explicit ``chunk_size`` / ``vocab_chunk_size``) and
``reference_chunk_rows`` for the chunked PyTorch path. What a plan costs in memory is a
formula (``PlanSizes.plan_bytes``); which plan is fastest is a property of the device. On a
GPU it is measured there (``fused.measured_plan`` times the ``candidate_plans`` that fit);
the constants below choose without measuring (off CUDA, inside a CUDA graph capture, or with
``FUSED_MEASURED_PLANS=0``), and encode what was measured on one GPU (``results/``), not a law.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from fused.kernels.logits_product import PARTIAL_COLUMNS, PARTIAL_STATISTICS

# At most this many tokens share one tile; more tokens means several row chunks, whose
# weight gradients add up in the inputs' dtype (see TilePlan).
MAX_CHUNK_ROWS = 16384
# With no knob set, the tile plan is the fastest whose tile fits in this many bytes (beyond
# the per-token statistics, which grow with N whatever the plan).
DEFAULT_MEMORY_BUDGET = 512 * 2**20
# With chunk_size alone, one tile spans the whole vocabulary while it fits in this many
# bytes; beyond it the vocabulary is cut into blocks of about VOCABULARY_BLOCK columns.
FULL_VOCABULARY_TILE_BYTES = 256 * 2**20
# Each extra vocabulary block costs one read and write of the float32 grad_hidden accumulator
# (about 10 * rows * D bytes) against about 8 * rows * D * cols matmul FLOPs: blocks this
# wide keep that traffic small beside the matmuls.
VOCABULARY_BLOCK = 4096
# Column counts are rounded up to a multiple of this, for aligned cuBLAS leading dimensions.
COLUMN_ALIGNMENT = 64
# Whole-vocabulary tiles (three matmuls, no recomputation) are worth it once this many tokens
# fit in one; below it the weight and its gradient are re-read and re-written once per row
# chunk, too often, and vocabulary blocks with more rows are faster.
MIN_WHOLE_VOCABULARY_ROWS = 512
# Vocabulary blocks narrower than this leave cuBLAS little to work with.
MIN_BUDGET_COLS = 2048
# Whole-vocabulary tiles of 384 rows (three of cuBLAS's 128-row tiles) when 512 do not fit:
# still faster than vocabulary blocks of the same memory, which pay a fourth matmul.
FEW_WHOLE_VOCABULARY_ROWS = 384
# The CUDA caching allocator serves a request of more than 1 MiB from a block up to 1 MiB
# larger (a remainder of 1 MiB or less is not split off), and peak memory counts the block.
ALLOCATOR_SLACK = 2**20


@dataclass(frozen=True)
class TilePlan:
    """``rows`` tokens per chunk and ``cols`` vocabulary entries per block of one tile.

    ``cols == vocab`` means one block: the logits are computed once, statistics and
    gradients come from the same buffer. ``cols < vocab`` means the gradient pass
    recomputes each block (a fourth matmul) and ``grad_hidden`` of a row chunk is summed over
    blocks in a float32 accumulator. Several row chunks (``rows < N``) sum ``grad_weight``
    over chunks in the inputs' dtype, one rounding per chunk.

    ``epilogue``: the logits product is a Triton matmul that computes the row statistics (and
    where the final ``lse`` is known, the gradient) in its epilogue
    (``fused.kernels.logits_product``), instead of cuBLAS followed by the row kernels; it holds
    a buffer of partial statistics beside the tile.
    """

    rows: int
    cols: int
    epilogue: bool = False


def chunk_rows(n_rows: int, max_rows: int) -> int:
    """Rows per chunk for ``n_rows`` tokens in chunks of at most ``max_rows``: all of them if
    they fit, else the largest power of two that does (cuBLAS runs power-of-two row counts
    faster than equal chunks of an odd size)."""
    if n_rows <= max_rows:
        return n_rows
    return 1 << (max_rows.bit_length() - 1)


def statistics_bytes(n_rows: int, compute_itemsize: int = 4) -> int:
    """The most memory a forward over ``n_rows`` tokens holds beside its tile, with
    statistics of ``compute_itemsize`` bytes (4: float32). Per token: running max, sum of
    exponentials, target logit and logit sum, lse and loss, the int64 targets (of shifted
    labels), and while the losses are finished one more temporary and a boolean mask: 37
    bytes in float32. Besides, a few tensors of a handful of elements (the label check's),
    and on CUDA every tensor's block is rounded up to a multiple of 512 bytes. A memory
    budget pays for these first."""
    return (7 * compute_itemsize + 8 + 1) * n_rows + 16 * 512


def held_bytes(nbytes: int) -> int:
    """The most memory a buffer of ``nbytes`` can hold in the CUDA caching allocator."""
    return nbytes + ALLOCATOR_SLACK if nbytes > ALLOCATOR_SLACK else nbytes


def _largest_request(room: int) -> int:
    """The largest request whose ``held_bytes`` fit in ``room`` bytes."""
    return room - ALLOCATOR_SLACK if room > 2 * ALLOCATOR_SLACK else min(room, ALLOCATOR_SLACK)


@dataclass(frozen=True)
class PlanSizes:
    """What a plan's memory depends on: ``n_rows`` tokens, ``vocab`` entries, ``hidden_dim``
    features of ``itemsize`` bytes; statistics of ``compute_itemsize`` bytes; a bias or not;
    logits tiles of ``logits_itemsize`` bytes (None: the inputs' own, as transformers);
    whether ``grad_weight`` is summed over row chunks in a float32 accumulator; and the
    per-token outputs the tile loop keeps besides the loss (``fused.tiles.run_tiles``'s
    ``entropy`` and ``top1``, as ``fused.per_token`` asks for them)."""

    n_rows: int
    vocab: int
    hidden_dim: int
    itemsize: int
    compute_itemsize: int = 4
    has_bias: bool = False
    logits_itemsize: int | None = None
    weight_accumulator: bool = False
    entropy: bool = False
    top1: bool = False

    @property
    def tile_bytes_per_logit(self) -> int:
        """Tile bytes per logit: the tile, and where the tile is wider than the inputs the
        gradient tile rounded to the inputs' dtype for the gradient products."""
        logits = self.logits_itemsize or self.itemsize
        return logits + (self.itemsize if logits != self.itemsize else 0)

    def token_output_bytes(self) -> int:
        """The per-token outputs' memory beyond ``statistics_bytes``, ``s'`` bytes a statistic.
        With ``entropy``: ``2 * s'`` a token, the entropies and, while they are finished, a
        second temporary beside the one ``statistics_bytes`` counts (the weighted sum of
        exponentials takes the place of the logit sum, which this path never keeps: it has no
        label smoothing). With ``top1``: ``s' + 1`` more, the largest logit left of the target
        and the boolean flags. The backward holds less: the forward's lse, entropies and
        outputs, the loss gradient it makes (``-grad_log_probs``) and at most a contiguous
        copy of the entropy's gradient, the statistics gone."""
        per_token = (2 * self.compute_itemsize if self.entropy else 0) + (self.compute_itemsize + 1 if self.top1 else 0)
        return per_token * self.n_rows

    def fixed_bytes(self) -> int:
        """The memory every plan holds whatever its tile: the per-token statistics and outputs
        (``token_output_bytes``); with a bias, its gradient's accumulator and one tile's column
        sums (``V`` entries each in the wider of the inputs' and the statistics' dtypes); the
        float32 ``grad_weight`` accumulator when asked for."""
        total = statistics_bytes(self.n_rows, self.compute_itemsize) + self.token_output_bytes()
        if self.has_bias:
            total += 2 * held_bytes(self.vocab * max(self.itemsize, self.compute_itemsize, self.logits_itemsize or 0))
        if self.weight_accumulator:
            total += held_bytes(self.vocab * self.hidden_dim * 4)
        return total

    def accumulator_bytes(self, plan: TilePlan) -> int:
        """The float32 ``grad_hidden`` sum of a row chunk over vocabulary blocks (16-bit inputs
        cut into blocks only)."""
        return plan.rows * self.hidden_dim * 4 if plan.cols < self.vocab and self.itemsize < 4 else 0

    def partial_bytes(self, plan: TilePlan) -> int:
        """The partial statistics of an ``epilogue`` plan's tile: ``PARTIAL_STATISTICS``
        numbers in the statistics' dtype per row and ``PARTIAL_COLUMNS`` columns."""
        if not plan.epilogue:
            return 0
        return PARTIAL_STATISTICS * plan.rows * triton.cdiv(plan.cols, PARTIAL_COLUMNS) * self.compute_itemsize

    def plan_bytes(self, plan: TilePlan) -> int:
        """Extra memory of ``plan`` beyond the inputs and the returned gradients: the tile
        (``tile_bytes_per_logit`` a logit, each buffer as the CUDA allocator holds it), the
        ``grad_hidden`` accumulator, an ``epilogue`` plan's partial statistics and
        ``fixed_bytes``."""
        tile = plan.rows * plan.cols
        logits = self.logits_itemsize or self.itemsize
        rounded = held_bytes(tile * self.itemsize) if logits != self.itemsize else 0
        extra = held_bytes(self.accumulator_bytes(plan)) + held_bytes(self.partial_bytes(plan))
        return held_bytes(tile * logits) + rounded + extra + self.fixed_bytes()


def plan_for_budget(sizes: PlanSizes, budget_bytes: int) -> TilePlan:
    """The fastest tile whose extra memory (``sizes.plan_bytes``) fits in ``budget_bytes``.

    More rows means fewer re-reads of the weight, so the plan takes whole-vocabulary tiles
    if at least ``MIN_WHOLE_VOCABULARY_ROWS`` rows fit (``chunk_rows`` of them) or else
    ``FEW_WHOLE_VOCABULARY_ROWS``; else the most rows (a power of two) that leave room for
    ``VOCABULARY_BLOCK`` columns, if that is at least ``MIN_WHOLE_VOCABULARY_ROWS`` rows,
    else the most that leave room for ``MIN_BUDGET_COLS``. Raises ``ValueError`` if no plan
    fits.
    """
    n_rows, vocab = sizes.n_rows, sizes.vocab
    per_logit = sizes.tile_bytes_per_logit
    room = budget_bytes - sizes.fixed_bytes()
    if per_logit != (sizes.logits_itemsize or sizes.itemsize):
        room -= ALLOCATOR_SLACK  # the second tile buffer's allocator block
    whole_rows = _largest_request(room) // (vocab * per_logit)
    if whole_rows >= min(n_rows, MIN_WHOLE_VOCABULARY_ROWS):
        return TilePlan(rows=chunk_rows(n_rows, min(whole_rows, MAX_CHUNK_ROWS)), cols=vocab)
    if whole_rows >= FEW_WHOLE_VOCABULARY_ROWS:
        return TilePlan(rows=FEW_WHOLE_VOCABULARY_ROWS, cols=vocab)
    # Blocks at least VOCABULARY_BLOCK wide while MIN_WHOLE_VOCABULARY_ROWS rows remain: each
    # block costs a read and write of the float32 grad_hidden accumulator and launches of its
    # own, host time the device waits for at small tiles; only then narrower blocks.
    for min_cols, min_rows in ((VOCABULARY_BLOCK, min(n_rows, MIN_WHOLE_VOCABULARY_ROWS)), (MIN_BUDGET_COLS, 1)):
        rows = triton.next_power_of_2(min(n_rows, MAX_CHUNK_ROWS))
        while rows >= min_rows:
            r = min(rows, n_rows)
            accumulator = sizes.accumulator_bytes(TilePlan(rows=r, cols=0))
            tile_room = _largest_request(room - held_bytes(accumulator))
            cols = tile_room // (r * per_logit) // COLUMN_ALIGNMENT * COLUMN_ALIGNMENT
            if cols >= min(vocab, min_cols):
                return TilePlan(rows=r, cols=min(vocab, cols))
            rows //= 2
    smallest = TilePlan(rows=1, cols=min(vocab, MIN_BUDGET_COLS))
    raise ValueError(
        f"memory_budget={budget_bytes} bytes is too small for {n_rows} tokens, a vocabulary of {vocab} and "
        f"hidden size {sizes.hidden_dim}: at least {sizes.plan_bytes(smallest)} bytes are needed"
    )


def budget_bytes(sizes: PlanSizes, memory_budget: int | None) -> int:
    """The bytes a plan may take: ``memory_budget``, or with none ``DEFAULT_MEMORY_BUDGET``
    for the tile beyond ``sizes.fixed_bytes()``."""
    return memory_budget if memory_budget is not None else DEFAULT_MEMORY_BUDGET + sizes.fixed_bytes()


# The measured planner times tiles of at least this many rows (or all of them, if fewer):
# below it each row chunk re-reads the whole weight, never the fastest way to spend memory.
MIN_CANDIDATE_ROWS = 256


def candidate_plans(sizes: PlanSizes, budget: int, *, epilogue: bool = False) -> list[TilePlan]:
    """The plans worth timing within ``budget`` bytes: for each row count (every power of two
    from ``MIN_CANDIDATE_ROWS`` below ``n_rows``, ``FEW_WHOLE_VOCABULARY_ROWS`` and the
    row chunk of ``chunk_rows``) the widest tile that fits, of the whole vocabulary or of equal
    blocks no narrower than ``MIN_BUDGET_COLS`` (a wider tile of the same rows does the same
    work in fewer launches and fewer ``grad_hidden`` passes); and ``plan_for_budget``'s
    choice. With ``epilogue``, the widest ``epilogue`` tile of each row count instead (no
    constants' choice). By rows; empty if nothing fits."""
    n_rows, vocab = sizes.n_rows, sizes.vocab
    row_counts = {chunk_rows(n_rows, MAX_CHUNK_ROWS)}
    row_counts.update(r for r in (FEW_WHOLE_VOCABULARY_ROWS, *(1 << k for k in range(8, 15))) if MIN_CANDIDATE_ROWS <= r < n_rows)
    widths = [vocab]
    blocks = 2
    while (cols := triton.cdiv(triton.cdiv(vocab, blocks), COLUMN_ALIGNMENT) * COLUMN_ALIGNMENT) >= MIN_BUDGET_COLS:
        if cols < widths[-1]:
            widths.append(cols)
        blocks += 1
    plans = []
    for rows in sorted(row_counts):
        fitting = (p for cols in widths if sizes.plan_bytes(p := TilePlan(rows, cols, epilogue)) <= budget)
        if (plan := next(fitting, None)) is not None:
            plans.append(plan)
    if epilogue:
        return plans
    try:
        static = plan_for_budget(sizes, budget)
    except ValueError:
        return plans
    return plans if static in plans else [*plans, static]


def tile_plan(
    sizes: PlanSizes,
    *,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    memory_budget: int | None = None,
) -> TilePlan:
    """The tile for a problem of ``sizes``.

    ``memory_budget``: the fastest plan within that many bytes (``plan_for_budget``). With no
    knob: the fastest whose tile has ``DEFAULT_MEMORY_BUDGET`` bytes, beyond
    ``sizes.fixed_bytes()``. ``chunk_size`` (tokens) and ``vocab_chunk_size`` (vocabulary
    entries) set the tile directly, each capped by the problem's own size; with
    ``chunk_size`` alone the tile spans the vocabulary while it fits in
    ``FULL_VOCABULARY_TILE_BYTES``, else equal blocks of about ``VOCABULARY_BLOCK`` columns.
    """
    if chunk_size is None and vocab_chunk_size is None:
        return plan_for_budget(sizes, budget_bytes(sizes, memory_budget))
    vocab = sizes.vocab
    rows = min(sizes.n_rows, chunk_size or MAX_CHUNK_ROWS)
    if vocab_chunk_size is not None:
        cols = min(vocab, vocab_chunk_size)
    elif rows * vocab * sizes.tile_bytes_per_logit <= FULL_VOCABULARY_TILE_BYTES:
        cols = vocab
    else:
        # Equal blocks rather than full blocks and a small remainder.
        blocks = math.ceil(vocab / VOCABULARY_BLOCK)
        cols = min(vocab, triton.cdiv(triton.cdiv(vocab, blocks), COLUMN_ALIGNMENT) * COLUMN_ALIGNMENT)
    return TilePlan(rows=rows, cols=cols)


def reference_chunk_rows(n_rows: int, vocab: int, memory_budget: int, *, compute_itemsize: int = 4) -> int:
    """Rows per chunk of ``reference.chunked_cross_entropy`` within ``memory_budget`` bytes:
    it holds about two chunks of logits in the compute dtype at once, beside the statistics."""
    room = memory_budget - statistics_bytes(n_rows, compute_itemsize)
    return max(1, room // (2 * compute_itemsize * vocab))


# Rows per chunk of the vocabulary-parallel path when no knob is set.
VOCAB_PARALLEL_CHUNK_ROWS = 1024


def vocab_parallel_chunk_rows(
    n_rows: int, local_vocab: int, chunk_size: int | None, memory_budget: int | None, compute_dtype: torch.dtype
) -> int:
    """Rows per chunk of ``fused.vocab_parallel`` on a shard of ``local_vocab`` entries:
    ``chunk_size`` as given, or as many as fit ``memory_budget`` with about three chunk-sized
    buffers of logits in the compute dtype alive at once, beside the statistics."""
    if chunk_size is not None:
        return chunk_size
    if memory_budget is None:
        return VOCAB_PARALLEL_CHUNK_ROWS
    per_row = 3 * compute_dtype.itemsize * max(1, local_vocab)
    return max(1, (memory_budget - statistics_bytes(n_rows, compute_dtype.itemsize)) // per_row)
