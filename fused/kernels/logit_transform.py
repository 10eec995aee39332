"""The logit transforms, applied on the fly inside the row kernels, and their derivative.

A raw logit ``x`` (the matmul's output) becomes ``u = logit_scale * x`` and then
``z = softcap * tanh(u / softcap)``, each step only when its option is set, in the order of
``reference.linear_cross_entropy.transform_logits``. The derivative is
``dz/dx = logit_scale * (1 - tanh(u / softcap)**2)``.
"""

import triton
import triton.language as tl


@triton.jit
def tanh_and_slope(x):
    """``tanh(x)`` and its derivative ``1 - tanh(x)**2``, from ``exp`` alone (the interpreter
    has no libdevice tanh).

    With ``e = exp(-2|x|)``: ``tanh|x| = (1 - e) / (1 + e)`` and ``1 - tanh**2 = 4e / (1 + e)**2``.
    The second form keeps its relative precision where tanh saturates (``1 - t*t`` would
    cancel to a few ulps of 1); near 0, ``1 - e`` cancels instead, and the odd Taylor series
    of tanh (exact to ~1e-12 relative below 0.1) takes over.
    """
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    t = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    series = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * 0.021869488536155203))))
    t = tl.where(ax < 0.1, series, t)
    slope = 4.0 * e / ((1.0 + e) * (1.0 + e))
    return tl.where(x < 0, -t, t), slope


@triton.jit
def transform_logits(x, logit_scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """``z`` from raw logits ``x``: times ``logit_scale``, then ``softcap * tanh(. / softcap)``."""
    if HAS_SCALE:
        x = x * logit_scale
    if HAS_SOFTCAP:
        t, _ = tanh_and_slope(x / softcap)
        x = t * softcap
    return x


@triton.jit
def transform_logits_with_slope(x, logit_scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """``z`` and ``dz/dx`` from raw logits ``x``."""
    slope = tl.full(x.shape, 1.0, x.dtype)
    if HAS_SCALE:
        x = x * logit_scale
        slope = slope * logit_scale
    if HAS_SOFTCAP:
        t, cap_slope = tanh_and_slope(x / softcap)
        x = t * softcap
        slope = slope * cap_slope
    return x, slope
