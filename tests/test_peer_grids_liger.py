"""Liger Kernel's test grids (linkedin/Liger-Kernel, test/transformers/test_cross_entropy.py and
test_fused_linear_cross_entropy.py), re-expressed for ``fused.linear_cross_entropy``
(tests/peer_grids.py says how). Each test is named after Liger's.

Liger's check is ``torch.allclose(torch's result, Liger's, atol, rtol)`` in the inputs'
dtype. Here the same ``atol``/``rtol`` hold the op against a float64 truth of the contract
(``reference.linear_cross_entropy``): logits in the inputs' dtype as ``lm_head(h)`` computes
them (Liger's torch side rounds them the same way), everything after in float64.

Liger's cross-entropy tests take logits; the op takes ``hidden @ weight.T``, so they run with
an identity head (``weight = I``, ``hidden`` = the logits, ``grad_hidden`` = the logits'
gradient: every product is by 1 or 0, exact in every dtype). A ``V x V`` head of Liger's
V = 32000 is 4 GB in float32; on CPU V is 4000 and the tokens are at most 64 (the interpreter
runs one program per token, about 20 ms each): ``_on_cpu``.

Where the project differs on purpose:
- Features it lacks are skips naming them: per-class weights (``weight=`` /
  ``ce_weight``), token accuracy and predicted tokens, token scaling, Liger's structured
  output. Liger's ``accum_dtype=torch.float32`` is the op's ``accumulation_dtype``.
- Liger's z-loss component (``return_z_loss``) is not returned separately: the op returns
  the per-token ``lse`` (``return_lse=True``), from which the component is
  ``z * sum(lse**2) / count`` (``_z_component``), held to Liger's tolerance.
- A label out of range raises ``ValueError`` naming it (Liger: an assertion "out of bounds").
- Liger's fused test with every option has class weights; it runs without them (kind
  ``documented``), the other options as Liger's.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fused import linear_cross_entropy
from loss_tolerances import forward_atols
from peer_grids import (
    BACKENDS, DEVICE, ON_GPU, allclose_ratio, cases, expect_interpreter_defect, generator, hold, rand, randn, run,
    together, truth,
)

pytestmark = pytest.mark.peer_grids

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# (dtype, atol, rtol) of Liger's cross-entropy tests.
CE_TOL = [together(BF16, 1e-8, 5e-2), together(FP32, 1e-8, 1e-6)]
CE_SHAPES = [together(2, 4096, 32000), together(3, 423, 32000)]
# (reduction, dtype, atol, rtol) of Liger's fused tests.
FLCE_TOL = [together("mean", BF16, 5e-3, 5e-2), together("mean", FP32, 1e-5, 5e-4),
            together("sum", BF16, 5e-0, 5e1), together("sum", FP32, 1e-3, 5e-2)]
FLCE_SHAPES = [together(8, 128, 1024, 4096), together(4, 47, 31, 123)]


def _on_cpu(b: int, t: int, v: int) -> tuple[int, int, int]:
    """Liger's ``(B, T, V)``; on CPU at most 64 tokens and V at most 4096 (4000 in place of
    32000, not a power of two either)."""
    if ON_GPU:
        return b, t, v
    return b, min(t, max(1, 64 // b)), v if v <= 4096 else 4000


def _op(backend, **knobs):
    def fn(*args, **kwargs):
        return linear_cross_entropy(*args, backend=backend, **knobs, **kwargs)

    return fn


def _ignore_some(targets, ignore_index, gen):
    """Liger's random ignores: between 1 and half the tokens."""
    n = targets.numel()
    k = int(torch.randint(1, max(2, n // 2), (1,), generator=gen, device=DEVICE))
    targets[torch.randperm(n, generator=gen, device=DEVICE)[:k]] = ignore_index
    return targets


def _z_component(lse, targets, z_loss, ignore_index, reduction):
    """Liger's returned z-loss: ``z * lse**2`` over valid tokens, reduced as the loss."""
    valid = targets != ignore_index
    z = torch.where(valid, lse.double().square(), 0) * z_loss
    return z.sum() / valid.sum() if reduction == "mean" else z.sum()


def _scalar_upstream(kind, gen):
    """Liger's upstream gradients: 1 (``backward()``), ``3 * rand`` ("not last layer") or ``randn``."""
    if kind == "one":
        return 1.0
    return rand(1, gen=gen).item() * 3 if kind == "rand3" else randn(1, gen=gen).item()


# ---- cross entropy on logits (test_cross_entropy.py), through an identity head ---------------


def _ce_case(request, backend, shape, dtype, atol, rtol, *, seed=0, ignore_index=-100, ignore_some=False,
             upstream="one", return_z=False, backward=True, kind="peer", **options):
    b, t, v = _on_cpu(*shape)
    gen = generator(seed)
    logits = randn(b * t, v, gen=gen, dtype=dtype)
    targets = torch.randint(0, v, (b * t,), generator=gen, device=DEVICE)
    if ignore_some:
        _ignore_some(targets, ignore_index, gen)
    factor = _scalar_upstream(upstream, gen)
    scalar_loss = options.get("reduction", "mean") != "none"
    expect_interpreter_defect(request, backend, dtype, scaled=backward and scalar_loss and not return_z and factor != 1)
    eye = torch.eye(v, dtype=dtype, device=DEVICE)
    objective = (lambda loss, lse: (loss * factor).sum()) if backward else None
    kwargs = dict(ignore_index=ignore_index, return_lse=return_z, **options)
    want = truth(logits, eye, targets, None, round_logits=True, wrt=("hidden",), objective=objective, **kwargs)
    got = run(_op(backend), logits, eye, targets, None, wrt=("hidden",), objective=objective, **kwargs)
    ratios = {"loss": allclose_ratio(got[0], want[0], atol, rtol)}
    if return_z:
        z_args = (targets, options["z_loss"], ignore_index, options.get("reduction", "mean"))
        ratios["z_loss"] = allclose_ratio(_z_component(got[1], *z_args), _z_component(want[1], *z_args), atol, rtol)
    if backward:
        ratios["grad"] = allclose_ratio(got[2]["hidden"], want[2]["hidden"], atol, rtol)
    hold(request, kind, **ratios)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, T, V, reduction, dtype, atol, rtol", cases(
    "B, T, V, reduction, dtype, atol, rtol", CE_SHAPES, ["sum", "mean", "none"], CE_TOL,
    default=lambda b, t, v, red, dtype, *_: b == 3 and red == "none" and dtype == FP32))
def test_correctness(request, backend, B, T, V, reduction, dtype, atol, rtol):
    _ce_case(request, backend, (B, T, V), dtype, atol, rtol, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, T, V, dtype, atol, rtol", cases(
    "B, T, V, dtype, atol, rtol", [together(2, 2, 8), together(9, 7, 41)], CE_TOL,
    default=lambda b, t, v, dtype, *_: b == 9 and dtype == FP32))
