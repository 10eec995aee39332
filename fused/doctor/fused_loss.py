"""Check: does a training forward with labels really take the fused loss?

Behavioural: one training-mode forward of the batch through the model as the training loop
calls it, reading the patch's call counters (``fused.patch_report``) before and after. The
fused count must move. A forward replaced after ``patch_model`` by one that skips the patch
(a wrapper assigned to ``model.forward`` that calls the class's forward) leaves the counters
still; a fallback counts and says why; a patch on a module the outer forward does not reach with labels stays still.
"""

from __future__ import annotations

from dataclasses import replace

from fused.doctor.findings import Finding, Status
from fused.doctor.subject import Subject, patch_reports

CHECK = "fused_loss"


def _describe(calls) -> str:
    return f"fused +{calls[0]}, stock +{calls[1]}, fallback +{calls[2]}"


def check(subject: Subject) -> Finding:
    reports = patch_reports(subject.model)
    if not reports:
        return Finding(
            CHECK,
            Status.SKIPPED,
            "not patched: the model's stock loss computes the training loss",
            fix="fused.patch_model(model) to compute it with the fused kernel",
        )
    before = [replace(report.calls) for report in reports]
    subject.loss(training=True)
    moved = [
        (r.calls.fused - b.fused, r.calls.stock - b.stock, r.calls.fallback - b.fallback)
        for r, b in zip(reports, before)
    ]
    evidence = "one training forward with labels: " + "; ".join(
        f"{r.model} {_describe(m)}" for r, m in zip(reports, moved)
    )
    for report, calls in zip(reports, moved):
        if calls[2]:
            return Finding(
                CHECK,
                Status.PROBLEM,
                f"the patched {report.model} fell back to its stock loss",
                f"{evidence}; reason: {report.calls.last_fallback}",
                "remove the cause named above, or unpatch_model and patch_model again after changing the model",
            )
    if any(calls[0] for calls in moved):
        return Finding(CHECK, Status.OK, "training forwards take the fused loss", evidence)
    forward = subject.transformers_model.forward
    name = getattr(forward, "__qualname__", type(forward).__name__)
    return Finding(
        CHECK,
        Status.PROBLEM,
        "patched, but silently inactive: the training forward did not reach the patch",
        f"{evidence}; model.forward is now {name}",
        "something replaced the forward or calls another module after patch_model (a wrapper that calls "
        "the class's forward): call fused.patch_model on the model the trainer calls, after that wrapper is installed",
    )
