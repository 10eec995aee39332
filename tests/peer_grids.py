"""What the peer grids (tests/test_peer_grids_liger.py, tests/test_peer_grids_cce.py) share:
the device, the case selection, the float64 truth, and the error-to-tolerance ratios they
record and assert.

Each grid re-expresses one test of Liger Kernel or Cut Cross Entropy (CCE) with the peer's
parameters and tolerances, and holds ``fused.linear_cross_entropy`` to them on both paths
(``backend='triton'``: the kernels, compiled on a GPU, interpreted on CPU; ``'reference'``: the
chunked PyTorch path) against a float64 truth instead of the peer's own comparison target.
A case either holds the project to the peer's check (kind ``peer``) or, where the project
deliberately differs, checks the documented behaviour instead and says why (kind
``documented``; it also records the ratio the peer's literal check would give). A feature the
project lacks is a skip that names it.

Every case records the worst ratio of its errors to the tolerance they are held to (<= 1
passes): ``python -m pytest tests/test_peer_grids_*.py --peer-grid-ratios`` prints the worst
ratio per grid and path (tests/conftest.py). Cases outside the default subset carry the
suite's ``full`` mark; ``-m peer_grids`` runs the grids whole, ``-m full`` only what the
subset leaves out.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Callable, Iterable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from reference.linear_cross_entropy import LossArguments, prepare_inputs, reduce_losses, token_losses, transform_logits

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
BACKENDS = ("triton", "reference")
FULL_ONLY = pytest.mark.full


def cases(names: str, *axes: Sequence, default: Callable[..., bool], skip: str | None = None) -> list:
    """The product of ``axes`` as ``pytest.param``s for ``parametrize(names, ...)``.

    An axis is a list of values, or of ``together(...)`` groups that fill several names at
    once (the peers group a dtype with its tolerances). Cases for which ``default(*values)``
    is false carry the ``full`` mark (left out by default); ``skip`` (a missing feature)
    skips every case.
    """
    params = []
    for combo in itertools.product(*axes):
        values = tuple(itertools.chain.from_iterable(v if isinstance(v, _Together) else (v,) for v in combo))
        marks = [] if default(*values) else [FULL_ONLY]
        if skip is not None:
            marks.append(pytest.mark.skip(reason=f"missing feature: {skip}"))
        params.append(pytest.param(*values, marks=marks, id="-".join(_id(v) for v in values)))
    return params


class _Together(tuple):
    pass


def together(*values) -> tuple:
    """Values that fill consecutive names of one case (a ``cases`` axis element)."""
    return _Together(values)


def _id(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value).replace(" ", "")


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def randn(*shape: int, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal draws in float32 on the device, then cast (the peers draw in the dtype)."""
    return torch.randn(*shape, generator=gen, device=DEVICE).to(dtype)


def rand(*shape: int, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.rand(*shape, generator=gen, device=DEVICE).to(dtype)


# ---- a defect of Triton's interpreter -------------------------------------------------------


@functools.cache
def interpreter_casts_float64_to_bfloat16_wrongly() -> bool:
    """Whether this Triton's interpreter turns float64 into bfloat16 by something other than
    rounding (Triton 3.9's gives 0 or a subnormal for 0.5; compiled kernels are right).

    ``fused.kernels.upstream_scale`` scales a scalar loss's gradients by an upstream gradient
    other than 1 in float64 and stores them in the gradients' dtype, so on CPU under the
    interpreter bfloat16 gradients come out as garbage there, and only there."""
    if ON_GPU:
        return False
    import triton
    import triton.language as tl

    @triton.jit
    def halve(x_ptr, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offsets)
        tl.store(x_ptr + offsets, (x.to(tl.float64) * 0.5).to(x_ptr.dtype.element_ty))

    x = torch.tensor([1.0, -3.0], dtype=torch.bfloat16)
    halve[(1,)](x, BLOCK=2)
    return x.tolist() != [0.5, -1.5]


def expect_interpreter_defect(request: pytest.FixtureRequest, backend: str, dtype: torch.dtype, *, scaled: bool) -> None:
    """Mark the case xfail (strict) when it runs into ``interpreter_casts_float64_to_bfloat16_wrongly``:
    the Triton path on CPU, bfloat16, a scalar loss whose gradients are ``scaled`` by an
    upstream gradient other than 1."""
    if backend == "triton" and dtype == torch.bfloat16 and scaled and interpreter_casts_float64_to_bfloat16_wrongly():
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "Triton's interpreter casts float64 to bfloat16 wrongly; fused.kernels.upstream_scale "
            "scales a scalar loss's gradients in float64 (compiled kernels are right)")))