def test_correctness_functional(request, backend, B, T, V, dtype, atol, rtol):
    _ce_case(request, backend, (B, T, V), dtype, atol, rtol, ignore_index=0, z_loss=1e-4, label_smoothing=0.1,
             reduction="mean", softcap=30.0, return_z=True, upstream="randn")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, T, V, ignore_index, reduction, dtype, atol, rtol", cases(
    "B, T, V, ignore_index, reduction, dtype, atol, rtol",
    [together(2, 4096, 32000, 2), together(3, 423, 32000, -123)], ["sum", "mean", "none"], CE_TOL,
    default=lambda b, t, v, ii, red, dtype, *_: b == 2 and red == "sum" and dtype == FP32))
def test_correctness_with_ignore_index(request, backend, B, T, V, ignore_index, reduction, dtype, atol, rtol):
    _ce_case(request, backend, (B, T, V), dtype, atol, rtol, ignore_index=ignore_index, ignore_some=True,
             reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, T, V, label_smoothing, dtype, atol, rtol", cases(
    "B, T, V, label_smoothing, dtype, atol, rtol", [together(2, 4096, 32000, 0.1), together(3, 423, 32000, 0.1)],
    CE_TOL, default=lambda b, *_: False))
def test_correctness_with_label_smoothing_once(request, backend, B, T, V, label_smoothing, dtype, atol, rtol):
    _ce_case(request, backend, (B, T, V), dtype, atol, rtol, label_smoothing=label_smoothing)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, T, V, ignore_index, label_smoothing, dtype, atol, rtol", cases(
    "B, T, V, ignore_index, label_smoothing, dtype, atol, rtol",
    [together(2, 4096, 32000, 1, 0.1), together(3, 423, 32000, -300, 0.2)], CE_TOL,
    default=lambda b, t, v, ii, ls, dtype, *_: b == 3 and dtype == FP32))
