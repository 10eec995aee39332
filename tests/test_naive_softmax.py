"""Naive softmax / cross entropy: exact for small logits, overflow for large ones; the shared input check."""

import math

import pytest
import torch
import torch.nn.functional as F

from reference.input_checks import check_logits_and_targets
from reference.naive_softmax import naive_cross_entropy, naive_softmax

EPS32 = torch.finfo(torch.float32).eps


def random_problem(n: int, vocab: int, scale: float, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=gen) * scale).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    return logits, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_matches_torch_for_small_logits(dtype):
    logits, _ = random_problem(16, 300, 3.0, seed=0, dtype=dtype)
    probs = naive_softmax(logits)
    assert probs.dtype == dtype and probs.shape == logits.shape
    eps = torch.finfo(dtype).eps
    # Each probability is exp / sum with a few roundings: a handful of ulps relative.
    torch.testing.assert_close(probs, torch.softmax(logits, dim=-1), rtol=16 * eps, atol=0)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("scale", [0.1, 1.0, 5.0])
def test_cross_entropy_matches_torch_for_small_logits(seed, scale):
    logits, targets = random_problem(64, 500, scale, seed)
    targets[::5] = -100
    ours = naive_cross_entropy(logits, targets)
    ref = F.cross_entropy(logits, targets)
    assert ours.dtype == torch.float32 and ours.dim() == 0
    # Per row: roundings of exp, the sum, the division and the log, each relative to the
    # row's loss (all losses are positive, so the mean adds no cancellation).
    torch.testing.assert_close(ours, ref, rtol=32 * EPS32, atol=0)


def test_cross_entropy_float64_agrees_to_float64_rounding():
    logits, targets = random_problem(32, 200, 2.0, seed=3, dtype=torch.float64)
    eps = torch.finfo(torch.float64).eps
    ours, ref = naive_cross_entropy(logits, targets), F.cross_entropy(logits, targets)
    torch.testing.assert_close(ours, ref, rtol=32 * eps, atol=0)


@pytest.mark.parametrize(
    "dtype, safe, overflowing",
    [
        # exp overflows past log(max finite): 88.72 for float32 and bfloat16, 11.09 for float16.
        (torch.float32, 88.0, 89.0),
        (torch.bfloat16, 88.0, 90.0),
        (torch.float16, 11.0, 11.1),
    ],
)
def test_softmax_overflow_threshold(dtype, safe, overflowing):
    assert math.log(torch.finfo(dtype).max) > safe
    fine = naive_softmax(torch.tensor([[safe, 0.0]], dtype=dtype))
    assert torch.isfinite(fine).all()
    broken = naive_softmax(torch.tensor([[overflowing, 0.0]], dtype=dtype))
    # inf / inf for the largest entry, finite / inf = 0 for the others.
    assert torch.isnan(broken[0, 0]) and broken[0, 1] == 0
    assert torch.isfinite(torch.softmax(torch.tensor([[overflowing, 0.0]], dtype=dtype).float(), -1)).all()


@pytest.mark.parametrize(
    "dtype, scale",
    [(torch.float32, 100.0), (torch.bfloat16, 200.0), (torch.float16, 12.0)],
)
def test_cross_entropy_overflows_where_the_stable_loss_is_finite(dtype, scale):
    logits, targets = random_problem(32, 100, 1.0, seed=1)
    # Rows whose largest logit is `scale`, beyond the dtype's exp range: inf / inf = nan,
    # or (float16) a sum of finite exps that overflows, giving p = 0 and -log 0 = inf.
    logits = (logits / logits.amax(dim=-1, keepdim=True) * scale).to(dtype)
    assert not torch.isfinite(naive_cross_entropy(logits, targets))
    assert torch.isfinite(F.cross_entropy(logits.float(), targets))


def test_cross_entropy_underflow_gives_inf():
    # The target's probability exp(-200) underflows to 0 in float32: -log 0 = inf,
    # although the true loss is about 200.
    logits = torch.tensor([[0.0, -200.0]])
    targets = torch.tensor([1])
    assert naive_cross_entropy(logits, targets).item() == math.inf
    assert F.cross_entropy(logits, targets).item() == pytest.approx(200.0)


def test_ignored_targets_are_left_out_of_the_mean():
    logits, targets = random_problem(8, 20, 1.0, seed=2)
    targets[3] = -100
    keep = targets != -100
    expected = naive_cross_entropy(logits[keep], targets[keep])
    assert torch.equal(naive_cross_entropy(logits, targets), expected)
    # An ignored row may hold anything, even logits that would overflow.
    logits[3] = 1e4
    assert torch.equal(naive_cross_entropy(logits, targets), expected)
    # A different ignore_index: target class 0 is excluded, -100 is now an error.
    targets[3] = 0
    kept = targets != 0
    assert torch.equal(naive_cross_entropy(logits, targets, ignore_index=0), naive_cross_entropy(logits[kept], targets[kept]))


def test_all_ignored_is_nan():
    logits, targets = random_problem(4, 10, 1.0, seed=0)
    assert torch.isnan(naive_cross_entropy(logits, torch.full_like(targets, -100)))


def test_int32_targets_accepted():
    logits, targets = random_problem(8, 20, 1.0, seed=4)
    assert torch.equal(naive_cross_entropy(logits, targets.int()), naive_cross_entropy(logits, targets))


@pytest.mark.parametrize(
    "logits, targets, kwargs, error, match",
    [
        (torch.zeros(2, 5), torch.tensor([0, 5]), {}, ValueError, r"outside \[0, 5\).*e\.g\. 5"),
        (torch.zeros(2, 5), torch.tensor([-1, 0]), {}, ValueError, r"not ignore_index=-100, e\.g\. -1"),
        (torch.zeros(2, 5), torch.tensor([-100, 0]), {"ignore_index": 0}, ValueError, "e.g. -100"),
        (torch.zeros(2, 5), torch.tensor([0.0, 1.0]), {}, TypeError, "integer class indices"),
        (torch.zeros(2, 5), torch.tensor([True, False]), {}, TypeError, "integer class indices"),
        (torch.zeros(2, 5), [0, 1], {}, TypeError, "must be a torch.Tensor"),
        (torch.zeros(2, 5, dtype=torch.long), torch.tensor([0, 1]), {}, TypeError, "floating point"),
        (torch.zeros(2, 5), torch.tensor([0, 1, 2]), {}, ValueError, r"shape \(3,\).*\(2,\)"),
        (torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), {}, ValueError, "empty batch"),
        (torch.zeros(2, 0), torch.tensor([0, 1]), {}, ValueError, "empty vocabulary"),
        (torch.zeros(()), torch.tensor(0), {}, ValueError, "0-d"),
        (torch.zeros(2, 5), torch.tensor([0, 1]), {"vocab_size": 6}, ValueError, "last dimension is 5, but vocab_size is 6"),
    ],
)
def test_bad_inputs_raise(logits, targets, kwargs, error, match):
    with pytest.raises(error, match=match):
        check_logits_and_targets(logits, targets, **kwargs)
    if "vocab_size" not in kwargs:
        with pytest.raises(error, match=match):
            naive_cross_entropy(logits, targets, **kwargs)


def test_check_names_the_argument():
    with pytest.raises(ValueError, match="^labels holds 1 value"):
        check_logits_and_targets(torch.zeros(2, 5), torch.tensor([0, 7]), name="labels")


def test_softmax_rejects_integer_input():
    with pytest.raises(TypeError, match="floating-point"):
        naive_softmax(torch.tensor([1, 2]))
