"""Statistics and gradient of whole rows in one launch, for tiles that span the vocabulary.

When a tile holds every vocabulary entry of its rows (and the loss is reduced, so the
gradient is wanted in the forward pass), a row's ``lse`` is final after one pass over it.
One program per row then reads the row twice: the pass of ``row_statistics``, which also
stores the row's statistics and ``lse``, and the pass of ``row_gradient``, which overwrites
the logits with ``dL/dx`` for an upstream gradient of 1 on valid rows (the mean's scale is
applied later, in the matmuls' epilogue). One launch instead of two, and the second read of
a row follows the first closely enough to find part of it still in L2.
"""

import triton
import triton.language as tl
from torch import Tensor

from fused.kernels.launch import row_kernel_launch
from fused.kernels.logit_gradient import row_gradient, zero_row
from fused.kernels.logit_statistics import RowStatistics, row_statistics
from reference.linear_cross_entropy import LossOptions


@triton.jit
def logit_statistics_and_gradient_kernel(
    logits_ptr, row_stride, n_cols,
    targets_ptr, max_ptr, sumexp_ptr, target_logit_ptr, logit_sum_ptr, weighted_sum_ptr, max_before_ptr, lse_ptr,
    ignore_index, label_smoothing, z_loss, logit_scale, softcap,
    HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SUM_LOGITS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    logits_row = logits_ptr + row.to(tl.int64) * row_stride
    target = tl.load(targets_ptr + row)
    dtype = max_ptr.dtype.element_ty
    zero = tl.full((), 0.0, dtype)
    if target == ignore_index:
        # Its gradient is 0 and its loss is masked: one write instead of two reads and a
        # write. Its statistics are those of a row with no logits (lse = -inf).
        tl.store(max_ptr + row, float("-inf"))
        tl.store(sumexp_ptr + row, zero)
        tl.store(target_logit_ptr + row, zero)
        if SUM_LOGITS:
            tl.store(logit_sum_ptr + row, zero)
        tl.store(lse_ptr + row, float("-inf"))
        zero_row(logits_row, n_cols, BLOCK_V)
        return
    running_max, sumexp, target_logit, logit_sum, _, _ = row_statistics(
        logits_row, n_cols, target, logit_scale, softcap, tl.full((), float("-inf"), dtype), zero, zero, zero,
        zero, zero, HAS_SCALE, HAS_SOFTCAP, SUM_LOGITS, False, False, BLOCK_V,
    )
    lse = running_max + tl.log(sumexp)
    tl.store(max_ptr + row, running_max)
    tl.store(sumexp_ptr + row, sumexp)
    tl.store(target_logit_ptr + row, target_logit)
    if SUM_LOGITS:
        tl.store(logit_sum_ptr + row, logit_sum)
    tl.store(lse_ptr + row, lse)
    row_gradient(
        logits_row, n_cols, target, lse, tl.full((), 1.0, dtype), zero, zero, zero, label_smoothing, z_loss, n_cols,
        logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP, False, BLOCK_V,
    )


def write_statistics_and_gradient(
    logits: Tensor, targets: Tensor, stats: RowStatistics, lse: Tensor, rows: slice, options: LossOptions
) -> None:
    """Fill ``stats`` and ``lse`` on ``rows`` from a whole-vocabulary tile and overwrite the
    tile with ``dL/dx`` for an upstream gradient of 1 on every valid row. Ignored rows are
    not read: their gradient rows are zeros and their statistics those of no logits
    (``lse = -inf``).

    ``logits (r, V)``: raw logits of rows ``rows``, contiguous rows; ``targets (N,)`` int64,
    ``stats`` and ``lse (N,)`` (float32 or float64) of all rows, kept without entropy (whose
    gradient needs the final statistics first) nor top1.
    """
    if stats.entropy or stats.top1:
        raise ValueError("write_statistics_and_gradient: keeps no per-token statistics (entropy, top1)")
    logit_statistics_and_gradient_kernel[(logits.shape[0],)](
        logits, logits.stride(0), logits.shape[1],
        targets[rows], *stats.rows(rows), *stats.per_token_rows(rows), lse[rows],
        options.ignore_index, options.label_smoothing, options.z_loss,
        options.logit_scale or 1.0, options.softcap or 1.0,
        HAS_SCALE=options.logit_scale is not None, HAS_SOFTCAP=options.softcap is not None,
        SUM_LOGITS=stats.sum_logits, **row_kernel_launch(logits.shape[1]),
    )
