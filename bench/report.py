"""Reading result files back: records, the newest measurement of each entry, the Pareto
front, and the issue's targets checked against the numbers.

Every record of every file in a directory is flattened into one list of dicts, each with
the file's ``source`` name, ``device`` and ``created`` date added.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.records import ROOT, SCHEMA

RESULTS_DIR = ROOT / "results"
PEERS = ("torch_eager", "torch_compile", "reference_chunked", "torch_lce_chunked", "liger_flce", "cce", "cce_exact")
FUSED_PREFIX = "fused@"
# The targets on peaked data, per kernel setting: the peer whose time it must beat
# (and whose extra memory it may use when no limit is given), the most time as a multiple of the bound and
# the most extra memory in MiB (or None). Every setting also keeps the gradient error of
# hidden no worse than torch eager's.
# The tight setting asks the kernel for 30 MiB: cuBLAS's workspace and small buffers outside
# the plan's formula add 0.6-1.7 MiB on an H100, and the target is 32 MiB as measured.
TARGETS = (
    ("fused@30MiB", "cce", None, 32.0),
    ("fused@liger", "liger_flce", None, None),
    ("fused@512MiB", None, 1.15, 512.0),
)
Record = dict[str, Any]


def load_document(path: Path) -> dict[str, Any]:
    """One result file; ValueError when it is not one (another schema)."""
    doc = json.loads(Path(path).read_text())
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{Path(path).name}: schema {doc.get('schema')!r} is not {SCHEMA!r}")
    return doc


def load_results(directory: Path | str = RESULTS_DIR) -> list[Record]:
    """All records of the ``*.json`` result files in ``directory``, oldest file first."""
    records = []
    docs = []
    for path in sorted(Path(directory).glob("*.json")):
        doc = load_document(path)
        docs.append((doc["created"], path.name, doc))
    for created, name, doc in sorted(docs, key=lambda d: d[:2]):
        device = doc["machine"].get("device")
        records.extend({**r, "source": name, "device": device, "created": created} for r in doc["records"])
    return records


def newest_ok(records: Iterable[Record], bench: str = "kernel", **match: Any) -> dict[tuple, Record]:
    """The newest successful record per (shape, data, method) among ``bench`` records
    ('kernel' or 'profile') whose fields equal ``match``; newer files replace older ones."""
    out: dict[tuple, Record] = {}
    for r in records:
        if r.get("bench") == bench and r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items()):
            out[(r["shape"], r["data"], r["method"])] = r
    return out


def newest_e2e(records: Iterable[Record]) -> dict[tuple[str, str], Record]:
    """The newest successful end-to-end record per (model, variant)."""
    return {(r["model"], r["variant"]): r for r in records if r.get("bench") == "e2e" and r.get("status") == "ok"}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (memory, time) no other point beats in both, by memory."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def beats_curve(point: tuple[float, float], curve: Sequence[tuple[float, float]]) -> bool:
    """Whether ``point`` (memory, time) is both lighter and faster than some point of ``curve``."""
    return any(point[0] < m and point[1] < t for m, t in curve)


def target_rows(records: Iterable[Record], data: str = "peaked", **match: Any) -> list[dict[str, Any]]:
    """The issue's targets per default shape, on the newest ``data`` records whose fields
    equal ``match`` (``device=...``, say).

    One row per (shape, kernel setting): the kernel's time as a multiple of the bound and the
    most it may take (``x``, ``max_x``: a peer's time must be beaten strictly), its extra
    memory and the most it may use (``mib``, ``max_mib``), its gradient error of hidden and
    eager's (``gh``, ``eager_gh``), and ``holds``: all of them met, or None when an entry it
    needs was not measured. A last row per shape says which peers, if any, are both faster
    and lighter than one of the kernel's points.
    """
    best = newest_ok(records, data=data, part="shapes", **match)
    shapes = sorted({s for s, _, _ in best}, key=lambda s: [int(x) for x in s.split("x")])
    rows = []
    for shape in shapes:
        eager = best.get((shape, data, "torch_eager"))
        for setting, peer, max_bound, max_extra in TARGETS:
            kernel = best.get((shape, data, setting))
            rival = best.get((shape, data, peer)) if peer else None
            row = {
                "shape": shape,
                "setting": setting,
                "x": kernel and kernel["vs_bound"],
                "max_x": rival["vs_bound"] if rival else max_bound,
                "mib": kernel and kernel["extra_mib"],
                "max_mib": max_extra if max_extra is not None or rival is None else rival["extra_mib"],
                "gh": kernel and kernel["gh_rel"],
                "eager_gh": eager and eager["gh_rel"],
                "holds": None,
            }
            if kernel is not None and eager is not None and (rival is not None or peer is None):
                faster = row["x"] < row["max_x"] if rival else row["max_x"] is None or row["x"] <= row["max_x"]
                lighter = row["max_mib"] is None or row["mib"] <= row["max_mib"]
                row["holds"] = faster and lighter and row["gh"] <= row["eager_gh"]
            rows.append(row)
        curve = [(r["extra_mib"], r["vs_bound"]) for (s, _, m), r in best.items() if s == shape and m.startswith(FUSED_PREFIX)]
        beaten = sorted(
            m for (s, _, m), r in best.items()
            if s == shape and m in PEERS and beats_curve((r["extra_mib"], r["vs_bound"]), curve)
        )
        rows.append({"shape": shape, "setting": "pareto: peers faster+lighter", "x": ", ".join(beaten) or ("none" if curve else None),
                     "holds": None if not curve else not beaten})
    return rows


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows of dicts as a fixed-width text table: '-' for None, floats to 3 significant
    digits (whole numbers from 100 up)."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
