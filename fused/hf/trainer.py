"""Trainer settings the patched loss can take over from ``transformers.Trainer``.

``label_smoothing_factor``: Trainer smooths outside the model (``LabelSmoother``): it takes the
labels out of the batch, so the model computes its full ``(N, V)`` logits and the patch never
runs. ``fuse_label_smoothing(trainer)`` moves the smoothing into the patched loss (the kernel's
``label_smoothing``, torch's definition, which is ``LabelSmoother``'s) and removes Trainer's
smoother, so training calls are fused and compute what Trainer computed; evaluation calls with
labels return the logits and the same smoothed loss, as before.
"""

from __future__ import annotations

from typing import Any

from fused.hf.capture import LOSS_FUNCTION
from fused.hf.forward import STATE
from fused.hf.patch import _transformers_model


def fuse_label_smoothing(trainer: Any) -> float:
    """Move ``trainer``'s label smoothing into its patched model's loss; returns the factor.

    Raises ``ValueError`` naming the reason, changing nothing, when the result would differ
    from Trainer's: the model is not patched or its loss is not ``ForCausalLMLoss``; its class
    is not a causal LM (Trainer then smooths unshifted labels); Trainer withholds
    ``num_items_in_batch`` from the model (its smoother would still divide by it).
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from transformers.trainer_pt_utils import LabelSmoother

    smoother = trainer.label_smoother
    if smoother is None:
        raise ValueError("the trainer has no label smoother (label_smoothing_factor is 0)")
    if type(smoother) is not LabelSmoother or smoother.ignore_index != -100:
        raise ValueError(f"the trainer's label smoother is a {type(smoother).__name__}, not Trainer's own")
    model = _transformers_model(trainer.accelerator.unwrap_model(trainer.model))
    state = vars(model).get(STATE)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched: call fused.patch_model(trainer.model) first")
    if state.report.loss != LOSS_FUNCTION:
        raise ValueError(f"{type(model).__name__}'s loss is {state.report.loss}, not ForCausalLMLoss")
    if model._get_name() not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        raise ValueError(
            f"{type(model).__name__} is not a causal-LM class: Trainer's LabelSmoother does not shift its labels"
        )
    if not trainer.model_accepts_loss_kwargs:
        raise ValueError("Trainer withholds num_items_in_batch from the model but hands it to its label smoother")
    state.label_smoothing = float(smoother.epsilon)
    trainer.label_smoother = None
    return state.label_smoothing