def test_correctness_with_label_smoothing_with_ignore_index_once(
    request, backend, B, T, V, ignore_index, label_smoothing, dtype, atol, rtol
):
    _ce_case(request, backend, (B, T, V), dtype, atol, rtol, ignore_index=ignore_index, ignore_some=True,
             label_smoothing=label_smoothing)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, T, V, softcap, reduction, dtype, atol, rtol", cases(
    "B, T, V, softcap, reduction, dtype, atol, rtol", [together(2, 4096, 32000, 30.0), together(3, 423, 32000, 30.0)],
    ["sum", "mean", "none"], CE_TOL,
    default=lambda b, t, v, cap, red, dtype, *_: b == 2 and red == "sum" and dtype == FP32))
def test_correctness_with_softcap_once(request, backend, B, T, V, softcap, reduction, dtype, atol, rtol):
    _ce_case(request, backend, (B, T, V), dtype, atol, rtol, softcap=softcap, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, T, V, dtype, atol, rtol, return_z_loss, lse_square_scale", cases(
    "B, T, V, dtype, atol, rtol, return_z_loss, lse_square_scale", CE_SHAPES, CE_TOL, [True, False], [1e-4, 1e-5],
    default=lambda b, t, v, dtype, a, r, rz, z: b == 3 and dtype == FP32 and rz and z == 1e-4))
def test_correctness_with_z_loss_once(request, backend, B, T, V, dtype, atol, rtol, return_z_loss, lse_square_scale):
    _ce_case(request, backend, (B, T, V), dtype, atol, rtol, z_loss=lse_square_scale, return_z=return_z_loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "B, T, V, dtype, atol, rtol, return_z_loss, lse_square_scale, label_smoothing, ignore_index, reduction",
    cases("B, T, V, dtype, atol, rtol, return_z_loss, lse_square_scale, label_smoothing, ignore_index, reduction",
          CE_SHAPES, CE_TOL, [together(True, 1e-4), together(False, 1e-5)],
          [together(0.1, 42, "mean"), together(0.2, -42, "sum")],
          default=lambda b, t, v, dtype, a, r, rz, z, ls, ii, red: b == 2 and dtype == BF16 and rz and red == "mean"),
)
def test_correctness_with_z_loss_with_other_params_once(
    request, backend, B, T, V, dtype, atol, rtol, return_z_loss, lse_square_scale, label_smoothing, ignore_index,
    reduction,
):
    _ce_case(request, backend, (B, T, V), dtype, atol, rtol, z_loss=lse_square_scale, return_z=return_z_loss,
             label_smoothing=label_smoothing, ignore_index=ignore_index, ignore_some=True, reduction=reduction)


@pytest.mark.parametrize("B, T, V, reduction, dtype, atol, rtol", cases(
    "B, T, V, reduction, dtype, atol, rtol", CE_SHAPES, ["sum", "mean", "none"], CE_TOL,
    default=lambda *_: True, skip="per-class weights (F.cross_entropy's weight=)"))
def test_correctness_with_weight_once(B, T, V, reduction, dtype, atol, rtol):
    pass  # skipped: the case's marks say why


