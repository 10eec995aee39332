"""Result files: one JSON document per part of a run, rewritten after every record.

A file is ``{"schema", "part", "created", "provenance", "machine", "versions", "config",
"finished", "wall_s", "records": [...]}``. It is rewritten (atomically) as each record
arrives, so a run stopped half way leaves valid JSON with everything measured so far and
``"finished": false``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

SCHEMA = "bench-results/1"
# Distributions whose versions a result depends on (importlib.metadata names).
DISTRIBUTIONS = ("torch", "triton", "transformers", "liger-kernel", "cut-cross-entropy", "numpy")
ROOT = Path(__file__).resolve().parent.parent


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _project_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine(device: torch.device) -> dict[str, Any]:
    """The host and, on CUDA, the GPU the measurements ran on."""
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "device": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            gpu_memory_mib=props.total_memory >> 20,
            multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
        )
    return info


def versions() -> dict[str, str | None]:
    """Python, the packages in ``DISTRIBUTIONS`` (None where absent), and the project's commit."""
    found = {dist: _version(dist) for dist in DISTRIBUTIONS}
    found["torch"] = torch.__version__  # the build tag (+cu130, +cpu) matters
    return {"python": platform.python_version(), **found, "project_commit": _project_commit()}


def device_slug(device: torch.device) -> str:
    """A file-name-safe name for the device: ``nvidia-h100-80gb-hbm3``, ``cpu``."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats written as the strings "nan", "inf", "-inf" (JSON has none)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class ResultFile:
    """The JSON file of one part of a run, saved after each ``add``."""

    def __init__(self, path: Path, *, part: str, device: torch.device, provenance: str, config: dict[str, Any]) -> None:
        self.path = path
        self._start = time.monotonic()
        self.doc: dict[str, Any] = {
            "schema": SCHEMA,
            "part": part,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "provenance": provenance,
            "machine": machine(device),
            "versions": versions(),
            "config": config,
            "finished": False,
            "wall_s": 0.0,
            "records": [],
        }
        self._save()

    def add(self, record: dict[str, Any]) -> None:
        self.doc["records"].append(json_safe({"part": self.doc["part"], **record}))
        self._save()

    def finish(self) -> None:
        self.doc["finished"] = True
        self._save()

    def _save(self) -> None:
        self.doc["wall_s"] = round(time.monotonic() - self._start, 1)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, allow_nan=False) + "\n")
        os.replace(tmp, self.path)
