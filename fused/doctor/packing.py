"""Check: do packed documents stay apart?

A packed row holds several documents, each with ``position_ids`` restarting (transformers
reads a document start wherever ``position_ids`` does not grow by one). transformers builds
the block-diagonal mask from them only when ``attention_mask is None``: a collator that also
sends an all-ones mask gets one causal mask over the whole row, and every document attends
to the ones before it. Nor when the forward builds a cache, which most do in training too
unless ``use_cache=False`` (``config.use_cache`` is on by default).

Behavioural: the loss of the first packed row as given against the same documents run one at
a time, on the same targets (document starts ignored in both, since the packed row would
score a document's last token on the next one's first). Equal within ``RERUN_TOLERANCE``
of the model's dtype means no leak. When they differ, the row without ``attention_mask`` (and
then also with ``use_cache=False``) says which change is the fix.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fused.doctor.findings import Finding, Status
from fused.doctor.subject import Subject
from reference.causal_lm_loss import IGNORE_INDEX, count_target_tokens

CHECK = "packing"


def document_starts(position_ids: Tensor) -> Tensor:
    """``(B, T)`` bool, True where a document starts, by transformers' rule
    (``find_packed_sequence_indices``): the first position, and wherever the position id
    does not grow by one."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[..., 1:] = position_ids[..., 1:] != position_ids[..., :-1] + 1
    return starts


def _row(subject: Subject, row: int) -> tuple[dict[str, Any], list[str]]:
    """The batch's inputs cut to row ``row``, and the names of inputs that cannot be cut so
    (not shaped ``(B, T, ...)``: images, caches)."""
    batch, (rows, length) = subject.batch, subject.batch["input_ids"].shape
    cut, uncut = {}, []
    for name, value in batch.items():
        if isinstance(value, Tensor) and value.shape[:2] == (rows, length):
            cut[name] = value[row : row + 1]
        elif isinstance(value, Tensor) and name == "position_ids" and value.shape == (1, length):
            cut[name] = value
        elif value is not None:
            uncut.append(name)
    return cut, uncut


def _remedies(inputs: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The packed row changed so that transformers can see the documents: the mask dropped,
    then also the cache the forward builds when ``config.use_cache`` is on."""
    no_cache = "set model.config.use_cache = False (or pass use_cache=False)"
    if "attention_mask" not in inputs:
        return [(no_cache, {**inputs, "use_cache": False})]
    unmasked = {k: v for k, v in inputs.items() if k != "attention_mask"}
    return [
        ("drop attention_mask", unmasked),
        (f"drop attention_mask and {no_cache}", {**unmasked, "use_cache": False}),
    ]


def _loss_and_count(subject: Subject, inputs: dict[str, Any]) -> tuple[float, int]:
    return float(subject.loss(inputs)), int(count_target_tokens(inputs["labels"]))


def check(subject: Subject) -> Finding:
    position_ids = subject.batch.get("position_ids")
    if not subject.given or not isinstance(position_ids, Tensor) or position_ids.dim() != 2:
        return Finding(CHECK, Status.SKIPPED, "no (B, T) position_ids: the batch is not packed")
    position_ids = position_ids.expand_as(subject.batch["input_ids"])
    starts = document_starts(position_ids)
    mask = subject.batch.get("attention_mask")
    if mask is not None:
        starts &= mask.bool()
    packed_rows = (starts.sum(-1) > 1).nonzero().flatten().tolist()
    if not packed_rows:
        return Finding(CHECK, Status.SKIPPED, "position_ids never restart inside a row: the batch is not packed")
    row = packed_rows[0]
    inputs, uncut = _row(subject, row)
    if uncut:
        return Finding(CHECK, Status.SKIPPED, f"packed, but {', '.join(uncut)} cannot be cut into documents")
    inputs["labels"] = inputs["labels"].masked_fill(starts[row : row + 1], IGNORE_INDEX)
    keep = torch.ones_like(starts[row]) if mask is None else mask[row].bool()
    bounds = starts[row].nonzero().flatten().tolist() + [int(keep.nonzero().max()) + 1]
    documents = []
    for begin, end in zip(bounds[:-1], bounds[1:]):
        document = {k: v[:, begin:end] for k, v in inputs.items() if k not in ("attention_mask", "position_ids")}
        document["position_ids"] = torch.arange(end - begin, device=position_ids.device).unsqueeze(0)
        documents.append(_loss_and_count(subject, document))
    total = sum(count for _, count in documents)
    if total == 0:
        return Finding(CHECK, Status.SKIPPED, f"row {row}'s documents have no target after their first token")
    separate = sum(loss * count for loss, count in documents if count) / total
    packed = float(subject.loss(inputs))
    tolerance = subject.tolerance
    error = abs(packed - separate) / abs(separate)
    later_starts = starts.clone()
    later_starts[:, 0] = False
    labelled_starts = int((subject.batch["labels"][later_starts] != IGNORE_INDEX).sum())
    agreement = f"relative difference {error:.1e}, tolerance {tolerance:g}" if error > tolerance else (
        f"equal within {tolerance:g}"  # rounding-level differences depend on the CPU: not printed
    )
    evidence = (
        f"row {row}, {len(documents)} documents: loss {packed:.4g} packed, {separate:.4g} one document at a time "
        f"({agreement}); attention_mask "
        + ("absent" if mask is None else "all ones" if bool(mask[row].all()) else "given")
    )
    if error > tolerance:
        fix = "train unpacked: this model does not keep packed documents apart"
        for change, variant in _remedies(inputs):
            try:
                loss = float(subject.loss(variant))
            except Exception:  # a forward that takes no use_cache: that remedy does not apply
                continue
            evidence += f"; {change}: {loss:.4g}"
            if abs(loss - separate) <= tolerance * abs(separate):
                fix = f"{change}: transformers detects packed documents only with no attention_mask and no cache"
                break
        return Finding(CHECK, Status.PROBLEM, "packed documents attend to each other", evidence, fix)
    if labelled_starts > 0:
        return Finding(
            CHECK,
            Status.WARNING,
            "documents stay apart, but each one's last token is scored on the next one's first",
            f"{evidence}; {labelled_starts} document starts after the first are labelled",
            "set labels to -100 at every document start (DataCollatorWithFlattening does)",
        )
    return Finding(CHECK, Status.OK, "packed documents stay apart", evidence)