@pytest.mark.parametrize("B, T, V, reduction, ignore_index, lse_square_scale, label_smoothing, softcap, dtype, atol, rtol",
                         cases("B, T, V, reduction, ignore_index, lse_square_scale, label_smoothing, softcap, dtype, atol, rtol",
                               CE_SHAPES, ["sum", "mean", "none"],
                               [together(-100, 1e-4, 0.1, 30.0), together(42, 1e-5, 0.2, 40.0)], CE_TOL,
                               default=lambda *_: True, skip="per-class weights (F.cross_entropy's weight=)"))
def test_correctness_with_weight_with_other_params_once(
    B, T, V, reduction, ignore_index, lse_square_scale, label_smoothing, softcap, dtype, atol, rtol
):
    pass  # skipped: the case's marks say why


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, T, V, reduction, dtype, atol, rtol", cases(
    "B, T, V, reduction, dtype, atol, rtol", CE_SHAPES, ["sum", "mean"], CE_TOL,
    default=lambda b, t, v, red, dtype, *_: b == 3 and red == "mean" and dtype == FP32))
def test_correctness_not_last_layer(request, backend, B, T, V, reduction, dtype, atol, rtol):
    _ce_case(request, backend, (B, T, V), dtype, atol, rtol, reduction=reduction, upstream="rand3")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "B, T, V, ignore_index, lse_square_scale, label_smoothing, softcap, reduction, dtype, atol, rtol",
    cases("B, T, V, ignore_index, lse_square_scale, label_smoothing, softcap, reduction, dtype, atol, rtol",
          [together(2, 1024, 32000), together(3, 423, 32000)],
          [together(-100, 1e-4, 0.1, 30.0), together(42, 1e-5, 0.2, 40.0)], ["sum", "mean"],
          [together(BF16, 1e-8, 5e-2), together(FP32, 1e-8, 1e-5)],
          default=lambda b, t, v, ii, z, ls, cap, red, dtype, *_: b == 2 and ii == 42 and red == "sum" and dtype == FP32),
)
def test_correctness_not_last_layer_with_other_params(
    request, backend, B, T, V, ignore_index, lse_square_scale, label_smoothing, softcap, reduction, dtype, atol, rtol
):
    _ce_case(request, backend, (B, T, V), dtype, atol, rtol, ignore_index=ignore_index, ignore_some=True,
             z_loss=lse_square_scale, label_smoothing=label_smoothing, softcap=softcap, reduction=reduction,
             upstream="rand3")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, T, V, ignore_index, reduction, dtype, atol, rtol", cases(
    "B, T, V, ignore_index, reduction, dtype, atol, rtol",
    [together(2, 4096, 32000, -100), together(3, 423, 32000, 2)], ["mean", "sum", "none"],
    [together(FP32, 1e-4, 1e-4), together(FP16, 1e-2, 1e-2), together(BF16, 1e-2, 1e-2)],
    default=lambda b, t, v, ii, red, dtype, *_: b == 3 and red == "none" and dtype == FP16))
