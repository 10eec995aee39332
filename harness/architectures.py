"""Stock against patched for every causal-LM architecture of the installed transformers.

For each architecture of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` and
``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES``: build a tiny random model
(``harness.tiny_models``), record the stock results on a batch of its own (not the patch
probe's), patch it, and compare in float32 on CPU, in training mode with the RNG reseeded
before each run:

- ``labels=None``: the logits must be bit-identical (that path is the stock forward);
- with labels, without a count and with ``num_items_in_batch`` as an int and as a 0-d
  tensor: the loss and the gradient of every parameter, within ``fused.hf.probe``'s
  float32 tolerance, every such call counted as fused by the report.

The same models answer the ``num_items_in_batch`` question (``reference.num_items_probe``):
does the stock forward divide by the count (static and behavioural), and is Trainer's
``accepts_loss_kwargs`` decision right for it, before and after patching.

    python -m harness.architectures              # all, 2 workers, writes harness/*.md
    python -m harness.architectures llama gemma2 # some

Each architecture runs in a worker process under a time limit.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

OUTPUT_DIR = Path(__file__).resolve().parent
CAUSAL_LM, IMAGE_TEXT_TO_TEXT = "causal-lm", "image-text-to-text"
BATCH, LENGTH = 2, 12


@dataclass
class Result:
    """One architecture's row in both tables."""

    model_type: str
    class_name: str
    mapping: str
    status: str  # patched | refused | MISMATCH | failed (build) | failed (stock) | error | timeout
    reason: str = ""
    max_error: float | None = None
    head: str | None = None
    transforms: str = ""
    seconds: float = 0.0
    static: bool | None = None
    behavioural: bool | None = None
    stock_accepts_loss_kwargs: bool | None = None
    patched_accepts_loss_kwargs: bool | None = None
    num_items_reason: str = ""


