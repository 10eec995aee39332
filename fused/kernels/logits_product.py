"""The logits product, with the row statistics or the gradient computed in its epilogue.

cuBLAS writes a tile of logits to memory and a row kernel reads it back: per 16-bit logit
2 bytes written, then 2 read for the statistics and 2 read and 2 written for the gradient.
Where the hidden size is small the product is short and these bytes cost as much as it
does. This Triton matmul computes the same tile (float32 sums over the hidden dimension,
plus the bias, rounded to the tile's dtype as ``lm_head`` rounds them) and, while a
``BLOCK_M x BLOCK_N`` block is still in registers, does the row kernel's work on it:

* **statistics**: for each row of the block, the max of its transformed logits, the sum of
  ``exp(z - max)`` and (for label smoothing) the sum of ``z`` over each ``PARTIAL_COLUMNS``
  columns, written to a partial buffer of ``(rows, cdiv(cols, PARTIAL_COLUMNS))`` entries per
  statistic; and the target logit, by the one block that holds the target's column. A second
  kernel then merges a row's partials into its running statistics
  (``fused.kernels.logit_statistics.RowStatistics``): a read of ``1 / PARTIAL_COLUMNS`` of the
  tile's entries instead of the whole tile. The logits are stored only when a gradient pass
  will read them.
* **gradient**: with every row's final ``lse`` known, ``dL/dx`` itself is stored, as
  ``logit_gradient`` would write it over stored logits: 2 bytes a logit instead of 6.

What it costs: a Triton matmul is not cuBLAS. On the H200 this one alone takes longer than
cuBLAS's product and the row kernel together (``python -m bench.epilogue``), so the saved
bytes never pay there, and the measured planner (``fused.measured_plan``) times epilogue plans
(``TilePlan.epilogue``) only when asked to. The arithmetic of a row's statistics differs from
the row kernel's in order only (partials merged in column order), and the launch
configuration is fixed, so one plan's results are bitwise deterministic.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused.kernels.logit_gradient import gradient_of_logits
from fused.kernels.logit_statistics import RowStatistics
from fused.kernels.logit_transform import transform_logits
from reference.linear_cross_entropy import LossOptions

# A row's partial statistics cover this many columns each, whatever BLOCK_N (a multiple of
# it): 12 bytes of partials per 256 bytes of 16-bit logits.
PARTIAL_COLUMNS = 128
# Partial statistics per (row, column block): max, sum of exponentials, sum of logits.
PARTIAL_STATISTICS = 3


# One launch configuration, not an autotuned choice: BLOCK_N and the warps decide the order
# in which a partial's exponentials are summed, and a plan's results must not depend on which
# configuration a process's timings favoured. 256 x 128 blocks (8 warps, 3 stages) made the
# fastest plain product of the configurations tried on an H200; the interpreter, which runs
# each program in numpy, takes few, small ones.
if os.environ.get("TRITON_INTERPRET") == "1":
    LAUNCH = {"BLOCK_M": 32, "BLOCK_N": PARTIAL_COLUMNS, "BLOCK_K": 32, "GROUP_M": 4}
else:
    LAUNCH = {"BLOCK_M": 256, "BLOCK_N": PARTIAL_COLUMNS, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


@triton.jit
def logits_product_kernel(
    hidden_ptr, weight_ptr, bias_ptr, out_ptr, out_stride, targets_ptr,
    partial_ptr, partial_plane, partial_stride, target_logit_ptr,
    lse_ptr, loss_grad_ptr, loss_grad_stride, lse_grad_ptr,
    n_rows, n_cols, hidden_dim, col_offset,
    ignore_index, label_smoothing, z_loss, vocab_size, logit_scale, softcap,
    GRADIENT: tl.constexpr, STORE_LOGITS: tl.constexpr, SUM_LOGITS: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LOSS_GRAD: tl.constexpr, HAS_LSE_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, PARTIAL_COLS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Blocks in groups of GROUP_M rows, column-major within a group: consecutive programs
    # share weight blocks while they are in L2.
    pid = tl.program_id(0)
    blocks_m, blocks_n = tl.cdiv(n_rows, BLOCK_M), tl.cdiv(n_cols, BLOCK_N)
    group = pid // (GROUP_M * blocks_n)
    first_m = group * GROUP_M
    group_rows = min(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * blocks_n)) % group_rows
    pid_n = (pid % (GROUP_M * blocks_n)) // group_rows
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in, col_in = rows < n_rows, cols < n_cols
    ks = tl.arange(0, BLOCK_K)
    # Rows and columns past the edge load a valid row again (wrapped) rather than through a
    # mask: the loop stays unmasked in them, and their results are never stored.
    a_ptrs = hidden_ptr + (rows % n_rows).to(tl.int64)[:, None] * hidden_dim + ks[None, :]
    b_ptrs = weight_ptr + (col_offset + cols % n_cols).to(tl.int64)[None, :] * hidden_dim + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, hidden_dim, BLOCK_K):
        k_in = ks < hidden_dim - k
        a = tl.load(a_ptrs, mask=k_in[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_in[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + col_offset + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    out_dtype = out_ptr.dtype.element_ty
    dtype = target_logit_ptr.dtype.element_ty
    # The logits as the tile holds them (rounded to its dtype), then widened for arithmetic.
    x = acc.to(out_dtype).to(dtype)
    targets = tl.load(targets_ptr + rows, mask=row_in, other=ignore_index)
    target_cols = targets - col_offset
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * out_stride + cols[None, :]
    in_tile = row_in[:, None] & col_in[None, :]
    if GRADIENT:
        ignored = targets == ignore_index
        lse = tl.load(lse_ptr + rows, mask=row_in, other=0.0)
        if not HAS_LSE_GRAD:
            # An ignored row's lse may be -inf (a forward computing the gradients skips it):
            # 0 * exp(z + inf) would be NaN where its gradient is 0.
            lse = tl.where(ignored, 0.0, lse)
        g = tl.full((BLOCK_M,), 1.0, dtype)
        if HAS_LOSS_GRAD:
            g = tl.load(loss_grad_ptr + rows * loss_grad_stride, mask=row_in, other=0.0).to(dtype)
        g = tl.where(ignored, 0.0, g)
        h = tl.zeros((BLOCK_M,), dtype)
        if HAS_LSE_GRAD:
            h = tl.load(lse_grad_ptr + rows, mask=row_in, other=0.0).to(dtype)
        zero = tl.zeros((BLOCK_M,), dtype)
        grad = gradient_of_logits(
            x, cols[None, :], target_cols[:, None], lse[:, None], g[:, None], h[:, None], zero[:, None], zero[:, None],
            label_smoothing, z_loss, vocab_size, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP, False,
        )
        if not HAS_LSE_GRAD:
            # As logit_gradient's zero rows, whatever an infinite upstream gradient makes of g.
            grad = tl.where(ignored[:, None], 0.0, grad)
        tl.store(out_ptrs, grad.to(out_dtype), mask=in_tile)
    else:
        if STORE_LOGITS:
            tl.store(out_ptrs, x.to(out_dtype), mask=in_tile)
        z = transform_logits(x, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
        z = tl.where(col_in[None, :], z, float("-inf"))
        # Partials per PARTIAL_COLUMNS columns whatever BLOCK_N: a block of SUBS of them.
        SUBS: tl.constexpr = BLOCK_N // PARTIAL_COLS
        part_idx = pid_n * SUBS + tl.arange(0, SUBS)
        partial = partial_ptr + rows.to(tl.int64)[:, None] * partial_stride + part_idx[None, :]
        # A part wholly past the last column is not stored: the fold reads
        # cdiv(n_cols, PARTIAL_COLUMNS) parts, each with one column at least.
        stored = row_in[:, None] & (part_idx < tl.cdiv(n_cols, PARTIAL_COLS))[None, :]
        if SUBS == 1:
            # Reduced in the product's own layout: no reshape, no shuffle through shared memory.
            part_max = tl.max(z, axis=1)[:, None]
            part_sum = tl.sum(tl.exp(z - part_max), axis=1)[:, None]
            if SUM_LOGITS:
                part_logits = tl.sum(tl.where(col_in[None, :], z, 0.0), axis=1)[:, None]
        else:
            z_parts = tl.reshape(z, (BLOCK_M, SUBS, PARTIAL_COLS))
            part_max = tl.max(z_parts, axis=2)
            shift = tl.where(part_max == float("-inf"), 0.0, part_max)
            part_sum = tl.sum(tl.exp(z_parts - shift[:, :, None]), axis=2)
            if SUM_LOGITS:
                part_logits = tl.sum(tl.reshape(tl.where(col_in[None, :], z, 0.0), (BLOCK_M, SUBS, PARTIAL_COLS)), axis=2)
        tl.store(partial, part_max, mask=stored)
        tl.store(partial + partial_plane, part_sum, mask=stored)
        if SUM_LOGITS:
            tl.store(partial + 2 * partial_plane, part_logits, mask=stored)
        # A padding column's index can equal a target in a later block: col_in guards it.
        hit = (cols[None, :] == target_cols[:, None]) & col_in[None, :]
        target_logit = tl.sum(tl.where(hit, z, 0.0), axis=1)
        tl.store(target_logit_ptr + rows, target_logit, mask=row_in & (tl.max(hit.to(tl.int32), axis=1) > 0))


@triton.jit
def fold_partial_statistics_kernel(
    partial_ptr, partial_plane, partial_stride, n_partials, targets_ptr, max_ptr, sumexp_ptr, logit_sum_ptr,
    ignore_index, SKIP_IGNORED: tl.constexpr, SUM_LOGITS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    if SKIP_IGNORED:
        if tl.load(targets_ptr + row) == ignore_index:
            return
    partials = partial_ptr + row.to(tl.int64) * partial_stride
    dtype = max_ptr.dtype.element_ty
    lane_max = tl.full((BLOCK,), float("-inf"), dtype)
    lane_sum = tl.zeros((BLOCK,), dtype)
    lane_logits = tl.zeros((BLOCK,), dtype)
    for start in range(0, n_partials, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        present = idx < n_partials
        block_max = tl.load(partials + idx, mask=present, other=float("-inf"))
        block_sum = tl.load(partials + partial_plane + idx, mask=present, other=0.0)
        new_max = tl.maximum(lane_max, block_max)
        # A lane with nothing yet (-inf) shifts by 0, not by -inf - -inf.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        lane_sum = lane_sum * tl.exp(lane_max - shift) + block_sum * tl.exp(block_max - shift)
        lane_max = new_max
        if SUM_LOGITS:
            lane_logits += tl.load(partials + 2 * partial_plane + idx, mask=present, other=0.0)
    running_max = tl.load(max_ptr + row)
    new_max = tl.maximum(running_max, tl.max(lane_max, axis=0))
    sumexp = tl.load(sumexp_ptr + row) * tl.exp(running_max - new_max)
    tl.store(sumexp_ptr + row, sumexp + tl.sum(lane_sum * tl.exp(lane_max - new_max), axis=0))
    tl.store(max_ptr + row, new_max)
    if SUM_LOGITS:
        tl.store(logit_sum_ptr + row, tl.load(logit_sum_ptr + row) + tl.sum(lane_logits, axis=0))


def _input_precision(hidden: Tensor) -> str:
    if hidden.dtype == torch.float64:
        raise ValueError("the logits product's epilogue kernels take 16- or 32-bit inputs, not float64")
    # float32 inputs: full float32 products, as torch.mm computes them (no TF32).
    return "ieee" if hidden.dtype == torch.float32 else "tf32"


def _launch(out: Tensor, hidden_rows: Tensor, weight: Tensor, bias: Tensor | None, cols: slice, targets: Tensor, **kw):
    n_rows, n_cols = hidden_rows.shape[0], cols.stop - cols.start
    if not (hidden_rows.is_contiguous() and weight.is_contiguous() and out.is_contiguous()):
        raise ValueError("the logits product's epilogue kernels take contiguous hidden rows, weight and tile")

    grid = (triton.cdiv(n_rows, LAUNCH["BLOCK_M"]) * triton.cdiv(n_cols, LAUNCH["BLOCK_N"]),)
    logits_product_kernel[grid](
        hidden_rows, weight, bias if bias is not None else hidden_rows, out, out.stride(0), targets,
        n_rows=n_rows, n_cols=n_cols, hidden_dim=hidden_rows.shape[1], col_offset=cols.start,
        HAS_BIAS=bias is not None, INPUT_PRECISION=_input_precision(hidden_rows), PARTIAL_COLS=PARTIAL_COLUMNS,
        **LAUNCH, **kw,
    )


def partial_buffer(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The partial statistics of a tile of ``rows x cols``: ``PARTIAL_STATISTICS`` planes of
    ``(rows, cdiv(cols, PARTIAL_COLUMNS))`` in the statistics' ``dtype``."""
    return torch.empty(PARTIAL_STATISTICS, rows, triton.cdiv(cols, PARTIAL_COLUMNS), dtype=dtype, device=device)


