"""The contract, reference.linear_cross_entropy, against torch and transformers on materialised logits.

The contract computes ``lse - z_y`` where torch computes ``-log_softmax(z)_y`` and sums the
reduction in its own order, so the two agree to rounding, not bit for bit (measured over
450 random cases: a third bit-identical, the rest within 5.4e-7 relative). Held to:
per-token losses within 4 ulps of ``max|z| + log V`` (the size of the intermediates, as in
tests/test_logsumexp.py), reduced losses rtol 2e-6, gradients rtol 1e-5 with atol
1e-6 * max|expected|. Where both sides run the same operations (the shift, the division
by a count) the test is bit-exact.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from problems import IGNORE, make_problem
from reference.linear_cross_entropy import LossArguments, LossOptions, linear_cross_entropy, prepare_inputs

EPS32 = torch.finfo(torch.float32).eps


def grads_of(loss, *inputs):
    return torch.autograd.grad(loss.sum(), [t for t in inputs if t is not None])


def assert_loss_close(actual, expected, logits):
    assert actual.dtype == expected.dtype == torch.float32 and actual.shape == expected.shape
    if actual.dim() == 0:
        torch.testing.assert_close(actual, expected, rtol=2e-6, atol=0, equal_nan=True)
    else:
        bound = 4 * EPS32 * (logits.abs().amax(-1) + math.log(logits.shape[-1]))
        assert ((actual - expected).abs() <= bound).all()


def assert_grads_close(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6 * e.abs().max().item())


def transformed_logits(hidden, weight, bias, softcap=None, logit_scale=None):
    """The logits as a model head builds them: linear in the inputs' dtype, upcast, scale, cap."""
    z = F.linear(hidden, weight, bias).float()
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z


# ---- torch's cross entropy on materialised logits ---------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_cross_entropy(reduction, label_smoothing, bias):
    hidden, weight, b, labels = make_problem((3, 7), 8, 29, bias=bias, seed=1)
    ours = linear_cross_entropy(hidden, weight, labels, bias=b, reduction=reduction, label_smoothing=label_smoothing)
    logits = transformed_logits(hidden, weight, b)
    ref = F.cross_entropy(logits.reshape(-1, 29), labels.reshape(-1), ignore_index=IGNORE,
                          reduction=reduction, label_smoothing=label_smoothing)
    ref = ref.reshape(labels.shape) if reduction == "none" else ref
    assert_loss_close(ours, ref, logits)
    assert_grads_close(grads_of(ours, hidden, weight, b), grads_of(ref, hidden, weight, b))


@pytest.mark.parametrize("ignore_index", [-1, 0, 5])
def test_other_ignore_index(ignore_index):
    # An ignore_index inside [0, V) ignores that class: those labels are not targets.
    hidden, weight, _, labels = make_problem((20,), 8, 11, ignore_frac=0.0, seed=2)
    labels[::3] = ignore_index
    ours = linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index, reduction="none")
    logits = transformed_logits(hidden, weight, None)
    ref = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    assert_loss_close(ours, ref, logits)
    assert torch.equal(ours[::3], torch.zeros(7))


@pytest.mark.parametrize(
    "transform",
    [{"softcap": 2.5}, {"logit_scale": 0.0625}, {"logit_scale": 2.0, "softcap": 4.0}],
    ids=["softcap", "logit_scale", "scale_then_softcap"],
)
def test_transforms_match_model_heads(transform):
    # gemma-style tanh(z / c) * c, cohere-style z * s, and their composition in that order.
    hidden, weight, b, labels = make_problem((2, 8), 8, 31, bias=True, seed=3)
    ours, lse = linear_cross_entropy(hidden, weight, labels, bias=b, return_lse=True, **transform)
    logits = transformed_logits(hidden, weight, b, **transform)
    ref = F.cross_entropy(logits.reshape(-1, 31), labels.reshape(-1), ignore_index=IGNORE)
    assert_loss_close(ours, ref, logits)
    assert torch.equal(lse, torch.logsumexp(logits, -1))
    assert_grads_close(grads_of(ours, hidden, weight, b), grads_of(ref, hidden, weight, b))


