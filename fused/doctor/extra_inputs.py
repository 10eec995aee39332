"""Check: does the batch carry the token-type inputs the model's processor would add?

Some models read which tokens are images (or which are the prompt) from an extra input that
only their processor builds: ``mm_token_type_ids`` (Gemma 4 and the Qwen-VL family: 0 text,
1 image, 2 video, 3 audio), ``token_type_ids`` in the same meaning for Gemma 3 (its processor
renames it), and ``token_type_ids`` as prefix 0 / suffix 1 for PaliGemma. A text collator
drops them silently, and the attention mask or positions change.

Behavioural: for each such input the forward takes and the batch lacks, the model's output
without it against the output with it built as the processor would (from the config's token
ids, or from the labels for PaliGemma's suffix), in eval mode, where even a patched model
returns its logits. A forward that fails without it, or logits that move, is a problem;
equal logits (text-only data on a model that needs no types for text) are fine.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor

from fused.doctor.findings import Finding, Status
from fused.doctor.subject import Subject
from fused.hf.probe import loss_of, relative_error
from reference.causal_lm_loss import IGNORE_INDEX

CHECK = "extra_inputs"
MODALITY_TYPES = {"image": 1, "video": 2, "audio": 3}  # processing_utils.create_mm_token_type_ids
# Processors that return the modality types under the name token_type_ids.
RENAMED_MODALITY_TYPES = {"gemma3", "gemma3n", "shieldgemma2"}
PREFIX_SUFFIX_TYPES = {"paligemma"}


def _modality_types(subject: Subject) -> Tensor:
    """``(B, T)`` int64: the processor's modality type of every token of ``input_ids``."""
    config, input_ids = subject.transformers_model.config, subject.batch["input_ids"]
    types = torch.zeros_like(input_ids)
    for modality, value in MODALITY_TYPES.items():
        for key in (f"{modality}_token_id", f"{modality}_token_index"):
            token = getattr(config, key, None)
            if isinstance(token, int):
                types[input_ids == token] = value
    return types


def _suffix_types(subject: Subject) -> Tensor:
    """PaliGemma's processor: 0 on the prefix (image and prompt), 1 on the suffix, which is
    the labelled part."""
    return (subject.batch["labels"] != IGNORE_INDEX).long()


def expected_inputs(subject: Subject) -> dict[str, Callable[[Subject], Tensor]]:
    """The token-type inputs this model's forward takes, each with how its processor builds it."""
    model = subject.transformers_model
    parameters = inspect.signature(model.forward).parameters
    model_type = getattr(model.config, "model_type", "")
    expected = {}
    if "mm_token_type_ids" in parameters:
        expected["mm_token_type_ids"] = _modality_types
    if "token_type_ids" in parameters and model_type in RENAMED_MODALITY_TYPES:
        expected["token_type_ids"] = _modality_types
    if "token_type_ids" in parameters and model_type in PREFIX_SUFFIX_TYPES:
        expected["token_type_ids"] = _suffix_types
    return expected


def check(subject: Subject) -> Finding:
    missing = {name: build for name, build in expected_inputs(subject).items() if subject.batch.get(name) is None}
    if not missing:
        present = [name for name in expected_inputs(subject)]
        summary = f"the batch carries {', '.join(present)}" if present else "the forward takes no token-type input"
        return Finding(CHECK, Status.OK if present else Status.SKIPPED, summary)
    evidence = []
    for name, build in missing.items():
        built = subject.output(subject.with_inputs(**{name: build(subject)}))
        try:
            absent = subject.output()
        except Exception as error:  # the model's own refusal names what it misses
            return Finding(
                CHECK, Status.PROBLEM, f"the forward fails without {name}",
                f"{type(error).__name__}: {error}; "
                f"with {name} built as the processor does: loss {float(loss_of(built)):.4g}",
                f"keep {name} from the processor in every batch (a text collator drops it)",
            )
        # The logits show a changed mask even where a random model's loss barely moves.
        change = relative_error(absent.logits, built.logits)
        evidence.append(
            f"{name}: loss {float(loss_of(absent)):.4g} without, {float(loss_of(built)):.4g} with it; "
            + (
                f"logits differ by {change:.1e} of their largest magnitude (tolerance {subject.tolerance:g})"
                if change > subject.tolerance
                else f"logits equal within {subject.tolerance:g}"
            )
        )
        if change > subject.tolerance:
            return Finding(
                CHECK, Status.PROBLEM, f"{name} is missing and changes the model's output", "; ".join(evidence),
                f"keep {name} from the processor in every batch (a text collator drops it)",
            )
    return Finding(
        CHECK, Status.OK, f"{', '.join(missing)} absent, but the output does not depend on it here", "; ".join(evidence)
    )
