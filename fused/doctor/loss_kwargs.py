"""Check: does Trainer hand ``num_items_in_batch`` to a model that divides by it, and only then?

Behavioural, through ``reference.num_items_probe``: the model runs twice on one small batch
with the counts ``n`` and ``2n``; a loss divided by the count halves. Trainer's decision
(``trainer.model_accepts_loss_kwargs``, or the rule it would apply,
``trainer_accepts_loss_kwargs``) must agree. Passing the count to a model that ignores it
makes Trainer skip its division by the accumulation steps: logged loss and gradients come
out ``gradient_accumulation_steps`` times too large. Withholding it from a model that uses it
averages per-micro-batch means, weighting a short micro-batch's tokens more.
"""

from __future__ import annotations

from fused.doctor.findings import Finding, Status
from fused.doctor.subject import Subject
from reference.num_items_probe import probe_num_items_in_batch, trainer_accepts_loss_kwargs

CHECK = "loss_kwargs"


def check(subject: Subject) -> Finding:
    try:
        probe = probe_num_items_in_batch(subject.model)
    except Exception as error:  # the model's own code failed on the probe's random batch
        return Finding(CHECK, Status.SKIPPED, f"the count probe could not run: {type(error).__name__}: {error}")
    trainer = subject.trainer
    if trainer is not None:
        decision, why = trainer.model_accepts_loss_kwargs, "trainer.model_accepts_loss_kwargs"
        steps, processes = trainer.args.gradient_accumulation_steps, trainer.args.world_size
    else:
        decision, reason = trainer_accepts_loss_kwargs(subject.model)
        why = f"Trainer's rule: {reason}"
        steps = processes = None
    uses = probe.uses_num_items_in_batch
    evidence = f"{probe.behavioural_reason}; model_accepts_loss_kwargs = {decision} ({why})"
    if steps is not None:
        evidence += f"; gradient_accumulation_steps = {steps}, processes = {processes}"
    if decision is None:
        return Finding(
            CHECK, Status.WARNING, "Trainer cannot tell whether the model takes num_items_in_batch", evidence,
            f"set model.accepts_loss_kwargs = {uses} before building the Trainer",
        )
    accumulates = steps is None or steps > 1 or processes > 1
    fix_target = "trainer.model_accepts_loss_kwargs" if trainer is not None else "model.accepts_loss_kwargs"
    if decision and not uses:
        factor = f"{steps * processes}x" if steps is not None else "gradient_accumulation_steps times"
        return Finding(
            CHECK,
            Status.PROBLEM if accumulates else Status.WARNING,
            f"Trainer passes num_items_in_batch, the loss ignores it: loss and gradients {factor} too large"
            if accumulates
            else "Trainer passes num_items_in_batch, the loss ignores it (harmless only at 1 step on 1 process)",
            evidence,
            f"{fix_target} = False (fused.patch_model sets it from the same measurement)",
        )
    if uses and not decision and accumulates:
        return Finding(
            CHECK,
            Status.WARNING,
            "the loss divides by num_items_in_batch, Trainer withholds it: a mean of micro-batch means",
            evidence,
            f"{fix_target} = True",
        )
    summary = "Trainer passes the count to a loss that divides by it" if uses else "no count is passed or needed"
    return Finding(CHECK, Status.OK, summary, evidence)
