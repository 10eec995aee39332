"""fused.per_token.token_outputs on the Triton kernels (the interpreter on CPU) against
reference.per_token_outputs, float32, on an irregular shape: 37 rows (two ignored) of 16
features against 101 vocabulary entries, tiles of 16 rows by 40 columns (three vocabulary
blocks, the last partial; three row chunks, the last partial), with and without the
transforms. Values within rtol 1e-5 / atol 1e-5 (the entropy's sums run in another order),
is_top1 exactly (rows whose target is their argmax; and a tie, two equal vocabulary entries
in different blocks, which the first maximum's rule decides), gradients of
``sum(a * log_probs + b * entropy)`` for random ``a``, ``b`` within rtol 1e-4 / atol 1e-6, as
tests/test_per_token_outputs.py holds TRL's head to the reference.

Planning: both passes' sizes count the per-token outputs (a budget with room for the loss's
tile alone plans smaller tiles, or is refused), and where plans are measured (a GPU; here a
made-up clock) each pass is timed as its own kind, its choice giving the results of the same
plan set by hand, bit for bit."""

from __future__ import annotations

import functools

import pytest
import torch

import fused.ops
import fused.per_token
from fused import measured_plan as mp
from fused.ops import plan_tiles
from fused.plan import PlanSizes, TilePlan
from problems import DEVICE
from reference.per_token_outputs import per_token_outputs, per_token_transform

N, D, V = 37, 16, 101
SETTINGS = {"plain": (1.0, None, 1.0), "temperature-softcap-scale": (1.3, 3.0, 0.8)}


@pytest.fixture
def small_tiles(monkeypatch):
    small = functools.partial(plan_tiles, chunk_size=16, vocab_chunk_size=40)
    monkeypatch.setattr(fused.per_token, "plan_tiles", small)


def problem(tie: bool = False):
    """Drawn on the CPU from one seed, then placed where the kernels run (``DEVICE``)."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=generator)
    weight = torch.randn(V, D, generator=generator) * 0.5
    bias = torch.randn(V, generator=generator)
    targets = torch.randint(0, V, (N,), generator=generator)
    targets[14:20] = (hidden[14:20] @ weight.T + bias).argmax(-1)  # top-1
    if tie:
        weight[7], bias[7] = weight[60], bias[60]  # a tie across vocabulary blocks
        hidden[10:14] = 4 * weight[60]  # rows whose maximum is that tie
        targets[10:12], targets[12:14] = 60, 7  # the later of the tie (not top-1), the first (top-1)
    targets[[3, 20]] = -100
    upstream = torch.randn(2, N, generator=generator)
    hidden, weight, bias = (t.to(DEVICE).requires_grad_() for t in (hidden, weight, bias))
    return hidden, weight, bias, targets.to(DEVICE), upstream.to(DEVICE)


def token_outputs_and_grads(hidden, weight, bias, targets, upstream, scale=None, cap=None):
    """The kernels' outputs, and the gradients of ``sum(a * log_probs + b * entropy)``."""
    a, b = upstream
    found = fused.per_token.token_outputs(
        hidden, weight, targets, bias=bias, logit_scale=scale, softcap=cap, top1=True, backend="triton"
    )
    grads = torch.autograd.grad((a * found["log_probs"]).sum() + (b * found["entropy"]).sum(), (hidden, weight, bias))
    return found, grads