def test_correctness_with_forward_only(request, backend, B, T, V, ignore_index, reduction, dtype, atol, rtol):
    with torch.no_grad():
        _ce_case(request, backend, (B, T, V), dtype, atol, rtol, ignore_index=ignore_index, reduction=reduction,
                 backward=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_internal(request, backend):
    # Liger: the statistics of bfloat16 logits are taken in float32, so the loss equals that of
    # the same values in float32 (Liger's test computes this and asserts nothing). Held to the
    # project's float32 tolerance of a loss (tests/loss_tolerances.py). Liger's 4 x 128256 with
    # an identity head would hold 99 GB; V = 32000 on a GPU.
    b, _, v = _on_cpu(4, 1, 32000)
    gen = generator(0)
    logits = randn(b, v, gen=gen, dtype=BF16)
    targets = torch.randint(0, v, (b,), generator=gen, device=DEVICE)
    losses = [
        linear_cross_entropy(x, torch.eye(v, dtype=x.dtype, device=DEVICE), targets, backend=backend)
        for x in (logits, logits.float())
    ]
    atol = forward_atols(logits.float(), torch.eye(v, device=DEVICE), None, targets, {})[0]
    hold(request, "documented", loss=allclose_ratio(losses[0], losses[1], atol, 0.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, T, V, ignore_index", cases(
    "B, T, V, ignore_index", [together(2, 4096, 32000, 2), together(3, 423, 32000, -123)],
    default=lambda b, *_: b == 3))
def test_correctness_with_out_of_bounds_target_once(request, backend, B, T, V, ignore_index):
    b, t, v = _on_cpu(B, T, V)
    gen = generator(0)
    logits = randn(b * t, v, gen=gen, dtype=BF16)
    targets = _ignore_some(torch.randint(0, v, (b * t,), generator=gen, device=DEVICE), ignore_index, gen)
    k = int(torch.randint(1, b * t // 2, (1,), generator=gen, device=DEVICE))
    targets[torch.randperm(b * t, generator=gen, device=DEVICE)[:k]] = torch.randint(
        v, 2 * v, (k,), generator=gen, device=DEVICE)
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, {v}\) or equal ignore_index={ignore_index}"):
        linear_cross_entropy(logits, torch.eye(v, dtype=BF16, device=DEVICE), targets, ignore_index=ignore_index,
                             backend=backend)
    hold(request, "documented", raises=0.0)


@pytest.mark.parametrize("return_z_loss, return_token_accuracy, return_predicted_tokens", cases(
    "return_z_loss, return_token_accuracy, return_predicted_tokens",
    [together(False, False, False), together(True, False, False), together(False, True, False),
     together(False, False, True), together(True, True, False), together(True, False, True),
     together(False, True, True), together(True, True, True)],
    default=lambda *_: True, skip="Liger's structured output (z-loss, token accuracy, predicted tokens)"))
def test_liger_cross_entropy_structured_output(return_z_loss, return_token_accuracy, return_predicted_tokens):
    pass  # skipped: the case's marks say why


@pytest.mark.parametrize("B, T, V, ignore_index, dtype", cases(
    "B, T, V, ignore_index, dtype", [together(2, 128, 512), together(3, 47, 31)], [-100, 2], [FP32, BF16],
    default=lambda *_: True, skip="predicted tokens (the argmax per token) without logits"))
def test_correctness_with_predicted_tokens(B, T, V, ignore_index, dtype):
    pass  # skipped: the case's marks say why


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, label_smoothing, reduction", cases(
    "dtype, label_smoothing, reduction", [BF16, FP16], [0.0, 0.1], ["sum", "mean"],
    default=lambda dtype, ls, red: dtype == BF16 and ls == 0.1 and red == "mean"))
def test_correctness_true_class_grad_confident_predictions(request, backend, dtype, label_smoothing, reduction):
    # Confident predictions: the target logit 10 above the row's maximum, so p_y - (1 - eps)
    # is a small difference of large terms. The gradient at the target must be no further
    # from the truth than 4 times torch's own in the dtype (Liger's bound, with its floor).
    b, t, v = _on_cpu(2, 64, 4096)
    gen = generator(0)
    logits = randn(b * t, v, gen=gen)
    targets = torch.randint(0, v, (b * t,), generator=gen, device=DEVICE)
    rows = torch.arange(b * t, device=DEVICE)
    logits[rows, targets] = logits.max(dim=-1).values + 10.0
    logits = logits.to(dtype)
    eye = torch.eye(v, dtype=dtype, device=DEVICE)
    kwargs = {"reduction": reduction, "label_smoothing": label_smoothing}
    want = truth(logits, eye, targets, None, round_logits=True, wrt=("hidden",), **kwargs)[2]["hidden"][rows, targets]
    got = run(_op(backend), logits, eye, targets, None, wrt=("hidden",), **kwargs)[2]["hidden"][rows, targets]
    x = logits.detach().clone().requires_grad_()
    F.cross_entropy(x, targets, reduction=reduction, label_smoothing=label_smoothing).backward()
    torch_err = (x.grad[rows, targets].double() - want).abs().max().item()
    ours = (got.double() - want).abs().max().item()
    hold(request, target_grad=ours / max(4 * torch_err, torch.finfo(dtype).tiny))


