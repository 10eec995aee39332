"""Cut Cross Entropy's test grids (apple/ml-cross-entropy, tests/test_cce_lse.py,
test_cce_indexed_dot.py, test_cce_loss_forward.py, test_cce_loss_backward.py), re-expressed
for ``fused.linear_cross_entropy`` (tests/peer_grids.py says how).

CCE's problem: ``e (N, D) ~ N(0, 1/D)``, classifier ``c (V, D) ~ N(0, 1)`` whose first
``min(N, V) // 2`` rows are copies of ``e``'s (so those tokens have one large logit), bias
``~ N(0, 0.02**2)`` (0.01 for the loss grids), 20% of targets ignored when ``invalids``.
CCE's check, elementwise: ``|got - truth| <= |torch's result in the dtype - truth| + tol``,
with its tolerances; its truth is float32 from upcast inputs, here float64 (the exact
logits). Parameters and tolerances are CCE's; on CPU the token counts shrink (``_rows``).

Where the project differs on purpose:
- 16-bit inputs, log-sum-exp: CCE keeps each tile's logits in float32; the project rounds them
  to the inputs' dtype, as transformers' ``lm_head(h).float()`` does (its contract). CCE's
  bound compares row by row against torch's own rounding (``e @ c.T`` then ``+= bias``: two
  roundings), which a different but equally rounded computation meets only by chance. These
  cases hold the default to the same bound with the contract's result (``F.linear``, one
  rounding) as torch's, and record the literal ratio; the op's option for accuracy beyond
  stock, ``logits_dtype=torch.float32`` (CCE's float32 tiles), is held to CCE's literal bound.
- ``shift=2``: ``shift`` is True or False (one position, as transformers), so 2 raises
  ``TypeError``; the case checks that, then the loss of labels shifted one place by the
  caller with ``shift=True``, which is CCE's shift of 2.
- The indexed dot: CCE has a kernel for the target logit, a direct dot product of the token's
  row and the target's; the op has none, and its target logit is, by the contract, an entry
  of the logits product (a GEMM, whose float32 sums round otherwise than a dot's). The
  cases hold it to CCE's bound with the contract's target logit as torch's result, and
  record the literal ratio. The op does not return the target logit: it is read as
  ``lse - loss`` of ``reduction='none'`` with ``return_lse=True``, which adds at most half an
  ulp of the float32 loss (2.4e-7 for losses in [4, 8)).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fused import linear_cross_entropy
from peer_grids import (
    BACKENDS, DEVICE, ON_GPU, bound_ratio, cases, expect_interpreter_defect, generator, hold, randn, run, together,
    truth,
)
from reference.linear_cross_entropy import linear_cross_entropy as contract

pytestmark = pytest.mark.peer_grids

IGNORE = -100
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HALF = (torch.float16, torch.bfloat16)
LSE_SHAPES = [(256, 512, 128), (255, 507, 128), (255, 507, 123)]
LOSS_SHAPES = [(256, 512, 128), (252, 507, 128), (252, 507, 123)]


def _rows(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """CCE's ``(N, V, D)``; on CPU about a quarter of the tokens, a multiple of 4 (the loss
    grids' 4 sequences) where CCE's is: the interpreter runs one program per token, about
    20 ms each."""
    n, v, d = shape
    return shape if ON_GPU else (n // 4 if n % 4 else n // 16 * 4, v, d)


def _problem(shape, dtype, bias_scale, seed):
    n, v, d = _rows(shape)
    gen = generator(seed)
    e = (randn(n, d, gen=gen) / d**0.5).to(dtype)
    c = randn(v, d, gen=gen, dtype=dtype)
    c[: min(n, v) // 2] = e[: min(n, v) // 2]
    bias = randn(v, gen=gen, dtype=dtype) * bias_scale if bias_scale else None
    return e, c, bias, gen


def _torch_logits(e, c, bias, softcap):
    """Torch's logits as CCE's tests compute them, in the inputs' dtype."""
    logits = e @ c.T
    if bias is not None:
        logits += bias
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _op(backend, **knobs):
    def fn(*args, **kwargs):
        return linear_cross_entropy(*args, backend=backend, **knobs, **kwargs)

    return fn


