"""The logit transforms, applied on the fly inside the row kernels, and their derivative.

A raw logit ``x`` (the matmul's output) becomes ``u = logit_scale * x`` and then
``z = softcap * tanh(u / softcap)``, each step only when its option is set, in the order of
``reference.linear_cross_entropy.transform_logits``. The derivative is
``dz/dx = logit_scale * (1 - tanh(u / softcap)**2)``.
"""

import triton
import triton.language as tl


@triton.jit
def _exactly(value: tl.constexpr, like):
    """``value`` in ``like``'s dtype and shape. A bare float literal is a float32 constant,
    which would round a float64 coefficient to 24 bits."""
    return tl.full(like.shape, value, like.dtype)


@triton.jit
def _tanh_near_zero(x):
    """``tanh(x)`` for ``|x| < 0.625``: Cephes' ``x + x^3 R(x^2)`` (a rational ``R`` in float64,
    a polynomial in float32), accurate to an ulp or two, where ``1 - exp(-2|x|)`` would lose
    up to all its bits to cancellation."""
    z = x * x
    if x.dtype == tl.float64:
        p = (_exactly(-9.64399179425052238628e-1, z) * z - _exactly(9.92877231001918586564e1, z)) * z
        p = p - _exactly(1.61468768441708447952e3, z)
        q = ((z + _exactly(1.12811678491632931402e2, z)) * z + _exactly(2.23548839060100448583e3, z)) * z
        q = q + _exactly(4.84406305325125486048e3, z)
        t = x + x * z * (p / q)
    else:
        r = (((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1) * z
        t = x + (r - 3.33332819422e-1) * z * x
    return t


@triton.jit
def tanh_and_slope(x):
    """``tanh(x)`` and its derivative ``1 - tanh(x)**2``, from ``exp`` and arithmetic alone
    (the interpreter has no libdevice tanh), in ``x``'s dtype (float32 or float64).

    With ``e = exp(-2|x|)``: ``tanh|x| = (1 - e) / (1 + e)`` from ``|x| = 0.625`` on, where
    ``e <= 0.29`` and ``1 - e`` cannot cancel; below, Cephes' approximation. The derivative
    ``4e / (1 + e)**2`` keeps its relative precision where tanh saturates (``1 - t*t`` would
    cancel to a few ulps of 1).
    """
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    t = tl.where(ax < 0.625, _tanh_near_zero(ax), (1.0 - e) / (1.0 + e))
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