def architectures() -> list[tuple[str, str, str]]:
    """``(model_type, class_name, mapping)`` for both auto mappings, causal LMs first."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    rows = []
    mappings = {
        CAUSAL_LM: MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        IMAGE_TEXT_TO_TEXT: MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    }
    for mapping, names in mappings.items():
        for model_type, class_name in names.items():
            rows.append((model_type, class_name if isinstance(class_name, str) else class_name[0], mapping))
    return rows


def _run(model, inputs: dict, seed: int):
    import torch

    torch.manual_seed(seed)
    return model(**inputs)


def _loss_and_grads(model, inputs: dict, seed: int):
    import torch

    from fused.hf.probe import loss_of

    loss = loss_of(_run(model, inputs, seed))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [None if g is None else g.detach() for g in grads]


def _cases(labels) -> dict[str, dict]:
    import torch

    count = int((labels[..., 1:] != -100).sum()) + 5
    return {
        "labels": {"labels": labels},
        "labels + int count": {"labels": labels, "num_items_in_batch": count},
        "labels + tensor count": {"labels": labels, "num_items_in_batch": torch.tensor(count)},
    }


def compare(model, result: Result) -> None:
    """Stock against patched on ``model`` (see the module docstring); fills ``result``."""
    import torch

    from fused.hf.patch import patch_model
    from fused.hf.probe import TOLERANCE, gradient_errors, probe_inputs, probe_labels, relative_error
    from reference.num_items_probe import probe_num_items_in_batch

    generator = torch.Generator().manual_seed(1)
    model.train()
    try:
        inputs = probe_inputs(model, generator, BATCH, LENGTH)
        stock_logits = _run(model, inputs, 0).logits
        labels = probe_labels(inputs["input_ids"], stock_logits.shape[-1], generator)
        stock = {}
        for name, extra in _cases(labels).items():
            try:
                stock[name] = _loss_and_grads(model, {**inputs, **extra}, 0)
            except TypeError as error:
                if "num_items_in_batch" not in str(error):
                    raise
    except Exception as error:
        result.status, result.reason = "failed (stock)", f"{type(error).__name__}: {error}"
        return
    try:
        probe = probe_num_items_in_batch(model)
    except Exception as error:
        result.num_items_reason = f"probe failed: {type(error).__name__}: {error}"
    else:
        result.static, result.behavioural = probe.static, probe.behavioural
        result.stock_accepts_loss_kwargs = probe.accepts_loss_kwargs
        result.num_items_reason = probe.behavioural_reason

    report = patch_model(model)
    result.head, result.transforms = report.head, "; ".join(report.transforms)
    if not report.patched:
        result.status, result.reason = "refused", report.reason
        return
    result.patched_accepts_loss_kwargs = report.accepts_loss_kwargs
    model.train()
    patched_logits = _run(model, inputs, 0).logits
    errors = [0.0 if torch.equal(patched_logits, stock_logits) else float("inf")]
    fused_before = report.calls.fused
    for name, (stock_loss, stock_grads) in stock.items():
        loss, grads = _loss_and_grads(model, {**inputs, **_cases(labels)[name]}, 0)
        errors += [relative_error(loss, stock_loss), gradient_errors(grads, stock_grads)]
    result.max_error = max(errors)
    calls = report.calls.fused - fused_before
    if calls != len(stock) or report.calls.fallback:
        result.status = "MISMATCH"
        fallbacks = f"{report.calls.fallback} fallbacks ({report.calls.last_fallback})"
        result.reason = f"{calls} of {len(stock)} loss calls fused, {fallbacks}"
    elif result.max_error > TOLERANCE[torch.float32]:
        result.status, result.reason = "MISMATCH", f"max error {result.max_error:.2e} over cases {list(stock)}"
    else:
        result.status, result.reason = "patched", f"verified: {len(stock)} loss cases, labels=None logits identical"


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def check_architecture(model_type: str, class_name: str, mapping: str, timeout: int = 0) -> Result:
    """Build, compare and classify one architecture (``timeout`` seconds, 0 for none)."""
    import torch
    import transformers

    from harness.tiny_models import build_tiny_model

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    result = Result(model_type, class_name, mapping, status="error")
    start = time.perf_counter()
    # Tiny models gain nothing from intra-op threads, and lose much to them on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if timeout:
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(timeout)
    try:
        try:
            model = build_tiny_model(model_type, class_name)
        except _Timeout:
            raise
        except Exception as error:
            result.status, result.reason = "failed (build)", f"{type(error).__name__}: {error}"
        else:
            with torch.random.fork_rng():
                compare(model, result)
    except _Timeout:
        result.status, result.reason = "timeout", f"over {timeout} s"
    except Exception as error:
        result.status, result.reason = "error", f"{type(error).__name__}: {error}"
    finally:
        torch.set_num_threads(threads)
        if timeout:
            signal.alarm(0)
    result.reason = " ".join(result.reason.split())[:300]
    result.seconds = round(time.perf_counter() - start, 2)
    return result


def _check(item: tuple[str, str, str, int]) -> Result:
    return check_architecture(*item)


def run(items: list[tuple[str, str, str]], workers: int = 2, timeout: int = 90) -> list[Result]:
    """``check_architecture`` over ``items`` in ``workers`` processes, printing progress."""
    results = []
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, maxtasksperchild=20) as pool:
        for index, result in enumerate(pool.imap_unordered(_check, [(*item, timeout) for item in items]), 1):
            results.append(result)
            progress = f"[{index}/{len(items)}] {result.model_type:28s} {result.status:15s} {result.reason[:90]}"
            print(progress, flush=True)
    order = {item: i for i, item in enumerate(items)}
    return sorted(results, key=lambda r: order[(r.model_type, r.class_name, r.mapping)])


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1e}"
    return str(value).replace("|", "\\|")


def _row(*values) -> str:
    return "| " + " | ".join(_cell(v) for v in values) + " |"


def _summary(results: list[Result], mapping: str) -> str:
    rows = [r for r in results if r.mapping == mapping]
    counts = {s: sum(r.status == s for r in rows) for s in dict.fromkeys(r.status for r in rows)}
    patched = counts.get("patched", 0)
    share = 100 * patched / len(rows) if rows else 0.0
    return f"- {mapping}: {len(rows)} architectures, {patched} patched and verified ({share:.1f}%); " + ", ".join(
        f"{n} {s}" for s, n in counts.items() if s != "patched"
    )


def patch_table(results: list[Result], versions: str) -> str:
    """The markdown coverage table of ``patch_model``."""
    worst = max((r.max_error for r in results if r.max_error is not None), default=0.0)
    lines = [
        "# patch_model coverage",
        "",
        f"Tiny random models, float32, CPU; {versions}. Written by `python -m harness.architectures`.",
        "Max error: largest of |patched - stock| / max|stock| over the loss and every parameter's",
        "gradient (each gradient's denominator at least 1e-3 of the largest gradient), for no count,",
        "an int count and a tensor count; labels=None logits must be bit-identical.",
        "",
        *(_summary(results, m) for m in (CAUSAL_LM, IMAGE_TEXT_TO_TEXT)),
        f"- mismatches: {sum(r.status == 'MISMATCH' for r in results)}; worst max error {worst:.1e}",
        "",
        "| architecture | class | mapping | status | head | transforms folded | max error | reason |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            _row(r.model_type, r.class_name, r.mapping, r.status, r.head, r.transforms, r.max_error, r.reason)
        )
    return "\n".join(lines) + "\n"


def num_items_table(results: list[Result], versions: str) -> str:
    """The markdown table: does the stock model use ``num_items_in_batch``, and is Trainer's
    ``accepts_loss_kwargs`` right, before and after patching."""
    probed = [r for r in results if r.behavioural is not None]
    wrong = sorted({r.model_type for r in probed if r.stock_accepts_loss_kwargs != r.behavioural})
    lines = [
        "# num_items_in_batch and accepts_loss_kwargs",
        "",
        f"Tiny random models, float32, CPU; {versions}. Written by `python -m harness.architectures`.",
        "static: the forward's source hands the count to a loss taking it. behavioural: the loss",
        "halves when the count doubles. Trainer passes the count (and skips its own division by the",
        "accumulation steps) when accepts_loss_kwargs is True, which is right only if the model",
        "divides by it. patch_model sets accepts_loss_kwargs to what it measured.",
        "",
        f"- {len(probed)} architectures probed; Trainer's stock decision is wrong for {len(wrong)} model types: "
        + ", ".join(wrong),
        "",
        "| architecture | mapping | static | behavioural | Trainer's accepts_loss_kwargs | right? "
        "| after patch_model | right? | measurement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in probed:
        after = r.patched_accepts_loss_kwargs
        lines.append(
            "| "
            + " | ".join(
                _cell(v)
                for v in (
                    r.model_type,
                    r.mapping,
                    r.static,
                    r.behavioural,
                    r.stock_accepts_loss_kwargs,
                    r.stock_accepts_loss_kwargs == r.behavioural,
                    after,
                    None if after is None else after == r.behavioural,
                    r.num_items_reason,
                )
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def write_tables(results: list[Result], output_dir: Path = OUTPUT_DIR) -> None:
    """Write ``patch_coverage.md``, ``num_items_coverage.md`` and ``coverage.json``."""
    import torch
    import transformers

    versions = f"transformers {transformers.__version__}, torch {torch.__version__}"
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "patch_coverage.md").write_text(patch_table(results, versions))
    (output_dir / "num_items_coverage.md").write_text(num_items_table(results, versions))
    (output_dir / "coverage.json").write_text(
        json.dumps({"versions": versions, "results": [asdict(r) for r in results]}, indent=1) + "\n"
    )


def selection_parser(description: str, scope: str) -> argparse.ArgumentParser:
    """The command line the harness's runs share: the model types to run (default: ``scope``),
    the worker processes, the folder the tables go to."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("model_types", nargs="*", help=f"only these model types (default: {scope})")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output-dir", type=Path, default=OUTPUT_DIR)
    return parser


def selected(parser: argparse.ArgumentParser, args: argparse.Namespace, candidates: list[tuple]) -> list[tuple]:
    """The ``candidates`` (tuples starting with a model type) the command line asked for."""
    items = [a for a in candidates if not args.model_types or a[0] in args.model_types]
    if not items:
        parser.error(f"no architecture among the candidates matches {args.model_types}")
    return items


def main(argv: list[str] | None = None) -> int:
    parser = selection_parser(__doc__.split("\n\n")[0], "all")
    parser.add_argument("--timeout", type=int, default=90, help="seconds per architecture")
    args = parser.parse_args(argv)
    items = selected(parser, args, architectures())
    start = time.perf_counter()
    results = run(items, args.workers, args.timeout)
    write_tables(results, args.output_dir)
    print(_summary(results, CAUSAL_LM), _summary(results, IMAGE_TEXT_TO_TEXT), sep="\n")
    print(f"{time.perf_counter() - start:.0f} s; tables in {args.output_dir}")
    return 1 if any(r.status == "MISMATCH" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
