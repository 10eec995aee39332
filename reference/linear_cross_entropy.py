"""Linear + cross entropy: the loss of ``hidden @ weight.T (+ bias)`` against labels.

This module is the definition the chunked path (``reference.chunked_cross_entropy``) and
the fused Triton kernel (``fused``) are held to. It materialises the full ``(N, V)`` logits
in float32 and lets autograd differentiate, so it is the slow, obviously-right version.

Per valid token ``i`` with target ``y`` and float32 logits ``z`` (after the optional
transforms ``z = softcap * tanh(logit_scale * x / softcap)``):

    lse_i  = log sum_j exp(z_ij)
    loss_i = (1 - eps) * (lse_i - z_iy) + eps * (lse_i - mean_j z_ij) + z_loss * lse_i**2

``eps`` is ``label_smoothing`` (torch's definition), ignored tokens contribute 0. The
reduction follows transformers: ``sum / num_items_in_batch`` when a count is given,
otherwise the mean over valid tokens (NaN when there are none, as in transformers).
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, get_type_hints

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.causal_lm_loss import shift_labels
from reference.logsumexp import REDUCTIONS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class LossOptions:
    """The options that change the value of the loss, validated once.

    ``logit_scale`` multiplies the logits before ``softcap`` (pass ``1 / d`` to divide by
    ``d``); ``softcap`` applies ``c * tanh(z / c)``; ``z_loss`` adds ``z_loss * lse**2``
    per valid token.
    """

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    softcap: float | None = None
    logit_scale: float | None = None
    z_loss: float = 0.0

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if not isinstance(self.ignore_index, int) or isinstance(self.ignore_index, bool):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1], got {self.label_smoothing}")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap must be positive (or None), got {self.softcap}")
        if self.logit_scale is not None and not (math.isfinite(self.logit_scale) and self.logit_scale != 0):
            raise ValueError(f"logit_scale must be finite and non-zero (or None), got {self.logit_scale}")
        if not self.z_loss >= 0:
            raise ValueError(f"z_loss must be >= 0, got {self.z_loss}")


class LossArguments(NamedTuple):
    """The keyword arguments of a linear cross entropy, declared once for every version of
    it (this contract, the chunked reference and the fused op): ``takes_loss_arguments``
    gives each function these keywords, with these defaults, in its signature."""

    bias: Tensor | None = None
    ignore_index: int = -100
    shift: bool = False
    reduction: str = "mean"
    num_items_in_batch: int | float | Tensor | None = None
    label_smoothing: float = 0.0
    softcap: float | None = None
    logit_scale: float | None = None
    z_loss: float = 0.0
    return_lse: bool = False

    def options(self) -> LossOptions:
        """The options that change the loss's value, validated."""
        return LossOptions(
            self.ignore_index, self.reduction, self.label_smoothing, self.softcap, self.logit_scale, self.z_loss
        )


def takes_loss_arguments(function: Callable) -> Callable:
    """Make ``function(hidden, weight, labels, arguments, *, <its own knobs>)`` callable as
    ``function(hidden, weight, labels, *, <LossArguments' keywords>, <its own knobs>)`` (the
    first three parameters under the function's own names), with
    that signature for ``help`` and ``inspect``, and Python's ``TypeError`` for an unknown
    keyword."""
    own = inspect.signature(function)
    positional = list(own.parameters.values())[:3]
    knobs = [p for p in own.parameters.values() if p.kind is p.KEYWORD_ONLY]
    hints = get_type_hints(LossArguments)
    shared = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=hints[name])
        for name, default in LossArguments._field_defaults.items()
    ]
    accepted = set(LossArguments._fields) | {p.name for p in knobs}

    @functools.wraps(function)
    def call(hidden, weight, labels, **keywords):
        unknown = keywords.keys() - accepted
        if unknown:
            raise TypeError(f"{function.__name__}() got an unexpected keyword argument {min(unknown)!r}")
        arguments = LossArguments(**{name: keywords.pop(name) for name in LossArguments._fields if name in keywords})
        return function(hidden, weight, labels, arguments, **keywords)

    call.__signature__ = own.replace(parameters=positional + shared + knobs)
    return call