# ---- fused linear cross entropy (test_fused_linear_cross_entropy.py) -------------------------


def _flce_case(request, backend, shape, dtype, atol, rtol, *, has_bias, seed=0, weight_init="rand",
               ignore_index=-100, ignore_some=True, upstream="one", return_z=False, backward=True, kind="peer",
               autocast=None, accum_dtype=None, **options):
    """Liger's TorchLMHeadCE against the op: ``x ~ N(0, 1)``, ``W ~ U[0, 1)`` (``weight_init``
    'randn': N(0, 1)), bias likewise; compares the loss, the z-loss component, and the
    gradients of x, W, bias. ``accum_dtype``: the op's ``accumulation_dtype``."""
    b, t, h, v = shape
    b, t, v = _on_cpu(b, t, v) if v > 4096 or b * t > 64 else (b, t, v)
    gen = generator(seed)
    draw = rand if weight_init == "rand" else randn
    param_dtype = FP32 if autocast else dtype
    weight = draw(v, h, gen=gen, dtype=param_dtype)
    bias = (draw(v, gen=gen, dtype=param_dtype) if autocast is None else
            (rand(v, gen=gen) * 2 - 1) / math.sqrt(h)) if has_bias else None
    x = randn(b * t, h, gen=gen, dtype=param_dtype)
    targets = torch.randint(0, v, (b * t,), generator=gen, device=DEVICE)
    if ignore_some:
        _ignore_some(targets, ignore_index, gen)
    factor = _scalar_upstream(upstream, gen)
    reduction = options.get("reduction", "mean")
    expect_interpreter_defect(request, backend, autocast or dtype,
                              scaled=backward and reduction != "none" and not return_z and factor != 1)
    objective = (lambda loss, lse: (loss * factor).sum()) if backward else None
    kwargs = dict(ignore_index=ignore_index, return_lse=return_z, **options)
    if autocast is None:
        want = truth(x, weight, targets, bias, round_logits=True, objective=objective, **kwargs)
        got = run(_op(backend, accumulation_dtype=accum_dtype), x, weight, targets, bias, objective=objective,
                  **kwargs)
    else:
        # Under autocast the head runs in the autocast dtype: the truth of the cast inputs.
        cast = [None if p is None else p.to(autocast) for p in (x, weight, bias)]
        want = truth(*cast[:2], targets, cast[2], round_logits=True, objective=objective, **kwargs)
        with torch.autocast(DEVICE, dtype=autocast):
            got = run(_op(backend, accumulation_dtype=accum_dtype), x, weight, targets, bias, objective=objective,
                      **kwargs)
    ratios = {"loss": allclose_ratio(got[0], want[0], atol, rtol)}
    if return_z:
        z_args = (targets, options["z_loss"], ignore_index, reduction)
        ratios["z_loss"] = allclose_ratio(_z_component(got[1], *z_args), _z_component(want[1], *z_args), atol, rtol)
    for name, g in got[2].items():
        ratios[f"grad_{name}"] = allclose_ratio(g, want[2][name], atol, rtol)
    hold(request, kind, **ratios)


# Liger's option rows: (ce_weight, label_smoothing, ignore_index, lse_square_scale, softcap,
# return_z_loss, accum_dtype). The second has class weights: here without them.
FLCE_OPTIONS = [together(False, 0, -100, 0, None, False, None), together(True, 0.1, 42, 1e-4, 30.0, True, FP32)]


# Liger's test_flce_correctness grid, which its forward-only twin shares.
FLCE_ARGS = (
    "B, T, H, V, reduction, dtype, atol, rtol, bias, has_ce_weight, label_smoothing, ignore_index, lse_square_scale, "
    "softcap, return_z_loss, accum_dtype"
)


