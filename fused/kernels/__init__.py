"""Triton kernels of the fused linear cross entropy, one job per module.

``logit_transform``: ``logit_scale`` and ``softcap`` on the fly, and their chain rule.
``logit_statistics``: one pass over a tile of logits rows: running max, sum of exponentials,
target logit and logit sum (the forward statistics).
``logit_gradient``: overwrite a tile of logits with the gradient of the loss.
``logit_statistics_and_gradient``: both in one launch, for tiles spanning the vocabulary.
``upstream_scale``: the forward's gradients times the upstream gradient, decided on the device.
``launch``: block sizes and warps of the row kernels, chosen in one place (the tile plan:
``fused.plan``).
"""
