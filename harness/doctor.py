"""The loss doctor on a correct setup of every architecture that patches: the count of false alarms.

For each architecture that ``harness/coverage.json`` records as patched: build the tiny model
(``harness.tiny_models``), patch it, and diagnose it on a correct batch: right padding with an
attention mask and -100 labels on it, labels equal to ``input_ids`` elsewhere, and the
token-type inputs its processor would add. Every warning or problem is a false alarm unless
``EXPLAINED`` says why it is not; a check that could not run is counted apart.

    python -m harness.doctor              # all, 2 workers, writes harness/doctor_coverage.md
    python -m harness.doctor llama gemma3 # some
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from harness.architectures import selected, selection_parser

OUTPUT_DIR = Path(__file__).resolve().parent
BATCH, LENGTH, PADDING = 2, 12, 3
# Alarms on a correct setup that were looked into: what the doctor measured is true of the
# model as built; each entry says why.
EXPLAINED = {
    "cpmant": "the default config initialises with init_std = 1.0: head weights of std 1, random-init logits of "
    "std 5.9 (a tiny Llama's: 0.11), so training starts far above ln V",
    "minicpm3": "the default config's initializer_range 0.1 with tied, scale_emb-scaled embeddings gives "
    "random-init logits of std 5.0 (a tiny Llama's: 0.11), so training starts far above ln V",
}


@dataclass
class Row:
    """One architecture's diagnosis: ``alarms`` lists ``check: summary`` of each warning or
    problem, ``unrun`` each check that could not run; ``error`` when no diagnosis came back."""

    model_type: str
    class_name: str
    alarms: list[str] = field(default_factory=list)
    unrun: list[str] = field(default_factory=list)
    error: str = ""


def correct_batch(model) -> dict:
    """A batch as a correct collator makes it: see the module docstring. Tokens lie below the
    logits' width (a padded vocabulary's extra rows are never targets); a token-type input
    is kept only where the forward takes it as built (some tiny configs lack the ids it reads)."""
    import torch

    from fused.doctor.extra_inputs import expected_inputs
    from fused.doctor.subject import Subject
    from fused.hf.probe import probe_inputs

    input_ids = probe_inputs(model, torch.Generator().manual_seed(1), BATCH, LENGTH)["input_ids"]
    with torch.no_grad():
        input_ids = input_ids.remainder(model(input_ids=input_ids).logits.shape[-1])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, -PADDING:] = 0
    pad = getattr(model.config.get_text_config(), "pad_token_id", None)
    if isinstance(pad, int):
        input_ids = input_ids.masked_fill(attention_mask == 0, pad)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    subject = Subject(model, batch, None, True, False)
    for name, build in expected_inputs(subject).items():
        extra = {**batch, name: build(subject)}
        try:
            with torch.no_grad():
                model(**extra)
        except Exception:
            continue
        batch = extra
    return batch


def diagnose_architecture(model_type: str, class_name: str) -> Row:
    """Build, patch and diagnose one architecture on its correct batch."""
    import torch
    import transformers

    from fused import diagnose, patch_model
    from fused.doctor import Status
    from harness.tiny_models import build_tiny_model

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)  # tiny models lose more to threads than they gain on a busy machine
    row = Row(model_type, class_name)
    try:
        model = build_tiny_model(model_type, class_name)
        report = patch_model(model)
        if not report.patched:
            raise RuntimeError(f"not patched: {report.reason}")
        diagnosis = diagnose(model, correct_batch(model), pretrained=False)
    except Exception as error:
        row.error = " ".join(f"{type(error).__name__}: {error}".split())[:200]
        return row
    for finding in diagnosis.findings:
        if finding.status in (Status.WARNING, Status.PROBLEM):
            row.alarms.append(f"{finding.check}: {finding.summary} ({finding.evidence})")
        elif finding.summary.startswith("could not run"):
            row.unrun.append(f"{finding.check}: {finding.summary}")
    return row


def _diagnose(item: tuple[str, str]) -> Row:
    return diagnose_architecture(*item)


def patched_architectures() -> list[tuple[str, str]]:
    """``(model_type, class_name)`` of every architecture patched in ``coverage.json``, once each."""
    results = json.loads((OUTPUT_DIR / "coverage.json").read_text())["results"]
    return list(dict.fromkeys((r["model_type"], r["class_name"]) for r in results if r["status"] == "patched"))


def table(rows: list[Row], versions: str) -> str:
    """The markdown summary: counts, then every architecture with an alarm, an unrun check or an error."""
    alarms = sum(len(r.alarms) for r in rows)
    unexplained = sum(len(r.alarms) for r in rows if r.model_type not in EXPLAINED)
    lines = [
        "# The loss doctor on correct setups",
        "",
        f"Tiny random models, patched, float32, CPU; {versions}. Written by `python -m harness.doctor`.",
        "",
        f"- {len(rows)} architectures diagnosed; warnings and problems: {alarms} "
        f"in {sum(bool(r.alarms) for r in rows)} architectures, {unexplained} of them unexplained (false alarms)",
        f"- checks that could not run: {sum(len(r.unrun) for r in rows)}; architectures that failed: "
        f"{sum(bool(r.error) for r in rows)}",
        "",
        "| architecture | class | alarms | explanation | checks not run | error |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.alarms or r.unrun or r.error:
            explanation = EXPLAINED.get(r.model_type, "") if r.alarms else ""
            cells = ["<br>".join(r.alarms), explanation, "<br>".join(r.unrun), r.error]
            escaped = [cell.replace("|", "\\|") for cell in cells]
            lines.append("| " + " | ".join([r.model_type, r.class_name, *escaped]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = selection_parser(__doc__.split("\n\n")[0], "all patched")
    args = parser.parse_args(argv)
    items = selected(parser, args, patched_architectures())
    start = time.perf_counter()
    rows = []
    with multiprocessing.get_context("spawn").Pool(args.workers, maxtasksperchild=20) as pool:
        for index, row in enumerate(pool.imap_unordered(_diagnose, items), 1):
            rows.append(row)
            verdict = row.error or "; ".join(row.alarms + row.unrun) or "quiet"
            print(f"[{index}/{len(items)}] {row.model_type:28s} {verdict[:150]}", flush=True)
    rows.sort(key=lambda r: items.index((r.model_type, r.class_name)))
    import torch
    import transformers

    versions = f"transformers {transformers.__version__}, torch {torch.__version__}"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "doctor_coverage.md").write_text(table(rows, versions))
    print(table(rows, versions).split("\n\n")[2])
    print(f"{time.perf_counter() - start:.0f} s; table in {args.output_dir / 'doctor_coverage.md'}")
    return 1 if any(r.alarms for r in rows if r.model_type not in EXPLAINED) else 0


if __name__ == "__main__":
    sys.exit(main())