def _flce_options(has_ce_weight, label_smoothing, ignore_index, lse_square_scale, softcap, return_z_loss):
    kind = "documented" if has_ce_weight else "peer"
    return kind, dict(label_smoothing=label_smoothing, ignore_index=ignore_index, z_loss=lse_square_scale,
                      softcap=softcap, return_z=return_z_loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    FLCE_ARGS,
    cases(FLCE_ARGS, FLCE_SHAPES, FLCE_TOL, [True, False], FLCE_OPTIONS,
          default=lambda b, t, h, v, red, dtype, a, r, bias, cw, *_: (
              b == 4 and bias and red == "mean" and dtype == BF16 and cw)),
)
def test_flce_correctness(request, backend, B, T, H, V, reduction, dtype, atol, rtol, bias, has_ce_weight,
                          label_smoothing, ignore_index, lse_square_scale, softcap, return_z_loss, accum_dtype):
    kind, options = _flce_options(has_ce_weight, label_smoothing, ignore_index, lse_square_scale, softcap,
                                  return_z_loss)
    _flce_case(request, backend, (B, T, H, V), dtype, atol, rtol, has_bias=bias, reduction=reduction, kind=kind,
               accum_dtype=accum_dtype, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    FLCE_ARGS,
    cases(FLCE_ARGS, FLCE_SHAPES, FLCE_TOL, [True, False], FLCE_OPTIONS,
          default=lambda b, t, h, v, red, dtype, a, r, bias, cw, *_: b == 4 and not bias and red == "sum" and cw),
)
def test_flce_correctness_with_forward_only(request, backend, B, T, H, V, reduction, dtype, atol, rtol, bias,
                                            has_ce_weight, label_smoothing, ignore_index, lse_square_scale, softcap,
                                            return_z_loss, accum_dtype):
    kind, options = _flce_options(has_ce_weight, label_smoothing, ignore_index, lse_square_scale, softcap,
                                  return_z_loss)
    with torch.no_grad():
        _flce_case(request, backend, (B, T, H, V), dtype, atol, rtol, has_bias=bias, reduction=reduction, kind=kind,
                   backward=False, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, T, H, V, dtype, atol, rtol, bias", cases(
    "B, T, H, V, dtype, atol, rtol, bias", [together(2, 2, 8, 8), together(9, 7, 41, 41)],
    [together(BF16, 5e-3, 5e-2), together(FP32, 1e-5, 5e-4)], [True, False],
    default=lambda b, t, h, v, dtype, a, r, bias: b == 9 and bias))
def test_flce_correctness_functional(request, backend, B, T, H, V, dtype, atol, rtol, bias):
    # Liger's ce_weight=True half of this grid is test_flce_correctness_functional_with_ce_weight.
    _flce_case(request, backend, (B, T, H, V), dtype, atol, rtol, has_bias=bias, weight_init="randn",
               ignore_some=False, ignore_index=-100, z_loss=1e-4, label_smoothing=0.1, reduction="mean",
               softcap=30.0, return_z=True, upstream="randn")


@pytest.mark.parametrize("B, T, H, V, dtype, atol, rtol, bias", cases(
    "B, T, H, V, dtype, atol, rtol, bias", [together(2, 2, 8, 8), together(9, 7, 41, 41)],
    [together(BF16, 5e-3, 5e-2), together(FP32, 1e-5, 5e-4)], [True, False],
    default=lambda *_: True, skip="per-class weights (ce_weight)"))
def test_flce_correctness_functional_with_ce_weight(B, T, H, V, dtype, atol, rtol, bias):
    pass  # skipped: the case's marks say why


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, T, H, V, reduction, dtype, atol, rtol, bias, return_token_accuracy", cases(
    "B, T, H, V, reduction, dtype, atol, rtol, bias, return_token_accuracy", FLCE_SHAPES, FLCE_TOL[:2],
    [True, False], [True, False],
    default=lambda b, t, h, v, red, dtype, a, r, bias, acc: b == 4 and dtype == FP32 and not bias and not acc))
