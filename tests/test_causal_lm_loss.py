"""causal_lm_loss is bit-for-bit transformers' ForCausalLMLoss: loss and gradient, every rule and edge case."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from reference.causal_lm_loss import causal_lm_loss, shift_labels
from reference.logsumexp import cross_entropy

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same dtype, shape, device and bits (NaN payloads and the sign of zero included)."""
    assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
    assert torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype])), (a, b)


def loss_and_grad(fn, logits, labels, vocab_size, **kwargs):
    """Run ``fn`` on a fresh leaf copy of ``logits``; return the loss and ``logits.grad``."""
    leaf = logits.detach().clone().requires_grad_()
    loss = fn(leaf, labels, vocab_size, **kwargs)
    loss.backward()
    return loss.detach(), leaf.grad


def assert_matches_transformers(logits, labels, vocab_size, **kwargs):
    ours, our_grad = loss_and_grad(causal_lm_loss, logits, labels, vocab_size, **kwargs)
    ref, ref_grad = loss_and_grad(ForCausalLMLoss, logits, labels, vocab_size, **kwargs)
    assert_bitwise_equal(ours, ref)
    assert_bitwise_equal(our_grad, ref_grad)
    return ours, our_grad


def random_case(seed: int, device: str):
    """Random shapes, dtype, ignored fraction, count kind and shift_labels use."""
    gen = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    batch, seq, vocab = pick([1, 2, 3]), pick([1, 2, 5, 17]), pick([2, 7, 64, 1000])
    dtype = pick([torch.float32, torch.float32, torch.bfloat16, torch.float16])
    scale = pick([0.1, 1.0, 10.0, 30.0])
    logits = (torch.randn(batch, seq, vocab, generator=gen) * scale).to(dtype).to(device)
    labels = torch.randint(vocab, (batch, seq), generator=gen)
    labels[torch.rand(batch, seq, generator=gen) < pick([0.0, 0.3, 0.9])] = -100
    kwargs = {}
    if pick([False, True]):
        kwargs["shift_labels"] = shift_labels(labels)
        labels = pick([labels, None])
    count = int((shift_labels(labels) if labels is not None else kwargs["shift_labels"]).ne(-100).sum())
    kwargs["num_items_in_batch"] = pick(
        [None, count, count + 3, torch.tensor(count), torch.tensor(float(count + 1)), torch.tensor(count + 2, device=device)]
    )
    if pick([False, True]):
        kwargs.update(label_smoothing=0.2, reduction="none", cu_seq_lens_q=torch.tensor([0, seq]), seq_idx=None)
    if labels is not None:
        labels = labels.to(pick(DEVICES))
    return logits, labels, vocab, kwargs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(60))
def test_random_cases_bit_exact(seed, device):
    logits, labels, vocab, kwargs = random_case(seed, device)
    loss, _ = assert_matches_transformers(logits, labels, vocab, **kwargs)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.device == logits.device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_model_sized_rows_bit_exact(dtype, device):
    # A vocabulary large enough for the vectorised reduction paths.
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 9, 5000, generator=gen) * 8).to(dtype).to(device)
    labels = torch.randint(5000, (2, 9), generator=gen)
    labels[1, 6:] = -100
    for count in (None, 13, torch.tensor(13)):
        assert_matches_transformers(logits, labels, 5000, num_items_in_batch=count)


def test_shift_labels_pads_then_shifts():
    labels = torch.tensor([[5, 6, 7, 8], [1, 2, -100, -100]])
    expected = torch.tensor([[6, 7, 8, -100], [2, -100, -100, -100]])
    assert torch.equal(shift_labels(labels), expected)
    assert torch.equal(shift_labels(labels, ignore_index=-1), torch.tensor([[6, 7, 8, -1], [2, -100, -100, -1]]))
    assert torch.equal(shift_labels(torch.tensor([3, 4])), torch.tensor([4, -100]))
    out = shift_labels(labels.int())
    assert out.dtype == torch.int64 and torch.equal(out, expected)


