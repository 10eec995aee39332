"""``patch_model``: make one Hugging Face causal LM compute its training loss with the fused kernel.

The patch changes one model instance (never transformers' classes): its ``forward``
becomes a wrapper that, for a training call with labels (``model.training`` and
``labels is not None``), runs the model's own forward with two seams cut
(``fused.patch_capture``): the head computes no logits, and the loss call
(``model.loss_function``, or ``F.cross_entropy`` in older heads) is answered by
``fused.linear_cross_entropy`` on the head's input, the head's weight (LoRA adapters and
``modules_to_save`` folded in, ``fused.patch_head``) and the model's logit transform as
kernel options (``fused.patch_transform``). Everything else is the model's code: backbone,
``logits_to_keep``, multimodal inputs, the MoE auxiliary loss, the output class and
``return_dict=False`` tuples. Every other call (``labels=None``, eval mode: evaluation loops
and ``generate``) is the stock forward, untouched.

Nothing is decided from source text. ``patch_model`` probes the instance
(``fused.patch_probe``): it measures the head -> loss wiring and transform, then checks
stock against patched loss and gradients on a tiny batch; anything that does not match
is refused and the model left exactly as it was. The report records what was folded and
the verification errors, and counts the calls that took the fused path, the stock path or
fell back, so "silently inactive" shows up as numbers. A training call that does not
follow the probed wiring (the config's floats changed, a custom ``loss_function`` was set,
the head became something else) runs the stock forward instead, with a ``RuntimeWarning``.

Outputs of fused calls carry ``logits=None`` (a ``return_dict=False`` tuple keeps ``None``
at the logits position, so positions match the stock tuple). The loss follows the call the
model made: ``ForCausalLMLoss`` (shift by padding the labels, or ``shift_labels`` as given;
mean over valid targets, or sum / ``num_items_in_batch``, int or tensor, used as given) or
``F.cross_entropy`` (labels as given, its ``reduction``, ``ignore_index`` and
``label_smoothing``). In 16-bit models the logit transform runs in float32 inside the
kernel, where the stock head rounds it to the model's dtype.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fused.api import linear_cross_entropy
from reference.input_checks import check_size
from fused.patch_capture import LOSS_FUNCTION, CaptureError, HeadLossCapture, LossCall, stock_causal_lm_loss
from fused.patch_head import UnsupportedHead, fold_head, head_kind
from fused.patch_probe import (
    ProbeRefusal,
    Verification,
    observe_wiring,
    probe_inputs,
    probe_labels,
    probing,
    verify,
)
from fused.patch_transform import LogitTransform
from reference.num_items_probe import trainer_accepts_loss_kwargs

_STATE = "_fused_patch"


@dataclass
class PatchCalls:
    """Live counts of the patched forward's calls since patching (or since ``copy.deepcopy``
    made the model they count for).

    ``fused``: training calls with labels whose loss came from the fused kernel.
    ``stock``: calls without labels or in eval mode, passed to the stock forward untouched.
    ``fallback``: training calls with labels that ran the stock forward instead, each with
    a ``RuntimeWarning``; ``last_fallback`` says why.
    """

    fused: int = 0
    stock: int = 0
    fallback: int = 0
    last_fallback: str = ""

    def __deepcopy__(self, memo: dict) -> PatchCalls:
        # A copied model has made no calls yet: its counters start at zero.
        return PatchCalls()


@dataclass
class PatchReport:
    """What ``patch_model`` did to a model, and why.

    ``patched``: whether the fused loss is installed; ``reason``: why (not).
    ``head``: ``'plain'``, ``'tied'``, ``'lora'`` or ``'modules_to_save'`` (None if unknown).
    ``loss``: the loss call the fused kernel replaces, ``'model.loss_function'``
    (``ForCausalLMLoss``: shifted labels, ``num_items_in_batch``) or
    ``'torch.nn.functional.cross_entropy'`` (older heads: labels as given, no count).
    ``transforms``: the logit transforms folded into the kernel, one line each.
    ``uses_num_items_in_batch``: whether the forward hands ``num_items_in_batch`` to the
    loss. ``accepts_loss_kwargs``: the value set on the instance for Trainer (equal to the
    former); ``stock_accepts_loss_kwargs``: Trainer's decision before the patch.
    ``verification``: stock against patched on the probe batch. ``calls``: live counters.
    """

    patched: bool
    reason: str
    model: str
    head: str | None = None
    loss: str | None = None
    transforms: tuple[str, ...] = ()
    uses_num_items_in_batch: bool | None = None
    accepts_loss_kwargs: bool | None = None
    stock_accepts_loss_kwargs: bool | None = None
    verification: Verification | None = None
    calls: PatchCalls = field(default_factory=PatchCalls)

    def __str__(self) -> str:
        lines = [f"{self.model}: {'patched' if self.patched else 'not patched'} ({self.reason})"]
        if self.patched:
            lines += [
                f"  head: {self.head}; loss: {self.loss}",
                f"  transforms: {', '.join(self.transforms) or 'none'}",
                f"  num_items_in_batch reaches the loss: {self.uses_num_items_in_batch}; "
                f"accepts_loss_kwargs {self.stock_accepts_loss_kwargs} -> {self.accepts_loss_kwargs}",
                f"  verification: {self.verification.describe()}",
                f"  calls: fused {self.calls.fused}, stock {self.calls.stock}, fallback {self.calls.fallback}"
                + (f" (last: {self.calls.last_fallback})" if self.calls.fallback else ""),
            ]
        return "\n".join(lines)


@dataclass
class _PatchState:
    """Everything the patched forward needs, kept in the model's ``__dict__`` (so a deep copy
    of the model carries its own)."""

    report: PatchReport
    transform: LogitTransform
    fingerprint: tuple
    previous_forward: Any
    previous_accepts_loss_kwargs: tuple  # () when the instance had none, else (value,)
    signature: inspect.Signature | None = None
    memory_budget: int | None = None  # the kernel's knob; None: its default


def _transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper, or ``model`` itself."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _fingerprint(model: nn.Module, transform: LogitTransform) -> tuple:
    """What a logit transform could be read from, to notice a change after patching: every
    float of the config and of the model's own attributes, and the ints the transform took
    from the config. Nothing else counts, whether it changes, appears or disappears: other
    ints (a resized vocabulary changes nothing), flags such as ``use_cache`` (which Trainer
    adds to composite configs that lack it), ``dtype``. A transform switched on later
    (``final_logit_softcapping`` None -> 30.0) still shows, as a float that appeared."""
    used = {name.removeprefix("1/") for _, name in transform.sources}
    items = []

    def walk(value, path: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}.{key}")
        elif isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool) and path in used):
            items.append((path, value))

    walk(model.config.to_dict(), "config")
    own = [(k, v) for k, v in vars(model).items() if isinstance(v, float)]
    return tuple(sorted(items, key=lambda kv: kv[0])) + tuple(sorted(own))


def _stock_forward(model: nn.Module, state: _PatchState):
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


def _fused_loss(head: nn.Module, state: _PatchState, call: LossCall, hidden: Tensor) -> Tensor:
    """The intercepted loss ``call`` computed by the fused kernel from the head's input: the
    semantics of ``ForCausalLMLoss`` or of ``F.cross_entropy``, read from the call's own
    arguments, with the probed transform folded in."""
    if call.kind != state.report.loss:
        raise CaptureError(f"the forward called {call.kind}, the probe saw {state.report.loss}")
    logits, arguments, transform = call.logits, call.arguments, state.transform
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


def _without_logits(output: Any, placeholders: tuple[Tensor | None, ...]) -> Any:
    """``output`` with the placeholder logits set to None; tuple positions are kept."""

    def is_placeholder(value: Any) -> bool:
        return any(value is p for p in placeholders if p is not None)

    if isinstance(output, tuple):
        return tuple(None if is_placeholder(v) else v for v in output)
    if hasattr(output, "items"):
        return type(output)(**{k: v for k, v in output.items() if not is_placeholder(v)})
    return output


def _sharded_head_parameter(head: nn.Module) -> str | None:
    """Why the head's weights cannot be read outside its forward (ZeRO-3, FSDP), or None."""
    for name, parameter in head.named_parameters():
        if parameter.numel() == 0 or hasattr(parameter, "ds_id") or type(parameter).__name__ == "DTensor":
            return f"the head's parameter {name} is sharded (ZeRO-3 / FSDP)"
    return None


