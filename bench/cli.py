"""``python -m bench``: run the benchmark's parts and write one JSON file per part.

Parts, run in the order given by ``--parts``:

* ``shapes``: the default shapes, on each kind of ``--data``;
* ``e2e``: a training step of each of ``--models``, each of ``--variants``;
* ``tokens``: ``--sweep-base`` with its token count replaced by each of ``--tokens``;
* ``vocabs``: ``--sweep-base`` with its vocabulary replaced by each of ``--vocabs``;
* ``profile``: the default shapes on ``--profile-data``, each method's time split by kind
  of kernel from one profiled run (``bench.time_breakdown``).

A shape and data already measured in an earlier part of the same run is copied, not
measured again (except by ``profile``, which measures its own). Once ``--time-budget-s``
is spent, what remains is recorded as skipped, so the run ends in about that time plus the
entry in progress.
``--smoke`` runs the same code on the CPU at tiny sizes, without peers (for CI).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from bench.e2e import MODEL_SHAPES, VARIANTS, measure_model
from bench.kernels import Record, RunSettings, measure_shape
from bench.methods import METHOD_NAMES, build_methods, parse_budget, parse_chunk_setting
from bench.problems import DATA_KINDS, Shape, parse_shape
from bench.records import ResultFile, device_slug

PARTS = ("shapes", "e2e", "tokens", "vocabs", "profile")
# Settings whose default depends on --smoke: (GPU run, CPU smoke run).
PRESETS: dict[str, tuple[str, str]] = {
    "device": ("cuda", "cpu"),
    "shapes": ("8192x2048x128256,8192x2304x256000,16384x4096x151936,4096x4096x32000", "48x32x80,40x16x100"),
    "sweep_base": ("8192x2048x128256", "48x32x80"),
    "tokens": ("1024,2048,4096,8192,16384,32768,65536", "16,48,96"),
    "vocabs": ("32000,49152,128256,151936,262144", "64,80,200"),
    "methods": (",".join(METHOD_NAMES), "torch_eager,reference_chunked,fused"),
    "budgets": ("30MiB,liger,256MiB,512MiB,1GiB,default", "2KiB,liger,8KiB,default"),
    "models": ("smollm2-135m,qwen2.5-0.5b,llama-3.2-1b", "tiny-llama"),
    "variants": (",".join(VARIANTS), "stock,body_only,fused"),
    "e2e_tokens": ("16384", "64"),
    "e2e_seq": ("2048", "32"),
    "reps": ("10", "2"),
    "warmup": ("3", "1"),
    "e2e_reps": ("5", "2"),
    "e2e_warmup": ("2", "1"),
    "time_budget_s": ("450", "0"),
}


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="directory for the JSON files (created)")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run without peers, for CI")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list from {PARTS}")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--data", default="peaked,uniform", help=f"data kinds of the 'shapes' part, from {DATA_KINDS}")
    ap.add_argument("--sweep-data", default="peaked", help="data kinds of the sweeps")
    ap.add_argument("--profile-data", default="peaked", help="data kinds of the 'profile' part")
    ap.add_argument("--autocast", choices=["bfloat16", "float16"],
                    help="run every method (and the bound) under torch.autocast to this dtype; use with --dtype float32")
    ap.add_argument("--chunk-sizes", default="",
                    help="explicit settings of the fused kernel, comma list of ROWS (chunk_size) or ROWSxCOLS (and vocab_chunk_size)")
    gpu = {k: v[0] for k, v in PRESETS.items()}
    ap.add_argument("--device", help=f"default {gpu['device']} (cpu with --smoke)")
    ap.add_argument("--shapes", help=f"TOKENSxHIDDENxVOCAB comma list; default {gpu['shapes']}")
    ap.add_argument("--sweep-base", help=f"the shape the sweeps vary; default {gpu['sweep_base']}")
    ap.add_argument("--tokens", help=f"token counts of the 'tokens' sweep; default {gpu['tokens']}")
    ap.add_argument("--vocabs", help=f"vocabularies of the 'vocabs' sweep; default {gpu['vocabs']}")
    ap.add_argument("--methods", help=f"from {METHOD_NAMES}; default all")
    ap.add_argument("--budgets", help=f"fused kernel memory budgets (32MiB, 1GiB, bytes, 'liger', 'default'); default {gpu['budgets']}")
    ap.add_argument("--models", help=f"e2e models from {sorted(MODEL_SHAPES)}; default {gpu['models']}")
    ap.add_argument("--variants", help=f"e2e variants from {VARIANTS}; default all")
    ap.add_argument("--e2e-tokens", type=int, help=f"tokens per training step; default {gpu['e2e_tokens']}")
    ap.add_argument("--e2e-seq", type=int, help=f"sequence length; default {gpu['e2e_seq']}")
    ap.add_argument("--reps", type=int, help=f"timed runs per entry (median); default {gpu['reps']}")
    ap.add_argument("--warmup", type=int, help=f"untimed runs first; default {gpu['warmup']}")
    ap.add_argument("--e2e-reps", type=int, help=f"default {gpu['e2e_reps']}")
    ap.add_argument("--e2e-warmup", type=int, help=f"default {gpu['e2e_warmup']}")
    ap.add_argument("--time-budget-s", type=float, help=f"skip what remains after this many seconds (0: no limit); default {gpu['time_budget_s']}")
    return ap


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parsed arguments with the GPU or the smoke defaults filled in and every list validated."""
    ap = parser()
    args = ap.parse_args(argv)
    preset = 1 if args.smoke else 0
    for name, values in PRESETS.items():
        if getattr(args, name) is None:
            setattr(args, name, values[preset])
    for name in ("e2e_tokens", "e2e_seq", "reps", "warmup", "e2e_reps", "e2e_warmup"):
        setattr(args, name, int(getattr(args, name)))
    args.time_budget_s = float(args.time_budget_s)
    try:
        args.parts = _check("parts", _split(args.parts), PARTS)
        args.data = _check("data", _split(args.data), DATA_KINDS)
        args.sweep_data = _check("sweep-data", _split(args.sweep_data), DATA_KINDS)
        args.profile_data = _check("profile-data", _split(args.profile_data), DATA_KINDS)
        args.methods = _check("methods", _split(args.methods), METHOD_NAMES)
        args.variants = _check("variants", _split(args.variants), VARIANTS)
        args.models = _check("models", _split(args.models), tuple(MODEL_SHAPES))
        args.shapes = [parse_shape(s) for s in _split(args.shapes)]
        args.sweep_base = parse_shape(args.sweep_base)
        args.tokens = [int(t) for t in _split(args.tokens)]
        args.vocabs = [int(v) for v in _split(args.vocabs)]
        args.budgets = [parse_budget(b) for b in _split(args.budgets)]
        args.chunk_sizes = [parse_chunk_setting(c) for c in _split(args.chunk_sizes)]
        args.token_sweep = [replace(args.sweep_base, tokens=t) for t in args.tokens]
        args.vocab_sweep = [replace(args.sweep_base, vocab=v) for v in args.vocabs]
    except ValueError as e:
        ap.error(str(e))
    args.dtype = getattr(torch, args.dtype)
    return args


