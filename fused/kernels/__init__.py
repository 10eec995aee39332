"""Triton kernels of the fused linear cross entropy, one job per module.

``logit_transform``: ``logit_scale`` and ``softcap`` on the fly, and their chain rule.
``logit_statistics``: one pass over a tile of logits rows: running max, sum of exponentials,
target logit and logit sum (the forward statistics).
``logit_gradient``: overwrite a tile of logits with the gradient of the loss.
``launch``: block sizes, warps and the tile plan, chosen in one place.
"""