# ---- log-sum-exp (test_cce_lse.py) -----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype, softcap, has_bias, shape",
    cases("dtype, softcap, has_bias, shape", DTYPES, [None, 20.0], [True, False], LSE_SHAPES,
          default=lambda dtype, softcap, has_bias, shape: (
              shape == LSE_SHAPES[2] and softcap is None and has_bias and dtype != torch.float16)),
)
def test_lse(request, backend, dtype, softcap, has_bias, shape):
    e, c, bias, _ = _problem(shape, dtype, 0.02 if has_bias else 0, seed=0)
    labels = torch.zeros(e.shape[0], dtype=torch.long, device=DEVICE)
    kwargs = {"softcap": softcap, "reduction": "none", "return_lse": True}
    gt = truth(e, c, labels, bias, round_logits=False, objective=None, **kwargs)[1]
    got = run(_op(backend), e, c, labels, bias, objective=None, **kwargs)[1]
    torch_lse = torch.logsumexp(_torch_logits(e, c, bias, softcap).float(), dim=-1)
    literal = bound_ratio(got, gt, torch_lse, 1e-5)
    if dtype in HALF:
        stock = contract(e, c, labels, bias=bias, **kwargs)[1]
        float32_logits = run(_op(backend, logits_dtype=torch.float32), e, c, labels, bias, objective=None, **kwargs)[1]
        hold(request, "documented", peer_literal=literal, lse=bound_ratio(got, gt, stock, 1e-5),
             lse_float32_logits=bound_ratio(float32_logits, gt, torch_lse, 1e-5))
    else:
        hold(request, lse=literal)


# ---- the target logit (test_cce_indexed_dot.py) ----------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype, error_tol, softcap, has_bias, shape",
    cases("dtype, error_tol, softcap, has_bias, shape",
          [together(torch.float32, 1e-6), together(torch.float16, 1e-3), together(torch.bfloat16, 1e-2)], [None, 20.0], [True, False],
          LSE_SHAPES,
          default=lambda dtype, tol, softcap, has_bias, shape: (
              shape == LSE_SHAPES[1] and softcap is not None and has_bias and dtype != torch.float16)),
)
def test_indexed_dot(request, backend, dtype, error_tol, softcap, has_bias, shape):
    e, c, bias, gen = _problem(shape, dtype, 0.02 if has_bias else 0, seed=0)
    inds = torch.randint(0, c.shape[0], (e.shape[0],), generator=gen, device=DEVICE)
    kwargs = {"softcap": softcap, "reduction": "none", "return_lse": True}
    loss, lse, _ = truth(e, c, inds, bias, round_logits=False, objective=None, **kwargs)
    gt = loss - lse  # CCE's kernel returns minus the target logit
    loss, lse, _ = run(_op(backend), e, c, inds, bias, objective=None, **kwargs)
    got = loss.double() - lse.double()
    ref = -(e * c[inds]).sum(-1, dtype=torch.float32)
    if bias is not None:
        ref -= bias[inds].float()
    if softcap is not None:
        ref = torch.tanh(ref / softcap) * softcap
    literal = bound_ratio(got, gt, ref.to(dtype), error_tol)
    # The contract's target logit: transformers' lm_head(h).float(), then the softcap.
    stock = -F.linear(e, c, bias).float()[torch.arange(len(inds), device=DEVICE), inds]
    if softcap is not None:
        stock = torch.tanh(stock / softcap) * softcap
    hold(request, "documented", peer_literal=literal, neg_dot=bound_ratio(got, gt, stock, error_tol))


# ---- per-token loss (test_cce_loss_forward.py) -----------------------------------------------


def _loss_problem(shape, dtype, has_bias, invalids, bias_scale, seed=0):
    e, c, bias, gen = _problem(shape, dtype, bias_scale if has_bias else 0, seed)
    n, v = e.shape[0], c.shape[0]
    targets = torch.randint(0, v, (n,), generator=gen, device=DEVICE)
    if invalids:
        targets[torch.randperm(n, generator=gen, device=DEVICE)[: int(0.2 * n)]] = IGNORE
    return e.view(4, -1, e.shape[-1]), c, bias, targets.view(4, -1)


def _shifted_by_caller(targets, shift):
    """Labels for ``shift=True`` that give CCE's shift of ``shift`` positions (1 or 2)."""
    if shift == 1:
        return targets
    labels = torch.full_like(targets, IGNORE)
    labels[:, : 1 - shift] = targets[:, shift - 1:]
    return labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype, error_tol, softcap, has_bias, shift, invalids, shape",
    cases("dtype, error_tol, softcap, has_bias, shift, invalids, shape",
          [together(torch.float32, 1e-5), together(torch.float16, 1e-3), together(torch.bfloat16, 1e-2)], [None, 20.0], [True, False],
          [0, 2], [False, True], LOSS_SHAPES,
          default=lambda dtype, tol, softcap, has_bias, shift, invalids, shape: (
              shape == LOSS_SHAPES[2] and invalids and has_bias and (softcap is None) == (shift == 0)
              and (dtype == torch.bfloat16) == (shift == 2))),
)
def test_loss_forward(request, backend, dtype, error_tol, softcap, has_bias, shift, invalids, shape):
    e, c, bias, targets = _loss_problem(shape, dtype, has_bias, invalids, 0.01)
    t = e.shape[1] - shift
    kind = "peer"
    if shift:
        with pytest.raises(TypeError, match="shift must be True or False"):
            linear_cross_entropy(e, c, targets, bias=bias, shift=shift, backend=backend)
        kind, labels, kwargs = "documented", _shifted_by_caller(targets, shift), {"shift": True}
    else:
        labels, kwargs = targets, {}
    kwargs.update(softcap=softcap, reduction="none")
    gt = truth(e, c, labels, bias, round_logits=False, objective=None, **kwargs)[0][:, :t]
    got = run(_op(backend), e, c, labels, bias, objective=None, **kwargs)[0][:, :t]
    flat_e = e[:, : e.shape[1] - shift].flatten(0, 1)
    ref = F.cross_entropy(_torch_logits(flat_e, c, bias, softcap).float(), targets[:, shift:].flatten(),
                          ignore_index=IGNORE, reduction="none").view(4, t)
    hold(request, kind, loss=bound_ratio(got, gt, ref, error_tol))


