"""Check: are the labels unshifted, as the model expects?

A causal LM shifts ``labels`` itself (``ForCausalLMLoss``): position ``t`` is scored against
``labels[t + 1]``. Labels shifted already by the collator (``labels[t] == input_ids[t + 1]``)
get shifted again, and the model learns to predict the token after next. ``shift_labels``
is the opposite: used as given, it must already be shifted.

Static on the batch, decisive for text: the share of labelled positions where the labels
equal ``input_ids`` at the same position and one position ahead. Behavioural evidence when
it fires: the loss with the labels as given against the labels moved back into place.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from fused.doctor.findings import Finding, Status
from fused.doctor.subject import Subject
from reference.causal_lm_loss import IGNORE_INDEX

CHECK = "label_shift"
# Shares of labelled positions: above MATCH the labels are that alignment; real text repeats
# tokens, so the other alignment also matches now and then.
MATCH = 0.99


def _shares(targets: Tensor, input_ids: Tensor) -> tuple[float, float, int]:
    """Of the positions ``t < T - 1`` with a target: the share where it equals ``input_ids[t]``
    and where it equals ``input_ids[t + 1]``, and their number."""
    labelled = targets[..., :-1] != IGNORE_INDEX
    count = int(labelled.sum())
    if count == 0:
        return 0.0, 0.0, 0
    same = int((labelled & (targets[..., :-1] == input_ids[..., :-1])).sum()) / count
    ahead = int((labelled & (targets[..., :-1] == input_ids[..., 1:])).sum()) / count
    return same, ahead, count


def check(subject: Subject) -> Finding:
    if not subject.given:
        return Finding(CHECK, Status.SKIPPED, "no batch given: the labels are drawn here")
    input_ids = subject.batch["input_ids"]
    name = "shift_labels" if isinstance(subject.batch.get("shift_labels"), Tensor) else "labels"
    same, ahead, count = _shares(subject.batch[name], input_ids)
    if count == 0:
        return Finding(CHECK, Status.SKIPPED, f"{name} has no target before the last position")
    evidence = (
        f"{name} equal input_ids at {same:.1%} and input_ids one ahead at {ahead:.1%} of {count} labelled positions"
    )
    expected, wrong = (same, ahead) if name == "labels" else (ahead, same)
    if expected >= MATCH:
        return Finding(CHECK, Status.OK, f"{name} are aligned as the loss expects", evidence)
    if wrong >= MATCH:
        if name == "shift_labels":
            return Finding(
                CHECK, Status.PROBLEM, "shift_labels are not shifted: every position is scored on its own token",
                evidence, "pass them as labels= (the model shifts), or shift them: shift_labels[t] = labels[t + 1]",
            )
        labels = subject.batch["labels"]
        realigned = F.pad(labels[..., :-1], (1, 0), value=IGNORE_INDEX)
        given, back = float(subject.loss()), float(subject.loss(subject.with_inputs(labels=realigned)))
        return Finding(
            CHECK,
            Status.PROBLEM,
            "labels are shifted twice: the model learns to predict the token after next",
            f"{evidence}; loss {given:.4g} as given, {back:.4g} with the labels moved back one position",
            "pass unshifted labels (input_ids with -100 where ignored), or pass the shifted ones as shift_labels=",
        )
    return Finding(
        CHECK, Status.WARNING, f"{name} match input_ids in neither alignment", evidence,
        "labels should be input_ids with -100 at ignored positions; check the collator",
    )
