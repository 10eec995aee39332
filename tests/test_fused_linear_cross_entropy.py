"""fused.linear_cross_entropy, Triton path, against the contract (reference.linear_cross_entropy).

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET)
and ``backend='triton'`` forces them on CPU tensors; shapes are small and odd (37 tokens,
101 vocabulary entries, 24 features: multiples of no block size). float32 throughout: the
interpreter rounds float32 to bfloat16 by truncation, so 16-bit dtypes are held to the
precision rule on a GPU (tests/gpu/test_fused_gpu.py).

Tolerances, float32 (fused vs. contract). The kernels sum the exponentials of a row block by
block (online log-sum-exp) where torch.logsumexp sums them in one go, and compute tanh from
exp; over 260 random problems (logits up to |z| ~ 60, every option, row chunks of 1 to 64
tokens, vocabulary blocks of 1 to 1000 columns) losses and lse differed from the contract by
at most 2.9 float32 ulps of ``max|z| + log V`` per token and gradients by at most 6.4e-6 of
their largest entry. Losses and lse are held to 4 such ulps per token (times the tokens a
summed loss adds up), plus rtol 1e-6; gradients to rtol 1e-5 plus atol 2e-5 * max|expected|
(at least 1e-6).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fused import api, ops, tiles
from fused.api import linear_cross_entropy
from fused.problem import LabelCheck, tile_problem
from reference.chunked_cross_entropy import chunked_linear_cross_entropy
from reference.linear_cross_entropy import LossOptions, transform_logits
from reference.linear_cross_entropy import linear_cross_entropy as contract
from reference.peak_memory import peak_memory_bytes
import problems
from loss_tolerances import forward_atols
from problems import DEVICE, IGNORE, random_like

# On a GPU machine these run the compiled kernels on CUDA tensors; elsewhere the kernels run
# on CPU tensors through Triton's interpreter (conftest switches it on). tests/gpu adds real
# shapes and 16-bit dtypes.

pytestmark = pytest.mark.usefixtures("on_the_suites_device")



EPS32 = torch.finfo(torch.float32).eps
N, D, V = 37, 24, 101
OPTIONS = {
    "plain": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "count_int": {"num_items_in_batch": 23},
    "count_tensor": {"num_items_in_batch": torch.tensor(23)},
    "label_smoothing": {"label_smoothing": 0.2},
    "softcap": {"softcap": 4.0},
    "logit_scale": {"logit_scale": 0.6},
    "z_loss": {"z_loss": 0.05},
    "all": {"softcap": 3.0, "logit_scale": 1.7, "label_smoothing": 0.1, "z_loss": 0.01},
}
# Tile plans: one tile, vocabulary blocks that do not divide V (nor a kernel block),
# row chunks that do not divide N, both.
TILES = {
    "one_tile": {},
    "vocab_blocks": {"vocab_chunk_size": 33},
    "row_chunks": {"chunk_size": 10},
    "both": {"chunk_size": 16, "vocab_chunk_size": 48},
}


def triton_path(*args, **kwargs):
    return linear_cross_entropy(*args, backend="triton", **kwargs)


def make_problem(shape=(N,), dim=D, vocab=V, **kwargs):
    """``problems.make_problem`` with this module's default shape."""
    return problems.make_problem(shape, dim, vocab, **kwargs)


def outputs(fn, hidden, weight, bias, labels, upstream=None, lse_upstream=None, **kwargs):
    """``(loss, lse or None, grads)``: the gradients of ``sum(upstream * loss) (+ sum(lse_upstream * lse))``
    with respect to the inputs that require them."""
    out = fn(hidden, weight, labels, bias=bias, **kwargs)
    loss, lse = out if kwargs.get("return_lse") else (out, None)
    objective = (loss * (upstream if upstream is not None else 1)).sum()
    if lse_upstream is not None:
        objective = objective + (lse * lse_upstream).sum()
    inputs = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(objective, inputs) if inputs else ()
    return loss.detach(), None if lse is None else lse.detach(), grads


def assert_grad_close(actual, expected):
    # The 1e-6 floor is for gradients the contract gets exactly 0 and float32 arithmetic
    # gets as a rounding residue: with V = 1, p - (1 - eps) - eps / V = 1.3e-8.
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=max(2e-5 * expected.abs().max().item(), 1e-6))