def _unavailable(model: nn.Module, state: _PatchState) -> str | None:
    """Why a training call cannot take the fused path now, or None."""
    if model.loss_function is not stock_causal_lm_loss():
        return "model.loss_function is not transformers' ForCausalLMLoss (a custom loss is used as is)"
    if _fingerprint(model, state.transform) != state.fingerprint:
        return "the config's float values changed since patch_model (run unpatch_model and patch_model again)"
    head = model.get_output_embeddings()
    try:
        head_kind(head, None)
    except UnsupportedHead as error:
        return str(error)
    return _sharded_head_parameter(head)


def _fall_back(model: nn.Module, state: _PatchState, reason: str, args: tuple, kwargs: dict) -> Any:
    state.report.calls.fallback += 1
    state.report.calls.last_fallback = reason
    message = f"fused.patch_model: {type(model).__name__} ran its stock loss: {reason}"
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    return _stock_forward(model, state)(*args, **kwargs)


def _fused_forward(model: nn.Module, state: _PatchState, args: tuple, kwargs: dict) -> Any:
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

    capture = HeadLossCapture(model, head, _placeholder_logits(state.report.loss), loss)
    try:
        with capture:
            output = _stock_forward(model, state)(*args, **kwargs)
        capture.check_complete()
    except Exception as error:
        if (failure and error is failure[0]) or isinstance(error, torch.OutOfMemoryError):
            raise
        if kwargs.get("past_key_values") is not None:
            # The failed attempt may have written to the caller's cache: a rerun could be wrong.
            raise RuntimeError(f"fused.patch_model: the fused loss failed with a cache passed in: {error}") from error
        return _fall_back(model, state, f"{type(error).__name__}: {error}", args, kwargs)
    state.report.calls.fused += 1
    return _without_logits(output, (capture.output, capture.call.logits))