def test_all_rows_stay_and_last_is_ignored():
    # Loss with the last position of each row's logits set to garbage: unchanged,
    # because that row's target is ignore_index.
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(11, (2, 5))
    spoiled = logits.clone()
    spoiled[:, -1] = 1e30
    assert torch.equal(causal_lm_loss(spoiled, labels, 11), causal_lm_loss(logits, labels, 11))
    # ... and the first label is never a target.
    other = labels.clone()
    other[:, 0] = (labels[:, 0] + 1) % 11
    assert torch.equal(causal_lm_loss(logits, other, 11), causal_lm_loss(logits, labels, 11))


def test_shift_labels_argument_used_as_is():
    logits = torch.randn(2, 6, 13)
    labels = torch.randint(13, (2, 6))
    given = torch.randint(13, (2, 6))  # not a shift of labels
    with_labels, _ = assert_matches_transformers(logits, labels, 13, shift_labels=given)
    without_labels, _ = assert_matches_transformers(logits, None, 13, shift_labels=given)
    assert torch.equal(with_labels, without_labels)
    assert not torch.equal(with_labels, causal_lm_loss(logits, labels, 13))


def test_unknown_kwargs_change_nothing():
    logits = torch.randn(2, 7, 20)
    labels = torch.randint(20, (2, 7))
    plain = causal_lm_loss(logits, labels, 20)
    noisy, _ = assert_matches_transformers(
        logits, labels, 20, label_smoothing=0.5, reduction="sum", cu_seq_lens_q=torch.tensor([0, 3, 7]),
        seq_idx=torch.zeros(1, 14), output_attentions=True,
    )
    assert torch.equal(noisy, plain)


@pytest.mark.parametrize("count", [1, 5, 1000, torch.tensor(5), torch.tensor(5.0), torch.tensor(7.5, dtype=torch.float64)])
def test_count_divides_the_sum_literally(count):
    logits = torch.randn(3, 4, 30)
    labels = torch.randint(30, (3, 4))
    loss, _ = assert_matches_transformers(logits, labels, 30, num_items_in_batch=count)
    total = torch.nn.functional.cross_entropy(logits.view(-1, 30), shift_labels(labels).view(-1), reduction="sum")
    assert_bitwise_equal(loss, total / count)


def test_count_is_not_recounted():
    logits = torch.randn(1, 6, 9)
    labels = torch.randint(9, (1, 6))
    by_5 = causal_lm_loss(logits, labels, 9, num_items_in_batch=5)  # the right count
    by_6 = causal_lm_loss(logits, labels, 9, num_items_in_batch=6)  # the unshifted count
    assert torch.allclose(by_5 * 5, by_6 * 6) and not torch.equal(by_5, by_6)


# The edge cases of ForCausalLMLoss, reproduced: (labels, count, expected loss).
EDGE_CASES = {
    "all ignored, no count": ("ignored", None, math.nan),
    "all ignored, int count": ("ignored", 4, 0.0),
    "all ignored, tensor count": ("ignored", torch.tensor(4), 0.0),
    "all ignored, count 0": ("ignored", 0, math.nan),
    "all ignored, tensor count 0": ("ignored", torch.tensor(0), math.nan),
    "valid targets, count 0": ("valid", 0, math.inf),
    "valid targets, tensor count 0": ("valid", torch.tensor(0), math.inf),
    "one sequence of length 1": ("length1", None, math.nan),
}


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_cases(name):
    kind, count, expected = EDGE_CASES[name]
    logits = torch.randn(1, 1, 10) if kind == "length1" else torch.randn(2, 4, 10)
    labels = torch.full(logits.shape[:-1], -100) if kind == "ignored" else torch.randint(10, logits.shape[:-1])
    loss, grad = assert_matches_transformers(logits, labels, 10, num_items_in_batch=count)
    if math.isnan(expected):
        assert torch.isnan(loss)
    else:
        assert loss.item() == expected
    if kind != "valid":
        # No target contributes: the gradient is finite and exactly zero, even for a NaN loss.
        assert torch.equal(grad, torch.zeros_like(grad))


def test_noncontiguous_logits_flatten_row_major():
    # transformers' .view raises here; the values are those of a contiguous copy.
    logits = torch.randn(5, 2, 17).transpose(0, 1)
    labels = torch.randint(17, (2, 5))
    assert not logits.is_contiguous()
    assert_bitwise_equal(causal_lm_loss(logits, labels, 17), ForCausalLMLoss(logits.contiguous(), labels, 17))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_narrow_integer_labels(dtype):
    # transformers needs int64 (F.cross_entropy); any integer width gives the int64 result.
    logits = torch.randn(2, 5, 40)
    labels = torch.randint(40, (2, 5))
    assert_bitwise_equal(causal_lm_loss(logits, labels.to(dtype), 40), ForCausalLMLoss(logits, labels, 40))


