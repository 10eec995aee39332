"""fused.hf.transform: the head-to-loss transform identified from probe logits alone."""

from __future__ import annotations

import pytest
import torch
from transformers import GraniteConfig

from fused.hf.transform import LogitTransform, UnsupportedTransform, fit_transform, numeric_constants, probe_logits


@pytest.fixture
def x() -> torch.Tensor:
    return probe_logits((2, 8, 50), torch.Generator().manual_seed(0))


def gemma_softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """As Gemma 2 writes it: divide, tanh, multiply."""
    return torch.tanh(logits / cap) * cap


SCALE, INVERSE, CAP, MULTIPLIER = (
    "config.logit_scale",
    "1/config.logits_scaling",
    "config.final_logit_softcapping",
    "config.output_multiplier",
)


@pytest.mark.parametrize(
    ("model_transform", "constants", "expected"),
    [
        (lambda x: x, {}, LogitTransform()),
        (lambda x: x * 0.0625, {SCALE: 0.0625}, LogitTransform(0.0625, sources=(("logit_scale", SCALE),))),
        (lambda x: x / 8.0, {INVERSE: 1 / 8.0}, LogitTransform(1 / 8.0, sources=(("logit_scale", INVERSE),))),
        (lambda x: gemma_softcap(x, 30.0), {CAP: 30.0}, LogitTransform(None, 30.0, sources=(("softcap", CAP),))),
        (
            lambda x: gemma_softcap(x * 0.2, 15.0),
            {MULTIPLIER: 0.2, CAP: 15.0},
            LogitTransform(0.2, 15.0, sources=(("logit_scale", MULTIPLIER), ("softcap", CAP))),
        ),
    ],
    ids=["identity", "logit_scale", "logits_scaling", "softcap", "multiplier-then-softcap"],
)
def test_the_exact_config_constant_is_found(x, model_transform, constants, expected):
    transform = fit_transform(x, model_transform(x.clone()), constants)
    assert transform == expected
    assert torch.allclose(transform.apply(x), model_transform(x), rtol=1e-6)


def test_vocabulary_slice_and_a_constant_the_config_lacks(x):
    transform = fit_transform(x, gemma_softcap(x[..., :40], 7.5), {})
    assert (transform.vocab, transform.softcap, transform.logit_scale) == (40, 7.5, None)
    assert transform.describe() == ("softcap=7.5 (fitted)", "vocab[:40] (40 of the head's 50 columns)")


def test_numeric_constants_name_config_values_and_their_inverses():
    constants = numeric_constants(GraniteConfig(logits_scaling=4.0))
    assert constants["config.logits_scaling"] == 4.0 and constants["1/config.logits_scaling"] == 0.25
    names = list(constants)
    assert names.index("config.logits_scaling") < names.index("config.hidden_size")  # likely names tried first


@pytest.mark.parametrize(
    ("model_transform", "message"),
    [
        (lambda x: torch.cat([torch.full_like(x[..., :2], -1e4), x[..., 2:]], dim=-1), "not an increasing|not softcap"),
        (lambda x: x[..., 5:], "not softcap"),  # a slice that is not a prefix
        (lambda x: torch.sign(x) * x.abs().sqrt(), "not softcap"),
        (lambda x: x.to(torch.bfloat16), "bfloat16"),
        (lambda x: torch.exp(x), "non-finite|not softcap"),
    ],
    ids=["masked-columns", "suffix", "sqrt", "downcast", "exp"],
)
def test_anything_else_is_refused(x, model_transform, message):
    with pytest.raises(UnsupportedTransform, match=message):
        fit_transform(x, model_transform(x.clone()), {})
