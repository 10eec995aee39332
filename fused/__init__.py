"""Fused linear + cross entropy: the Triton kernel, its CPU path, the transformers patcher
and the loss doctor."""

from fused.doctor import diagnose
from fused.api import linear_cross_entropy
from fused.patch import PatchReport, patch_model, patch_report, unpatch_model

__all__ = ["PatchReport", "diagnose", "linear_cross_entropy", "patch_model", "patch_report", "unpatch_model"]