def test_granite_division_matches_to_rounding():
    # Granite divides by logits_scaling; the contract multiplies by logit_scale = 1 / d.
    hidden, weight, _, labels = make_problem((16,), 8, 23, seed=4)
    logits = F.linear(hidden, weight).float() / 3.0
    ref = F.cross_entropy(logits, labels, ignore_index=IGNORE)
    assert_loss_close(linear_cross_entropy(hidden, weight, labels, logit_scale=1 / 3.0), ref, logits)


def test_z_loss_is_added_per_valid_token():
    hidden, weight, b, labels = make_problem((3, 5), 8, 17, bias=True, seed=5)
    ours = linear_cross_entropy(hidden, weight, labels, bias=b, z_loss=0.01, reduction="none")
    logits = transformed_logits(hidden, weight, b)
    valid = labels != IGNORE
    ce = F.cross_entropy(logits.reshape(-1, 17), labels.reshape(-1), ignore_index=IGNORE, reduction="none")
    ref = torch.where(valid, ce.reshape(3, 5) + 0.01 * torch.logsumexp(logits, -1) ** 2, 0.0)
    assert_loss_close(ours, ref, logits)
    mean = linear_cross_entropy(hidden, weight, labels, bias=b, z_loss=0.01)
    torch.testing.assert_close(mean, ours.sum() / valid.sum(), rtol=2e-6, atol=0)


def test_reduction_none_shape_and_lse():
    hidden, weight, _, labels = make_problem((2, 6), 8, 13, seed=6)
    loss, lse = linear_cross_entropy(hidden, weight, labels, reduction="none", return_lse=True)
    logits = transformed_logits(hidden, weight, None)
    assert loss.shape == lse.shape == labels.shape and loss.dtype == lse.dtype == torch.float32
    assert torch.equal(loss[labels == IGNORE], torch.zeros(int((labels == IGNORE).sum())))
    # lse is defined for every row, ignored ones included.
    assert torch.equal(lse, torch.logsumexp(logits, -1))


# ---- transformers' ForCausalLMLoss ------------------------------------------------------


