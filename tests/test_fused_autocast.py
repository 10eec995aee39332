"""fused.linear_cross_entropy under torch.autocast computes what a model's own head and loss
compute there: ``F.linear`` in bfloat16 (float32 parameters cast to it), then the loss of the
upcast logits in float32, forward and backward alike.

Tolerances: the loss is a float32 reduction of the very same bfloat16 logits, so it agrees to
float32 rounding (rtol 1e-5). The gradients pass through two bfloat16 roundings each way
(unit roundoff 2**-9 = 2e-3), in a different order than autograd's, so their relative L2 error
is held to 1e-2. A backward that recomputed the logits in float32 while the forward used
bfloat16 ones misses that by three times (3e-2 on these logits of standard deviation ~8).
"""

import pytest
import torch
import torch.nn.functional as F

from fused import linear_cross_entropy

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-2


def _problem(device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n, d, vocab = 256, 64, 1000
    hidden = torch.randn(n, d, generator=gen)
    weight = torch.randn(vocab, d, generator=gen)
    bias = torch.randn(vocab, generator=gen)
    labels = torch.randint(vocab, (n,), generator=gen)
    labels[::5] = -100
    upstream = torch.rand(n, generator=gen)
    leaves = [t.to(device).requires_grad_() for t in (hidden, weight, bias)]
    return leaves, labels.to(device), upstream.to(device)


def _run(loss_fn, leaves, upstream, device):
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = loss_fn(*leaves)
    loss.backward(upstream if loss.dim() else None)
    grads = [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    return loss.detach(), grads


def _relative_error(got, expected) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_autocast_computes_what_the_stock_head_and_loss_compute(device, reduction):
    leaves, labels, upstream = _problem(device)

    def stock(hidden, weight, bias):
        return F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, reduction=reduction)

    def fused(hidden, weight, bias):
        return linear_cross_entropy(hidden, weight, labels, bias=bias, reduction=reduction)

    expected_loss, expected_grads = _run(stock, leaves, upstream, device)
    loss, grads = _run(fused, leaves, upstream, device)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected_loss, rtol=LOSS_RTOL, atol=0)
    for name, got, expected in zip(("hidden", "weight", "bias"), grads, expected_grads):
        assert got.dtype == torch.float32, name
        assert _relative_error(got, expected) < GRAD_RTOL, name


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_leaves_float64_alone(device):
    # autocast casts no float64 tensor; neither does the op, so float64 stays exact.
    leaves, labels, _ = _problem(device)
    hidden, weight, bias = (t.detach().double() for t in leaves)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels, bias=bias, compute_dtype=torch.float64)
    expected = F.cross_entropy(F.linear(hidden, weight, bias), labels)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
