"""Launch parameters of the row kernels, chosen in one place: block sizes and warps."""

from __future__ import annotations

import triton

# A row kernel reads its row in blocks of at most this many columns (a power of two).
MAX_BLOCK_V = 2048


def row_kernel_launch(n_cols: int) -> dict[str, int]:
    """``BLOCK_V`` and ``num_warps`` of a kernel with one program per row of ``n_cols``."""
    block = min(MAX_BLOCK_V, triton.next_power_of_2(n_cols))
    return {"BLOCK_V": block, "num_warps": 8 if block >= 2048 else 4}