@pytest.mark.parametrize("count", [None, 9, 9.0, torch.tensor(9), torch.tensor(9.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_for_causal_lm_loss(count, dtype):
    hidden, weight, _, labels = make_problem((3, 10), 16, 41, dtype=dtype, seed=7)
    ours = linear_cross_entropy(hidden, weight, labels, shift=True, num_items_in_batch=count)
    logits = F.linear(hidden, weight)  # the model's lm_head, in the model's dtype
    ref = ForCausalLMLoss(logits, labels, 41, num_items_in_batch=count)
    assert_loss_close(ours, ref, logits.float())
    assert_grads_close(grads_of(ours, hidden, weight), grads_of(ref, hidden, weight))


@pytest.mark.parametrize("ignore_index", [IGNORE, -1])
def test_shift_is_transformers_pad_and_shift(ignore_index):
    hidden, weight, b, labels = make_problem((3, 8), 8, 19, bias=True, seed=8)
    labels[labels == IGNORE] = ignore_index
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()
    kwargs = {"bias": b, "ignore_index": ignore_index, "reduction": "none"}
    ours = linear_cross_entropy(hidden, weight, labels, shift=True, **kwargs)
    # Bit-exact: shifting the labels is the only difference between the two calls.
    assert torch.equal(ours, linear_cross_entropy(hidden, weight, shifted, **kwargs))
    assert torch.equal(ours[:, -1], torch.zeros(3))  # the last row of every sequence
    # Every logit row stays; labels[:, 0] is never a target; nothing crosses sequences.
    changed = labels.clone()
    changed[:, 0] = (labels[:, 0] + 1) % 19
    assert torch.equal(ours, linear_cross_entropy(hidden, weight, changed, shift=True, **kwargs))
    mean = linear_cross_entropy(hidden, weight, labels, shift=True, bias=b, ignore_index=ignore_index)
    ref = ForCausalLMLoss(F.linear(hidden, weight, b), labels, 19, ignore_index=ignore_index)
    assert_loss_close(mean, ref, F.linear(hidden, weight, b).float())
    pre_shifted = ForCausalLMLoss(
        F.linear(hidden, weight, b), None, 19, ignore_index=ignore_index, shift_labels=shifted
    )
    assert torch.equal(ref, pre_shifted)


def test_count_divides_literally():
    hidden, weight, _, labels = make_problem((2, 9), 8, 13, seed=9)
    total = linear_cross_entropy(hidden, weight, labels, shift=True, reduction="sum")
    for count in (7, 7.5, torch.tensor(7), torch.tensor(7.0)):
        assert torch.equal(linear_cross_entropy(hidden, weight, labels, shift=True, num_items_in_batch=count),
                           total / count)


def test_tiny_llama_end_to_end():
    # The model's own loss (lm_head on the final hidden states, tied embeddings) and ours.
    torch.manual_seed(10)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    input_ids = torch.randint(0, 64, (2, 12))
    labels = input_ids.clone()
    labels[0, :4] = IGNORE
    for count in (None, torch.tensor(17)):
        out = model(input_ids, labels=labels, num_items_in_batch=count, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        assert model.lm_head.weight is model.model.embed_tokens.weight
        ours = linear_cross_entropy(hidden, model.lm_head.weight, labels, shift=True, num_items_in_batch=count)
        assert_loss_close(ours, out.loss, out.logits.float())
        ref_grad = torch.autograd.grad(out.loss, model.lm_head.weight, retain_graph=True)[0]
        our_grad = torch.autograd.grad(ours, model.lm_head.weight)[0]
        assert_grads_close([our_grad], [ref_grad])


# ---- transformers' edge cases -----------------------------------------------------------


@pytest.mark.parametrize(
    ("all_ignored", "count", "expected"),
    [(True, None, math.nan), (True, 4, 0.0), (True, 0, math.nan), (False, 0, math.inf)],
)
def test_edge_cases_as_transformers(all_ignored, count, expected):
    hidden, weight, _, labels = make_problem((2, 5), 8, 11, ignore_frac=1.1 if all_ignored else 0.0, seed=11)
    ours = linear_cross_entropy(hidden, weight, labels, shift=True, num_items_in_batch=count)
    ref = ForCausalLMLoss(F.linear(hidden, weight), labels, 11, num_items_in_batch=count)
    assert ours.item() == expected or (math.isnan(expected) and math.isnan(ours.item()))
    assert torch.equal(ours, ref) or (ours.isnan() and ref.isnan())
    if all_ignored:
        # NaN or zero loss, but a zero (finite) gradient, as in transformers.
        for g in grads_of(ours, hidden, weight):
            assert torch.equal(g, torch.zeros_like(g))


def test_float64_inputs_give_a_float32_loss():
    # transformers upcasts with logits.float(), which is a downcast for float64.
    hidden, weight, _, labels = make_problem((2, 5), 8, 11, dtype=torch.float64, seed=12)
    loss = linear_cross_entropy(hidden, weight, labels)
    assert loss.dtype == torch.float32
    logits = F.linear(hidden, weight)
    assert_loss_close(loss, ForCausalLMLoss(logits, None, 11, shift_labels=labels), logits.float())
    assert all(g.dtype == torch.float64 for g in grads_of(loss, hidden, weight))


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int16, torch.uint8, torch.int8])
def test_integer_label_dtypes(label_dtype):
    hidden, weight, _, labels = make_problem((2, 5), 8, 11, ignore_frac=0.0, seed=13)
    assert torch.equal(linear_cross_entropy(hidden, weight, labels.to(label_dtype)),
                       linear_cross_entropy(hidden, weight, labels))


# ---- bad inputs -------------------------------------------------------------------------


H, W, L = torch.zeros(2, 5, 8), torch.zeros(11, 8), torch.zeros(2, 5, dtype=torch.long)


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"hidden": [[0.0]]}, TypeError, "hidden must be a torch.Tensor, got list"),
        ({"weight": None}, TypeError, "weight must be a torch.Tensor, got NoneType"),
        ({"hidden": H.long()}, TypeError, r"hidden must be a floating tensor .* got torch.int64"),
        ({"weight": W.double()}, TypeError, "weight dtype torch.float64 does not match hidden dtype torch.float32"),
        ({"labels": L.float()}, TypeError, "labels must be an integer tensor, got torch.float32"),
        ({"labels": L.bool()}, TypeError, "labels must be an integer tensor, got torch.bool"),
        ({"hidden": H[0, 0], "labels": L[0, 0]}, ValueError, r"hidden must be \(N, D\) .* got shape \(8,\)"),
        ({"hidden": H[None], "labels": L[None]}, ValueError, r"hidden must be \(N, D\) or \(B, T, D\)"),
        ({"weight": torch.zeros(11, 7)}, ValueError, r"weight must be \(V, D\) with D = hidden.shape\[-1\] = 8"),
        ({"weight": torch.zeros(0, 8)}, ValueError, r"weight has an empty vocabulary \(V = 0\)"),
        ({"labels": L[:, :4]}, ValueError, r"labels shape \(2, 4\) does not match hidden's leading shape \(2, 5\)"),
        ({"hidden": H[:, :0], "labels": L[:, :0]}, ValueError, "empty batch"),
        ({"bias": [0.0] * 11}, TypeError, "bias must be a torch.Tensor or None, got list"),
        ({"bias": torch.zeros(10)}, ValueError, r"bias must be \(V,\) = \(11,\), got \(10,\)"),
        ({"bias": torch.zeros(11).double()}, TypeError, "bias dtype torch.float64 does not match"),
        ({"hidden": H.to("meta")}, ValueError, "hidden, weight and bias must share one device"),
        ({"labels": L + 11}, ValueError, r"labels must lie in \[0, 11\) or equal ignore_index=-100; found 11"),
        ({"labels": L - 1}, ValueError, r"labels must lie in \[0, 11\) or equal ignore_index=-100; found -1"),
        ({"reduction": "none", "num_items_in_batch": 3}, ValueError, "cannot be used with reduction='none'"),
        ({"num_items_in_batch": torch.tensor([3, 4])}, ValueError, r"num_items_in_batch must be a scalar"),
        ({"num_items_in_batch": True}, TypeError, "num_items_in_batch must be an int or a 0-d tensor, got bool"),
        ({"num_items_in_batch": "3"}, TypeError, "num_items_in_batch must be an int or a 0-d tensor, got str"),
        ({"reduction": "avg"}, ValueError, r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"),
        ({"ignore_index": -100.0}, TypeError, "ignore_index must be an int, got float"),
        ({"ignore_index": True}, TypeError, "ignore_index must be an int, got bool"),
        ({"label_smoothing": -0.1}, ValueError, r"label_smoothing must lie in \[0, 1\], got -0.1"),
        ({"label_smoothing": 1.5}, ValueError, r"label_smoothing must lie in \[0, 1\], got 1.5"),
        ({"softcap": 0.0}, ValueError, "softcap must be positive"),
        ({"softcap": math.nan}, ValueError, "softcap must be positive"),
        ({"logit_scale": 0.0}, ValueError, "logit_scale must be finite and non-zero"),
        ({"logit_scale": math.inf}, ValueError, "logit_scale must be finite and non-zero"),
        ({"z_loss": -1e-4}, ValueError, "z_loss must be >= 0"),
        ({"z_loss": math.nan}, ValueError, "z_loss must be >= 0"),
    ],
)
def test_bad_inputs(changes, error, message):
    hidden, weight, labels = changes.pop("hidden", H), changes.pop("weight", W), changes.pop("labels", L)
    with pytest.raises(error, match=message):
        linear_cross_entropy(hidden, weight, labels, **changes)


