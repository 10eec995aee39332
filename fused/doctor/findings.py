"""The loss doctor's report: one finding per check, printed as a short checklist."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Status(str, Enum):
    """A check's verdict. ``SKIPPED``: the check does not apply to this model or batch (or
    could not run); the summary says which."""

    OK = "ok"
    WARNING = "warning"
    PROBLEM = "problem"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Finding:
    """One check's verdict on one model and batch.

    ``check``: the check's name (``'fused_loss'``, ``'initial_loss'`` ...); ``summary``: one
    line; ``evidence``: what was measured on the batch, with the numbers; ``fix``: what to
    change (empty when nothing needs to).
    """

    check: str
    status: Status
    summary: str
    evidence: str = ""
    fix: str = ""

    def lines(self, name_width: int = 0) -> str:
        """The checklist entry: status, check name (padded to ``name_width``) and summary,
        then the evidence and the fix indented beneath."""
        label = f"[{self.status.value}]".ljust(_LABEL_WIDTH)
        indent = " " * (2 + _LABEL_WIDTH + 1 + max(name_width, len(self.check)) + 1)
        entry = [f"  {label} {self.check.ljust(name_width)} {self.summary}"]
        entry += [f"{indent}{kind}: {text}" for kind, text in (("evidence", self.evidence), ("fix", self.fix)) if text]
        return "\n".join(entry)

    def __str__(self) -> str:
        return self.lines()


_LABEL_WIDTH = max(len(status.value) for status in Status) + 2


@dataclass(frozen=True)
class Diagnosis:
    """What ``fused.diagnose`` found: ``model`` (its class), ``batch`` (where the batch came
    from and its shape) and one ``Finding`` per check, in checklist order."""

    model: str
    batch: str
    findings: tuple[Finding, ...]

    def __getitem__(self, check: str) -> Finding:
        for finding in self.findings:
            if finding.check == check:
                return finding
        raise KeyError(f"no check named {check!r}; checks: {', '.join(f.check for f in self.findings)}")

    def with_status(self, *statuses: Status) -> tuple[Finding, ...]:
        """The findings whose status is one of ``statuses``."""
        return tuple(f for f in self.findings if f.status in statuses)

    @property
    def healthy(self) -> bool:
        """No problem and no warning."""
        return not self.with_status(Status.PROBLEM, Status.WARNING)

    def __str__(self) -> str:
        name_width = max(len(f.check) for f in self.findings)
        lines = [f"Loss doctor: {self.model} on {self.batch}"]
        lines += [f.lines(name_width) for f in self.findings]
        counts = ", ".join(f"{len(self.with_status(s))} {s.value}" for s in Status)
        lines.append(f"  {counts}")
        return "\n".join(lines)

    def _repr_pretty_(self, printer, cycle: bool) -> None:  # IPython shows the checklist
        printer.text(str(self))