def test_float64_logits_rounded_to_float32():
    logits = torch.randn(2, 5, 40, dtype=torch.float64)
    labels = torch.randint(40, (2, 5))
    loss, grad = assert_matches_transformers(logits, labels, 40)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float64


def test_stable_cross_entropy_agrees_within_rounding():
    logits = torch.randn(3, 16, 500) * 6
    labels = torch.randint(500, (3, 16))
    labels[0, 9:] = -100
    ours = causal_lm_loss(logits, labels, 500)
    ref = cross_entropy(logits.view(-1, 500), shift_labels(labels).view(-1))
    torch.testing.assert_close(ours, ref, rtol=16 * torch.finfo(torch.float32).eps, atol=0)


def test_model_loss_reproduced():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    input_ids = torch.randint(300, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    attention_mask[2, 4:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert_bitwise_equal(out.loss, causal_lm_loss(out.logits, labels, config.vocab_size))
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, num_items_in_batch=torch.tensor(17))
    assert_bitwise_equal(out.loss, causal_lm_loss(out.logits, labels, config.vocab_size, num_items_in_batch=torch.tensor(17)))


@pytest.mark.parametrize(
    "logits, labels, kwargs, error, match",
    [
        # Every label is checked, the first one too (it is never a target, but it is wrong).
        (torch.zeros(1, 3, 8), torch.tensor([[8, 1, 2]]), {}, ValueError, r"^labels holds 1 value\(s\) outside \[0, 8\)"),
        (torch.zeros(1, 3, 8), torch.tensor([[1, 2, -1]]), {}, ValueError, r"not ignore_index=-100, e\.g\. -1"),
        (torch.zeros(1, 3, 8), torch.tensor([[1, 2, -100]]), {"ignore_index": -1}, ValueError, "e.g. -100"),
        (torch.zeros(1, 3, 8), None, {"shift_labels": torch.tensor([[1, 99, -100]])}, ValueError, "^shift_labels holds"),
        (torch.zeros(1, 3, 8), torch.tensor([[1, 2, 3]]), {"vocab_size": 9}, ValueError, "last dimension is 8, but vocab_size is 9"),
        (torch.zeros(1, 3, 8), torch.tensor([[1, 2]]), {}, ValueError, r"labels has shape \(1, 2\).*\(1, 3\)"),
        (torch.zeros(1, 3, 8), torch.tensor([1, 2, 3]), {}, ValueError, r"labels has shape \(3,\)"),
        (torch.zeros(1, 3, 8), None, {"shift_labels": torch.tensor([1, 2, 3])}, ValueError, r"shift_labels has shape"),
        (torch.zeros(1, 3, 8), torch.tensor([[1.0, 2.0, 3.0]]), {}, TypeError, "labels must hold integer class indices"),
        (torch.zeros(1, 3, 8), torch.tensor([[True, False, True]]), {}, TypeError, "integer class indices"),
        (torch.zeros(1, 3, 8), None, {}, TypeError, "labels must be a torch.Tensor, got NoneType"),
        (torch.zeros(1, 3, 8, dtype=torch.long), torch.tensor([[1, 2, 3]]), {}, TypeError, "logits must be floating point"),
        (torch.zeros(0, 3, 8), torch.zeros(0, 3, dtype=torch.long), {}, ValueError, "empty batch"),
        (torch.zeros(2, 0, 8), torch.zeros(2, 0, dtype=torch.long), {}, ValueError, "empty batch"),
    ],
)
def test_bad_inputs_raise(logits, labels, kwargs, error, match):
    kwargs = {"vocab_size": 8, **kwargs}
    with pytest.raises(error, match=match):
        causal_lm_loss(logits, labels, **kwargs)


def test_shift_labels_bad_inputs():
    with pytest.raises(TypeError, match="integer class indices"):
        shift_labels(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="sequence dimension"):
        shift_labels(torch.tensor(3))