class _PatchedForward:
    """The ``forward`` a patched model carries. It holds only the model, so a deep copy of
    the model gets a forward bound to the copy, and shows the stock forward's signature
    (Trainer drops dataset columns the signature does not name)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(_stock_forward(self.model, vars(self.model)[_STATE]))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        state: _PatchState = vars(model)[_STATE]
        labels = kwargs.get("labels")
        if labels is None and args:
            if state.signature is None:
                state.signature = inspect.signature(_stock_forward(model, state))
            labels = state.signature.bind_partial(*args).arguments.get("labels")
        if labels is None or not model.training:
            state.report.calls.stock += 1
            return _stock_forward(model, state)(*args, **kwargs)
        return _fused_forward(model, state, args, kwargs)


def _refuse(model: nn.Module, reason: str, head: str | None = None) -> tuple[PatchReport, None]:
    return PatchReport(patched=False, reason=reason, model=type(model).__name__, head=head), None


def _probe_batch(
    model: nn.Module, example_inputs: dict[str, Any] | None, generator: torch.Generator
) -> tuple[dict[str, Any], Tensor | None, Tensor]:
    """The probe's model inputs, its labels if given, and the tensor labels are shaped like."""
    inputs = dict(example_inputs) if example_inputs is not None else probe_inputs(model, generator)
    labels = inputs.pop("labels", None)
    shape_source = labels if labels is not None else inputs.get("input_ids")
    if not isinstance(shape_source, Tensor):
        raise ProbeRefusal("example_inputs has neither labels nor input_ids to shape them")
    return inputs, labels, shape_source


def _examine(
    model: nn.Module, example_inputs: dict[str, Any] | None, seed: int
) -> tuple[PatchReport, _PatchState | None]:
    """Probe ``model``: its report, with the state to install when it can be patched."""
    for needed in ("config", "get_output_embeddings", "get_input_embeddings", "loss_function"):
        if not hasattr(model, needed):
            return _refuse(model, f"not a transformers model: it has no {needed}")
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Module):
        return _refuse(model, "the model has no output head (get_output_embeddings() is None)")
    try:
        kind = head_kind(head, model.get_input_embeddings())
    except UnsupportedHead as error:
        return _refuse(model, str(error))
    sharded = _sharded_head_parameter(head)
    if sharded is not None:
        return _refuse(model, sharded, kind)
    if model.loss_function is not stock_causal_lm_loss():
        name = getattr(model.loss_function, "__qualname__", type(model.loss_function).__name__)
        return _refuse(model, f"model.loss_function is {name}, not ForCausalLMLoss: the custom loss is kept", kind)

    forward = vars(model).get("forward") or type(model).forward.__get__(model)
    generator = torch.Generator().manual_seed(seed)
    state = None
    with probing(model), torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a fallback on the probe becomes the refusal
        try:
            inputs, labels, shape_source = _probe_batch(model, example_inputs, generator)
            wiring = observe_wiring(model, head, forward, {**inputs, "labels": shape_source}, generator)
            if labels is None:
                vocab = min(wiring.transform.vocab or wiring.head_vocab, model.get_input_embeddings().weight.shape[0])
                labels = probe_labels(shape_source, vocab, generator)
            report = PatchReport(
                patched=True,
                reason="verified against the stock forward",
                model=type(model).__name__,
                head=kind,
                loss=wiring.loss,
                transforms=wiring.transform.describe(),
                uses_num_items_in_batch=wiring.uses_num_items_in_batch,
                accepts_loss_kwargs=wiring.uses_num_items_in_batch,
                stock_accepts_loss_kwargs=trainer_accepts_loss_kwargs(model)[0],
            )
            state = _PatchState(
                report=report,
                transform=wiring.transform,
                fingerprint=_fingerprint(model, wiring.transform),
                previous_forward=vars(model).get("forward"),
                previous_accepts_loss_kwargs=tuple(
                    vars(model)[name] for name in ("accepts_loss_kwargs",) if name in vars(model)
                ),
            )
            # The patched path runs here in eval mode, installed nowhere.
            patched = lambda **kw: _fused_forward(model, state, (), kw)  # noqa: E731
            count = torch.tensor(int((labels[..., 1:] != -100).sum()) + 3) if wiring.uses_num_items_in_batch else None
            verification = verify(forward, patched, head, {**inputs, "labels": labels}, count)
        except Exception as error:  # refusing is always allowed; the reason says what happened
            if state is not None and state.report.calls.fallback:
                reason = f"the patched path fell back on the probe ({state.report.calls.last_fallback})"
            elif isinstance(error, ProbeRefusal):
                reason = str(error)
            else:
                reason = f"the probe failed: {type(error).__name__}: {error}"
            return _refuse(model, reason, kind)
    calls = state.report.calls
    if calls.fallback or not calls.fused:
        return _refuse(model, f"the patched path fell back on the probe ({calls.last_fallback})", kind)
    if not verification.passed:
        return _refuse(model, f"patched and stock differ on the probe batch: {verification.describe()}", kind)
    state.report.verification = verification
    state.report.calls = PatchCalls()
    return state.report, state


