"""The forward a patched model carries, and the one training call it serves with the fused kernel.

A training call with labels (``model.training`` and ``labels is not None``) runs the model's
own forward with two seams cut (``fused.hf.capture``): the head computes no logits, and the
loss call is answered by ``fused.linear_cross_entropy`` on the head's input, the head's weight
(``fused.hf.head``) and the probed logit transform as kernel options. Every other call is the
stock forward, untouched. A training call that does not follow the probed wiring runs the
stock forward instead, with a ``RuntimeWarning``.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fused.hf.capture import LOSS_FUNCTION, CaptureError, HeadLossCapture, LossCall, plain, stock_causal_lm_loss
from fused.hf.config import config_leaves
from fused.hf.head import UnsupportedHead, fold_head, head_kind
from fused.hf.report import PatchReport
from fused.hf.transform import LogitTransform
from fused.linear_cross_entropy import linear_cross_entropy

STATE = "_fused_patch"


@dataclass
class PatchState:
    """Everything the patched forward needs, kept in the model's ``__dict__`` (so a deep copy
    of the model carries its own)."""

    report: PatchReport
    transform: LogitTransform
    fingerprint: tuple
    previous_forward: Any
    previous_accepts_loss_kwargs: tuple  # () when the instance had none, else (value,)
    signature: inspect.Signature | None = None
    memory_budget: int | None = None  # the kernel's knob; None: its default


def fingerprint(model: nn.Module, transform: LogitTransform) -> tuple:
    """What a logit transform could be read from, to notice a change after patching: every
    float of the config and of the model's own attributes, and the ints the transform took
    from the config. Nothing else counts, whether it changes, appears or disappears: other
    ints (a resized vocabulary changes nothing), flags such as ``use_cache`` (which Trainer
    adds to composite configs that lack it), ``dtype``. A transform switched on later
    (``final_logit_softcapping`` None -> 30.0) still shows, as a float that appeared."""
    used = {name.removeprefix("1/") for _, name in transform.sources}
    items = [
        (path, value)
        for path, value in config_leaves(model.config)
        if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool) and path in used)
    ]
    own = [(k, v) for k, v in vars(model).items() if isinstance(v, float)]
    return tuple(sorted(items, key=lambda kv: kv[0])) + tuple(sorted(own))


def stock_forward(model: nn.Module, state: PatchState):
    return state.previous_forward if state.previous_forward is not None else type(model).forward.__get__(model)


def _placeholder_logits(loss: str):
    """What the head returns in a fused call instead of its ``(..., V)`` logits, allocating
    nothing of size ``V``: a tensor with no columns, whose transforms cost nothing, for
    ``model.loss_function`` forwards; for ``cross_entropy`` forwards, which view the logits
    as ``(-1, logits.size(-1))``, zeros of the full width expanded from one element."""

    def placeholder(hidden: Tensor, vocab: int) -> Tensor:
        if loss == LOSS_FUNCTION:
            return hidden.new_empty(tuple(hidden.shape[:-1]) + (0,))
        return hidden.new_zeros(()).expand(*hidden.shape[:-1], vocab)

    return placeholder


def _fused_loss(head: nn.Module, state: PatchState, call: LossCall, hidden: Tensor) -> Tensor:
    """The intercepted loss ``call`` computed by the fused kernel from the head's input: the
    semantics of ``ForCausalLMLoss`` or of ``F.cross_entropy``, read from the call's own
    arguments, with the probed transform folded in."""
    if call.kind != state.report.loss:
        raise CaptureError(f"the forward called {call.kind}, the probe saw {state.report.loss}")
    logits, arguments, transform = plain(call.logits), call.arguments, state.transform
    if not isinstance(logits, Tensor) or (logits.numel() != 0 and any(logits.stride())):
        raise CaptureError("the logits reaching the loss are not the head's placeholder")
    operands = fold_head(head, hidden)
    weight, bias = operands.weight, operands.bias
    if transform.vocab is not None:
        weight = weight[: transform.vocab]
        bias = bias[: transform.vocab] if bias is not None else None
    if call.kind == LOSS_FUNCTION:
        # Forwards that pass vocab_size=logits.shape[-1] see the placeholder's width, 0.
        if arguments["vocab_size"] not in (weight.shape[0], logits.shape[-1]):
            raise CaptureError(
                f"the loss is told vocab_size={arguments['vocab_size']} for {weight.shape[0]} logit columns"
            )
        shift_labels = arguments["shift_labels"]
        targets = shift_labels if shift_labels is not None else arguments["labels"]
        options = dict(
            ignore_index=arguments["ignore_index"],
            shift=shift_labels is None,
            num_items_in_batch=arguments["num_items_in_batch"],
        )
    else:
        if any(arguments[name] is not None for name in ("weight", "size_average", "reduce")):
            raise CaptureError("cross_entropy is called with class weights or legacy reduction arguments")
        if logits.shape[-1] != weight.shape[0]:
            raise CaptureError(f"cross_entropy views the logits with width {logits.shape[-1]}, not {weight.shape[0]}")
        targets = arguments["target"]
        options = dict(
            ignore_index=arguments["ignore_index"],
            reduction=arguments["reduction"],
            label_smoothing=arguments["label_smoothing"],
        )
    if not isinstance(targets, Tensor):
        raise CaptureError("the loss was called without labels")
    rows = operands.hidden
    if rows.shape[:-1].numel() != targets.numel():
        raise ValueError(
            f"labels of shape {tuple(targets.shape)} do not match the {rows.shape[:-1].numel()} positions "
            "the head was applied to (logits_to_keep with labels?)"
        )
    return linear_cross_entropy(
        rows.reshape(*targets.shape, rows.shape[-1]),
        weight,
        targets,
        bias=bias,
        softcap=transform.softcap,
        logit_scale=transform.logit_scale,
        memory_budget=state.memory_budget,
        **options,
    )


def _without_logits(output: Any, capture: HeadLossCapture) -> Any:
    """``output`` with the placeholder logits set to None; tuple positions are kept."""
    if isinstance(output, tuple):
        return tuple(None if capture.is_head_output(v) else v for v in output)
    if hasattr(output, "items"):
        return type(output)(**{k: v for k, v in output.items() if not capture.is_head_output(v)})
    return output


def sharded_head_parameter(head: nn.Module) -> str | None:
    """Why the head's weights cannot be read outside its forward (ZeRO-3, FSDP), or None."""
    for name, parameter in head.named_parameters():
        if parameter.numel() == 0 or hasattr(parameter, "ds_id") or type(parameter).__name__ == "DTensor":
            return f"the head's parameter {name} is sharded (ZeRO-3 / FSDP)"
    return None


