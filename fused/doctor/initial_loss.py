"""Check: is the loss on the batch sane against ``log(vocab_size)``?

Behavioural: the model's loss on the batch (eval mode) against ``ln V``, the loss of a
uniform guess over the vocabulary. A randomly initialised model starts near ``ln V``; a
pretrained one fine-tuned on text it can read starts far below it (SmolLM2-135M-Instruct on
this project's instruction answers, Python docstrings: 0.38 ``ln V``), so a pretrained model
near ``ln V`` means broken weights or targets that are not the next tokens. Above ``ln V``
the model is worse than guessing.
"""

from __future__ import annotations

import math

from fused.doctor.findings import Finding, Status
from fused.doctor.subject import Subject
from reference.causal_lm_loss import count_target_tokens

CHECK = "initial_loss"
# loss / ln V of a pretrained model on its own kind of text lies well below these.
PRETRAINED_WARNING, PRETRAINED_PROBLEM = 0.6, 0.8
# A random initialisation gives nearly uniform logits: loss / ln V close to 1. Far above it
# is not wrong as such (some configs initialise large), but training starts saturated.
RANDOM_WARNING = 1.5


def check(subject: Subject) -> Finding:
    if subject.pretrained and not subject.given:
        return Finding(CHECK, Status.SKIPPED, "no batch given: random tokens say nothing of a pretrained model's loss")
    targets = int(count_target_tokens(subject.batch["labels"]))
    if targets == 0:
        return Finding(
            CHECK,
            Status.PROBLEM,
            "the batch has no target: every label after the first position is -100",
            "0 target tokens; the loss is NaN and the gradient zero",
            "check the collator's masking (completion-only masks, padding masks)",
        )
    loss = float(subject.loss())
    uniform = math.log(subject.vocab_size)
    ratio = loss / uniform
    evidence = (
        f"loss {loss:.4g} over {targets} targets; ln V = ln {subject.vocab_size} = {uniform:.4g}; ratio {ratio:.3f}"
    )
    weights = "pretrained" if subject.pretrained else "randomly initialised"
    if not math.isfinite(loss):
        return Finding(CHECK, Status.PROBLEM, "the loss is not finite", evidence, "look for inf/NaN weights or inputs")
    if subject.pretrained and ratio >= PRETRAINED_PROBLEM:
        return Finding(
            CHECK,
            Status.PROBLEM,
            "pretrained model, loss near or above a uniform guess",
            evidence,
            "check that the weights loaded (no newly initialised head or norm), that labels are the next "
            "tokens (label_shift) and that the batch is text the model was trained on",
        )
    if subject.pretrained and ratio >= PRETRAINED_WARNING:
        return Finding(
            CHECK, Status.WARNING, "pretrained model, loss high for text it should know", evidence,
            "compare with the model on plain text it knows; check masking and labels",
        )
    if not subject.pretrained and ratio >= RANDOM_WARNING:
        return Finding(
            CHECK, Status.WARNING, "randomly initialised model, loss far above a uniform guess", evidence,
            "large initial logits: check the initialisation scale (initializer_range, embedding and logit "
            "multipliers); pass pretrained=True if the weights are trained",
        )
    expected = "well below ln V" if subject.pretrained else "near ln V"
    return Finding(CHECK, Status.OK, f"{weights} model, loss {expected} as expected", evidence)