def patch_model(
    model: nn.Module,
    *,
    example_inputs: dict[str, Any] | None = None,
    seed: int = 0,
    memory_budget: int | None = None,
) -> PatchReport:
    """Make ``model``'s training loss come from the fused kernel, if that is exact; report why (not).

    ``model``: a transformers causal LM (``*ForCausalLM``, ``*ForConditionalGeneration``),
    or a PEFT model wrapping one (the wrapped model is patched). ``example_inputs``: the
    keyword inputs of one small batch (``input_ids`` ..., optionally ``labels``) for models
    that random ``input_ids (2, 8)`` cannot drive. ``seed`` seeds the probe's own generator;
    the global RNG, parameters, buffers, gradients and module modes are left as they were.
    ``memory_budget``: bytes of extra memory the loss may use beyond its gradients
    (``fused.linear_cross_entropy``'s knob; None keeps the kernel's default, 512 MiB).

    Idempotent: a patched model returns its existing report; a ``memory_budget`` given then
    replaces the one in use. A refused model is untouched.
    """
    if memory_budget is not None:
        check_size("memory_budget", memory_budget)
    target = _transformers_model(model)
    state = vars(target).get(_STATE)
    if state is not None:
        if memory_budget is not None:
            state.memory_budget = memory_budget
        return state.report
    report, state = _examine(target, example_inputs, seed)
    if state is None:
        return report
    state.memory_budget = memory_budget
    vars(target)[_STATE] = state
    target.forward = _PatchedForward(target)
    target.accepts_loss_kwargs = report.accepts_loss_kwargs
    return report


def unpatch_model(model: nn.Module) -> bool:
    """Restore the stock forward and ``accepts_loss_kwargs`` of a patched model.

    Returns True if a patch was removed, False if the model was not patched. Raises
    ``RuntimeError``, changing nothing, when ``forward`` was wrapped again after the patch
    (accelerate's autocast wrapper, a trainer's own): the patch sits inside that wrapper, and
    removing it would remove the wrapper too.
    """
    target = _transformers_model(model)
    if _STATE not in vars(target):
        return False
    current = vars(target).get("forward")
    if not isinstance(current, _PatchedForward):
        raise RuntimeError(
            f"fused.unpatch_model: {type(target).__name__}.forward was wrapped after patch_model "
            f"(it is now {current!r}); unpatching would remove that wrapper too. Remove the wrapper "
            "first (accelerate: accelerator.unwrap_model(model, keep_fp32_wrapper=False)), or keep the patch."
        )
    state = vars(target).pop(_STATE)
    if state.previous_forward is None:
        vars(target).pop("forward", None)
    else:
        vars(target)["forward"] = state.previous_forward
    if state.previous_accepts_loss_kwargs:
        vars(target)["accepts_loss_kwargs"] = state.previous_accepts_loss_kwargs[0]
    else:
        vars(target).pop("accepts_loss_kwargs", None)
    return True


def patch_report(model: nn.Module) -> PatchReport | None:
    """The report of a patched model (live call counters included), or None if not patched."""
    state = vars(_transformers_model(model)).get(_STATE)
    return state.report if state is not None else None
