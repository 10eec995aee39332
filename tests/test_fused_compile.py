"""fused.linear_cross_entropy as a torch.library custom op: torch.compile without graph breaks,
opcheck (schema, fake tensors, autograd registration), and float64 gradcheck.

Eager calls on plain tensors skip the dispatcher (the same functions in a
torch.autograd.Function). Triton path, kernels in the interpreter without CUDA. Compiled and
eager calls run the same kernels on the same inputs: losses agree to rtol 1e-6 (inductor may
sum a 'none' loss in another order), gradients exactly.
"""

from __future__ import annotations


import pytest
import torch

from fused import ops
from fused.api import linear_cross_entropy
from fused.ops import LossInputs, Upstream

# opcheck's own use of torch.jit, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

N, D, V = 37, 24, 101
CALLS = {
    "mean": {},
    "none_and_lse": {"reduction": "none", "return_lse": True},
    "count_tensor": {"num_items_in_batch": torch.tensor(30)},
    "count_int": {"num_items_in_batch": 30, "vocab_chunk_size": 40},
    "every_option": {"softcap": 3.0, "logit_scale": 0.8, "label_smoothing": 0.1, "z_loss": 0.01, "chunk_size": 16},
}


# The kernels run on the GPU where there is one, else in the interpreter (conftest).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def problem(dtype=torch.float32, n=N, d=D, vocab=V, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=dtype).to(DEVICE).requires_grad_()
    weight = torch.randn(vocab, d, generator=gen, dtype=dtype).mul_(0.5).to(DEVICE).requires_grad_()
    bias = torch.randn(vocab, generator=gen, dtype=dtype).to(DEVICE).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=gen).to(DEVICE)
    labels[::4] = -100
    return hidden, weight, bias, labels


@pytest.mark.parametrize("name", CALLS)
def test_compile_fullgraph(name):
    hidden, weight, bias, labels = problem()
    kwargs = CALLS[name]

    def objective(h, w, b, y):
        out = linear_cross_entropy(h, w, y, bias=b, backend="triton", **kwargs)
        return out[0].sum() + out[1].sum() if isinstance(out, tuple) else out.sum()

    torch._dynamo.reset()
    compiled = torch.compile(objective, fullgraph=True)  # fails on any graph break
    results = []
    for fn in (compiled, objective):
        value = fn(hidden, weight, bias, labels)
        results.append((value, *torch.autograd.grad(value, (hidden, weight, bias))))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=0)
    for a, b in zip(results[0][1:], results[1][1:]):
        assert torch.equal(a, b)


def test_eager_calls_on_plain_tensors_skip_the_dispatcher(monkeypatch):
    # Same functions either way (test_compile_fullgraph compares the two routes); eager calls
    # on tensors and parameters go around the custom op, tracers' tensors through it.
    hidden, weight, bias, labels = problem()
    weight = torch.nn.Parameter(weight.detach())

    def dispatched(*args):
        raise AssertionError("an eager call on plain tensors went through the dispatcher")

    monkeypatch.setattr(ops, "forward_op", dispatched)
    linear_cross_entropy(hidden, weight, labels, bias=bias, backend="triton").backward()
    assert hidden.grad is not None and weight.grad is not None and bias.grad is not None
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fake = torch.empty(3)
    assert ops.needs_dispatcher(fake, None)
    assert not ops.needs_dispatcher(hidden, weight, labels, None)


def _forward_args(hidden, weight, bias, labels, *, reduction="mean", count=None, grads=(True, True, True), **options):
    """The forward op's arguments."""
    return LossInputs(
        hidden, weight, labels, bias,
        num_items=count if isinstance(count, torch.Tensor) else None,
        num_items_value=float(count) if isinstance(count, (int, float)) else None,
        ignore_index=-100, shift=False, reduction=reduction, label_smoothing=options.get("label_smoothing", 0.0),
        softcap=options.get("softcap"), logit_scale=options.get("logit_scale"), z_loss=options.get("z_loss", 0.0),
        chunk_size=options.get("chunk_size"), vocab_chunk_size=options.get("vocab_chunk_size"),
        memory_budget=None, compute_dtype=torch.float32, logits_dtype=None, accumulation_dtype=None,
        grad_hidden=grads[0], grad_weight=grads[1], grad_bias=grads[2],
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"reduction": "sum", "count": torch.tensor([30]), "grads": (True, False, True)},
        {"reduction": "none", "grads": (False, False, False), "softcap": 2.0, "label_smoothing": 0.1,
         "chunk_size": 16, "vocab_chunk_size": 48},
    ],
    ids=["grads_in_forward", "count_shape_1", "recompute"],
)
def test_opcheck_forward(kwargs):
    hidden, weight, bias, labels = problem(n=9, vocab=30)
    if "grads" in kwargs:  # the gradients the op computes in its forward pass are those required
        for t, flag in zip((hidden, weight, bias), kwargs["grads"]):
            t.requires_grad_(flag)
    torch.library.opcheck(ops.forward_op, _forward_args(hidden, weight, bias, labels, **kwargs))


def test_opcheck_backward():
    # The backward op has no derivative of its own (no double backward): plain inputs.
    hidden, weight, bias, labels = (t.detach() for t in problem(n=9, vocab=30))
    args = _forward_args(hidden, weight, bias, labels, reduction="none", grads=(False, False, False))
    _, lse, *_ = ops.forward_op(*args)
    gen = torch.Generator().manual_seed(1)
    loss_grad, lse_grad = torch.randn(2, 9, generator=gen).to(DEVICE)
    wanted = args._replace(grad_hidden=True, grad_weight=True, grad_bias=True)
    backward_args = (*wanted, *Upstream(lse.detach(), loss_grad, lse_grad))
    torch.library.opcheck(ops.backward_op, backward_args)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"reduction": "none"},
        {"return_lse": True, "softcap": 2.0, "logit_scale": 1.3, "label_smoothing": 0.1, "z_loss": 0.01},
    ],
    ids=["grads_in_forward", "none", "lse_and_every_option"],
)
def test_gradcheck_float64(kwargs):
    # compute_dtype=float64 keeps float64 inputs in float64 in the kernels, so finite
    # differences can see a wrong term; tiles of 4 rows x 6 columns exercise every carry.
    hidden, weight, bias, labels = problem(torch.float64, n=7, d=5, vocab=11, seed=2)

    def fn(h, w, b):
        return linear_cross_entropy(h, w, labels, bias=b, backend="triton", compute_dtype=torch.float64,
                                    chunk_size=4, vocab_chunk_size=6, **kwargs)

    # fast_mode: a few random directions instead of every entry (the interpreter is slow).
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias), fast_mode=True)