def assert_matches_the_reference(found, grads, hidden, weight, bias, targets, upstream, setting="plain"):
    temperature, softcap, logit_scale = SETTINGS[setting]
    a, b = upstream
    log_probs, entropy, is_top1 = found["log_probs"], found["entropy"], found["is_top1"]
    valid = targets != -100
    expected = per_token_outputs(
        hidden[valid], weight, targets[valid], bias, temperature=temperature, softcap=softcap,
        logit_scale=logit_scale, outputs=("log_probs", "entropy", "is_top1"),
    )
    torch.testing.assert_close(log_probs[valid], expected.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[valid], expected.entropy, rtol=1e-5, atol=1e-5)
    assert torch.equal(is_top1[valid], expected.is_top1) and is_top1[14:20].all()
    assert log_probs[~valid].eq(0).all() and entropy[~valid].eq(0).all() and not is_top1[~valid].any()
    want = torch.autograd.grad(
        (a[valid] * expected.log_probs).sum() + (b[valid] * expected.entropy).sum(), (hidden, weight, bias)
    )
    for name, g, w in zip(("hidden", "weight", "bias"), grads, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("setting", SETTINGS)
def test_kernel_token_outputs_match_the_reference(small_tiles, setting):
    hidden, weight, bias, targets, upstream = problem()
    scale, cap = per_token_transform(*SETTINGS[setting])
    found, grads = token_outputs_and_grads(hidden, weight, bias, targets, upstream, scale, cap)
    assert_matches_the_reference(found, grads, hidden, weight, bias, targets, upstream, setting)


def test_the_plan_counts_the_per_token_outputs(monkeypatch):
    # A budget with room for the loss's whole-problem tile, not for it and the per-token
    # outputs: both passes plan smaller tiles within it (the forward's outputs are counted in
    # the backward's sizes too: one budget holds for both), and the results stay right.
    hidden, weight, bias, targets, upstream = problem()
    budget = PlanSizes(N, V, D, 4, has_bias=True).plan_bytes(TilePlan(rows=N, cols=V))
    calls = []

    def planned(problem, sizes, dtypes, pass_name, run):
        plan = plan_tiles(problem, sizes, dtypes, pass_name, run, memory_budget=budget)
        calls.append((sizes, pass_name, plan))
        return plan

    monkeypatch.setattr(fused.per_token, "plan_tiles", planned)
    found, grads = token_outputs_and_grads(hidden, weight, bias, targets, upstream)
    sizes = PlanSizes(N, V, D, 4, has_bias=True, entropy=True, top1=True)
    assert calls == [
        (sizes, "forward,grads=,entropy,top1", TilePlan(rows=16, cols=V)),
        (sizes, "backward,grads=hwb,entropy_grad", TilePlan(rows=16, cols=V)),
    ]
    assert sizes.plan_bytes(TilePlan(rows=16, cols=V)) <= budget < sizes.plan_bytes(TilePlan(rows=N, cols=V))
    assert_matches_the_reference(found, grads, hidden, weight, bias, targets, upstream)


def test_a_budget_without_room_for_the_per_token_outputs_is_refused(monkeypatch):
    hidden, weight, bias, targets, _ = problem()
    loss_minimum = PlanSizes(N, V, D, 4, has_bias=True).plan_bytes(TilePlan(rows=1, cols=V))
    monkeypatch.setattr(fused.per_token, "plan_tiles", functools.partial(plan_tiles, memory_budget=loss_minimum))
    with pytest.raises(ValueError, match=f"memory_budget={loss_minimum} bytes is too small"):
        fused.per_token.token_outputs(hidden, weight, targets, bias=bias, top1=True, backend="triton")


def test_measured_planning_times_each_pass_of_its_own_kind(monkeypatch):
    # As on a GPU (fused.measured_plan), with a made-up clock: each pass times its candidates
    # under its own kind, and the plan chosen gives the results of the same plan set by hand.
    monkeypatch.setattr(fused.ops, "measuring", lambda device: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "test-gpu")
    monkeypatch.delenv(mp.TIMINGS_FILE_VARIABLE, raising=False)
    monkeypatch.setattr(mp, "_timings", None)
    monkeypatch.setattr(mp, "_chosen", {})
    timed = []
    monkeypatch.setattr(mp, "_elapsed_ms", lambda run, plan: (run(plan), timed.append(plan), 1.0)[-1])
    hidden, weight, bias, targets, upstream = problem()
    scale, cap = per_token_transform(*SETTINGS["temperature-softcap-scale"])
    found, grads = token_outputs_and_grads(hidden, weight, bias, targets, upstream, scale, cap)
    passes = {kind.split("|")[-1]: plans for kind, plans in mp.plan_timings().ms.items()}
    assert passes == {
        "forward,grads=,entropy,top1,softcap,scale": {"allx101": 1.0},
        "backward,grads=hwb,entropy_grad,softcap,scale": {"allx101": 1.0},
    }
    assert set(timed) == {TilePlan(rows=N, cols=V)} and len(timed) >= 2
    (plan,) = set(mp._chosen.values())
    by_hand = functools.partial(plan_tiles, chunk_size=plan.rows, vocab_chunk_size=plan.cols)
    monkeypatch.setattr(fused.per_token, "plan_tiles", by_hand)
    same, same_grads = token_outputs_and_grads(hidden, weight, bias, targets, upstream, scale, cap)
    for name in found:
        assert torch.equal(found[name], same[name]), name
    for g, h in zip(grads, same_grads):
        assert torch.equal(g, h)


def test_is_top1_takes_the_first_of_a_tie(small_tiles):
    # Vocabulary entries 7 and 60 equal (in different blocks) and the largest of rows 10-13:
    # 7 is the first maximum, as argmax and the reference decide it.
    hidden, weight, bias, targets, _ = problem(tie=True)
    is_top1 = fused.per_token.token_outputs(hidden, weight, targets, bias=bias, top1=True, backend="triton")["is_top1"]
    valid = targets != -100
    expected = per_token_outputs(hidden[valid], weight, targets[valid], bias, outputs=("is_top1",)).is_top1
    assert torch.equal(is_top1[valid], expected)
    assert is_top1[12:14].all() and not is_top1[10:12].any()


def test_the_reference_backend_is_the_reference():
    hidden, weight, bias, targets, _ = problem()
    found = fused.per_token.token_outputs(hidden, weight, targets, bias=bias, top1=True, backend="reference")
    valid = targets != -100
    names = ("log_probs", "entropy", "is_top1")
    expected = per_token_outputs(hidden[valid], weight, targets[valid], bias, outputs=names)
    for name in names:
        assert torch.equal(found[name][valid], getattr(expected, name)), name