@pytest.mark.parametrize("shift", [False, True])
def test_every_label_is_checked_even_one_that_is_no_target(shift):
    labels = L.clone()
    labels[0, 0] = 12  # a first label: not a target after the shift, still checked
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 11\) or equal ignore_index=-100; found 12"):
        prepare_inputs(H, W, labels, LossArguments(shift=shift))


def test_options_are_validated_on_their_own():
    assert LossOptions().reduction == "mean"
    with pytest.raises(ValueError, match="reduction must be one of"):
        LossOptions(reduction="max")


def test_every_version_takes_the_contracts_keywords():
    # One declaration (LossArguments) gives the contract, the chunked reference and the fused
    # op the same keywords and defaults, each followed by its own knobs; a misspelt keyword
    # is an error, not silently dropped.
    import inspect

    from fused import linear_cross_entropy as fused_loss
    from reference.chunked_cross_entropy import chunked_linear_cross_entropy

    shared = list(LossArguments._field_defaults.items())
    for fn in (linear_cross_entropy, chunked_linear_cross_entropy, fused_loss):
        parameters = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in parameters[:3]] == ["hidden", "weight", "labels"]
        assert [(p.name, p.default) for p in parameters[3 : 3 + len(shared)]] == shared
        with pytest.raises(TypeError, match="unexpected keyword argument 'reduce'"):
            fn(H, W, L, reduce="sum")
