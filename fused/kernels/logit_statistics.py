"""The forward statistics: one pass over a tile of logits rows, online log-sum-exp.

For every row the kernel walks the tile's columns in blocks of ``BLOCK_V``, transforms the
logits on the fly (float32, or float64 for a float64 compute dtype) and keeps four running
numbers, carried over from the previous vocabulary blocks of the same rows:

* ``max``: the largest transformed logit seen so far, ``m``;
* ``sumexp``: ``sum_j exp(z_j - m)``, rescaled by ``exp(m_old - m_new)`` when ``m`` grows;
* ``target_logit``: ``z_y`` when the target column ``y`` lies in this tile;
* ``logit_sum``: ``sum_j z_j`` (label smoothing needs the mean logit), only if asked;
* ``weighted_sum``: ``sum_j exp(z_j - m) * z_j``, rescaled with ``sumexp``, only if asked
  (``ENTROPY``): the entropy of the row is ``lse - weighted_sum / sumexp``
  (``reference.per_token_outputs``);
* ``max_before``: the largest logit left of the target's column, only if asked (``TOP1``):
  the target is the first maximum (argmax's rule) when ``target_logit >= max`` and
  ``target_logit > max_before``.

Within a row each of the ``BLOCK_V`` lanes keeps its own running max and sum, so a block
costs one exponential per logit and no reduction across the program; the lanes are merged
once, at the end of the row (merging every block would take a barrier per block). After the last block
``lse = max + log(sumexp)``. One program per row; the row offset is computed in int64 so
tiles beyond 2**31 elements are addressed correctly.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused.kernels.launch import row_kernel_launch
from fused.kernels.logit_transform import transform_logits
from reference.linear_cross_entropy import LossOptions


@triton.jit
def row_statistics(
    logits_row, n_cols, target_col, logit_scale, softcap, running_max, sumexp, target_logit, logit_sum,
    weighted_sum, max_before,
    HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SUM_LOGITS: tl.constexpr, ENTROPY: tl.constexpr,
    TOP1: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Fold one row's ``n_cols`` raw logits at ``logits_row`` into its running statistics
    (scalars, in the compute dtype) and return the updated ``(max, sumexp, target_logit,
    logit_sum, weighted_sum, max_before)``. ``target_col`` is the target's column within this
    row segment (negative past it, beyond ``n_cols`` before it)."""
    dtype = running_max.dtype
    lane_max = tl.full((BLOCK_V,), float("-inf"), dtype)
    lane_sum = tl.zeros((BLOCK_V,), dtype)
    lane_target = tl.zeros((BLOCK_V,), dtype)
    lane_logits = tl.zeros((BLOCK_V,), dtype)
    lane_weighted = tl.zeros((BLOCK_V,), dtype)
    lane_before = tl.full((BLOCK_V,), float("-inf"), dtype)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < n_cols
        x = tl.load(logits_row + cols, mask=in_row, other=0.0).to(dtype)
        z = transform_logits(x, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
        z = tl.where(in_row, z, float("-inf"))
        new_max = tl.maximum(lane_max, z)
        # One exponential either way: exp(-|z - m|) is the new term when z <= m and the
        # factor that rescales the old sum when z > m. A lane that has seen only masked
        # columns (-inf) adds exp(-inf) = 0: its shift is 0 rather than -inf - -inf.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        e = tl.exp(tl.minimum(lane_max, z) - shift)
        if ENTROPY:
            # The same rescaling as lane_sum, each term weighted by its logit; a masked
            # column weighs 0, not -inf (its e is 0, and 0 * -inf would be NaN).
            weight = tl.where(in_row, z, 0.0)
            lane_weighted = tl.where(z > lane_max, lane_weighted * e + weight, lane_weighted + e * weight)
        lane_sum = tl.where(z > lane_max, lane_sum * e + 1.0, lane_sum + e)
        lane_max = new_max
        # A target past this segment's last column must not pick up a masked lane's -inf.
        lane_target += tl.where((cols == target_col) & in_row, z, 0.0)
        if SUM_LOGITS:
            lane_logits += tl.where(in_row, z, 0.0)
        if TOP1:
            lane_before = tl.maximum(lane_before, tl.where(cols < target_col, z, float("-inf")))
    new_max = tl.maximum(running_max, tl.max(lane_max, axis=0))
    # new_max is finite once a row has one finite logit; -inf lanes then scale by exp(-inf) = 0.
    old_scale, lane_scale = tl.exp(running_max - new_max), tl.exp(lane_max - new_max)
    sumexp = sumexp * old_scale + tl.sum(lane_sum * lane_scale, axis=0)
    target_logit += tl.sum(lane_target, axis=0)
    if SUM_LOGITS:
        logit_sum += tl.sum(lane_logits, axis=0)
    if ENTROPY:
        weighted_sum = weighted_sum * old_scale + tl.sum(lane_weighted * lane_scale, axis=0)
    if TOP1:
        max_before = tl.maximum(max_before, tl.max(lane_before, axis=0))
    return new_max, sumexp, target_logit, logit_sum, weighted_sum, max_before


@triton.jit
def logit_statistics_kernel(
    logits_ptr, row_stride, n_cols, col_offset,
    targets_ptr, max_ptr, sumexp_ptr, target_logit_ptr, logit_sum_ptr, weighted_sum_ptr, max_before_ptr,
    ignore_index, logit_scale, softcap,
    SKIP_IGNORED: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SUM_LOGITS: tl.constexpr,
    ENTROPY: tl.constexpr, TOP1: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    target = tl.load(targets_ptr + row)
    if SKIP_IGNORED:
        if target == ignore_index:
            return
    logit_sum = tl.full((), 0.0, max_ptr.dtype.element_ty)
    if SUM_LOGITS:
        logit_sum = tl.load(logit_sum_ptr + row)
    weighted_sum = tl.full((), 0.0, max_ptr.dtype.element_ty)
    if ENTROPY:
        weighted_sum = tl.load(weighted_sum_ptr + row)
    max_before = tl.full((), float("-inf"), max_ptr.dtype.element_ty)
    if TOP1:
        max_before = tl.load(max_before_ptr + row)
    running_max, sumexp, target_logit, logit_sum, weighted_sum, max_before = row_statistics(
        logits_ptr + row.to(tl.int64) * row_stride, n_cols, target - col_offset,
        logit_scale, softcap, tl.load(max_ptr + row), tl.load(sumexp_ptr + row),
        tl.load(target_logit_ptr + row), logit_sum, weighted_sum, max_before, HAS_SCALE, HAS_SOFTCAP, SUM_LOGITS,
        ENTROPY, TOP1, BLOCK_V,
    )
    tl.store(max_ptr + row, running_max)
    tl.store(sumexp_ptr + row, sumexp)
    tl.store(target_logit_ptr + row, target_logit)
    if SUM_LOGITS:
        tl.store(logit_sum_ptr + row, logit_sum)
    if ENTROPY:
        tl.store(weighted_sum_ptr + row, weighted_sum)
    if TOP1:
        tl.store(max_before_ptr + row, max_before)


class RowStatistics:
    """The running statistics of ``n`` rows, in ``dtype`` (float32 or float64).

    ``max`` starts at -inf and the sums at 0, so the first block needs no special case;
    with ``overwritten`` they start uninitialised, for a kernel that writes every row's
    statistics without reading them (``logit_statistics_and_gradient``): four fewer launches
    ahead of the first product. ``logit_sum`` is kept only if ``sum_logits`` (label smoothing
    needs it), ``weighted_sum`` only if ``entropy``, ``max_before`` only if ``top1``.
    """

    def __init__(
        self, n: int, dtype: torch.dtype, device: torch.device, sum_logits: bool, *, overwritten: bool = False,
        entropy: bool = False, top1: bool = False,
    ) -> None:
        self.sum_logits, self.entropy, self.top1 = sum_logits, entropy, top1

        def start(size: int, value: float) -> Tensor:
            if overwritten:
                return torch.empty(size, dtype=dtype, device=device)
            return torch.full((size,), value, dtype=dtype, device=device)

        self.max = start(n, float("-inf"))
        self.sumexp = start(n, 0.0)
        self.target_logit = start(n, 0.0)
        self.logit_sum = start(n if sum_logits else 1, 0.0)
        self.weighted_sum = start(n if entropy else 1, 0.0)
        self.max_before = start(n if top1 else 1, float("-inf"))

    def rows(self, rows: slice) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Views of ``(max, sumexp, target_logit, logit_sum)`` on ``rows``, for a kernel's
        pointers (``logit_sum`` is a dummy of one element unless it is kept)."""
        logit_sum = self.logit_sum[rows] if self.sum_logits else self.logit_sum
        return self.max[rows], self.sumexp[rows], self.target_logit[rows], logit_sum

    def per_token_rows(self, rows: slice) -> tuple[Tensor, Tensor]:
        """``(weighted_sum, max_before)`` on ``rows`` for a kernel's pointers (dummies of one
        element unless ``entropy``, ``top1``)."""
        weighted_sum = self.weighted_sum[rows] if self.entropy else self.weighted_sum
        return weighted_sum, self.max_before[rows] if self.top1 else self.max_before

    def entropy_of(self, rows: slice, lse: Tensor) -> Tensor:
        """The entropy of the softmax of rows ``rows`` with final statistics and log-sum-exp
        ``lse`` (of those rows): ``lse - weighted_sum / sumexp``."""
        if not self.entropy:
            raise ValueError("these statistics were kept without entropy=True")
        return lse - self.weighted_sum[rows] / self.sumexp[rows]

    def is_top1(self, rows: slice) -> Tensor:
        """Whether each target of rows ``rows`` is the first maximum of its row's logits
        (final statistics)."""
        if not self.top1:
            raise ValueError("these statistics were kept without top1=True")
        target = self.target_logit[rows]
        return (target >= self.max[rows]) & (target > self.max_before[rows])


def accumulate_logit_statistics(
    logits: Tensor,
    col_offset: int,
    targets: Tensor,
    stats: RowStatistics,
    rows: slice,
    options: LossOptions,
    *,
    skip_ignored: bool = False,
) -> None:
    """Fold one tile into ``stats``.

    ``logits (r, c)``: raw logits of rows ``rows`` and vocabulary columns
    ``[col_offset, col_offset + c)``, contiguous rows in any float dtype; ``targets (N,)``
    int64, all rows; ``stats`` of all ``N`` rows, updated in place on ``rows``. ``options``:
    the transforms to apply and ``ignore_index``. ``skip_ignored``: leave the statistics of
    ignored rows as they started (their lse then comes out -inf), for a caller that needs
    no lse of them: their loss is masked and their gradient is 0.
    """
    logit_statistics_kernel[(logits.shape[0],)](
        logits, logits.stride(0), logits.shape[1], col_offset,
        targets[rows], *stats.rows(rows), *stats.per_token_rows(rows),
        options.ignore_index, options.logit_scale or 1.0, options.softcap or 1.0,
        SKIP_IGNORED=skip_ignored, HAS_SCALE=options.logit_scale is not None, HAS_SOFTCAP=options.softcap is not None,
        SUM_LOGITS=stats.sum_logits, ENTROPY=stats.entropy, TOP1=stats.top1, **row_kernel_launch(logits.shape[1]),
    )
