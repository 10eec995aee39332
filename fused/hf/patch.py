"""``patch_model``: make one Hugging Face causal LM compute its training loss with the fused kernel.

The patch changes one model instance (never transformers' classes): its ``forward``
becomes a wrapper that, for a training call with labels (``model.training`` and
``labels is not None``), runs the model's own forward with two seams cut
(``fused.hf.capture``): the head computes no logits, and the loss call
(``model.loss_function``, or ``F.cross_entropy`` in older heads) is answered by
``fused.linear_cross_entropy`` on the head's input, the head's weight (LoRA adapters and
``modules_to_save`` folded in, ``fused.hf.head``) and the model's logit transform as
kernel options (``fused.hf.transform``). Everything else is the model's code: backbone,
``logits_to_keep``, multimodal inputs, the MoE auxiliary loss, the output class and
``return_dict=False`` tuples. Every other call (``labels=None``, eval mode: evaluation loops
and ``generate``) is the stock forward, untouched.

Nothing is decided from source text. ``patch_model`` probes the instance
(``fused.hf.probe``): it measures the head -> loss wiring and transform, then checks
stock against patched loss and gradients on a tiny batch; anything that does not match
is refused and the model left exactly as it was. The report records what was folded and
the verification errors, and counts the calls that took the fused path, the stock path or
fell back, so "silently inactive" shows up as numbers. A training call that does not
follow the probed wiring still runs the model body once: what is known before the forward
(the config's floats changed, a custom ``loss_function`` was set, the head became something
else) runs the stock forward instead; what only the loss call shows (class weights on
``cross_entropy``) gets the stock loss on the head's captured input. Either is counted as a
fallback and warned about once per reason (``RuntimeWarning``).

The seams (``fused.hf.capture``) stay installed while the model is patched, idle outside a
training call, so ``torch.compile(model, fullgraph=True)`` traces a patched training forward
in one graph.

TRL's fused LM head (``add_fused_lm_head``) composes with the patch in either order: its
``fused_lm_head=True`` training calls are served by the kernel (``fused.hf.trl``), through
the patched forward when TRL's forward sits inside it, through a forward pre-hook the patch
registers (``trl_pre_hook``) when TRL's forward was added around it.

Models sharded by FSDP2 (``fully_shard``, before or after ``patch_model``) are patched too:
the loss runs where FSDP2 has gathered the head's weight (``fused.fsdp``); the report's
``layout`` says which way.

A head sharded over the vocabulary by tensor parallelism (``ColwiseParallel``) gets the
vocabulary-parallel loss, verified against the unsharded model's computation
(``fused.tensor_parallel``); every process of its mesh calls ``patch_model``, as it calls
``parallelize_module``.

Outputs of fused calls carry ``logits=None`` (a ``return_dict=False`` tuple keeps ``None``
at the logits position, so positions match the stock tuple). The loss follows the call the
model made: ``ForCausalLMLoss`` (shift by padding the labels, or ``shift_labels`` as given;
mean over valid targets, or sum / ``num_items_in_batch``, int or tensor, used as given) or
``F.cross_entropy`` (labels as given, its ``reduction``, ``ignore_index`` and
``label_smoothing``). In 16-bit models the logit transform runs in float32 inside the
kernel, where the stock head rounds it to the model's dtype.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from fused.hf.capture import CaptureError, Seams, loss_function_owners, stock_causal_lm_loss
from fused.hf.forward import (
    STATE, PatchedForward, PatchState, count_call, fingerprint, fused_forward, sharded_head_parameter, trl_pre_hook
)
from fused.hf.head import UnsupportedHead, head_kind
from fused.hf.probe import ProbeRefusal, observe_wiring, probe_inputs, probe_labels, probing, verify
from fused.hf.report import PatchCalls, PatchReport
from fused.hf.trl import FIRST_SERVED_TRL, old_trl
from fused.fsdp import head_layout, is_fsdp_module, through_module_call
from fused.tensor_parallel import is_tensor_parallel_head, unsharded_head_forward
from fused.fsdp import fsdp_gathers_head
from reference.input_checks import check_size
from reference.num_items_probe import trainer_accepts_loss_kwargs


def _transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper, or ``model`` itself."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


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
) -> tuple[PatchReport, PatchState | None]:
    """Probe ``model``: its report, with the state to install when it can be patched."""
    old = old_trl()
    if old is not None:
        return _refuse(
            model,
            f"TRL {old} is installed: its trainers read outputs.logits of training calls with labels "
            "(SFTTrainer's token accuracy and entropy) and its loss_type='chunked_nll' reads "
            "model.forward.__func__, where a patched model gives logits=None and a forward object; "
            f"TRL >= {FIRST_SERVED_TRL} is served by the patch (pip install 'trl>={FIRST_SERVED_TRL}')",
        )
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
    sharded = sharded_head_parameter(model, head)
    if sharded is not None:
        return _refuse(model, sharded, kind)
    for owner in loss_function_owners(model, head):
        if owner.loss_function is not stock_causal_lm_loss():
            loss = owner.loss_function
            name = getattr(loss, "__qualname__", type(loss).__name__)
            where = "model" if owner is model else type(owner).__name__
            return _refuse(model, f"{where}.loss_function is {name}, not ForCausalLMLoss: the custom loss is kept", kind)
    try:
        seams = Seams(model, head)
    except CaptureError as error:
        return _refuse(model, str(error), kind)
    report, state = _probe(model, head, kind, seams, example_inputs, seed)
    if state is None:
        seams.remove()
    return report, state


def _probe(
    model: nn.Module, head: nn.Module, kind: str, seams: Seams, example_inputs: dict[str, Any] | None, seed: int
) -> tuple[PatchReport, PatchState | None]:
    """The probes of ``_examine`` on a model with its ``seams`` installed."""
    forward = vars(model).get("forward") or type(model).forward.__get__(model)
    if is_fsdp_module(model):  # its hooks gather the parameters the probe's forwards need
        forward = through_module_call(model, forward)
    generator = torch.Generator().manual_seed(seed)
    state = None
    with probing(model), torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a fallback on the probe becomes the refusal
        try:
            inputs, labels, shape_source = _probe_batch(model, example_inputs, generator)
            wiring = observe_wiring(model, seams, forward, {**inputs, "labels": shape_source}, generator)
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
                layout=head_layout(model, head),
            )
            state = PatchState(
                report=report,
                transform=wiring.transform,
                fingerprint=fingerprint(model, wiring.transform),
                seams=seams,
                previous_forward=vars(model).get("forward"),
                previous_accepts_loss_kwargs=tuple(
                    vars(model)[name] for name in ("accepts_loss_kwargs",) if name in vars(model)
                ),
            )
            # The patched path runs here in eval mode, its forward installed nowhere yet.
            def patched(**inputs: Any) -> Any:
                output, fused = fused_forward(model, state, (), inputs)
                if fused:
                    count_call(state.serial, "fused")
                return output

            if is_fsdp_module(model):
                patched = through_module_call(model, patched)
            count = torch.tensor(int((labels[..., 1:] != -100).sum()) + 3) if wiring.uses_num_items_in_batch else None
            # A head sharded over the vocabulary is held to the unsharded model's computation.
            tensor_parallel = not fsdp_gathers_head(model, head) and is_tensor_parallel_head(head)
            stock = unsharded_head_forward(head, forward) if tensor_parallel else forward
            verification = verify(stock, patched, head, {**inputs, "labels": labels}, count)
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
    state.warned = set()
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

    Refused while a TRL older than 1.15 is installed: its trainers read the logits the patch
    leaves out (``fused.hf.trl.old_trl``).

    Idempotent: a patched model returns its existing report; a ``memory_budget`` given then
    replaces the one in use. A refused model is untouched.
    """
    if memory_budget is not None:
        check_size("memory_budget", memory_budget)
    target = _transformers_model(model)
    state = vars(target).get(STATE)
    if state is not None:
        if memory_budget is not None:
            state.memory_budget = memory_budget
        return state.report
    report, state = _examine(target, example_inputs, seed)
    if state is None:
        return report
    state.memory_budget = memory_budget
    vars(target)[STATE] = state
    target.forward = PatchedForward(target)
    target.accepts_loss_kwargs = report.accepts_loss_kwargs
    target.register_forward_pre_hook(trl_pre_hook, with_kwargs=True)  # TRL's head added after the patch
    return report


