"""The float32 tolerance of a linear cross entropy's forward, shared by the tests of every
path held to the contract (chunked reference, fused kernel)."""

import math

import torch
import torch.nn.functional as F

from reference.linear_cross_entropy import LossOptions, transform_logits

EPS32 = torch.finfo(torch.float32).eps


def forward_atols(hidden, weight, bias, labels, kwargs):
    """Absolute tolerances of (loss, lse): 4 float32 ulps of max|z| + log V per token, times
    the number of tokens a reduced loss adds up over its divisor."""
    options = LossOptions(softcap=kwargs.get("softcap"), logit_scale=kwargs.get("logit_scale"))
    with torch.no_grad():
        z = transform_logits(F.linear(hidden, weight, bias).float(), options)
    per_token = 4 * EPS32 * (z.abs().max().item() + math.log(weight.shape[0]))
    count = kwargs.get("num_items_in_batch")
    if kwargs.get("reduction") == "none":
        tokens = 1.0
    elif count is not None:
        tokens = labels.numel() / max(float(count), 1.0)
    else:
        tokens = labels.numel() if kwargs.get("reduction") == "sum" else 1.0
    return per_token * tokens, per_token
