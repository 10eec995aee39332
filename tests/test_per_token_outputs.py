"""reference.per_token_outputs against TRL's own fused LM head (trl.kernels.ChunkedLogProbFunction,
its torch path on CPU), and log_probs against the project's fused loss.

float32 inputs, rows and vocabulary in other chunk sizes on each side: values agree to rtol 1e-5 / atol 1e-5 and gradients (through log_probs and
entropy, as TRL backpropagates both) to rtol 1e-4 / atol 1e-6; is_top1 exactly.
"""

from __future__ import annotations

import pytest
import torch

from fused import linear_cross_entropy
from reference.per_token_outputs import OUTPUTS, per_token_outputs, per_token_transform

trl_kernels = pytest.importorskip("trl.kernels")

N, D, V = 37, 16, 101
SETTINGS = {
    "plain": dict(temperature=1.0, softcap=None, logit_scale=1.0),
    "temperature": dict(temperature=0.7, softcap=None, logit_scale=1.0),
    "every_option": dict(temperature=1.3, softcap=3.0, logit_scale=0.8),
}


def problem(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=generator).requires_grad_()
    weight = (torch.randn(V, D, generator=generator) * 0.5).requires_grad_()
    bias = torch.randn(V, generator=generator).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=generator)
    return hidden, weight, bias, targets


def grads(values: list[torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(9)
    objective = sum((v * torch.randn(v.shape, generator=generator)).sum() for v in values)
    return torch.autograd.grad(objective, inputs)


@pytest.mark.parametrize("name", SETTINGS)
def test_matches_trls_fused_lm_head(name):
    options = SETTINGS[name]
    hidden, weight, bias, targets = problem()
    trl = trl_kernels.ChunkedLogProbFunction.apply(
        hidden, weight, bias, targets, options["temperature"], 32, options["softcap"], options["logit_scale"], OUTPUTS
    )
    ours = per_token_outputs(hidden, weight, targets, bias, chunk_size=16, **options)
    for field, expected in zip(OUTPUTS, trl):
        actual = getattr(ours, field)
        if field == "is_top1":
            assert torch.equal(actual, expected)
        else:
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=field)
    inputs = (hidden, weight, bias)
    for actual, expected in zip(grads([ours.log_probs, ours.entropy], inputs), grads(list(trl[:2]), inputs)):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)


def test_is_top1_takes_the_first_maximum():
    hidden = torch.eye(4)[[0, 0, 2]]
    weight = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    targets = torch.tensor([1, 0, 3])  # row 0: target ties with an earlier column; row 1: first of a tie
    outputs = per_token_outputs(hidden, weight, targets, outputs=("is_top1",))
    assert outputs.is_top1.tolist() == [False, True, True] and outputs.entropy is None


@pytest.mark.parametrize("name", SETTINGS)
def test_log_probs_are_minus_the_fused_token_loss(name):
    options = SETTINGS[name]
    hidden, weight, bias, targets = problem(seed=1)
    logit_scale, softcap = per_token_transform(**options)
    loss = linear_cross_entropy(
        hidden, weight, targets, bias=bias, reduction="none", logit_scale=logit_scale, softcap=softcap
    )
    ours = per_token_outputs(hidden, weight, targets, bias, outputs=("log_probs",), **options)
    torch.testing.assert_close(-loss, ours.log_probs, rtol=1e-5, atol=1e-6)


def test_bad_inputs():
    hidden, weight, bias, targets = problem()
    with pytest.raises(ValueError, match="unknown outputs"):
        per_token_outputs(hidden, weight, targets, outputs=("logits",))
    with pytest.raises(ValueError, match="targets must lie in"):
        per_token_outputs(hidden, weight, torch.full((N,), V))
    with pytest.raises(ValueError, match="temperature must be positive"):
        per_token_transform(temperature=0.0)
    empty = per_token_outputs(hidden[:0], weight, targets[:0])
    assert empty.log_probs.shape == (0,) and empty.is_top1.dtype == torch.bool