def _check(flag: str, values: list[str], allowed: Sequence[str]) -> list[str]:
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"--{flag}: unknown {unknown}; choose from {list(allowed)}")
    return values


def _config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings as JSON values."""
    def plain(v: Any) -> Any:
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, (Shape, Path, torch.dtype)):
            return str(v)
        return v

    return {k: plain(v) for k, v in vars(args).items()}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the parts; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: pass --smoke (or --device cpu) to run on the CPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if args.smoke:
        # Tiny matrices gain nothing from threads, and on a busy machine spinning threads
        # make each op 100x slower.
        torch.set_num_threads(1)
    try:
        _run(args, argv, device)
    finally:
        torch.set_num_threads(threads)
    return 0


def _run(args: argparse.Namespace, argv: list[str], device: torch.device) -> None:
    start = time.monotonic()

    def stop_reason() -> str | None:
        if args.time_budget_s and time.monotonic() - start > args.time_budget_s:
            return f"time budget of {args.time_budget_s:g} s spent"
        return None

    autocast = None if args.autocast is None else getattr(torch, args.autocast)
    kernel_settings = RunSettings(device, args.dtype, args.reps, args.warmup, stop_reason, autocast=autocast)
    e2e_settings = replace(kernel_settings, reps=args.e2e_reps, warmup=args.e2e_warmup)
    methods = build_methods(args.methods)
    fused_budgets = args.budgets if "fused" in args.methods else []
    fused_chunks = args.chunk_sizes if "fused" in args.methods else []
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    measured: dict[tuple[bool, str, str], tuple[str, list[Record]]] = {}
    for part in args.parts:
        result = ResultFile(
            args.out / f"{part}_{device_slug(device)}_{stamp}.json",
            part=part,
            device=device,
            provenance="python -m bench " + " ".join(argv),
            config=_config(args),
        )

        def emit(record: Record, collect: list[Record] | None = None) -> None:
            if collect is not None:
                collect.append(record)
            result.add(record)
            print(json.dumps(result.doc["records"][-1]), flush=True)

        print(f"# part {part}: {result.path}", file=sys.stderr, flush=True)
        if part == "e2e":
            for model in args.models:
                measure_model(model, tuple(args.variants), e2e_settings, tokens=args.e2e_tokens, seq=args.e2e_seq, emit=emit)
        else:
            shapes = {"shapes": args.shapes, "profile": args.shapes, "tokens": args.token_sweep, "vocabs": args.vocab_sweep}[part]
            data_kinds = {"shapes": args.data, "profile": args.profile_data}.get(part, args.sweep_data)
            # A profiled measurement is not interchangeable with a plain one.
            settings = replace(kernel_settings, profile=part == "profile")
            for data in data_kinds:
                for shape in shapes:
                    key = (settings.profile, str(shape), data)
                    if key in measured:
                        source, records = measured[key]
                        for record in records:
                            emit({**record, "reused_from": source})
                        continue
                    collected: list[Record] = []
                    measured[key] = (part, collected)
                    measure_shape(
                        shape,
                        data,
                        methods,
                        settings,
                        budgets=fused_budgets,
                        chunk_sizes=fused_chunks,
                        emit=lambda r: emit(r, collected),
                    )
        result.finish()
        statuses = Counter(r["status"] for r in result.doc["records"])
        print(f"# part {part} done: {dict(statuses)}", file=sys.stderr, flush=True)
    print(f"# done in {time.monotonic() - start:.0f} s; files in {args.out}", file=sys.stderr, flush=True)