def test_flce_correctness_with_token_accuracy(request, backend, B, T, H, V, reduction, dtype, atol, rtol, bias,
                                              return_token_accuracy):
    if return_token_accuracy:
        pytest.skip("missing feature: token accuracy without logits")
    _flce_case(request, backend, (B, T, H, V), dtype, atol, rtol, has_bias=bias, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, T, H, V, bias, cast_dtype, atol, rtol, accum_dtype", cases(
    "B, T, H, V, bias, cast_dtype, atol, rtol, accum_dtype", FLCE_SHAPES,
    [together(True, BF16, 5e-3, 5e-2), together(True, FP16, 5e-3, 5e-2), together(False, BF16, 5e-3, 5e-2),
     together(False, FP16, 5e-3, 5e-2)], [None, FP32],
    default=lambda b, t, h, v, bias, dtype, a, r, accum: b == 4 and bias and dtype == BF16 and accum is None))
def test_flce_amp(request, backend, B, T, H, V, bias, cast_dtype, atol, rtol, accum_dtype):
    # Liger builds two nn.Linear heads and shares only their weight; one bias here, drawn as
    # nn.Linear's default (U(-1/sqrt(H), 1/sqrt(H))).
    _flce_case(request, backend, (B, T, H, V), FP32, atol, rtol, has_bias=bias, ignore_some=False,
               autocast=cast_dtype, accum_dtype=accum_dtype)


@pytest.mark.parametrize("name", cases(
    "name", ["token_scaling", "token_scaling_consistency", "token_scaling_functional", "token_scaling_module",
             "token_scaling_with_ignore_index"],
    default=lambda *_: True, skip="token scaling (the loss times the detached target probability)"))
def test_flce_correctness_token_scaling(name):
    pass  # skipped: the case's marks say why


@pytest.mark.parametrize("return_z_loss, return_token_accuracy", cases(
    "return_z_loss, return_token_accuracy",
    [together(False, False), together(True, False), together(False, True), together(True, True)],
    default=lambda *_: True, skip="Liger's structured output (z-loss, token accuracy)"))
def test_liger_fused_linear_cross_entropy_structured_output(return_z_loss, return_token_accuracy):
    pass  # skipped: the case's marks say why


@pytest.mark.parametrize("B, T, H, V, reduction, dtype, atol, rtol, bias, ignore_index", cases(
    "B, T, H, V, reduction, dtype, atol, rtol, bias, ignore_index", FLCE_SHAPES, FLCE_TOL[:2], [True, False],
    [-100, 2], default=lambda *_: True, skip="predicted tokens (the argmax per token) without logits"))
def test_flce_correctness_with_predicted_tokens(B, T, H, V, reduction, dtype, atol, rtol, bias, ignore_index):
    pass  # skipped: the case's marks say why


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, T, H, V, bias, dtype, atol, rtol", cases(
    "B, T, H, V, bias, dtype, atol, rtol", [together(2, 16, 32, 64), together(1, 32, 64, 128)], [True, False],
    [together(FP32, 1e-4, 1e-4)], default=lambda b, t, h, v, bias, *_: b == 2 and bias))
def test_flce_correctness_reduction_none_per_token_grad_output(request, backend, B, T, H, V, bias, dtype, atol, rtol):
    # A per-token upstream gradient must weight each token's rows of the gradient.
    gen = generator(42)
    x = randn(B * T, H, gen=gen) * 0.1
    weight = randn(V, H, gen=gen) * 0.1
    b = randn(V, gen=gen) * 0.1 if bias else None
    targets = torch.randint(0, V, (B * T,), generator=gen, device=DEVICE)
    upstream = rand(B * T, gen=gen) + 0.5

    def objective(loss, lse):
        return (loss * upstream).sum()

    want = truth(x, weight, targets, b, round_logits=True, objective=objective, reduction="none")
    got = run(_op(backend), x, weight, targets, b, objective=objective, reduction="none")
    ratios = {"loss": allclose_ratio(got[0], want[0], atol, rtol)}
    ratios.update({f"grad_{n}": allclose_ratio(g, want[2][n], atol, rtol) for n, g in got[2].items()})
    hold(request, **ratios)
