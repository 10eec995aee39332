"""The transformers patcher: ``patch_model`` makes one Hugging Face causal LM compute its training
loss with the fused kernel (``patch``: probe, install, remove; ``forward``: the patched forward;
``capture``: the head and loss seams; ``head``: PEFT heads as linear operands; ``transform``:
logit transforms by measurement; ``probe``: the patch-time checks; ``report``: what was done;
``trl``: TRL's ``fused_lm_head=True`` calls; ``trainer``: Trainer's label smoothing moved into
the patched loss)."""

from fused.hf.patch import patch_model, patch_report, unpatch_model
from fused.hf.report import PatchReport
from fused.hf.trainer import fuse_label_smoothing

__all__ = ["PatchReport", "fuse_label_smoothing", "patch_model", "patch_report", "unpatch_model"]
