"""The forward pass's gradients times the loss's upstream gradient, without asking the host.

A scalar loss's gradients are computed in the forward pass; its backward only multiplies
them by the upstream gradient, a 0-d tensor on the device that is almost always exactly 1
(``loss.backward()``). Reading it on the host would make the host wait for the whole forward
pass to finish before it could queue any of the backward pass, so the kernel reads it
itself: if it is 1 every program returns at once and nothing is read or written; otherwise
the gradient is scaled in place (arithmetic in float64, one rounding to the gradient's dtype)
and a flag is raised for the op to check if a retained graph is differentiated again.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

SCALE_BLOCK = 4096


@triton.jit
def scale_unless_one_kernel(x_ptr, n, factor_ptr, scaled_ptr, BLOCK: tl.constexpr):
    factor = tl.load(factor_ptr).to(tl.float64)
    if factor != 1.0:
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_range = offsets < n
        x = tl.load(x_ptr + offsets, mask=in_range, other=0.0)
        tl.store(x_ptr + offsets, (x.to(tl.float64) * factor).to(x_ptr.dtype.element_ty), mask=in_range)
        if tl.program_id(0) == 0:
            tl.store(scaled_ptr, 1)


def scale_unless_one(grads: list[Tensor], factor: Tensor) -> Tensor:
    """Multiply each contiguous tensor of ``grads`` in place by the 0-d ``factor`` (any float
    dtype, same device) unless it is exactly 1. Returns an int32 0-d flag on the device, 1
    if anything was scaled; the host does not wait for it."""
    scaled = torch.zeros((), dtype=torch.int32, device=factor.device)
    for g in grads:
        if g.numel():
            scale_unless_one_kernel[(triton.cdiv(g.numel(), SCALE_BLOCK),)](
                g, g.numel(), factor, scaled, BLOCK=SCALE_BLOCK, num_warps=4
            )
    return scaled