def logits_with_statistics(
    buffer: Tensor, hidden_rows: Tensor, weight: Tensor, bias: Tensor | None, cols: slice, targets: Tensor,
    stats: RowStatistics, rows: slice, options: LossOptions, partials: Tensor, *, store: bool, skip_ignored: bool,
) -> Tensor | None:
    """Fold the tile of ``hidden_rows (r, D)`` against vocabulary ``cols`` of ``weight (V, D)``
    (and ``bias (V,)``) into ``stats`` on ``rows``, as ``logits_tile`` then
    ``accumulate_logit_statistics`` would; with ``store``, return the raw logits ``(r, c)``
    written into a contiguous view of ``buffer`` (its dtype), else None and nothing is written.
    ``targets (N,)`` int64 of all rows; ``partials``: a ``partial_buffer`` of at least
    ``(r, c)``; ``skip_ignored`` as ``accumulate_logit_statistics``'s. Keeps neither entropy nor
    top1."""
    if stats.entropy or stats.top1:
        raise ValueError("logits_with_statistics: keeps no per-token statistics (entropy, top1)")
    r, c = hidden_rows.shape[0], cols.stop - cols.start
    out = buffer[: r * c].view(r, c)
    part = partials[:, :r, : triton.cdiv(c, PARTIAL_COLUMNS)]
    row_targets = targets[rows]
    row_max, row_sumexp, row_target_logit, row_logit_sum = stats.rows(rows)
    _launch(
        out, hidden_rows, weight, bias, cols, row_targets,
        partial_ptr=part, partial_plane=part.stride(0), partial_stride=part.stride(1), target_logit_ptr=row_target_logit,
        lse_ptr=row_max, loss_grad_ptr=row_max, loss_grad_stride=0, lse_grad_ptr=row_max,
        ignore_index=options.ignore_index, label_smoothing=0.0, z_loss=0.0, vocab_size=weight.shape[0],
        logit_scale=options.logit_scale or 1.0, softcap=options.softcap or 1.0,
        GRADIENT=False, STORE_LOGITS=store, SUM_LOGITS=stats.sum_logits, HAS_LOSS_GRAD=False, HAS_LSE_GRAD=False,
        HAS_SCALE=options.logit_scale is not None, HAS_SOFTCAP=options.softcap is not None,
    )
    n_partials = triton.cdiv(c, PARTIAL_COLUMNS)
    fold_partial_statistics_kernel[(r,)](
        part, part.stride(0), part.stride(1), n_partials, row_targets, row_max, row_sumexp, row_logit_sum,
        options.ignore_index, SKIP_IGNORED=skip_ignored, SUM_LOGITS=stats.sum_logits,
        BLOCK=min(1024, triton.next_power_of_2(n_partials)),
    )
    return out if store else None


