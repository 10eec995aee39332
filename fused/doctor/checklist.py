"""``diagnose``: the checklist run on one model and batch."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from fused.doctor import extra_inputs, fused_loss, initial_loss, label_shift, loss_kwargs, packing, padding
from fused.doctor.findings import Diagnosis, Finding, Status
from fused.doctor.subject import Subject, examining, model_of, subject_of

# In the order a practitioner would walk them: is the fast path on, is the number sane, is
# it the right number (accumulation, targets, data layout).
CHECKS: tuple[tuple[str, Callable[[Subject], Finding]], ...] = tuple(
    (module.CHECK, module.check)
    for module in (fused_loss, initial_loss, loss_kwargs, label_shift, packing, padding, extra_inputs)
)


def _run(name: str, check: Callable[[Subject], Finding], subject: Subject) -> Finding:
    try:
        return check(subject)
    except Exception as error:  # one check failing on this model must not hide the others
        return Finding(name, Status.SKIPPED, f"could not run: {type(error).__name__}: {error}")


def diagnose(
    model_or_trainer: Any,
    batch: Mapping[str, Any] | None = None,
    *,
    pretrained: bool | None = None,
    checks: Iterable[str] | None = None,
) -> Diagnosis:
    """Run the loss checklist on a model (or a transformers ``Trainer``) and one batch.

    ``model_or_trainer``: a transformers causal LM (or a PEFT model around one), patched by
    ``fused.patch_model`` or not, or a ``Trainer`` (``trl.SFTTrainer`` included), whose
    ``model``, decisions and first train-dataloader batch are examined. ``batch``: the keyword
    inputs of one batch as the training loop passes them, ``input_ids (B, T)`` and ``labels
    (B, T)`` integer tensors among them (``attention_mask``, ``position_ids``, token types ...
    as the collator makes them). Without one, a Trainer's dataloader gives it, or random
    tokens stand in (then only the checks that do not read the data run). ``pretrained``:
    whether the weights are trained ones, which sets what a sane first loss is; None reads
    it from ``config._name_or_path`` (set by ``from_pretrained``). ``checks``: names of the
    checks to run (``CHECKS``' order is kept); None runs them all.

    Leaves the model as it was: parameters, buffers, ``.grad``, every module's train/eval
    mode, the RNG state and the patch's call counters. Returns a ``Diagnosis``; ``print`` it
    for the checklist. Raises ``TypeError``/``ValueError`` naming what is wrong with the
    arguments (no transformers model, a batch without labels ...).
    """
    names = [name for name, _ in CHECKS]
    wanted = names if checks is None else list(checks)
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise ValueError(f"unknown checks {unknown}; the checks are {names}")
    model = model_of(model_or_trainer)
    if not isinstance(model, nn.Module):
        raise TypeError(f"diagnose takes a transformers model or Trainer, got {type(model_or_trainer).__name__}")
    with examining(model), warnings.catch_warnings():
        # The patch's fallback warnings are findings here, not noise for the caller.
        warnings.simplefilter("ignore")
        subject, source = subject_of(model_or_trainer, batch, pretrained)
        findings = tuple(_run(name, check, subject) for name, check in CHECKS if name in wanted)
    return Diagnosis(type(subject.model).__name__, source, findings)