def assert_matches_contract(hidden, weight, bias, labels, *, tiles=None, upstream=None, lse_upstream=None, **kwargs):
    ref = outputs(contract, hidden, weight, bias, labels, upstream, lse_upstream, **kwargs)
    ours = outputs(triton_path, hidden, weight, bias, labels, upstream, lse_upstream, **(tiles or {}), **kwargs)
    loss_atol, lse_atol = forward_atols(hidden, weight, bias, labels, kwargs)
    for actual, expected, atol in ((ours[0], ref[0], loss_atol), (ours[1], ref[1], lse_atol)):
        if expected is None:
            assert actual is None
            continue
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=atol, equal_nan=True)
    assert len(ours[2]) == len(ref[2])
    for actual, expected in zip(ours[2], ref[2]):
        assert_grad_close(actual, expected)


# ---- equivalence with the contract, float32 -----------------------------------------------


@pytest.mark.parametrize("return_lse", [False, True], ids=["grads_in_forward", "recompute"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("name", OPTIONS)
def test_every_option(name, bias, return_lse, plan_kind):
    # Without return_lse a scalar loss has its gradients computed in the forward pass; with
    # it (or reduction='none') the backward pass recomputes the logits. Both are checked.
    hidden, weight, b, labels = make_problem(bias=bias, seed=1)
    upstream = torch.randn(labels.shape) if OPTIONS[name].get("reduction") == "none" else None
    assert_matches_contract(hidden, weight, b, labels, upstream=upstream, return_lse=return_lse, **OPTIONS[name])


@pytest.mark.parametrize("return_lse", [False, True], ids=["grads_in_forward", "recompute"])
@pytest.mark.parametrize("tiles", TILES)
def test_tile_plans(tiles, return_lse, plan_kind):
    hidden, weight, b, labels = make_problem(bias=True, seed=2)
    lse_upstream = torch.randn(labels.shape) if return_lse else None
    assert_matches_contract(
        hidden, weight, b, labels, tiles=TILES[tiles], lse_upstream=lse_upstream, return_lse=return_lse,
        **OPTIONS["all"],
    )


def test_reduction_none_with_every_tile_plan(plan_kind):
    hidden, weight, b, labels = make_problem(bias=True, seed=3)
    upstream, lse_upstream = random_like((2, N), seed=4)
    for tiles in TILES.values():
        assert_matches_contract(hidden, weight, b, labels, tiles=tiles, upstream=upstream, lse_upstream=lse_upstream,
                                reduction="none", return_lse=True, **OPTIONS["all"])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_shift_with_3d_hidden(reduction):
    hidden, weight, b, labels = make_problem((3, 13), bias=True, seed=5)
    upstream = torch.randn(3, 13) if reduction == "none" else None
    assert_matches_contract(hidden, weight, b, labels, tiles=TILES["both"], upstream=upstream, shift=True,
                            reduction=reduction)


@pytest.mark.parametrize(
    "count", [23, 23.5, torch.tensor(23), torch.tensor(23.0, dtype=torch.float64), torch.tensor([23])],
    ids=["int", "float", "int64_tensor", "float64_tensor", "shape_1_tensor"],
)
def test_num_items_in_batch(count):
    # The contract divides literally: a float64 0-d count gives a float64 loss, a (1,) count
    # a (1,) loss. The op's fake (compile-time) outputs must agree, which opcheck checks.
    hidden, weight, b, labels = make_problem((2, 19), bias=True, seed=6)
    assert_matches_contract(hidden, weight, b, labels, shift=True, num_items_in_batch=count)


def test_lse_gradient_alone():
    # Only the lse is used: the loss's gradient reaches the backward as None. The lse of
    # ignored rows is differentiable too.
    hidden, weight, b, labels = make_problem(bias=True, seed=7)
    grads = [
        torch.autograd.grad(fn(hidden, weight, labels, bias=b, return_lse=True)[1].sum(), (hidden, weight, b))
        for fn in (contract, triton_path)
    ]
    for actual, expected in zip(grads[1], grads[0]):
        assert_grad_close(actual, expected)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_label_ignored(reduction):
    # transformers' edge case: a mean over no target is NaN, with zero (finite) gradients.
    hidden, weight, b, labels = make_problem(bias=True, ignore_frac=1.0, seed=8)
    upstream = torch.randn(N) if reduction == "none" else None
    assert_matches_contract(hidden, weight, b, labels, upstream=upstream, reduction=reduction)
    loss, _, grads = outputs(triton_path, hidden, weight, b, labels, upstream, reduction=reduction)
    assert torch.isnan(loss).any().item() == (reduction == "mean")
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_ignore_index_inside_the_vocabulary():
    # ignore_index = 5 is also a valid class: rows labelled 5 are ignored, not targets.
    hidden, weight, b, labels = make_problem(seed=9, ignore_frac=0.0)
    labels[::3] = 5
    assert_matches_contract(hidden, weight, b, labels, tiles=TILES["both"], ignore_index=5)


@pytest.mark.parametrize("requires", ["h", "w", "b", "hw", "wb", ""])
def test_any_subset_of_inputs_requires_grad(requires):
    hidden, weight, b, labels = make_problem(bias=True, seed=10, requires_grad=False)
    for name, t in zip("hwb", (hidden, weight, b)):
        t.requires_grad_(name in requires)
    assert_matches_contract(hidden, weight, b, labels, **OPTIONS["all"])
    assert triton_path(hidden, weight, labels, bias=b).requires_grad == bool(requires)


def test_float64_compute_dtype():
    hidden, weight, _, labels = make_problem(dtype=torch.float64, ignore_frac=0.0, seed=11, requires_grad=False)
    ours = triton_path(hidden, weight, labels, compute_dtype=torch.float64, reduction="none")
    exact = chunked_linear_cross_entropy(hidden, weight, labels, compute_dtype=torch.float64, reduction="none")
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, exact, rtol=1e-12, atol=1e-12)


# ---- autograd behaviour -------------------------------------------------------------------


@pytest.mark.parametrize("return_lse", [False, True], ids=["grads_in_forward", "recompute"])
def test_gradients_accumulate_into_existing_grad(return_lse):
    hidden, weight, b, labels = make_problem(bias=True, seed=12)
    _, _, once = outputs(contract, hidden, weight, b, labels)
    for _ in range(2):
        out = triton_path(hidden, weight, labels, bias=b, return_lse=return_lse)
        (out[0] if return_lse else out).backward()
    for t, g in zip((hidden, weight, b), once):
        assert_grad_close(t.grad, 2 * g)


def test_upstream_gradient_scales_the_forward_gradients():
    hidden, weight, b, labels = make_problem(bias=True, seed=13)
    _, _, once = outputs(contract, hidden, weight, b, labels)
    (-2.5 * triton_path(hidden, weight, labels, bias=b)).backward()
    for t, g in zip((hidden, weight, b), once):
        assert_grad_close(t.grad, -2.5 * g)


def test_retained_graph():
    # With an upstream gradient of exactly 1 the forward's gradients are returned as they
    # are, so a retained graph can be differentiated again; otherwise they were scaled in
    # place and a second backward must fail loudly, not return scaled-twice gradients.
    hidden, weight, _, labels = make_problem(seed=14)
    loss = triton_path(hidden, weight, labels)
    first = torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    second = torch.autograd.grad(loss, (hidden, weight))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    scaled = 3 * triton_path(hidden, weight, labels)
    torch.autograd.grad(scaled, hidden, retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        torch.autograd.grad(scaled, hidden)


def test_forward_gradients_become_grad_without_a_copy(monkeypatch):
    # The point of gradients in the forward pass is memory: the V x D weight gradient must
    # become weight.grad itself, not a copy of it.
    made = {}
    run_tiles = tiles.run_tiles

    def spy(*args, **kwargs):
        out = run_tiles(*args, **kwargs)
        made.update(hidden=out.hidden.data_ptr(), weight=out.weight.data_ptr())
        return out

    monkeypatch.setattr(ops, "run_tiles", spy)
    hidden, weight, _, labels = make_problem(seed=15)
    triton_path(hidden, weight, labels).backward()
    assert hidden.grad.data_ptr() == made["hidden"] and weight.grad.data_ptr() == made["weight"]


def test_no_grad_computes_no_gradients(monkeypatch):
    calls = []
    run_tiles = tiles.run_tiles
    monkeypatch.setattr(ops, "run_tiles", lambda *a, **k: calls.append(k["wanted"]) or run_tiles(*a, **k))
    hidden, weight, _, labels = make_problem(seed=16)
    with torch.no_grad():
        loss = triton_path(hidden, weight, labels)
    assert calls == [(False, False, False)] and not loss.requires_grad
    torch.testing.assert_close(loss, contract(hidden, weight, labels), rtol=1e-6, atol=1e-5)


# ---- inputs -------------------------------------------------------------------------------


def test_non_contiguous_inputs():
    hidden, weight, b, labels = make_problem(bias=True, seed=17)
    strided = (
        hidden.detach().t().contiguous().t().requires_grad_(),  # column-major
        weight.detach().repeat(1, 2)[:, ::2].requires_grad_(),  # every other column
        b.detach().repeat(2)[::2].requires_grad_(),
        labels.repeat(2)[::2],
    )
    assert not any(t.is_contiguous() for t in strided)
    ref = outputs(contract, *strided[:3], strided[3], **OPTIONS["all"])
    ours = outputs(triton_path, *strided[:3], strided[3], **OPTIONS["all"])
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-6, atol=1e-5)
    for actual, expected in zip(ours[2], ref[2]):
        assert_grad_close(actual, expected)


def test_cpu_tensors_use_the_chunked_reference_by_default():
    hidden, weight, b, labels = make_problem(bias=True, seed=18, device="cpu")
    for kwargs in ({}, {"chunk_size": 5, "reduction": "none", "return_lse": True}):
        auto = outputs(linear_cross_entropy, hidden, weight, b, labels, **kwargs)
        chunked = outputs(chunked_linear_cross_entropy, hidden, weight, b, labels, **kwargs)
        forced = outputs(linear_cross_entropy, hidden, weight, b, labels, backend="reference", **kwargs)
        for a, c, f in zip(auto[:2] + auto[2], chunked[:2] + chunked[2], forced[:2] + forced[2]):
            assert (a is None and c is None) or (torch.equal(a, c) and torch.equal(a, f))


def _bad(**changes):
    """Arguments of a valid call with ``changes`` applied."""
    hidden, weight, _, labels = make_problem(seed=19, requires_grad=False, device="cpu")
    return {"hidden": hidden, "weight": weight, "labels": labels, **changes}


BAD_INPUTS = {
    "hidden_not_tensor": (_bad(hidden=[[1.0]]), TypeError, "hidden must be a torch.Tensor"),
    "bias_not_tensor": (_bad(bias=[0.0] * V), TypeError, "bias must be a torch.Tensor"),
    "dtype_mismatch": (_bad(weight=torch.zeros(V, D, dtype=torch.float64)), TypeError, "weight dtype"),
    "integer_hidden": (_bad(hidden=torch.zeros(N, D, dtype=torch.int64)), TypeError, "hidden must be a floating"),
    "float_labels": (_bad(labels=torch.zeros(N)), TypeError, "labels must be an integer"),
    "label_too_large": (_bad(labels=torch.full((N,), V)), ValueError, r"labels must lie in \[0, 101\)"),
    "negative_label": (_bad(labels=torch.full((N,), -1)), ValueError, "labels must lie in"),
    "labels_shape": (_bad(labels=torch.zeros(N + 1, dtype=torch.long)), ValueError, "labels shape"),
    "weight_width": (_bad(weight=torch.zeros(V, D + 1)), ValueError, "weight must be"),
    "empty_batch": (_bad(hidden=torch.zeros(0, D), labels=torch.zeros(0, dtype=torch.long)), ValueError, "empty batch"),
    "bias_shape": (_bad(bias=torch.zeros(V + 1)), ValueError, "bias must be"),
    "count_with_none": (_bad(num_items_in_batch=3, reduction="none"), ValueError, "num_items_in_batch"),
    "count_bool": (_bad(num_items_in_batch=True), TypeError, "num_items_in_batch must be"),
    "count_string": (_bad(num_items_in_batch="3"), TypeError, "num_items_in_batch must be"),
    "reduction": (_bad(reduction="avg"), ValueError, "reduction must be"),
    "label_smoothing": (_bad(label_smoothing=1.5), ValueError, "label_smoothing"),
    "softcap": (_bad(softcap=0.0), ValueError, "softcap"),
    "logit_scale": (_bad(logit_scale=math.inf), ValueError, "logit_scale"),
    "chunk_size_zero": (_bad(chunk_size=0), ValueError, "chunk_size must be positive"),
    "chunk_size_float": (_bad(chunk_size=8.0), TypeError, "chunk_size must be an int"),
    "vocab_chunk_size_bool": (_bad(vocab_chunk_size=True), TypeError, "vocab_chunk_size must be an int"),
    "compute_dtype": (_bad(compute_dtype=torch.float16), ValueError, "compute_dtype must be"),
    "backend": (_bad(backend="cuda"), ValueError, "backend must be"),
    "logits_dtype": (_bad(logits_dtype=torch.float16), ValueError, "logits_dtype must be None"),
    "accumulation_dtype": (_bad(accumulation_dtype=torch.bfloat16), ValueError, "accumulation_dtype must be None"),
    "shift_int": (_bad(shift=2), TypeError, "shift must be True or False"),
}


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_inputs(name, backend):
    kwargs, error, message = BAD_INPUTS[name]
    if name == "backend":
        backend = kwargs["backend"]
    # The table is built on the CPU at import; the call runs where the suite's kernels run.
    kwargs = {name: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for name, t in kwargs.items()}
    kwargs = {**kwargs, "backend": backend}
    with pytest.raises(error, match=message):
        linear_cross_entropy(kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("labels"), **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"vocab_chunk_size": 32}, {"reduction": "none"}, {"return_lse": True}, {"shift": True}],
    ids=["one_launch", "vocab_blocks", "none", "lse", "shift"],
)
@pytest.mark.parametrize("grad", [True, False])
def test_a_bad_label_raises_whether_or_not_gradients_are_wanted(kwargs, grad):
    # The op reads the labels' check late (after queuing work); every path must still read it.
    hidden, weight, _, labels = make_problem(seed=21, requires_grad=grad)
    labels[7] = V + 4
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, {V}\) or equal ignore_index=-100; found {V + 4}"):
        triton_path(hidden, weight, labels, **kwargs)


