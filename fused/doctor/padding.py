"""Check: is padding kept out of the loss, and is the real eos still a target?

Padding positions are those of ``attention_mask == 0``; without a mask, the run of pad ids
that ends a row, less its first token (which may be the real eos when pad == eos). A padding
position with a label trains the model on padding. When pad and eos share an id, a
collator that masks labels by id (``DataCollatorForLanguageModeling``) also masks the real
eos: the model never learns to stop.

Static on the batch; behavioural evidence when it fires: the loss as given against the loss
with the padding positions ignored.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fused.doctor.findings import Finding, Status
from fused.doctor.subject import Subject
from reference.causal_lm_loss import IGNORE_INDEX

CHECK = "padding"


def _ids(value: Any) -> set[int]:
    values = value if isinstance(value, (list, tuple)) else [value]
    return {int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)}


def special_ids(subject: Subject) -> tuple[set[int], set[int]]:
    """The pad and eos ids: the trainer's tokenizer's if there is one, else the config's and
    the generation config's."""
    tokenizer = getattr(subject.trainer, "processing_class", None)
    sources = [tokenizer] if tokenizer is not None and hasattr(tokenizer, "pad_token_id") else []
    model = subject.transformers_model
    sources += [subject.text_config, model.config, getattr(model, "generation_config", None)]
    pad: set[int] = set()
    eos: set[int] = set()
    for source in sources:
        pad = pad or _ids(getattr(source, "pad_token_id", None))
        eos = eos or _ids(getattr(source, "eos_token_id", None))
    return pad, eos


def _padding(input_ids: Tensor, attention_mask: Tensor | None, pad: set[int]) -> Tensor:
    """``(B, T)`` bool: the padding positions."""
    if attention_mask is not None:
        return attention_mask == 0
    is_pad = torch.isin(input_ids, torch.tensor(sorted(pad), device=input_ids.device))
    # A trailing run of pad ids: reversed cumulative product keeps the positions after the
    # last non-pad token.
    trailing = is_pad.flip(-1).long().cumprod(-1).flip(-1).bool()
    first = trailing & ~torch.nn.functional.pad(trailing, (1, 0))[..., :-1]
    return trailing & ~first


def check(subject: Subject) -> Finding:
    if not subject.given:
        return Finding(CHECK, Status.SKIPPED, "no batch given: random tokens carry no padding")
    pad, eos = special_ids(subject)
    input_ids, labels = subject.batch["input_ids"], subject.batch["labels"]
    attention_mask = subject.batch.get("attention_mask")
    if attention_mask is None and not pad:
        return Finding(CHECK, Status.SKIPPED, "neither an attention_mask nor a pad token id to find padding with")
    padding = _padding(input_ids, attention_mask, pad)
    scored = padding & (labels != IGNORE_INDEX)
    scored[..., 0] = False  # the first label of a row is never a target
    shared = bool(pad & eos)
    evidence = (
        f"{int(padding.sum())} padding positions, {int(scored.sum())} of them labelled; "
        f"pad ids {sorted(pad)}, eos ids {sorted(eos)}"
    )
    if scored.any():
        given = float(subject.loss())
        masked = float(subject.loss(subject.with_inputs(labels=labels.masked_fill(padding, IGNORE_INDEX))))
        return Finding(
            CHECK,
            Status.PROBLEM,
            "padding positions are scored by the loss",
            f"{evidence}; loss {given:.4g} as given, {masked:.4g} with padding ignored",
            "labels[attention_mask == 0] = -100"
            + (" (mask by attention_mask, not by the pad id: pad == eos)" if shared else ""),
        )
    real_eos = ~padding & torch.isin(input_ids, torch.tensor(sorted(eos) or [-1], device=input_ids.device))
    real_eos[..., 0] = False
    if shared and real_eos.any() and not (labels[real_eos] != IGNORE_INDEX).any():
        return Finding(
            CHECK,
            Status.WARNING,
            "pad == eos and every real eos is ignored: the model never learns to stop",
            f"{evidence}; {int(real_eos.sum())} eos tokens inside the attention mask, all labelled -100",
            "mask padding by attention_mask (labels[attention_mask == 0] = -100), not by the pad id",
        )
    summary = "padding is ignored by the loss" if padding.any() else "no padding in the batch"
    return Finding(CHECK, Status.OK, summary, evidence)