def logit_gradient_tile(
    buffer: Tensor, hidden_rows: Tensor, weight: Tensor, bias: Tensor | None, cols: slice, targets: Tensor,
    lse: Tensor, loss_grad: Tensor | None, lse_grad: Tensor | None, rows: slice, options: LossOptions,
) -> Tensor:
    """``dL/dx (r, c)`` of the tile of ``hidden_rows (r, D)`` against vocabulary ``cols``,
    written into a contiguous view of ``buffer`` (its dtype) without the logits ever being
    stored: what ``logits_tile`` then ``write_logit_gradient`` leave in the tile. ``targets``,
    ``lse``, ``loss_grad`` and ``lse_grad`` as ``write_logit_gradient``'s (no entropy term)."""
    r, c = hidden_rows.shape[0], cols.stop - cols.start
    out = buffer[: r * c].view(r, c)
    loss_grad_rows = loss_grad[rows] if loss_grad is not None else lse[rows]
    _launch(
        out, hidden_rows, weight, bias, cols, targets[rows],
        partial_ptr=lse, partial_plane=0, partial_stride=0, target_logit_ptr=lse,
        lse_ptr=lse[rows], loss_grad_ptr=loss_grad_rows, loss_grad_stride=loss_grad_rows.stride(0),
        lse_grad_ptr=lse_grad[rows] if lse_grad is not None else lse,
        ignore_index=options.ignore_index, label_smoothing=options.label_smoothing, z_loss=options.z_loss,
        vocab_size=weight.shape[0], logit_scale=options.logit_scale or 1.0, softcap=options.softcap or 1.0,
        GRADIENT=True, STORE_LOGITS=False, SUM_LOGITS=False, HAS_LOSS_GRAD=loss_grad is not None,
        HAS_LSE_GRAD=lse_grad is not None, HAS_SCALE=options.logit_scale is not None,
        HAS_SOFTCAP=options.softcap is not None,
    )
    return out
