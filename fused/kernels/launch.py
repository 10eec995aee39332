"""Launch parameters and the memory plan of the fused linear cross entropy, in one place.

The op walks over tiles of ``rows x cols`` logits (``rows`` tokens, ``cols`` vocabulary
entries), computed by cuBLAS into one reused buffer in the inputs' dtype. The tile plan
decides how big that buffer is; the row kernels decide how a Triton program walks one row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import triton

# A row kernel reads its row in blocks of at most this many columns (a power of two).
MAX_BLOCK_V = 2048

# At most this many tokens share one tile; more tokens means several row chunks, whose
# weight gradients add up in the inputs' dtype (see TilePlan).
MAX_CHUNK_ROWS = 16384
# With no knob set, the tile plan is the fastest that fits in this many bytes of extra memory
# (beyond the per-token statistics): on an H100 in bf16, whole-vocabulary tiles of 1024 to
# 4096 rows at the benchmark's four default shapes, 1.10-1.23x the three-matmul bound.
DEFAULT_MEMORY_BUDGET = 512 * 2**20
# With chunk_size alone, one tile spans the whole vocabulary while it fits in this many
# bytes; beyond it the vocabulary is cut into blocks of about VOCABULARY_BLOCK columns.
FULL_VOCABULARY_TILE_BYTES = 256 * 2**20
# Each extra vocabulary block costs one read and write of the float32 grad_hidden accumulator
# (about 10 * rows * D bytes) against about 8 * rows * D * cols matmul FLOPs: 4096 columns
# keep that under 10% of the matmul time on an H100.
VOCABULARY_BLOCK = 4096
# Column counts are rounded up to a multiple of this, for aligned cuBLAS leading dimensions.
COLUMN_ALIGNMENT = 64


@dataclass(frozen=True)
class TilePlan:
    """``rows`` tokens per chunk and ``cols`` vocabulary entries per block of one tile.

    ``cols == vocab`` means one block: the logits are computed once, statistics and
    gradients come from the same buffer. ``cols < vocab`` means the gradient pass
    recomputes each block (a fourth matmul) and ``grad_hidden`` of a row chunk is summed over
    blocks in a float32 accumulator. Several row chunks (``rows < N``) sum ``grad_weight``
    over chunks in the inputs' dtype, one rounding per chunk.
    """

    rows: int
    cols: int


def chunk_rows(n_rows: int, max_rows: int) -> int:
    """Rows per chunk for ``n_rows`` tokens in chunks of at most ``max_rows``: all of them if
    they fit, else the largest power of two that does. cuBLAS runs power-of-two row counts
    fastest: on an H100 at 16384 x 4096 x 151936, chunks of 1024 rows ran at 1.12x the bound
    and of 2048 at 1.08x, but ten equal chunks of 1664 rows at 1.17x."""
    if n_rows <= max_rows:
        return n_rows
    return 1 << (max_rows.bit_length() - 1)


def plan_tiles(
    n_rows: int, vocab: int, hidden_dim: int, itemsize: int, chunk_size: int | None, vocab_chunk_size: int | None
) -> TilePlan:
    """The tile for ``n_rows`` tokens, ``vocab`` entries and ``hidden_dim`` features of
    ``itemsize`` bytes.

    With neither knob, the fastest plan within ``DEFAULT_MEMORY_BUDGET`` bytes
    (``plan_for_budget``). ``chunk_size`` (tokens) and ``vocab_chunk_size`` (vocabulary
    entries) override it; each is capped by the problem's own size.
    """
    if chunk_size is None and vocab_chunk_size is None:
        budget = DEFAULT_MEMORY_BUDGET + statistics_bytes(n_rows)
        return plan_for_budget(n_rows, vocab, hidden_dim, itemsize, budget)
    rows = min(n_rows, chunk_size or MAX_CHUNK_ROWS)
    if vocab_chunk_size is not None:
        cols = min(vocab, vocab_chunk_size)
    elif rows * vocab * itemsize <= FULL_VOCABULARY_TILE_BYTES:
        cols = vocab
    else:
        # Equal blocks rather than full blocks and a small remainder.
        blocks = math.ceil(vocab / VOCABULARY_BLOCK)
        cols = min(vocab, triton.cdiv(triton.cdiv(vocab, blocks), COLUMN_ALIGNMENT) * COLUMN_ALIGNMENT)
    return TilePlan(rows=rows, cols=cols)


def statistics_bytes(n_rows: int, compute_itemsize: int = 4) -> int:
    """The most memory a forward over ``n_rows`` tokens holds beside its tile, with
    statistics of ``compute_itemsize`` bytes (4: float32). Per token: running max, sum of
    exponentials, target logit and logit sum, lse and loss, the int64 targets (of shifted
    labels), and while the losses are finished one more temporary and a boolean mask: 37
    bytes in float32. Besides, a few tensors of a handful of elements (the label check's),
    and on CUDA every tensor's block is rounded up to a multiple of 512 bytes. A memory
    budget pays for these first."""
    return (7 * compute_itemsize + 8 + 1) * n_rows + 16 * 512


# Whole-vocabulary tiles (three matmuls, no recomputation) are worth it once this many tokens
# fit in one; below it the weight and its gradient are re-read and re-written too often and
# vocabulary blocks are faster. H100, bf16, at the four default shapes: 512-row tiles ran at
# 1.29-1.54x the bound, vocabulary blocks of similar memory at 1.52-1.69x, 256-row tiles at
# 1.8-2.3x.
MIN_WHOLE_VOCABULARY_ROWS = 512
# Vocabulary blocks narrower than this leave cuBLAS little to work with.
MIN_BUDGET_COLS = 2048
# Whole-vocabulary tiles of 384 rows (three of cuBLAS's 128-row tiles) when 512 do not fit:
# H100, bf16, fwd+bwd at 384 x V against the vocabulary blocks of the same budget: 7.2 against
# 7.8-10.9 ms at 4096 x 4096 x 32000, 123 against 133 ms at 16384 x 4096 x 151936.
FEW_WHOLE_VOCABULARY_ROWS = 384
# The CUDA caching allocator serves a request of more than 1 MiB from a block up to 1 MiB
# larger (a remainder of 1 MiB or less is not split off), and peak memory counts the block.
ALLOCATOR_SLACK = 2**20


def held_bytes(nbytes: int) -> int:
    """The most memory a buffer of ``nbytes`` can hold in the CUDA caching allocator."""
    return nbytes + ALLOCATOR_SLACK if nbytes > ALLOCATOR_SLACK else nbytes


def _largest_request(room: int) -> int:
    """The largest request whose ``held_bytes`` fit in ``room`` bytes."""
    return room - ALLOCATOR_SLACK if room > 2 * ALLOCATOR_SLACK else min(room, ALLOCATOR_SLACK)


def plan_for_budget(
    n_rows: int,
    vocab: int,
    hidden_dim: int,
    itemsize: int,
    budget_bytes: int,
    *,
    compute_itemsize: int = 4,
    has_bias: bool = False,
) -> TilePlan:
    """The fastest tile whose extra memory fits in ``budget_bytes``.

    Extra memory of a plan (module docstring of ``fused.linear_cross_entropy``): the tile,
    ``rows * cols * itemsize``; the float32 ``grad_hidden`` accumulator of a row chunk,
    ``rows * hidden_dim * 4``, when the vocabulary is cut into blocks and the inputs are
    16-bit; ``statistics_bytes(n_rows, compute_itemsize)`` of statistics (``compute_itemsize``:
    the bytes of ``compute_dtype``); with a bias (``has_bias``), its gradient's accumulator
    and one tile's column sums, ``V`` entries each in the wider of the two dtypes; each
    buffer counted as the allocator holds it (``held_bytes``).

    More rows means fewer re-reads of the weight, so the plan takes whole-vocabulary tiles
    if at least ``MIN_WHOLE_VOCABULARY_ROWS`` rows fit (``chunk_rows`` of them) or else
    ``FEW_WHOLE_VOCABULARY_ROWS``; else the most rows (a power of two) that leave room for
    ``VOCABULARY_BLOCK`` columns, if that is at least ``MIN_WHOLE_VOCABULARY_ROWS`` rows,
    else the most that leave room for ``MIN_BUDGET_COLS``. Raises ``ValueError`` if no plan
    fits.
    """
    fixed_bytes = statistics_bytes(n_rows, compute_itemsize)
    if has_bias:
        fixed_bytes += 2 * held_bytes(vocab * max(itemsize, compute_itemsize))
    room = budget_bytes - fixed_bytes
    whole_rows = _largest_request(room) // (vocab * itemsize)
    if whole_rows >= min(n_rows, MIN_WHOLE_VOCABULARY_ROWS):
        return TilePlan(rows=chunk_rows(n_rows, min(whole_rows, MAX_CHUNK_ROWS)), cols=vocab)
    if whole_rows >= FEW_WHOLE_VOCABULARY_ROWS:
        return TilePlan(rows=FEW_WHOLE_VOCABULARY_ROWS, cols=vocab)
    accumulator = hidden_dim * 4 if itemsize < 4 else 0
    # Blocks at least VOCABULARY_BLOCK wide while MIN_WHOLE_VOCABULARY_ROWS rows remain: each
    # block costs a read and write of the float32 grad_hidden accumulator and six launches of
    # its own, host time the device waits for at small tiles. H100, bf16, fwd+bwd: at 30 MiB,
    # 1024 x 11136 tiles ran in 32.4 ms against 34.0 ms for 2048 x 3520 at 8192 x 2048 x
    # 128256, 1024 x 10624 in 72.2 ms against 93.8 ms for 2048 x 3008 at 8192 x 2304 x 256000;
    # at Liger's 64 and 126 MiB, 2048 x 12224 and 4096 x 11456 in 30.1 and 66.6 ms against 32.2
    # and 69.4 ms for 4096 x 4032 and 8192 x 3392.
    for min_cols, min_rows in ((VOCABULARY_BLOCK, min(n_rows, MIN_WHOLE_VOCABULARY_ROWS)), (MIN_BUDGET_COLS, 1)):
        rows = triton.next_power_of_2(min(n_rows, MAX_CHUNK_ROWS))
        while rows >= min_rows:
            r = min(rows, n_rows)
            tile_room = _largest_request(room - held_bytes(r * accumulator))
            cols = tile_room // (r * itemsize) // COLUMN_ALIGNMENT * COLUMN_ALIGNMENT
            if cols >= min(vocab, min_cols):
                return TilePlan(rows=r, cols=min(vocab, cols))
            rows //= 2
    needed = fixed_bytes + held_bytes(accumulator) + held_bytes(min(vocab, MIN_BUDGET_COLS) * itemsize)
    raise ValueError(
        f"memory_budget={budget_bytes} bytes is too small for {n_rows} tokens, a vocabulary of {vocab} and "
        f"hidden size {hidden_dim}: at least {needed} bytes are needed"
    )


def row_kernel_launch(n_cols: int) -> dict[str, int]:
    """``BLOCK_V`` and ``num_warps`` of a kernel with one program per row of ``n_cols``."""
    block = min(MAX_BLOCK_V, triton.next_power_of_2(n_cols))
    return {"BLOCK_V": block, "num_warps": 8 if block >= 2048 else 4}