def _unavailable(model: nn.Module, state: PatchState) -> str | None:
    """Why a training call cannot take the fused path now, or None."""
    if model.loss_function is not stock_causal_lm_loss():
        return "model.loss_function is not transformers' ForCausalLMLoss (a custom loss is used as is)"
    if fingerprint(model, state.transform) != state.fingerprint:
        return "the config's float values changed since patch_model (run unpatch_model and patch_model again)"
    head = model.get_output_embeddings()
    try:
        head_kind(head, None)
    except UnsupportedHead as error:
        return str(error)
    return sharded_head_parameter(head)


def _fall_back(model: nn.Module, state: PatchState, reason: str, args: tuple, kwargs: dict) -> Any:
    state.report.calls.fallback += 1
    state.report.calls.last_fallback = reason
    message = f"fused.patch_model: {type(model).__name__} ran its stock loss: {reason}"
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    return stock_forward(model, state)(*args, **kwargs)


def fused_forward(model: nn.Module, state: PatchState, args: tuple, kwargs: dict) -> Any:
    """One training forward with the loss from the fused kernel, or the stock forward with
    a counted, warned fallback when the model does not follow the probed wiring."""
    reason = _unavailable(model, state)
    if reason is not None:
        return _fall_back(model, state, reason, args, kwargs)
    head = model.get_output_embeddings()
    failure: list[BaseException] = []

    def loss(call: LossCall, hidden: Tensor) -> Tensor:
        try:
            return _fused_loss(head, state, call, hidden)
        except ValueError as error:  # the kernel's input validation: a caller error, not a fallback
            if not isinstance(error, UnsupportedHead):
                failure.append(error)
            raise

    capture = HeadLossCapture(
        model, head, _placeholder_logits(state.report.loss), loss, cross_entropy=state.report.loss != LOSS_FUNCTION
    )
    try:
        with capture:
            output = stock_forward(model, state)(*args, **kwargs)
        capture.check_complete()
    except Exception as error:
        if (failure and error is failure[0]) or isinstance(error, torch.OutOfMemoryError):
            raise
        if kwargs.get("past_key_values") is not None:
            # The failed attempt may have written to the caller's cache: a rerun could be wrong.
            raise RuntimeError(f"fused.patch_model: the fused loss failed with a cache passed in: {error}") from error
        return _fall_back(model, state, f"{type(error).__name__}: {error}", args, kwargs)
    state.report.calls.fused += 1
    return _without_logits(output, capture)


class PatchedForward:
    """The ``forward`` a patched model carries. It holds only the model, so a deep copy of
    the model gets a forward bound to the copy, and shows the stock forward's signature
    (Trainer drops dataset columns the signature does not name)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(stock_forward(self.model, vars(self.model)[STATE]))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        state: PatchState = vars(model)[STATE]
        labels = kwargs.get("labels")
        if labels is None and args:
            if state.signature is None:
                state.signature = inspect.signature(stock_forward(model, state))
            labels = state.signature.bind_partial(*args).arguments.get("labels")
        if labels is None or not model.training:
            state.report.calls.stock += 1
            return stock_forward(model, state)(*args, **kwargs)
        return fused_forward(model, state, args, kwargs)