@pytest.mark.parametrize("shift", [False, True])
def test_a_deferred_label_check_raises_when_read(shift):
    hidden, weight, _, labels = make_problem((2, 5), 4, 11, ignore_frac=0.0, seed=23)
    labels[1, 0] = IGNORE
    problem = tile_problem(hidden, weight, labels, None, LossOptions(), shift=shift, num_items_in_batch=None)
    # Unshifted, 10 labels less the ignored one; shifted, each row's first label (the ignored
    # one among them) is no target and its last target is ignored: 2 * 4.
    assert problem.valid_tokens == (8 if shift else 9) and problem.label_check.read() == problem.valid_tokens
    labels[0, 0] = 12  # a first label: not a target after the shift, still checked
    problem = tile_problem(hidden, weight, labels, None, LossOptions(), shift=shift, num_items_in_batch=None)
    for _ in range(2):  # every read raises, not only the first
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 11\) or equal ignore_index=-100; found 12"):
            problem.valid_tokens


def test_the_labels_are_worked_on_after_the_first_logits_product_is_queued(monkeypatch):
    # The labels' operations and the check's read cost host time, and the read waits for the
    # device: done first, they would leave the GPU idle before the first product.
    events = []
    logits_tile, check_init, read = tiles.logits_tile, LabelCheck.__init__, LabelCheck.read
    monkeypatch.setattr(tiles, "logits_tile", lambda *a: events.append("logits") or logits_tile(*a))
    monkeypatch.setattr(LabelCheck, "__init__", lambda self, *a: events.append("check") or check_init(self, *a))
    monkeypatch.setattr(LabelCheck, "read", lambda self: events.append("read") or read(self))
    hidden, weight, _, labels = make_problem(seed=22)
    triton_path(hidden, weight, labels).backward()
    assert events[:3] == ["logits", "check", "read"], events


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(api, "KERNELS_INTERPRETED", False)
    hidden, weight, _, labels = make_problem(seed=20, device="cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        triton_path(hidden, weight, labels)


# ---- memory -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_peak_memory_follows_the_formula(dtype):
    # The module docstring's formula: one tile (rows x cols) in the inputs' dtype, for
    # 16-bit inputs split into vocabulary blocks a float32 rows x D accumulator, and O(N)
    # statistics; nothing of size N x V. Measured with the profiler's allocation record.
    # On CPU, adding the float16 partial product into the float32 accumulator upcasts it
    # through a temporary of the accumulator's size (CUDA casts on the fly): counted too.
    n, d, vocab, cols = 128, 16, 1024, 256
    hidden, weight, _, labels = make_problem((n,), d, vocab, dtype=dtype, ignore_frac=0.0, logit_std=d**0.5, seed=21)

    def forward_backward():
        triton_path(hidden, weight, labels, vocab_chunk_size=cols).backward()

    peak = peak_memory_bytes(forward_backward, DEVICE)
    size = hidden.element_size()
    grads = (n + vocab) * d * size
    accumulator = n * d * 4 if size < 4 else 0
    bound = grads + n * cols * size + 2 * accumulator + 64 * n
    assert peak <= bound, (peak, bound)
    assert peak < n * vocab * size / 2  # half of one copy of the logits


def test_float16_gradients_meet_the_precision_rule():
    # The rule the GPU suite applies to 16-bit dtypes: error against a float32 truth no worse
    # than torch eager's in the same dtype, times 1.5. float16 runs faithfully in the
    # interpreter (its float32 -> float16 rounding is torch's), so the accumulation of
    # grad_hidden over vocabulary blocks and over row chunks is checked here too.
    n, d, vocab = 96, 32, 1000
    hidden, weight, _, labels = make_problem((n,), d, vocab, ignore_frac=0.0, logit_std=4.0, seed=22, requires_grad=False)
    labels[::7] = IGNORE

    def grads(fn, dtype):
        h, w = hidden.to(dtype).detach().requires_grad_(), weight.to(dtype).detach().requires_grad_()
        loss = fn(h, w)
        loss.backward()
        return loss.float(), h.grad.float(), w.grad.float()

    def eager(h, w):
        return F.cross_entropy((h @ w.t()).float(), labels, ignore_index=IGNORE)

    truth, torch_half = grads(eager, torch.float32), grads(eager, torch.float16)
    for tiles in ({"vocab_chunk_size": 256}, {"chunk_size": 40, "vocab_chunk_size": 300}):
        ours = grads(lambda h, w: triton_path(h, w, labels, **tiles), torch.float16)
        assert abs(ours[0] - truth[0]) <= 1.5 * abs(torch_half[0] - truth[0]) + 4 * EPS32 * truth[0]
        for mine, theirs, exact in zip(ours[1:], torch_half[1:], truth[1:]):
            assert (mine - exact).norm() <= 1.5 * (theirs - exact).norm()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_float32_logits_remove_the_16_bit_rounding_of_the_loss(backend):
    # Against a float64 truth from the same float16 inputs: by default the loss carries the
    # logits' rounding to float16, as transformers' does; with float32 tiles only float32's.
    hidden, weight, b, labels = make_problem((64,), 32, 300, dtype=torch.float16, bias=True, logit_std=8.0, seed=24)
    wide = [t.detach().double() for t in (hidden, weight, b)]
    truth = contract(*wide[:2], labels, bias=wide[2], reduction="none")
    def error(**knobs):
        loss = linear_cross_entropy(hidden, weight, labels, bias=b, reduction="none", backend=backend, **knobs)
        return (loss.double() - truth).abs().max().item()
    stock = error()
    assert stock == (contract(hidden, weight, labels, bias=b, reduction="none").double() - truth).abs().max().item()
    z_scale = 8.0 * 4 + math.log(300)  # a generous bound on |z| + log V
    assert error(logits_dtype=torch.float32) <= 16 * EPS32 * z_scale < stock / 10


def test_float32_weight_sums_over_row_chunks_are_no_worse_than_eager():
    # float16 grad_weight summed over 16 row chunks: rounded once per chunk by default, once
    # in all with accumulation_dtype=float32 (the precision rule: within 1.5x eager's error).
    hidden, weight, _, labels = make_problem((512,), 16, 200, dtype=torch.float16, logit_std=4.0, seed=25)
    exact_w = weight.detach().double().requires_grad_()
    contract(hidden.detach().double(), exact_w, labels).backward()
    def weight_error(fn, **knobs):
        w = weight.detach().clone().requires_grad_()
        fn(hidden.detach(), w, labels, **knobs).backward()
        return ((w.grad.double() - exact_w.grad).norm() / exact_w.grad.norm()).item()
    eager = weight_error(contract)
    summed = weight_error(triton_path, chunk_size=32, accumulation_dtype=torch.float32)
    assert summed <= 1.5 * eager
    assert summed <= weight_error(triton_path, chunk_size=32)


# ---- properties ---------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 40),
    vocab=st.integers(1, 150),
    dim=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    option=st.sampled_from(list(OPTIONS)),
    chunk_size=st.one_of(st.none(), st.integers(3, 50)),
    vocab_chunk_size=st.one_of(st.none(), st.integers(5, 200)),
    return_lse=st.booleans(),
)
def test_matches_contract_property(n, vocab, dim, seed, ignore_frac, option, chunk_size, vocab_chunk_size, return_lse):
    hidden, weight, b, labels = make_problem((n,), dim, vocab, bias=seed % 2 == 0, ignore_frac=ignore_frac, seed=seed)
    kwargs = dict(OPTIONS[option])
    upstream = random_like(n, seed) if kwargs.get("reduction") == "none" else None
    tiles = {"chunk_size": chunk_size, "vocab_chunk_size": vocab_chunk_size}
    assert_matches_contract(hidden, weight, b, labels, tiles=tiles, upstream=upstream, return_lse=return_lse, **kwargs)
