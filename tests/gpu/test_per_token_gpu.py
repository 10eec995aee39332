"""fused.per_token.token_outputs on a CUDA GPU at a real shape (2048 tokens, Llama 3's hidden
size 2048 and vocabulary 128256), against reference.per_token_outputs. Skipped without CUDA.

Run: python -m pytest tests/gpu/test_per_token_gpu.py -x -q

float32: log_probs and entropy within rtol 1e-4 / atol 1e-4 of the reference, is_top1 equal on
all but near-ties (at most 2 of 2048: the tiles' products and the reference's full product
may round a near-tie differently), the gradients of ``sum(a * log_probs + b * entropy)``
within a relative L2 error of 1e-4. bfloat16: against a float64 truth from the same inputs,
the kernels' relative L2 errors are no worse than the reference's in bfloat16 times 1.5 (plus
8 float32 ulps), as tests/gpu/test_fused_gpu.py holds the loss.
"""

from __future__ import annotations

import pytest
import torch

from fused.per_token import token_outputs
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
