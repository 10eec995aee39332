"""The softcap's tanh inside the kernels (``fused.kernels.logit_transform.tanh_and_slope``)
against float64 ``torch.tanh`` over the whole range, in float32 and float64: under the
interpreter on CPU, compiled on a GPU.

Tolerances, in ulps of the result's own dtype: 2 for tanh (float32's ``torch.tanh`` is within
0.5 of the truth; the kernel's, from ``exp`` and arithmetic, within 1.5 on CPU and 1.6 on an
H200), 4 for its derivative. Compiled for a GPU, float32 ``tl.exp`` is the hardware's
approximate exponential, whose relative error grows with its argument ``2|x|``: there the
derivative is held to ``4 + |x|`` ulps (measured on an H200: 15.6 at |x| = 20). The former
formula lost up to 4.8 float32 ulps near |x| = 0.15, where ``1 - exp(-2|x|)`` cancels, and
4000 float64 ulps just below 0.1, where a truncated series took over.
"""

import pytest
import torch
import triton
import triton.language as tl

from fused.kernels.logit_transform import tanh_and_slope

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TANH_ULPS = 2
SLOPE_ULPS = 4


@triton.jit
def _tanh_and_slope_kernel(x_ptr, t_ptr, s_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    t, s = tanh_and_slope(tl.load(x_ptr + offs, mask=mask, other=0.0))
    tl.store(t_ptr + offs, t, mask=mask)
    tl.store(s_ptr + offs, s, mask=mask)


def _points(dtype: torch.dtype) -> torch.Tensor:
    """A dense grid over [-20, 20], tiny magnitudes down to 1e-30, and both sides of the switch
    between the two formulas at 0.625."""
    dense = torch.linspace(-20, 20, 200_001, dtype=torch.float64)
    tiny = torch.logspace(-30, 0.3, 2_001, dtype=torch.float64)
    switch = torch.tensor(0.625, dtype=dtype)
    around = torch.stack([torch.nextafter(switch, torch.tensor(0.0, dtype=dtype)), switch])
    x = torch.cat([dense, tiny, -tiny, around.double(), -around.double()]).to(dtype)
    return x.to(DEVICE)


def _ulps(got: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (got.double() - exact).abs() / (exact.abs() * torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tanh_and_slope_are_accurate_over_the_whole_range(dtype):
    x = _points(dtype)
    t, s = torch.empty_like(x), torch.empty_like(x)
    block = 4096
    _tanh_and_slope_kernel[(triton.cdiv(x.numel(), block),)](x, t, s, x.numel(), BLOCK=block)
    exact_t = torch.tanh(x.double())
    exact_s = 1 / torch.cosh(x.double()) ** 2
    assert torch.equal(t[x == 0], x[x == 0])
    nonzero, sloped = exact_t != 0, exact_s > 0
    slope_ulps = torch.full_like(x, SLOPE_ULPS, dtype=torch.float64)
    if DEVICE == "cuda" and dtype == torch.float32:
        slope_ulps += x.abs().double()
    worst_t = _ulps(t, exact_t, dtype)[nonzero].max().item()
    worst_s = (_ulps(s, exact_s, dtype) / slope_ulps)[sloped].max().item()
    assert worst_t <= TANH_ULPS, f"tanh off by {worst_t:.2f} ulps"
    assert worst_s <= 1, f"slope off by {worst_s:.2f} times its tolerance"
