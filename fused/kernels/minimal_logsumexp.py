"""The smallest useful kernel of the project, for teaching: online log-sum-exp of logits rows.

Notebook 06 starts here before it shows the production kernels. One program takes a block
of ``BLOCK_ROWS`` rows and walks across the vocabulary ``BLOCK_COLS`` columns at a time,
keeping two numbers per row: the running maximum ``m`` and the running sum ``s`` of
``exp(z - m)``. When a tile raises the maximum, the sum so far is rescaled by
``exp(m_old - m_new)`` (the online softmax of Milakov and Gimelshein). The row is read once;
nothing of size ``V`` is ever written. No options, no gradient: the production kernels
(``logit_statistics``, ``logit_gradient``) add those.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def row_logsumexp_kernel(
    z_ptr, lse_ptr, n_rows, n_cols, row_stride, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr
):
    """``lse[r] = log(sum(exp(z[r, :])))`` for one block of rows, one pass over the columns."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows  # the last block may stick out of the matrix
    m = tl.full((BLOCK_ROWS,), float("-inf"), tl.float32)  # running maximum
    s = tl.zeros((BLOCK_ROWS,), tl.float32)  # running sum of exp(z - m)
    for start in range(0, n_cols, BLOCK_COLS):
        cols = start + tl.arange(0, BLOCK_COLS)
        in_matrix = row_ok[:, None] & (cols[None, :] < n_cols)
        # Outside the matrix read -inf (exp gives 0); rows past the end read 0, never stored.
        outside = tl.where(row_ok[:, None], float("-inf"), 0.0)
        offsets = rows[:, None] * row_stride + cols[None, :]
        z = tl.load(z_ptr + offsets, mask=in_matrix, other=0.0).to(tl.float32)
        z = tl.where(in_matrix, z, outside)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # First tile: m = -inf, so exp(m - m_new) = 0 and the empty sum stays 0.
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    tl.store(lse_ptr + rows, m + tl.log(s), mask=row_ok)


def row_logsumexp(logits: Tensor, block_rows: int = 16, block_cols: int = 128) -> Tensor:
    """Float32 log-sum-exp of each row of a 2-d ``logits`` tensor (any float dtype, rows
    contiguous), by :func:`row_logsumexp_kernel`. Every row needs one finite logit."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("logits must be 2-d with contiguous rows")
    n_rows, n_cols = logits.shape
    # The kernel keeps it short with int32 offsets (the production kernels use int64).
    if n_rows * logits.stride(0) >= 2**31:
        raise ValueError("the teaching kernel addresses fewer than 2**31 elements")
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    grid = (triton.cdiv(n_rows, block_rows),)
    row_logsumexp_kernel[grid](
        logits, lse, n_rows, n_cols, logits.stride(0), BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols
    )
    return lse