# ---- running the op and the truth ------------------------------------------------------------

Objective = Callable[[Tensor, Tensor | None], Tensor]


def total(loss: Tensor, lse: Tensor | None) -> Tensor:
    """The objective of ``loss.backward(torch.ones_like(loss))``."""
    return loss.sum()


def run(
    fn: Callable, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None,
    *, wrt: Iterable[str] = ("hidden", "weight", "bias"), objective: Objective | None = total, **kwargs,
) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """``(loss, lse or None, {name: gradient})`` of ``fn(hidden, weight, labels, bias=bias,
    **kwargs)`` on fresh leaves; the gradients are those of ``objective(loss, lse)`` with respect
    to the inputs named in ``wrt`` (none when ``objective`` is None: a forward only)."""
    wrt = [name for name in wrt if {"hidden": hidden, "weight": weight, "bias": bias}[name] is not None]
    leaves = {
        name: None if t is None else t.detach().clone().requires_grad_(objective is not None and name in wrt)
        for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias))
    }
    out = fn(leaves["hidden"], leaves["weight"], labels, bias=leaves["bias"], **kwargs)
    loss, lse = out if kwargs.get("return_lse") else (out, None)
    grads = {}
    if objective is not None and wrt:
        grads = dict(zip(wrt, torch.autograd.grad(objective(loss, lse), [leaves[n] for n in wrt])))
    return loss.detach(), None if lse is None else lse.detach(), grads


def float64_truth(hidden: Tensor, weight: Tensor, labels: Tensor, *, round_logits, **keywords) -> Tensor | tuple[Tensor, Tensor]:
    """``reference.linear_cross_entropy`` of the float64 leaves ``hidden``, ``weight`` (and the
    ``bias`` keyword), differentiable, with everything after the logits in float64.

    The contract's own steps (``prepare_inputs``, ``transform_logits``, ``token_losses``,
    ``reduce_losses``) on float64 logits, where the contract's ``.float()`` would round them
    to float32. ``round_logits`` (a dtype): the logits take the values the contract computes
    in that dtype, ``F.linear`` then upcast as transformers does, while the gradient flows as
    through the exact float64 product (the truth of the contract); False: the exact float64
    product (the truth of the inputs, as CCE's). ``keywords``: ``LossArguments``.
    """
    arguments = LossArguments(**keywords)
    options = arguments.options()
    p = prepare_inputs(hidden, weight, labels, arguments)
    logits = F.linear(p.hidden, p.weight, p.bias)
    if round_logits:
        with torch.no_grad():
            leaves = (None if t is None else t.detach().to(round_logits) for t in (p.hidden, p.weight, p.bias))
            stock = F.linear(*leaves).double()
        logits = logits + (stock - logits).detach()
    losses, lse = token_losses(transform_logits(logits, options), p.targets, options)
    loss = reduce_losses(losses, p.targets, options, arguments.num_items_in_batch, p.batch_shape)
    return (loss, lse.reshape(p.batch_shape)) if arguments.return_lse else loss


def truth(hidden, weight, labels, bias, *, round_logits: bool, wrt=("hidden", "weight", "bias"), objective=total, **kwargs):
    """``run`` of ``float64_truth`` on float64 copies of the inputs (exact: every dtype the op
    takes is a subset of float64), with ``round_logits`` in the inputs' dtype."""
    dtype = hidden.dtype if round_logits else False

    def fn(h, w, y, *, bias, **kw):
        return float64_truth(h, w, y, bias=bias, round_logits=dtype, **kw)

    as64 = [None if t is None else t.double() for t in (hidden, weight, bias)]
    return run(fn, as64[0], as64[1], labels, as64[2], wrt=wrt, objective=objective, **kwargs)


# ---- error-to-tolerance ratios ---------------------------------------------------------------


def allclose_ratio(got: Tensor, want: Tensor, atol: float, rtol: float) -> float:
    """The largest ``|got - want| / (atol + rtol * |want|)``: <= 1 exactly when
    ``torch.allclose(got, want, rtol, atol, equal_nan=True)`` holds (the peers' Liger check, with
    the float64 truth as ``want``). A NaN on one side only is infinitely far."""
    assert got.shape == want.shape, (got.shape, want.shape)
    got, want = got.double(), want.double()
    both_nan = got.isnan() & want.isnan()
    ratio = (got - want).abs() / (atol + rtol * want.abs())
    ratio = torch.where(both_nan, 0.0, ratio.nan_to_num(nan=math.inf))
    return ratio.max().item() if ratio.numel() else 0.0


