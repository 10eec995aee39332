"""The per-token outputs RL and distillation trainers ask of a language-model head (TRL's
``fused_lm_head=True`` calls): for each position, statistics of the next-token distribution.

Per token ``i`` with head output ``x_i = hidden_i @ weight.T (+ bias)`` and target ``y_i``, the
logits are transformed as TRL does, in float32:

    z_i = softcap * tanh(logit_scale * x_i / softcap) / temperature   (without softcap: logit_scale * x_i / temperature)
    p_i = softmax(z_i)

and the outputs are

    log_probs_i        = log p_iy = z_iy - logsumexp(z_i)            differentiable
    entropy_i          = -sum_v p_iv log p_iv = logsumexp(z_i) - sum_v p_iv z_iv   differentiable
    log_sum_sq_probs_i = log sum_v p_iv^2                             no gradient
    mean_logits_i      = mean_v z_iv                                  no gradient
    is_top1_i          = z_iy is the first maximum of z_i             (argmax's tie rule)

``log_probs`` is minus the cross entropy of ``z_i`` (``reduction='none'``), which is what the
fused loss computes; the temperature folds into its options (``per_token_transform``). The
gradient of the entropy with respect to the logits is ``d entropy_i / d z_iv = p_iv (lse_i -
z_iv - entropy_i)``; autograd derives it here.

``per_token_outputs`` computes rows in chunks, each under activation checkpointing, so only
one chunk's ``(rows, V)`` logits exist at a time in the forward and the backward: readable,
and light enough to serve training on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@dataclass(frozen=True)
class PerTokenOutputs:
    """Each field ``(N,)`` float32 (``is_top1`` bool), or None when not asked for."""

    log_probs: Tensor | None = None
    entropy: Tensor | None = None
    log_sum_sq_probs: Tensor | None = None
    mean_logits: Tensor | None = None
    is_top1: Tensor | None = None


def per_token_transform(
    temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0
) -> tuple[float, float | None]:
    """``(logit_scale', softcap')`` with ``softcap' * tanh(logit_scale' * x / softcap')`` equal to
    TRL's ``softcap * tanh(logit_scale * x / softcap) / temperature``: the temperature divides
    both constants (``c/T * tanh((s/T) x / (c/T)) = c tanh(s x / c) / T``)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return logit_scale / temperature, None if softcap is None else softcap / temperature


def transformed_logits(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> Tensor:
    """``z``: float32 ``(N, V)`` from ``hidden (N, D)``, ``weight (V, D)``, ``bias (V,)``, in TRL's order."""
    x = hidden @ weight.T
    if bias is not None:
        x = x + bias
    z = x.float() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def entropy(log_p: Tensor) -> Tensor:
    """``-sum_v p_v log p_v`` over the last dimension of log-probabilities ``log_p (..., V)``:
    the entropy, differentiable (the fused kernel computes it as ``lse - sum_v p_v z_v`` from
    its row statistics and its gradient in the closed form of the module docstring)."""
    return -(log_p.exp() * log_p).sum(-1)


def _row_outputs(z: Tensor, targets: Tensor) -> tuple[Tensor, ...]:
    """The five outputs of float32 logits ``z (n, V)`` and ``targets (n,)`` (see the module docstring)."""
    log_p = torch.log_softmax(z, dim=-1)
    target_z = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    log_probs = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    log_sum_sq_probs = torch.logsumexp(2 * log_p.detach(), dim=-1)
    mean_logits = z.detach().mean(-1)
    before = torch.arange(z.shape[-1], device=z.device) < targets.unsqueeze(-1)
    max_before = z.detach().masked_fill(~before, float("-inf")).amax(-1)
    is_top1 = (target_z.detach() >= z.detach().amax(-1)) & (target_z.detach() > max_before)
    return log_probs, entropy(log_p), log_sum_sq_probs, mean_logits, is_top1


def per_token_outputs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    outputs: tuple[str, ...] = OUTPUTS,
    chunk_size: int = 1024,
) -> PerTokenOutputs:
    """The per-token outputs named in ``outputs`` for ``hidden (N, D)``, ``weight (V, D)``,
    ``targets (N,)`` int64 in ``[0, V)`` (no ignored tokens: select the valid rows first), with
    TRL's ``temperature``, ``softcap`` and ``logit_scale``. Rows go ``chunk_size`` at a time,
    each chunk checkpointed (its logits recomputed in the backward)."""
    unknown = set(outputs) - set(OUTPUTS)
    if unknown:
        raise ValueError(f"unknown outputs {sorted(unknown)}; choose among {OUTPUTS}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets of shape {tuple(targets.shape)} for hidden of shape {tuple(hidden.shape)}")
    if targets.numel() and not (0 <= int(targets.min()) and int(targets.max()) < weight.shape[0]):
        raise ValueError(f"targets must lie in [0, {weight.shape[0]})")
    options = dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale)

    def chunk(h: Tensor, w: Tensor, b: Tensor | None, y: Tensor) -> tuple[Tensor, ...]:
        return _row_outputs(transformed_logits(h, w, b, **options), y)

    rows = range(0, max(hidden.shape[0], 1), chunk_size)  # one empty chunk when there are no rows
    pieces = [
        checkpoint(chunk, hidden[i : i + chunk_size], weight, bias, targets[i : i + chunk_size], use_reentrant=False)
        for i in rows
    ]
    columns = [torch.cat(column) for column in zip(*pieces)]
    return PerTokenOutputs(**{name: value for name, value in zip(OUTPUTS, columns) if name in outputs})
