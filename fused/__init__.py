"""Fused linear + cross entropy: the Triton kernel, its CPU path, the transformers patcher
(``fused.hf``) and the loss doctor.

The patcher and the doctor are imported on first use, so ``import fused`` loads neither them
nor transformers."""

from fused.api import linear_cross_entropy

_LAZY = {
    "PatchReport": "fused.hf",
    "patch_model": "fused.hf",
    "patch_report": "fused.hf",
    "unpatch_model": "fused.hf",
    "diagnose": "fused.doctor",
}

__all__ = ["PatchReport", "diagnose", "linear_cross_entropy", "patch_model", "patch_report", "unpatch_model"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fused' has no attribute {name!r}")