def bound_ratio(got: Tensor, want: Tensor, peer: Tensor, tol: float) -> float:
    """The largest ``|got - want| / (|peer - want| + tol)``: <= 1 exactly when CCE's check
    ``|got - truth| <= |torch's result - truth| + tol`` holds elementwise."""
    assert got.shape == want.shape == peer.shape, (got.shape, want.shape, peer.shape)
    got, want, peer = got.double(), want.double(), peer.double()
    ratio = ((got - want).abs() / ((peer - want).abs() + tol)).nan_to_num(nan=math.inf)
    return ratio.max().item() if ratio.numel() else 0.0


def hold(request: pytest.FixtureRequest, kind: str = "peer", peer_literal: float | None = None, **ratios: float) -> None:
    """Record the case's worst ratio (and, for a ``documented`` case, the ratio of the peer's
    literal check) for ``--peer-grid-ratios``, then assert every ratio is at most 1."""
    assert kind in ("peer", "documented")
    worst = max(ratios.values())
    request.node.user_properties.extend([("peer_grid_kind", kind), ("peer_grid_ratio", worst)])
    if peer_literal is not None:
        request.node.user_properties.append(("peer_grid_literal", peer_literal))
    over = {name: f"{r:.3g}" for name, r in ratios.items() if not r <= 1}
    assert not over, f"error / tolerance above 1: {over} (all: { {n: f'{r:.3g}' for n, r in ratios.items()} })"


# ---- the report ------------------------------------------------------------------------------


def collection_hook(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Label every peer-grid case with its grid and path, for ``summary``."""
    for item in items:
        if item.get_closest_marker("peer_grids") is not None:
            backend = getattr(item, "callspec", None) and item.callspec.params.get("backend")
            grid = f"{item.module.__name__.removeprefix('test_peer_grids_')}::{item.originalname.removeprefix('test_')}"
            item.user_properties.append(("peer_grid", grid))
            item.user_properties.append(("peer_grid_path", f"{backend or '-'}@{DEVICE}"))


def summary(terminalreporter) -> None:
    """Per grid and path, the cases: held to the peer's check and passing; deliberately
    different (documented behaviour checked instead, or a missing feature skipped); failing;
    expected to fail (a named defect outside the project). The worst ratio of the peer-held
    and of the documented cases (not counting expected failures), the worst ratio the peer's
    literal check gave a documented case, and the case of the worst of the two."""
    rows: dict[tuple[str, str], dict] = {}
    seen = set()
    for outcome in ("failed", "error", "xfailed", "passed", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            props = dict(getattr(report, "user_properties", ()))
            if "peer_grid" not in props or report.nodeid in seen or (outcome == "passed" and report.when != "call"):
                continue
            seen.add(report.nodeid)
            row = rows.setdefault((props["peer_grid"], props["peer_grid_path"]), {
                "passed": 0, "deliberate": 0, "failed": 0, "xfailed": 0,
                "peer": (0.0, ""), "documented": (0.0, ""), "literal": 0.0,
            })
            kind = props.get("peer_grid_kind")
            if outcome in ("failed", "error"):
                row["failed"] += 1
            elif outcome == "xfailed":
                row["xfailed"] += 1
                continue
            elif outcome == "skipped" or kind == "documented":
                row["deliberate"] += 1
            else:
                row["passed"] += 1
            if kind is not None:
                ratio, case = props["peer_grid_ratio"], report.nodeid.split("[", 1)[-1].rstrip("]")
                if ratio >= row[kind][0]:
                    row[kind] = (ratio, case)
                row["literal"] = max(row["literal"], props.get("peer_grid_literal", 0.0))
    write = terminalreporter.write_line
    write("")
    write("peer grids, worst error / tolerance (<= 1 passes). pass: held to the peer's check; delib: documented "
          "behaviour checked instead, or a missing feature skipped; xfail: a named defect outside the project")
    write(f"{'grid':58} {'path':16} {'pass':>5} {'delib':>5} {'fail':>5} {'xfail':>5} {'peer':>9} "
          f"{'documented':>10} {'literal':>9}  worst case")
    for (grid, path), row in sorted(rows.items()):
        write(f"{grid:58} {path:16} {row['passed']:5d} {row['deliberate']:5d} {row['failed']:5d} {row['xfailed']:5d} "
              f"{row['peer'][0]:9.3g} {row['documented'][0]:10.3g} {row['literal']:9.3g}  "
              f"{max(row['peer'], row['documented'])[1]}")
