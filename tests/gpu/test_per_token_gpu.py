"""fused.per_token.token_outputs on a CUDA GPU at a real shape (2048 tokens, Llama 3's hidden
size 2048 and vocabulary 128256), against reference.per_token_outputs. Skipped without CUDA.

Run: python -m pytest tests/gpu/test_per_token_gpu.py -x -q

float32: log_probs and entropy within rtol 1e-4 / atol 1e-4 of the reference, is_top1 equal on
all but near-ties (at most 2 of 2048: the tiles' products and the reference's full product
may round a near-tie differently), the gradients of ``sum(a * log_probs + b * entropy)``
within a relative L2 error of 1e-4. bfloat16: against a float64 truth from the same inputs,
the kernels' relative L2 errors are no worse than the reference's in bfloat16 times 1.5 (plus
8 float32 ulps), as tests/gpu/test_fused_gpu.py holds the loss.

Planning, in bfloat16: each pass's plan is measured under its own kind and gives the results of
the same plan set by hand, bit for bit; forward and backward stay within the default budget
(``fused.plan.budget_bytes``, counting the per-token outputs) as the allocator measures them.
"""

from __future__ import annotations

import json

import pytest
import torch

import fused.per_token
from fused import measured_plan as mp
from fused.ops import plan_tiles
from fused.plan import PlanSizes, budget_bytes, held_bytes
from fused.per_token import token_outputs
from reference.peak_memory import peak_memory_bytes
from reference.per_token_outputs import per_token_outputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

N, D, V = 2048, 2048, 128256
FLOOR = 8 * torch.finfo(torch.float32).eps


def problem(dtype: torch.dtype):
    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(N, D, device="cuda", generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, device="cuda", generator=generator) * 0.02).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), device="cuda", generator=generator)
    upstream = torch.randn(2, N, device="cuda", generator=generator)
    return hidden, weight, targets, upstream


def kernels(hidden, weight, targets, upstream):
    found = token_outputs(hidden, weight, targets, top1=True)
    a, b = upstream
    grads = torch.autograd.grad((a * found["log_probs"]).sum() + (b * found["entropy"]).sum(), (hidden, weight))
    return found, grads


def reference(hidden, weight, targets, upstream):
    found = per_token_outputs(hidden, weight, targets, outputs=("log_probs", "entropy", "is_top1"))
    a, b = upstream
    grads = torch.autograd.grad((a * found.log_probs).sum() + (b * found.entropy).sum(), (hidden, weight))
    return {"log_probs": found.log_probs, "entropy": found.entropy, "is_top1": found.is_top1}, grads


def relative(x: torch.Tensor, truth: torch.Tensor) -> float:
    return float((x.double() - truth).norm() / truth.norm())


def test_float32_matches_the_reference():
    inputs = problem(torch.float32)
    (found, grads), (expected, expected_grads) = kernels(*inputs), reference(*inputs)
    for name in ("log_probs", "entropy"):
        torch.testing.assert_close(found[name], expected[name], rtol=1e-4, atol=1e-4, msg=name)
    assert int((found["is_top1"] != expected["is_top1"]).sum()) <= 2
    for name, g, w in zip(("hidden", "weight"), grads, expected_grads):
        assert relative(g, w.double()) < 1e-4, name


def test_bfloat16_is_no_worse_than_the_reference():
    hidden, weight, targets, upstream = problem(torch.bfloat16)
    truth_inputs = (hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_())
    truth, truth_grads = reference(*truth_inputs, targets, upstream.double())
    (found, grads), (expected, expected_grads) = kernels(hidden, weight, targets, upstream), reference(
        hidden, weight, targets, upstream
    )
    for name in ("log_probs", "entropy"):
        assert relative(found[name], truth[name]) <= 1.5 * relative(expected[name], truth[name]) + FLOOR, name
    for name, g, w, t in zip(("hidden", "weight"), grads, expected_grads, truth_grads):
        assert relative(g, t) <= 1.5 * relative(w, t) + FLOOR, name


def test_measured_plans_give_the_results_of_the_same_plans_set_by_hand(monkeypatch, tmp_path):
    path = tmp_path / "timings.json"
    monkeypatch.setenv(mp.TIMINGS_FILE_VARIABLE, str(path))
    monkeypatch.setattr(mp, "_timings", None)
    chosen = {}

    def measured(problem, sizes, dtypes, pass_name, run):
        chosen[pass_name] = plan_tiles(problem, sizes, dtypes, pass_name, run)
        return chosen[pass_name]

    monkeypatch.setattr(fused.per_token, "plan_tiles", measured)
    inputs = problem(torch.bfloat16)
    found, grads = kernels(*inputs)
    assert sorted(chosen) == ["backward,grads=hw,entropy_grad", "forward,grads=,entropy,top1"]
    assert sorted(kind.split("|")[-1] for kind in json.loads(path.read_text())) == sorted(chosen)

    def by_hand(problem, sizes, dtypes, pass_name, run):
        plan = chosen[pass_name]
        return plan_tiles(problem, sizes, dtypes, pass_name, run, chunk_size=plan.rows, vocab_chunk_size=plan.cols)

    monkeypatch.setattr(fused.per_token, "plan_tiles", by_hand)
    same, same_grads = kernels(*inputs)
    for name in found:
        assert torch.equal(found[name], same[name]), name
    for name, g, h in zip(("hidden", "weight"), grads, same_grads):
        assert torch.equal(g, h), name


def test_forward_and_backward_stay_within_the_default_budget():
    hidden, weight, targets, (a, b) = problem(torch.bfloat16)

    def step():
        found = token_outputs(hidden, weight, targets, top1=True)
        torch.autograd.backward((found["log_probs"], found["entropy"]), (a, b))

    step()  # plans measured, cuBLAS's workspace allocated
    hidden.grad = weight.grad = None  # freed before the measurement starts: the gradients count inside it
    # The gradients as the allocator may hold them: the formula counts what is beyond them.
    extra = peak_memory_bytes(step, "cuda") - held_bytes(N * D * 2) - held_bytes(V * D * 2)
    sizes = PlanSizes(N, V, D, 2, entropy=True, top1=True)
    assert extra <= budget_bytes(sizes, None), (extra, budget_bytes(sizes, None))