def bad_labels(labels: Tensor, vocab: int, ignore_index: int) -> Tensor:
    """Boolean mask, shaped like ``labels``, of the values outside ``[0, vocab)`` that are not
    ``ignore_index``."""
    return (labels != ignore_index) & ((labels < 0) | (labels >= vocab))


def bad_label_error(first_bad: int, vocab: int, ignore_index: int) -> ValueError:
    """The error for a label value outside ``[0, vocab)`` that is not ``ignore_index``."""
    return ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found {first_bad}")


@dataclass(frozen=True)
class FlatProblem:
    """Inputs reshaped to rows: ``hidden (N, D)``, ``weight (V, D)``, ``bias (V,)`` or None,
    ``targets (N,)`` int64 on hidden's device (the labels, shifted when asked), and
    ``batch_shape``, the labels' shape (that of ``reduction='none'`` losses and of the lse)."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    targets: Tensor
    batch_shape: torch.Size


def check_shift(shift: bool) -> None:
    """Raise ``TypeError`` unless ``shift`` is True or False: labels shift by one position or
    not at all, and a truthy ``2`` must not silently mean one."""
    if not isinstance(shift, bool):
        raise TypeError(f"shift must be True or False, got {shift!r}")


def check_inputs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    options: LossOptions,
    *,
    shift: bool = False,
    num_items_in_batch: int | Tensor | None = None,
) -> None:
    """Raise ``ValueError``/``TypeError`` naming the offending argument unless the arguments
    make a linear cross entropy; everything but the labels' values, which need their device.

    ``hidden``: ``(N, D)`` or ``(B, T, D)`` float16/bfloat16/float32/float64.
    ``weight``: ``(V, D)`` of the same dtype and device; ``bias``: ``(V,)`` or None.
    ``labels``: integer tensor shaped like ``hidden`` without its last dimension, on any device.
    ``num_items_in_batch``: None, a Python number or a one-element tensor.
    """
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_shift(shift)
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be a floating tensor (fp16, bf16, fp32, fp64), got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match hidden dtype {hidden.dtype}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be (N, D) or (B, T, D), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be (V, D) with D = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V = 0)")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match hidden's leading shape {tuple(hidden.shape[:-1])}"
        )
    if hidden.numel() == 0 or labels.numel() == 0:
        raise ValueError(f"empty batch: hidden has shape {tuple(hidden.shape)}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} does not match hidden dtype {hidden.dtype}")
    devices = {t.device for t in (hidden, weight) + ((bias,) if bias is not None else ())}
    if len(devices) > 1:
        raise ValueError(f"hidden, weight and bias must share one device, got {sorted(map(str, devices))}")
    if num_items_in_batch is not None:
        if options.reduction == "none":
            raise ValueError("num_items_in_batch divides a summed loss; it cannot be used with reduction='none'")
        if isinstance(num_items_in_batch, Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(
                    f"num_items_in_batch must be a scalar, got a tensor of shape {tuple(num_items_in_batch.shape)}"
                )
        elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
            raise TypeError(f"num_items_in_batch must be an int or a 0-d tensor, got {type(num_items_in_batch).__name__}")



def prepare_inputs(hidden: Tensor, weight: Tensor, labels: Tensor, arguments: LossArguments) -> FlatProblem:
    """Validate the inputs of a linear cross entropy (``check_inputs``, then every label in
    ``[0, V)`` or ``ignore_index``) and flatten them to rows.

    With ``shift=True`` the labels are transformers' unshifted labels: the target of row ``t``
    is ``labels[..., t + 1]``, the last row of each sequence is ignored, and no shifted copy of
    ``hidden`` is made.
    """
    ignore_index, shift = arguments.ignore_index, arguments.shift
    check_inputs(
        hidden, weight, labels, arguments.bias, arguments.options(), shift=shift,
        num_items_in_batch=arguments.num_items_in_batch,
    )
    # As in transformers, labels follow the logits to their device.
    labels = labels.to(device=hidden.device, dtype=torch.long)
    bad = bad_labels(labels, weight.shape[0], ignore_index)
    if bad.any():
        raise bad_label_error(labels[bad][0].item(), weight.shape[0], ignore_index)
    targets = shift_labels(labels, ignore_index=ignore_index) if shift else labels
    return FlatProblem(
        hidden=hidden.reshape(-1, hidden.shape[-1]),
        weight=weight,
        bias=arguments.bias,
        targets=targets.reshape(-1),
        batch_shape=labels.shape,
    )


def transform_logits(logits: Tensor, options: LossOptions) -> Tensor:
    """Apply ``logit_scale`` then ``softcap`` to float32 logits ``(..., V)``."""
    if options.logit_scale is not None:
        logits = logits * options.logit_scale
    if options.softcap is not None:
        logits = torch.tanh(logits / options.softcap) * options.softcap
    return logits


def token_losses(logits: Tensor, targets: Tensor, options: LossOptions) -> tuple[Tensor, Tensor]:
    """Per-token losses and log-sum-exp of float32 logits ``(N, V)`` against ``targets (N,)``.

    Returns ``(loss (N,), lse (N,))``, both float32; ignored rows have loss 0.
    """
    lse = torch.logsumexp(logits, dim=-1)
    valid = targets != options.ignore_index
    target_logit = logits.gather(1, torch.where(valid, targets, 0).unsqueeze(1)).squeeze(1)
    loss = lse - target_logit
    if options.label_smoothing:
        eps = options.label_smoothing
        loss = (1 - eps) * loss + eps * (lse - logits.mean(dim=-1))
    if options.z_loss:
        loss = loss + options.z_loss * lse.square()
    return torch.where(valid, loss, torch.zeros_like(loss)), lse


def reduce_losses(
    losses: Tensor,
    targets: Tensor,
    options: LossOptions,
    num_items_in_batch: int | Tensor | None,
    batch_shape: torch.Size,
) -> Tensor:
    """Reduce per-token losses ``(N,)`` as transformers does.

    ``'none'`` returns them shaped like the labels; with a count, ``sum / num_items_in_batch``
    (a tensor count is moved to the loss's device, a Python number is divided literally);
    otherwise ``'sum'`` or the mean over valid targets (0/0 = NaN when none is valid).
    """
    if options.reduction == "none":
        return losses.reshape(batch_shape)
    total = losses.sum()
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if options.reduction == "sum":
        return total
    return total / (targets != options.ignore_index).sum()


@takes_loss_arguments
def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, arguments: LossArguments) -> Tensor | tuple[Tensor, Tensor]:
    """Cross entropy of ``hidden @ weight.T + bias`` against ``labels``, materialising the logits.

    Shapes: ``hidden (N, D)`` or ``(B, T, D)``; ``weight (V, D)``; ``labels`` shaped like
    ``hidden[..., 0]``. The logits are computed in the inputs' dtype and upcast to float32,
    as transformers does (``lm_head(h).float()``); everything after is float32.
    Returns the loss (0-d float32, or per-token float32 shaped like ``labels`` for
    ``reduction='none'``), and with ``return_lse=True`` also the per-token log-sum-exp
    (float32, shaped like ``labels``). The keyword arguments: ``LossArguments``.
    """
    options = arguments.options()
    problem = prepare_inputs(hidden, weight, labels, arguments)
    logits = transform_logits(F.linear(problem.hidden, problem.weight, problem.bias).float(), options)
    losses, lse = token_losses(logits, problem.targets, options)
    loss = reduce_losses(losses, problem.targets, options, arguments.num_items_in_batch, problem.batch_shape)
    return (loss, lse.reshape(problem.batch_shape)) if arguments.return_lse else loss
