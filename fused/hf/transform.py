"""Identify, by measurement, what a model does to its logits between the head and the loss.

Some heads change the logits before the cross entropy: a softcap ``c * tanh(z / c)``
(Gemma 2), a scale (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``), a scale then
a softcap (``output_multiplier``), a slice that drops padded vocabulary columns. The fused
kernel folds exactly two of these, ``logit_scale`` then ``softcap``, plus a slice of the
weight's rows, so any head transform has to be written in that form or refused.

The form is found from behaviour, not from the model's source: the probe feeds chosen
logits ``x`` in place of the head's output and records the ``y`` the model hands to its loss.
``x`` spans ten decades of magnitude, so the small entries reveal the slope ``s`` and the
huge ones saturate a softcap at ``|y| = c``, and then ``y = c * tanh(s * x / c)`` (or
``y = s * x``) is checked on every entry. Constants are taken from the config where one
matches the fitted value (so the kernel gets the exact number), else the fitted value is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fused.hf.config import config_leaves

# |x| spans 10**LOG10_MIN .. 10**LOG10_MAX: small enough that tanh(s x / c) is linear to
# fp32 precision, large enough to saturate any softcap c <= s * 1e5.
LOG10_MIN, LOG10_MAX = -4.0, 6.0
SLOPE_REGION = 1e-3
# y and the candidate transform are the same fp32 operations in a possibly different order.
MATCH_RTOL = 1e-5
# A config constant is taken for the fitted value when they agree this closely.
CONSTANT_RTOL = 1e-4


class UnsupportedTransform(ValueError):
    """The head-to-loss transform is not ``softcap(logit_scale * x)`` of a vocabulary prefix."""


@dataclass(frozen=True)
class LogitTransform:
    """``y = softcap * tanh(logit_scale * x[..., :vocab] / softcap)``; None fields are absent.

    ``vocab`` None keeps every column. ``sources`` names where each constant came from
    (``'config.final_logit_softcapping'``, ``'1/config.logits_scaling'`` or ``'fitted'``).
    """

    logit_scale: float | None = None
    softcap: float | None = None
    vocab: int | None = None
    sources: tuple[tuple[str, str], ...] = ()

    def apply(self, logits: Tensor) -> Tensor:
        """The transform of float32 logits ``(..., V)``, in the kernel's order."""
        if self.vocab is not None:
            logits = logits[..., : self.vocab]
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def describe(self) -> tuple[str, ...]:
        """One line per folded transform, e.g. ``'softcap=30.0 (config.final_logit_softcapping)'``."""
        sources = dict(self.sources)
        lines = []
        if self.logit_scale is not None:
            lines.append(f"logit_scale={self.logit_scale:g} ({sources['logit_scale']})")
        if self.softcap is not None:
            lines.append(f"softcap={self.softcap:g} ({sources['softcap']})")
        if self.vocab is not None:
            lines.append(f"vocab[:{self.vocab}] ({sources['vocab']})")
        return tuple(lines)


def probe_logits(shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str = "cpu") -> Tensor:
    """float32 logits of ``shape`` with random signs and log-uniform magnitudes in
    ``[10**LOG10_MIN, 10**LOG10_MAX]``: the input ``fit_transform`` needs."""
    exponent = torch.empty(shape).uniform_(LOG10_MIN, LOG10_MAX, generator=generator)
    sign = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    return (sign * torch.pow(10.0, exponent)).to(device)


def numeric_constants(config) -> dict[str, float]:
    """Every positive finite number in a transformers config, and its inverse, by name.

    Nested configs are walked (``config.text_config.logit_scale``). The names order the
    candidates: those that mention logits, caps, scales or multipliers come first.
    """
    found: dict[str, float] = {}
    for path, value in config_leaves(config):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            found.setdefault(path, float(value))
            found.setdefault(f"1/{path}", 1.0 / float(value))
    hints = ("logit", "softcap", "scal", "multiplier")
    return dict(sorted(found.items(), key=lambda item: not any(h in item[0].lower() for h in hints)))


def _matches(y: Tensor, expected: Tensor) -> bool:
    return bool(((y - expected).abs() <= MATCH_RTOL * expected.abs() + 1e-30).all())


def _candidates(value: float, constants: dict[str, float]) -> list[tuple[float, str]]:
    """``(constant, name)`` for the config constants within ``CONSTANT_RTOL`` of a fitted
    ``value``, then ``(value, 'fitted')``: the exact numbers to try, best first."""
    close = [(c, name) for name, c in constants.items() if math.isclose(c, value, rel_tol=CONSTANT_RTOL)]
    return close + [(value, "fitted")]


def fit_transform(x: Tensor, y: Tensor, constants: dict[str, float] | None = None) -> LogitTransform:
    """The ``LogitTransform`` with ``y == transform.apply(x)``, or ``UnsupportedTransform``.

    ``x``: float32 ``(..., V)`` from ``probe_logits``; ``y``: what the model made of it,
    ``(..., V')`` with ``V' <= V``. ``constants``: named candidate values (``numeric_constants``).
    """
    constants = constants or {}
    if y.dtype != torch.float32:
        raise UnsupportedTransform(f"the logits reaching the loss are {y.dtype}, float32 logits went in")
    if y.shape[:-1] != x.shape[:-1] or y.shape[-1] > x.shape[-1] or y.shape[-1] == 0:
        raise UnsupportedTransform(
            f"the logits reaching the loss have shape {tuple(y.shape)}, not a vocabulary prefix of {tuple(x.shape)}"
        )
    sources: dict[str, str] = {}
    vocab = None
    if y.shape[-1] < x.shape[-1]:
        vocab = y.shape[-1]
        sources["vocab"] = f"{vocab} of the head's {x.shape[-1]} columns"
        x = x[..., :vocab]
    x, y = x.detach().float(), y.detach()
    if not bool(torch.isfinite(y).all()):
        raise UnsupportedTransform("the logits reaching the loss hold non-finite values for finite head outputs")

    small = x.abs() <= SLOPE_REGION
    if int(small.sum()) < 8:
        raise UnsupportedTransform("the probe logits are too few to fit a slope; use a larger probe")
    slope = float((y[small] * x[small]).sum() / (x[small] * x[small]).sum())
    if not (math.isfinite(slope) and slope > 0):
        raise UnsupportedTransform(
            f"the logits reaching the loss are not an increasing function of the head's (slope {slope:g})"
        )
    scales = [(None, "")] if math.isclose(slope, 1.0, rel_tol=CONSTANT_RTOL) else _candidates(slope, constants)
    # Without a softcap y is s * x; with one, the huge entries of x saturate it at |y| = c.
    caps = [(None, "")] + _candidates(float(y.abs().max()), constants)
    for cap, cap_source in caps:
        for scale, scale_source in scales:
            named = {"logit_scale": scale_source, "softcap": cap_source}
            named = {key: source for key, source in named.items() if source}
            transform = LogitTransform(scale, cap, vocab, tuple(sorted((sources | named).items())))
            if _matches(y, transform.apply(x)):
                return transform
    raise UnsupportedTransform(
        "the logits reaching the loss are not softcap(logit_scale * head output) of a vocabulary prefix "
        f"(fitted slope {slope:g}, max |y| {float(y.abs().max()):g})"
    )
