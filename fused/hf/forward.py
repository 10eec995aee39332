"""The forward a patched model carries, and the one training call it serves with the fused kernel.

A training call with labels (``model.training`` and ``labels is not None``) runs the model's
own forward with two seams cut (``fused.hf.capture``): the head computes no logits, and the
loss call is answered by ``fused.linear_cross_entropy`` on the head's input, the head's weight
(``fused.hf.head``) and the probed logit transform as kernel options. Every other call is the
stock forward, untouched. A training call that does not follow the probed wiring runs the
stock forward instead, with a ``RuntimeWarning``.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fused.hf.capture import LOSS_FUNCTION, Capture, CaptureError, LossCall, Seams, plain
from fused.hf.config import config_leaves
from fused.hf.head import UnsupportedHead, fold_head, head_kind
from fused.hf.report import PatchReport
from fused.hf.transform import LogitTransform
from fused.hf.trl import TRL_CALL, TrlHead, outer_trl_head, trl_head, unservable
from fused.hf.trl import serve as serve_trl
from fused.api import linear_cross_entropy
from fused.fsdp import fsdp_gathers_head, head_layout, is_fsdp_module, run_in_fsdp_forward
from fused.tensor_parallel import is_tensor_parallel_head, tensor_parallel_refusal

STATE = "_fused_patch"
# Live patch states by serial number, for count_call (see there).
_STATES: weakref.WeakValueDictionary[int, PatchState] = weakref.WeakValueDictionary()
_SERIALS = itertools.count()


def count_call(serial: int, kind: str) -> None:
    """Add one call of ``kind`` (``'fused'``, ``'stock'``) to the counters of the patch state
    numbered ``serial``. Its arguments are constants, so torch.compile runs it after the graph
    (a reorderable logging function) instead of tracing it: a traced ``calls.fused += 1``
    would guard on the count and recompile at every call."""
    state = _STATES.get(serial)
    if state is not None:
        calls = state.report.calls
        setattr(calls, kind, getattr(calls, kind) + 1)


torch._dynamo.config.reorderable_logging_functions.add(count_call)


@dataclass
class PatchState:
    """Everything the patched forward needs, kept in the model's ``__dict__`` (so a deep copy
    of the model carries its own, with its own serial number)."""

    report: PatchReport
    transform: LogitTransform
    fingerprint: tuple
    seams: Seams
    previous_forward: Any
    previous_accepts_loss_kwargs: tuple  # () when the instance had none, else (value,)
    signature: inspect.Signature | None = None
    memory_budget: int | None = None  # the kernel's knob; None: its default
    warned: set[str] = field(default_factory=set)  # fallback reasons already warned about
    label_smoothing: float = 0.0  # Trainer's label_smoothing_factor, moved here by fuse_label_smoothing
    serial: int = -1  # set by __post_init__

    def __post_init__(self) -> None:
        self.serial = next(_SERIALS)
        _STATES[self.serial] = self

    def __deepcopy__(self, memo: dict) -> PatchState:
        clone = copy.copy(self)
        memo[id(self)] = clone
        for name, value in vars(self).items():
            setattr(clone, name, copy.deepcopy(value, memo))
        clone.__post_init__()
        return clone


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
            label_smoothing=state.label_smoothing,
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


def _without_logits(output: Any, capture: Capture) -> Any:
    """``output`` with the placeholder logits set to None; tuple positions are kept."""
    if isinstance(output, tuple):
        return tuple(None if capture.is_head_output(v) else v for v in output)
    if hasattr(output, "items"):
        return type(output)(**{k: v for k, v in output.items() if not capture.is_head_output(v)})
    return output


def sharded_head_parameter(model: nn.Module, head: nn.Module) -> str | None:
    """Why the head's weights cannot be read outside its forward (ZeRO-3, FSDP1), or None.
    FSDP2 gathers them around the forward the loss runs in (``fused.fsdp``); a head sharded
    over the vocabulary by tensor parallelism is served as it is (``fused.tensor_parallel``)."""
    if fsdp_gathers_head(model, head):
        return None
    if is_tensor_parallel_head(head):
        return tensor_parallel_refusal(head)
    for name, parameter in head.named_parameters():
        if parameter.numel() == 0 or hasattr(parameter, "ds_id"):
            return f"the head's parameter {name} is sharded (ZeRO-3 / FSDP)"
    return None


def _unavailable(model: nn.Module, state: PatchState) -> str | None:
    """Why a training call cannot take the fused path now, or None: decided before the forward
    runs, so the stock forward that runs instead runs once."""
    replaced = state.seams.replaced_loss_function()
    if replaced is not None:
        return f"{replaced} was replaced after patch_model (a custom loss is used as is)"
    if fingerprint(model, state.transform) != state.fingerprint:
        return "the config's float values changed since patch_model (run unpatch_model and patch_model again)"
    head = model.get_output_embeddings()
    try:
        head_kind(head, None)
    except UnsupportedHead as error:
        return str(error)
    return sharded_head_parameter(model, head)


def _note_fallback(model: nn.Module, state: PatchState, reason: str, instead: str) -> None:
    """Count a training call the fused kernel did not serve; warn once per reason and model."""
    state.report.calls.fallback += 1
    state.report.calls.last_fallback = f"{reason}; {instead}"
    if reason not in state.warned:
        state.warned.add(reason)
        message = f"fused.patch_model: {type(model).__name__}: {reason}; {instead} (warned once)"
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _stock_loss(head: nn.Module, state: PatchState, capture: Capture, call: LossCall, hidden: Tensor) -> Tensor:
    """The intercepted ``call`` answered by the stock loss without running the body again: on
    the logits the call was given if they are real, else on the head applied to its captured
    input with the probed transform."""
    arguments = dict(call.arguments)
    logits_name = "logits" if call.kind == LOSS_FUNCTION else "input"
    if capture.is_head_output(arguments[logits_name]):
        with state.seams.idle():
            logits = head(hidden)
        logits = state.transform.apply(logits.float()).to(logits.dtype)
        arguments[logits_name] = logits.reshape(*plain(arguments[logits_name]).shape[:-1], logits.shape[-1])
    if call.kind == LOSS_FUNCTION:
        extra = arguments.pop("kwargs", {})
        return state.seams.loss_seams[0][1].previous(**arguments, **extra)
    return torch.nn.functional.cross_entropy(**arguments)


def fused_forward(
    model: nn.Module, state: PatchState, args: tuple, kwargs: dict, trl: TrlHead | None = None
) -> tuple[Any, bool]:
    """One training forward, run once, and whether the fused kernel computed its loss. Where the
    call does not follow the probed wiring, the stock loss instead (decided before the forward:
    the stock forward; found at the loss: the stock loss on the captured head input), counted
    as a fallback and warned once. ``trl``: the settings of a TRL forward around the patch whose
    ``fused_lm_head=True`` call ``trl_pre_hook`` handed through."""
    reason = _unavailable(model, state)
    if trl is not None or kwargs.get("fused_lm_head"):
        trl = trl or trl_head(state.previous_forward)  # else TRL's forward sits inside the patch
        why = reason or unservable(trl, kwargs)
        if why is None:
            return serve_trl(model, trl, state.transform, args, kwargs), True
        reason = f"a TRL fused_lm_head=True call this patch cannot serve exactly ({why})"
    if reason is not None:
        _note_fallback(model, state, reason, "the unpatched forward ran instead")
        return stock_forward(model, state)(*args, **kwargs), False
    head = model.get_output_embeddings()
    if head is not state.seams.head:  # PEFT wrapped the head after patching
        state.seams.attach(head)
    served_by_stock: list[str] = []

    def loss(call: LossCall, hidden: Tensor) -> Tensor:
        try:
            if is_fsdp_module(head):  # sharded on its own: gathered only inside its forward
                return run_in_fsdp_forward(head, lambda rows: _fused_loss(head, state, call, rows), hidden)
            return _fused_loss(head, state, call, hidden)
        except CaptureError as error:
            served_by_stock.append(str(error))
            _note_fallback(model, state, str(error), "the stock loss ran on the head's captured input instead")
            return _stock_loss(head, state, state.seams.active, call, hidden)

    kind = state.report.loss
    with state.seams.capturing(_placeholder_logits(kind), loss, cross_entropy=kind != LOSS_FUNCTION) as capture:
        output = stock_forward(model, state)(*args, **kwargs)
    try:
        capture.check_complete()
    except CaptureError as error:
        raise RuntimeError(
            f"fused.patch_model: {type(model).__name__}'s training forward did not follow the probed wiring "
            f"({error}); its output has no logits and is not used. Run the model unpatched (unpatch_model)."
        ) from error
    state.report.layout = head_layout(model, head)  # sharding may come after patch_model
    return _without_logits(output, capture), not served_by_stock


def smoothed_evaluation(model: nn.Module, state: PatchState, args: tuple, kwargs: dict) -> Any:
    """An evaluation call with labels while Trainer's label smoothing lives in the patch: the stock
    forward without labels (Trainer's metrics want the logits), and the loss Trainer's
    ``LabelSmoother`` computes from them (next-token shift, mean over valid targets, or the sum
    over ``num_items_in_batch``)."""
    kwargs = dict(kwargs)
    labels, count = kwargs.pop("labels"), kwargs.pop("num_items_in_batch", None)
    output = stock_forward(model, state)(*args, **kwargs)
    logits = output["logits"] if isinstance(output, dict) else output[0]
    targets = labels[..., 1:].reshape(-1).to(logits.device)
    losses = torch.nn.functional.cross_entropy(
        logits[..., :-1, :].reshape(-1, logits.shape[-1]).float(), targets,
        reduction="none", label_smoothing=state.label_smoothing,
    )
    loss = losses.sum() / ((targets != -100).sum() if count is None else count)
    if isinstance(output, dict):
        output["loss"] = loss
        return output
    return (loss, *output)


def trl_pre_hook(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """A forward pre-hook of every patched model: a ``fused_lm_head=True`` training call to a
    TRL forward that wraps the patch (patched before the trainer was built) is handed through
    to the patch (``fused_lm_head=False``, which TRL passes through with the labels to the
    forward it wraps, plus TRL's settings under ``TRL_CALL``). A call the patch cannot serve
    exactly is left to TRL's head, counted as a fallback and warned once. Everything else
    passes untouched, at the cost of one dictionary lookup."""
    if not kwargs.get("fused_lm_head") or not model.training:
        return None
    state = vars(model).get(STATE)
    if state is None:
        return None
    trl = outer_trl_head(vars(model).get("forward"))
    inner = None if trl is None else trl.inner_forward
    if not (isinstance(inner, PatchedForward) and inner.model is model):
        return None  # TRL's forward inside the patch (PatchedForward serves it), or no TRL around it
    why = _unavailable(model, state) or unservable(trl, kwargs)
    if why is not None:
        reason = f"a TRL fused_lm_head=True call this patch cannot serve exactly ({why})"
        _note_fallback(model, state, reason, "TRL's own head computed it")
        return None
    return args, {**kwargs, "fused_lm_head": False, TRL_CALL: trl}


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
        trl = kwargs.pop(TRL_CALL, None)  # a fused_lm_head=True training call trl_pre_hook handed through
        labels = kwargs.get("labels")
        if labels is None and args:
            if state.signature is None:
                state.signature = inspect.signature(stock_forward(model, state))
            labels = state.signature.bind_partial(*args).arguments.get("labels")
        if trl is None and labels is not None and not model.training and state.label_smoothing:
            count_call(state.serial, "stock")
            return smoothed_evaluation(model, state, args, kwargs)
        if trl is None and (labels is None or not model.training):
            count_call(state.serial, "stock")
            return stock_forward(model, state)(*args, **kwargs)
        output, fused = fused_forward(model, state, args, kwargs, trl)
        if fused:
            # Here, in the frame torch.compile(model) compiles: it runs a reorderable logging
            # function after the graph only when the call sits in that frame itself.
            count_call(state.serial, "fused")
        return output