def unpatch_model(model: nn.Module) -> bool:
    """Restore the stock forward, head, ``loss_function`` and ``accepts_loss_kwargs`` of a patched model.

    Returns True if a patch was removed, False if the model was not patched. Raises
    ``RuntimeError``, changing nothing, when ``forward`` was wrapped again after the patch
    (accelerate's autocast wrapper, a trainer's own): the patch sits inside that wrapper, and
    removing it would remove the wrapper too.
    """
    target = _transformers_model(model)
    if STATE not in vars(target):
        return False
    current = vars(target).get("forward")
    if not isinstance(current, PatchedForward):
        raise RuntimeError(
            f"fused.unpatch_model: {type(target).__name__}.forward was wrapped after patch_model "
            f"(it is now {current!r}); unpatching would remove that wrapper too. Remove the wrapper "
            "first (accelerate: accelerator.unwrap_model(model, keep_fp32_wrapper=False)), or keep the patch."
        )
    if vars(target)[STATE].label_smoothing:
        raise RuntimeError(
            f"fused.unpatch_model: {type(target).__name__}'s loss holds a Trainer's label smoothing "
            "(fused.hf.trainer.fuse_label_smoothing); unpatching would drop it silently. Build the Trainer anew."
        )
    state = vars(target).pop(STATE)
    state.seams.remove()
    for key in [key for key, hook in target._forward_pre_hooks.items() if hook is trl_pre_hook]:
        del target._forward_pre_hooks[key]
        target._forward_pre_hooks_with_kwargs.pop(key, None)
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
    state = vars(_transformers_model(model)).get(STATE)
    return state.report if state is not None else None
