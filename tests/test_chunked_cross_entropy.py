"""The chunked linear cross entropy against the contract (reference.linear_cross_entropy).

Tolerances, float32 (chunked vs. contract): the forward pass runs the contract's own code
on blocks of rows, so losses and lse differ only where the matmul of a block rounds
differently from the matmul of all rows: a last-bit change of a logit, which moves a
token's loss by up to a few ulps of its largest intermediate, max|z| + log V (measured:
2 such ulps on CPU, 1 on an H100, where one token's loss of 0.6 moved by 1.6e-6). Losses
and lse are held to 4 of those ulps per token (times the tokens a sum adds up), plus
rtol 1e-6 for the order of the reduction's sum. Gradients
differ by the order of the sums over tokens (grad_weight, grad_bias: chunk by chunk
instead of one GEMM) and by those last-bit logit differences passed through softmax.
Over 300 random problems (logits up to |z| ~ 25, chunk_size 1 to 1000) the largest
difference was 9.3e-6 of the largest gradient entry, so gradients are held to
rtol 1e-5 plus atol 2e-5 * max|expected|. The analytic backward itself is checked in
float64 by torch.autograd.gradcheck, where no rounding hides a wrong term.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from problems import IGNORE, LOSS_OPTIONS, make_problem
from reference.chunked_cross_entropy import chunked_linear_cross_entropy
from reference.linear_cross_entropy import LossOptions, linear_cross_entropy, transform_logits
from reference.peak_memory import peak_memory_bytes
from loss_tolerances import forward_atols

EPS32 = torch.finfo(torch.float32).eps
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
OPTIONS = LOSS_OPTIONS


def loss_and_grads(fn, hidden, weight, bias, labels, upstream=None, lse_upstream=None, **kwargs):
    """Loss, lse and the gradients of ``sum(upstream * loss) + sum(lse_upstream * lse)``."""
    loss, lse = fn(hidden, weight, labels, bias=bias, return_lse=True, **kwargs)
    objective = (loss * (upstream if upstream is not None else 1)).sum()
    if lse_upstream is not None:
        objective = objective + (lse * lse_upstream).sum()
    inputs = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(objective, inputs) if inputs else ()
    return loss.detach(), lse.detach(), grads


def assert_grad_close(actual, expected, rtol=1e-5, scale_atol=2e-5):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=scale_atol * expected.abs().max().item())


def assert_forward_close(ours, ref, atols):
    for actual, expected, atol in zip(ours, ref, atols, strict=True):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=atol, equal_nan=True)


def assert_matches_contract(hidden, weight, bias, labels, chunk_size, upstream=None, lse_upstream=None, **kwargs):
    ref = loss_and_grads(linear_cross_entropy, hidden, weight, bias, labels, upstream, lse_upstream, **kwargs)
    ours = loss_and_grads(
        chunked_linear_cross_entropy, hidden, weight, bias, labels, upstream, lse_upstream,
        chunk_size=chunk_size, **kwargs,
    )
    assert_forward_close(ours[:2], ref[:2], forward_atols(hidden, weight, bias, labels, kwargs))
    assert len(ours[2]) == len(ref[2])
    for actual, expected in zip(ours[2], ref[2]):
        assert_grad_close(actual, expected)


# ---- equivalence with the contract, float32 ---------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_contract_every_option(name, bias, device):
    hidden, weight, b, labels = make_problem((3, 11), 16, 37, bias=bias, seed=1, device=device)
    upstream = torch.randn(labels.shape, device=device) if OPTIONS[name].get("reduction") == "none" else None
    assert_matches_contract(hidden, weight, b, labels, chunk_size=8, upstream=upstream, **OPTIONS[name])


@pytest.mark.parametrize("chunk_size", [1, 5, 33, 34, 1000])
def test_odd_chunk_sizes(chunk_size):
    # 33 rows: chunk 1, a chunk that does not divide 33, exactly N, N + 1 and far beyond N.
    hidden, weight, b, labels = make_problem((33,), 8, 21, bias=True, seed=2)
    assert_matches_contract(hidden, weight, b, labels, chunk_size=chunk_size, **OPTIONS["all"])


def test_shift_with_3d_hidden():
    hidden, weight, b, labels = make_problem((3, 10), 8, 19, bias=True, seed=3)
    assert_matches_contract(hidden, weight, b, labels, chunk_size=4, shift=True)
    assert_matches_contract(hidden, weight, b, labels, chunk_size=4, shift=True, reduction="none",
                            upstream=torch.randn(3, 10))


def test_reduction_none_and_lse_with_random_upstream_gradients():
    hidden, weight, b, labels = make_problem((4, 6), 8, 17, bias=True, seed=4)
    gen = torch.Generator().manual_seed(5)
    upstream, lse_upstream = torch.randn(2, 4, 6, generator=gen)
    # The lse of ignored rows is differentiable too: its gradient must reach hidden.
    assert_matches_contract(hidden, weight, b, labels, chunk_size=5, upstream=upstream, lse_upstream=lse_upstream,
                            reduction="none", **OPTIONS["all"])
    assert_matches_contract(hidden, weight, b, labels, chunk_size=5, lse_upstream=lse_upstream)


def test_gradient_of_lse_alone():
    # The loss output is unused: its gradient reaches the backward as None.
    hidden, weight, b, labels = make_problem((10,), 8, 17, bias=True, seed=6)
    grads = [
        torch.autograd.grad(fn(hidden, weight, labels, bias=b, return_lse=True)[1].sum(), (hidden, weight, b))
        for fn in (linear_cross_entropy, lambda *a, **k: chunked_linear_cross_entropy(*a, chunk_size=3, **k))
    ]
    for actual, expected in zip(grads[1], grads[0]):
        assert_grad_close(actual, expected)


@pytest.mark.parametrize("count", [7, torch.tensor(7.0), torch.tensor(7, dtype=torch.int64)])
def test_num_items_in_batch(count):
    hidden, weight, b, labels = make_problem((2, 8), 8, 11, bias=True, seed=7)
    assert_matches_contract(hidden, weight, b, labels, chunk_size=3, num_items_in_batch=count, shift=True)


@pytest.mark.parametrize("requires", ["h", "w", "b", "hw", "hb", "wb", ""])
def test_any_subset_of_inputs_requires_grad(requires):
    hidden, weight, b, labels = make_problem((12,), 8, 15, bias=True, seed=8, requires_grad=False)
    for name, t in zip("hwb", (hidden, weight, b)):
        t.requires_grad_(name in requires)
    assert_matches_contract(hidden, weight, b, labels, chunk_size=5, **OPTIONS["all"])
    loss = chunked_linear_cross_entropy(hidden, weight, labels, bias=b, chunk_size=5)
    assert loss.requires_grad == bool(requires)


def test_grads_accumulate_across_calls():
    hidden, weight, b, labels = make_problem((2, 7), 8, 13, bias=True, seed=9)
    _, _, once = loss_and_grads(linear_cross_entropy, hidden, weight, b, labels)
    for _ in range(2):
        chunked_linear_cross_entropy(hidden, weight, labels, bias=b, chunk_size=4).backward()
    for t, g in zip((hidden, weight, b), once):
        assert_grad_close(t.grad, 2 * g)


def test_non_contiguous_inputs():
    hidden, weight, b, labels = make_problem((5, 8), 8, 13, bias=True, seed=10, requires_grad=False)
    # The same values, laid out transposed / strided.
    hidden_t = hidden.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    weight_t = weight.t().contiguous().t().requires_grad_()
    bias_s = torch.stack([b, b], dim=1)[:, 0].detach().requires_grad_()
    labels_t = labels.t().contiguous().t()
    assert not any(t.is_contiguous() for t in (hidden_t, weight_t, bias_s, labels_t))
    assert_matches_contract(hidden_t, weight_t, bias_s, labels_t, chunk_size=6, shift=True, **OPTIONS["all"])


@pytest.mark.parametrize("count", [None, 5])
def test_all_targets_ignored(count):
    # Spec: no count -> NaN loss with zero (finite) gradients; a count > 0 -> 0.0.
    hidden, weight, b, labels = make_problem((2, 6), 8, 11, bias=True, ignore_frac=1.1, seed=11)
    loss = chunked_linear_cross_entropy(hidden, weight, labels, bias=b, chunk_size=4, num_items_in_batch=count)
    assert torch.isnan(loss) if count is None else loss.item() == 0.0
    loss.backward()
    for t in (hidden, weight, b):
        assert torch.equal(t.grad, torch.zeros_like(t))
    assert_matches_contract(hidden, weight, b, labels, chunk_size=4, num_items_in_batch=count)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    # Logits are computed in the inputs' dtype and upcast; the loss is float32, gradients
    # come back in the inputs' dtype. grad_weight is summed in float32 here, from the
    # 16-bit GEMM in the contract: they agree to 16-bit rounding.
    hidden, weight, b, labels = make_problem((3, 8), 16, 29, dtype=dtype, bias=True, seed=12)
    ref = loss_and_grads(linear_cross_entropy, hidden, weight, b, labels, softcap=5.0)
    ours = loss_and_grads(chunked_linear_cross_entropy, hidden, weight, b, labels, softcap=5.0, chunk_size=5)
    assert ours[0].dtype == torch.float32
    assert_forward_close(ours[:2], ref[:2], forward_atols(hidden, weight, b, labels, {"softcap": 5.0}))
    for actual, expected in zip(ours[2], ref[2]):
        assert actual.dtype == dtype
        torch.testing.assert_close(actual, expected, rtol=2e-2, atol=1e-2 * expected.abs().max().item())


def test_float64_inputs_follow_the_contract_by_default():
    # The contract upcasts with .float(): for float64 inputs the logits are float32.
    hidden, weight, b, labels = make_problem((3, 8), 8, 17, dtype=torch.float64, bias=True, seed=13)
    ref = loss_and_grads(linear_cross_entropy, hidden, weight, b, labels)
    ours = loss_and_grads(chunked_linear_cross_entropy, hidden, weight, b, labels, chunk_size=5)
    assert ours[0].dtype == torch.float32
    assert_forward_close(ours[:2], ref[:2], forward_atols(hidden, weight, b, labels, {}))
    for actual, expected in zip(ours[2], ref[2]):
        assert_grad_close(actual, expected)


def test_compute_dtype_float64_is_float64_throughout():
    hidden, weight, b, labels = make_problem((3, 8), 8, 17, dtype=torch.float64, bias=True, seed=14)
    loss, lse = chunked_linear_cross_entropy(hidden, weight, labels, bias=b, return_lse=True,
                                             compute_dtype=torch.float64, chunk_size=5)
    logits = hidden @ weight.T + b
    targets = labels.reshape(-1)
    valid = targets != IGNORE
    rows = logits.reshape(-1, 17)
    expected_lse = torch.logsumexp(rows, -1)
    expected = (expected_lse - rows.gather(1, targets.clamp(min=0)[:, None])[:, 0])[valid].mean()
    assert loss.dtype == lse.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(lse.reshape(-1), expected_lse, rtol=1e-14, atol=0)


# ---- float64 gradcheck of the analytic backward -----------------------------------------

GRADCHECK_CASES = {
    **{name: opts for name, opts in OPTIONS.items() if name != "count_int"},
    "count_int": {"num_items_in_batch": 5},
    "count_tensor": {"num_items_in_batch": torch.tensor(5.0, dtype=torch.float64)},
    "shift": {"shift": True},
    "shift_all_none": {"shift": True, "reduction": "none", **OPTIONS["all"]},
}


@pytest.mark.parametrize("name", GRADCHECK_CASES)
def test_gradcheck_float64(name):
    # 2 x 4 tokens in chunks of 3: two full chunks and a partial one, a quarter ignored.
    hidden, weight, b, labels = make_problem((2, 4), 3, 7, dtype=torch.float64, bias=True, seed=15, logit_std=1.5)
    kwargs = GRADCHECK_CASES[name]

    def fn(hidden, weight, bias):
        # gradcheck also checks the lse output: any upstream gradient of both outputs.
        return chunked_linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=3,
                                            compute_dtype=torch.float64, return_lse=True, **kwargs)

    assert torch.autograd.gradcheck(fn, (hidden, weight, b))


def test_gradcheck_float64_without_bias_and_frozen_weight():
    hidden, weight, _, labels = make_problem((5,), 4, 6, dtype=torch.float64, seed=16, logit_std=1.5)
    weight.requires_grad_(False)

    def fn(hidden):
        return chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=2, compute_dtype=torch.float64,
                                            **OPTIONS["all"])

    assert torch.autograd.gradcheck(fn, (hidden,))


# ---- property tests ---------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 12),
    dim=st.integers(1, 9),
    vocab=st.integers(1, 40),
    chunk_size=st.integers(1, 40),
    ignore_frac=st.sampled_from([0.0, 0.3, 0.9, 1.0]),
    shift=st.booleans(),
    bias=st.booleans(),
    option=st.sampled_from(sorted(OPTIONS)),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_contract(batch, seq, dim, vocab, chunk_size, ignore_frac, shift, bias, option, seed):
    hidden, weight, b, labels = make_problem((batch, seq), dim, vocab, bias=bias, ignore_frac=ignore_frac, seed=seed)
    upstream = torch.randn(labels.shape) if OPTIONS[option].get("reduction") == "none" else None
    assert_matches_contract(hidden, weight, b, labels, chunk_size, upstream=upstream, shift=shift, **OPTIONS[option])


# ---- bad inputs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunk_size", "error", "message"),
    [
        (0, ValueError, "chunk_size must be positive, got 0"),
        (-4, ValueError, "chunk_size must be positive, got -4"),
        (2.0, TypeError, "chunk_size must be an int, got float"),
        (True, TypeError, "chunk_size must be an int, got bool"),
        (None, TypeError, "chunk_size must be an int, got NoneType"),
    ],
)
def test_bad_chunk_size(chunk_size, error, message):
    hidden, weight, _, labels = make_problem()
    with pytest.raises(error, match=message):
        chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=chunk_size)


def test_bad_compute_dtype():
    hidden, weight, _, labels = make_problem()
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        chunked_linear_cross_entropy(hidden, weight, labels, compute_dtype=torch.bfloat16)


def test_contract_validation_applies():
    hidden, weight, _, labels = make_problem()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 13\) or equal ignore_index=-100; found 13"):
        chunked_linear_cross_entropy(hidden, weight, torch.full_like(labels, 13))
    with pytest.raises(ValueError, match="reduction must be one of"):
        chunked_linear_cross_entropy(hidden, weight, labels, reduction="avg")


# ---- memory -----------------------------------------------------------------------------


def test_peak_memory_sees_allocations():
    assert peak_memory_bytes(lambda: torch.empty(1000)) == 4000
    # Two tensors alive at once, then one freed before the next: 3 and 2 MB at most.
    def two_then_one():
        a, b = torch.empty(2**18), torch.empty(2**19)
        del a, b
        torch.empty(2**19)

    assert peak_memory_bytes(two_then_one) == 3 * 2**20


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_peak_memory_is_below_unchunked(device):
    n, vocab, dim, chunk = 512, 4096, 32, 64
    hidden, weight, _, labels = make_problem((n,), dim, vocab, seed=17, device=device)

    def fwd_bwd(fn, **kwargs):
        hidden.grad = weight.grad = None
        return peak_memory_bytes(lambda: fn(hidden, weight, labels, **kwargs).backward(), device)

    # One untimed pass first: library workspaces (cuBLAS on CUDA) are allocated once, there.
    fwd_bwd(linear_cross_entropy)
    logits_bytes = n * vocab * 4
    grads_bytes = (n + vocab) * dim * 4
    unchunked = fwd_bwd(linear_cross_entropy)
    chunked = fwd_bwd(chunked_linear_cross_entropy, chunk_size=chunk)
    assert unchunked >= 2 * logits_bytes  # the logits and at least one tensor of their size
    # Docstring bound: three chunk-sized buffers plus the gradients, plus per-token vectors.
    assert chunked <= 3 * chunk * vocab * 4 + grads_bytes + 64 * n
    assert chunked < unchunked / 4


def test_peak_memory_bad_inputs():
    with pytest.raises(TypeError, match="fn must be callable, got Tensor"):
        peak_memory_bytes(torch.empty(1))
    with pytest.raises(ValueError, match="device must be a CPU or CUDA device, got meta"):
        peak_memory_bytes(lambda: None, "meta")