# ---- gradients (test_cce_loss_backward.py) ---------------------------------------------------


# The default subset of the gradient grid: the recomputing backward (return_lse for the z-loss),
# a mean in bfloat16, and a sum divided afterwards (an upstream gradient other than 1).
DEFAULT_BACKWARD = [
    (torch.float32, "none", True, None), (torch.bfloat16, "mean", False, 20.0), (torch.float32, "sum", False, 20.0),
]


def _cce_objective(reduction, z_loss, valid, rows):
    """CCE's scalar: the loss's mean (``'none'``: over ``rows`` positions; ``'sum'``: divided
    by the valid targets), plus the mean over valid targets of ``lse**2`` with ``z_loss``."""
    count = valid.sum()

    def objective(loss, lse):
        if reduction == "none":
            value = loss.flatten()[rows].sum() / rows.sum()
        elif reduction == "sum":
            value = loss / count
        else:
            value = loss
        if z_loss:
            value = value + torch.where(valid, lse.square(), 0).sum() / count
        return value

    return objective


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype, error_tol, softcap, has_bias, shift, invalids, reduction, z_loss, shape",
    cases("dtype, error_tol, softcap, has_bias, shift, invalids, reduction, z_loss, shape",
          [together(torch.float32, 5e-4), together(torch.float16, 1e-3), together(torch.bfloat16, 1e-2)], [None, 20.0], [False, True],
          [False, True], [False, True], ["none", "mean", "sum"], [True, False], LOSS_SHAPES,
          default=lambda dtype, tol, softcap, has_bias, shift, invalids, reduction, z_loss, shape: (
              shape == LOSS_SHAPES[2] and invalids and shift and has_bias
              and (dtype, reduction, z_loss, softcap) in DEFAULT_BACKWARD)),
)
def test_loss_backward(request, backend, dtype, error_tol, softcap, has_bias, shift, invalids, reduction, z_loss, shape):
    # 'sum' is divided by the count afterwards: an upstream gradient other than 1.
    expect_interpreter_defect(request, backend, dtype, scaled=reduction == "sum" and not z_loss)
    e, c, bias, targets = _loss_problem(shape, dtype, has_bias, invalids, 0.02)
    b, t = targets.shape
    shifted = torch.cat([targets[:, 1:], torch.full_like(targets[:, :1], IGNORE)], 1) if shift else targets
    rows = torch.arange(t, device=DEVICE).expand(b, t).flatten() < t - int(shift)
    objective = _cce_objective(reduction, z_loss, shifted != IGNORE, rows)
    kwargs = {"softcap": softcap, "shift": shift, "reduction": reduction, "return_lse": z_loss}
    gt = truth(e, c, targets, bias, round_logits=False, objective=objective, **kwargs)[2]
    got = run(_op(backend), e, c, targets, bias, objective=objective, **kwargs)[2]

    # Torch in the inputs' dtype, as CCE's _grads: logits of the kept rows, then float32.
    leaves = [x.detach().clone().requires_grad_() for x in (e, c, bias) if x is not None]
    ee, cc = leaves[0], leaves[1]
    logits = _torch_logits(ee[:, : t - int(shift)].flatten(0, 1), cc, leaves[2] if has_bias else None, softcap)
    kept = targets[:, int(shift):].flatten()
    loss = F.cross_entropy(logits.float(), kept, ignore_index=IGNORE, reduction=reduction)
    count = (kept != IGNORE).sum()
    loss = (loss / count if reduction == "sum" else loss).mean()
    if z_loss:
        loss = loss + torch.where(kept != IGNORE, torch.logsumexp(logits.float(), -1).square(), 0).sum() / count
    ref = dict(zip(("hidden", "weight", "bias"), torch.autograd.grad(loss, leaves)))
    hold(request, **{name: bound_ratio(got[name], gt[name], ref[name], error_tol) for name in gt})
