"""The gradient of the loss with respect to a tile of logits, written over the logits.

For a row ``i`` with target ``y``, log-sum-exp ``lse`` (final, from the statistics pass),
upstream gradient ``g`` of its loss (0 on ignored rows) and ``h`` of its lse:

    dL/dz_j = (g * (1 + 2 * z_loss * lse) + h) * p_j - g * (1 - eps) * [j == y] - g * eps / V
            + e * p_j * (lse - z_j - H)

with ``p_j = exp(z_j - lse)``, then times ``dz/dx`` of the transforms. The last term is the
gradient of the row's entropy ``H`` (``reference.per_token_outputs``) for an upstream
gradient ``e`` of it, only when asked (``HAS_ENTROPY_GRAD``): without it the kernel is the
one it was. The
kernel recomputes ``z`` from the raw logits in the tile, does the arithmetic in float32 (or
float64) and stores ``dL/dx`` in the tile's own dtype, in place: the tile then feeds the
``grad_hidden`` and ``grad_weight`` matmuls.
"""

import triton
import triton.language as tl
from torch import Tensor

from fused.kernels.launch import row_kernel_launch
from fused.kernels.logit_transform import transform_logits_with_slope
from reference.linear_cross_entropy import LossOptions


@triton.jit
def gradient_of_logits(
    x, cols, target_col, lse, g, h, entropy, e, label_smoothing, z_loss, vocab_size, logit_scale, softcap,
    HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
):
    """``dL/dx`` of raw logits ``x`` (the compute dtype) in columns ``cols``, for rows with
    target column ``target_col``, final ``lse``, upstream gradients ``g`` of the loss (0 if
    ignored), ``h`` of the lse and, with ``HAS_ENTROPY_GRAD``, ``e`` of the ``entropy``: the
    module's formula, elementwise, so that a row segment (``row_gradient``) and a block of
    rows with per-row values broadcast (``fused.kernels.logits_product``) share it."""
    coef_p = g * (1.0 + 2.0 * z_loss * lse) + h
    coef_target = g * (1.0 - label_smoothing)
    coef_uniform = g * label_smoothing / vocab_size
    z, slope = transform_logits_with_slope(x, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
    p = tl.exp(z - lse)
    dz = coef_p * p - tl.where(cols == target_col, coef_target, 0.0) - coef_uniform
    if HAS_ENTROPY_GRAD:
        dz += e * p * (lse - entropy - z)
    return dz * slope


@triton.jit
def row_gradient(
    logits_row, n_cols, target_col, lse, g, h, entropy, e, label_smoothing, z_loss, vocab_size, logit_scale,
    softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Overwrite one row's ``n_cols`` raw logits at ``logits_row`` with ``dL/dx``, given the
    row's final ``lse``, the upstream gradient ``g`` of its loss (0 if ignored), ``h`` of its
    lse and, with ``HAS_ENTROPY_GRAD``, its ``entropy`` and the upstream gradient ``e`` of it
    (all in the compute dtype)."""
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < n_cols
        x = tl.load(logits_row + cols, mask=in_row, other=0.0).to(lse.dtype)
        dx = gradient_of_logits(
            x, cols, target_col, lse, g, h, entropy, e, label_smoothing, z_loss, vocab_size, logit_scale, softcap,
            HAS_SCALE, HAS_SOFTCAP, HAS_ENTROPY_GRAD,
        )
        tl.store(logits_row + cols, dx.to(logits_row.dtype.element_ty), mask=in_row)


@triton.jit
def zero_row(logits_row, n_cols, BLOCK_V: tl.constexpr):
    """Overwrite one row's ``n_cols`` logits with zeros: the gradient of an ignored row, which
    then needs no read of its logits."""
    zeros = tl.zeros((BLOCK_V,), logits_row.dtype.element_ty)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        tl.store(logits_row + cols, zeros, mask=cols < n_cols)


@triton.jit
def logit_gradient_kernel(
    logits_ptr, row_stride, n_cols, col_offset,
    targets_ptr, lse_ptr, loss_grad_ptr, loss_grad_stride, lse_grad_ptr, entropy_ptr, entropy_grad_ptr,
    ignore_index, label_smoothing, z_loss, vocab_size, logit_scale, softcap,
    HAS_LOSS_GRAD: tl.constexpr, HAS_LSE_GRAD: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    target = tl.load(targets_ptr + row)
    logits_row = logits_ptr + row.to(tl.int64) * row_stride
    if not HAS_LSE_GRAD:
        if target == ignore_index:
            # Nothing reaches an ignored row but through its lse: its gradient is 0, written
            # without reading the row (nor its lse, which a forward computing the gradients
            # leaves at -inf).
            zero_row(logits_row, n_cols, BLOCK_V)
            return
    lse = tl.load(lse_ptr + row)
    if HAS_LOSS_GRAD:
        g = tl.load(loss_grad_ptr + row * loss_grad_stride).to(lse.dtype)
    else:
        g = tl.full((), 1.0, lse.dtype)
    # Ignored rows get here only with an lse gradient. where, not a product: an infinite
    # upstream gradient of the loss must still give them 0.
    g = tl.where(target != ignore_index, g, 0.0)
    h = tl.full((), 0.0, lse.dtype)
    if HAS_LSE_GRAD:
        h = tl.load(lse_grad_ptr + row).to(lse.dtype)
    entropy = tl.full((), 0.0, lse.dtype)
    e = tl.full((), 0.0, lse.dtype)
    if HAS_ENTROPY_GRAD:
        entropy = tl.load(entropy_ptr + row).to(lse.dtype)
        e = tl.where(target != ignore_index, tl.load(entropy_grad_ptr + row).to(lse.dtype), 0.0)
    row_gradient(
        logits_row, n_cols, target - col_offset, lse, g, h, entropy, e,
        label_smoothing, z_loss, vocab_size, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP, HAS_ENTROPY_GRAD, BLOCK_V,
    )


def write_logit_gradient(
    logits: Tensor,
    col_offset: int,
    targets: Tensor,
    lse: Tensor,
    loss_grad: Tensor | None,
    lse_grad: Tensor | None,
    rows: slice,
    vocab_size: int,
    options: LossOptions,
    *,
    entropy: Tensor | None = None,
    entropy_grad: Tensor | None = None,
) -> None:
    """Overwrite the raw logits of one tile with ``dL/dx``.

    ``logits (r, c)``: rows ``rows``, vocabulary columns ``[col_offset, col_offset + c)``,
    contiguous rows. ``targets (N,)`` int64 and ``lse (N,)`` (float32 or float64) of all
    rows. ``loss_grad``: ``(N,)`` upstream gradient of each row's loss (any stride, 0 for a
    broadcast scalar), or None for 1. ``lse_grad``: ``(N,)`` contiguous, or None for 0.
    ``entropy`` and ``entropy_grad``: ``(N,)`` contiguous, each row's entropy and the
    upstream gradient of it, both or neither (None: no entropy term).
    """
    if (entropy is None) != (entropy_grad is None):
        raise ValueError("write_logit_gradient: give entropy and entropy_grad together")
    # An absent gradient's pointer is never read (its HAS_ flag is off): pass any tensor.
    loss_grad_rows = loss_grad[rows] if loss_grad is not None else lse
    lse_grad_rows = lse_grad[rows] if lse_grad is not None else lse
    entropy_rows = entropy[rows] if entropy is not None else lse
    entropy_grad_rows = entropy_grad[rows] if entropy_grad is not None else lse
    logit_gradient_kernel[(logits.shape[0],)](
        logits, logits.stride(0), logits.shape[1], col_offset,
        targets[rows], lse[rows], loss_grad_rows, loss_grad_rows.stride(0), lse_grad_rows,
        entropy_rows, entropy_grad_rows,
        options.ignore_index, options.label_smoothing, options.z_loss, vocab_size,
        options.logit_scale or 1.0, options.softcap or 1.0,
        HAS_LOSS_GRAD=loss_grad is not None, HAS_LSE_GRAD=lse_grad is not None,
        HAS_ENTROPY_GRAD=entropy_grad is not None,
        HAS_SCALE=options.logit_scale is not None, HAS_SOFTCAP=options.softcap is not None,
        **row_kernel_launch(logits.shape[1]),
    )
