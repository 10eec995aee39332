"""TRL's ``fused_lm_head=True`` calls served by the project's kernel.

TRL's SFT, DPO and GRPO trainers install ``trl.trainer.utils.add_fused_lm_head`` (a forward
that, called with ``fused_lm_head=True``, runs the backbone and returns per-token statistics
of the next-token distribution instead of logits) and call the model that way. The patch and
TRL's forward compose in either order:

- patched after TRL's head is added (after the trainer is built), the patch wraps TRL's
  forward and answers its ``fused_lm_head=True`` training calls itself;
- patched before, TRL's forward wraps the patch (its ``original_forward``) and would compute
  its own head. A forward pre-hook of the patched model (``fused.hf.forward.trl_pre_hook``)
  finds TRL's forward around the patch (``outer_trl_head``) and turns the call into one TRL
  hands through to the patch, with TRL's settings attached (``TRL_CALL``).

Either way the answer is what TRL's head returns:

- ``log_probs``: minus the fused kernel's ``reduction='none'`` loss, TRL's temperature folded
  into the probed logit transform (``reference.per_token_outputs.per_token_transform``);
- ``entropy`` and ``is_top1`` with them, from the same walk over the tiles
  (``fused.per_token``; on CPU the reference);
- ``log_sum_sq_probs``, ``mean_logits`` (no gradient): the kernels do not compute
  them yet; ``token_statistics`` takes them from ``reference.per_token_outputs``, rows in
  checkpointed chunks;
- ``loss`` (``-sum(log_probs) / num_items_in_batch``, or the count of valid labels) and
  ``label_mask`` as TRL computes them.

TRL's settings (temperature, requested outputs, backbone attribute, the head cast to float32)
are read from its forward; MoE models' load-balancing loss is added as TRL adds it. A call
this module cannot serve exactly (``unservable``: router logits of a config without
``num_experts``, a TRL whose forward it does not recognise, no labels) is left to TRL's own head.

TRL older than 1.15 reads ``outputs.logits`` of its training calls (SFTTrainer's token
accuracy and entropy), which the patch leaves None, and its ``loss_type='chunked_nll'``
reads ``model.forward.__func__``: ``old_trl`` names an installed one, and ``patch_model``
refuses while it is installed, instead of a crash in the first training step.
"""

from __future__ import annotations

import importlib.metadata
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version
from torch import Tensor, nn

from fused.hf.head import fold_head
from fused.hf.transform import LogitTransform
from fused.api import linear_cross_entropy
from fused.per_token import token_outputs
from reference.per_token_outputs import per_token_outputs, per_token_transform

TRL_MODULE = ("trl", "trainer", "utils.py")  # where add_fused_lm_head defines its forward
_SETTINGS = ("temperature", "outputs", "cast_lm_head_to_fp32", "backbone_attr", "text_config")
FIRST_SERVED_TRL = Version("1.15")  # the first TRL whose trainers call fused_lm_head=True
TRL_CALL = "_fused_trl_head"  # the keyword that carries an outer TRL forward's settings to the patch


@dataclass(frozen=True)
class TrlHead:
    """What ``add_fused_lm_head`` was told: ``temperature``, the per-token ``outputs`` to return,
    the backbone attribute it runs, and whether the head runs in float32; ``inner_forward`` is
    the forward it wraps (its ``original_forward``)."""

    temperature: float
    outputs: tuple[str, ...]
    cast_lm_head_to_fp32: bool
    backbone_attr: str
    text_config: Any
    inner_forward: Any


def trl_head(forward: Any) -> TrlHead | None:
    """The settings of TRL's fused-head forward ``forward`` (a bound method or its function),
    or None when it is not one this module recognises."""
    function = getattr(forward, "__func__", forward)
    code = getattr(function, "__code__", None)  # functools.wraps gave it the model's name and module
    if code is None or code.co_name != "_fused_forward" or Path(code.co_filename).parts[-3:] != TRL_MODULE:
        return None
    cells = dict(zip(code.co_freevars, (cell.cell_contents for cell in function.__closure__ or ())))
    if not all(name in cells for name in (*_SETTINGS, "original_forward")):
        return None
    return TrlHead(*(cells[name] for name in _SETTINGS), inner_forward=cells["original_forward"])


def outer_trl_head(forward: Any) -> TrlHead | None:
    """The settings of the first TRL fused-head forward found in ``forward`` (a model's forward,
    maybe wrapped again since: accelerate's autocast wrapper), or None. Wrappers are unwrapped
    through ``__func__`` and ``__wrapped__`` (what ``MethodType`` and ``functools.wraps`` leave);
    the search stops at anything else, such as the patch's own forward."""
    for _ in range(16):  # a chain of wrappers, never a cycle
        if forward is None:
            return None
        head = trl_head(forward)
        if head is not None:
            return head
        forward = getattr(forward, "__func__", None) or getattr(forward, "__wrapped__", None)
    return None


def unservable(head: TrlHead | None, kwargs: dict) -> str | None:
    """Why the ``fused_lm_head=True`` call with keywords ``kwargs`` to TRL's forward set up as
    ``head`` cannot be served exactly by the patch, or None."""
    if head is None:
        return "TRL's forward is not one this patch recognises"
    routed = getattr(head.text_config, "output_router_logits", False) or kwargs.get("output_router_logits")
    if routed and (Version(transformers.__version__) < Version("5") or not hasattr(head.text_config, "num_experts")):
        return "MoE router logits are asked for of a model whose config has no num_experts"
    if kwargs.get("labels") is None and kwargs.get("shift_labels") is None:
        return "the call has no labels"
    return None


def old_trl() -> str | None:
    """The version of an installed TRL older than 1.15 (its trainers read ``outputs.logits``
    of training calls with labels), or None."""
    try:
        version = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        return None
    return version if Version(version) < FIRST_SERVED_TRL else None


def token_statistics(
    rows: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, head: TrlHead, transform: LogitTransform
) -> dict[str, Tensor]:
    """The per-token outputs of the valid ``rows (n, D)`` against ``targets (n,)``: ``log_probs``
    (and ``entropy``, ``is_top1`` when TRL asks for them) from the fused kernels, the others
    TRL asked for from the reference."""
    logit_scale = transform.logit_scale if transform.logit_scale is not None else 1.0
    scale, cap = per_token_transform(head.temperature, transform.softcap, logit_scale)
    if "entropy" in head.outputs or "is_top1" in head.outputs:
        found = token_outputs(
            rows, weight, targets, bias=bias, logit_scale=scale, softcap=cap, top1="is_top1" in head.outputs
        )
        found = {name: value for name, value in found.items() if name == "log_probs" or name in head.outputs}
    else:
        loss = linear_cross_entropy(rows, weight, targets, bias=bias, reduction="none", logit_scale=scale, softcap=cap)
        found = {"log_probs": -loss}
    others = tuple(name for name in head.outputs if name not in found)
    if others:
        statistics = per_token_outputs(
            rows, weight, targets, bias, temperature=head.temperature, softcap=transform.softcap,
            logit_scale=logit_scale, outputs=others,
        )
        found |= {name: getattr(statistics, name) for name in others}
    return found


def serve(model: nn.Module, head: TrlHead, transform: LogitTransform, args: tuple, kwargs: dict) -> Any:
    """TRL's ``FusedCausalLMOutput`` for one ``fused_lm_head=True`` call that ``unservable``
    passed."""
    from trl.trainer.utils import FusedCausalLMOutput

    kwargs = dict(kwargs)
    kwargs.pop("fused_lm_head", None)  # absent when an outer TRL forward handed the call through
    labels, shift_labels = kwargs.pop("labels", None), kwargs.pop("shift_labels", None)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    kwargs["use_cache"] = False
    if getattr(head.text_config, "output_router_logits", False):
        kwargs.setdefault("output_router_logits", True)
    backbone = getattr(model, head.backbone_attr)(*args, **kwargs)
    hidden = backbone.last_hidden_state
    if shift_labels is None:
        hidden, targets = hidden[:, :-1], labels[:, 1:]
    else:
        targets = shift_labels
    operands = fold_head(model.get_output_embeddings(), hidden)
    weight, bias = operands.weight, operands.bias
    if transform.vocab is not None:
        weight, bias = weight[: transform.vocab], None if bias is None else bias[: transform.vocab]
    targets = targets.to(weight.device)
    mask = targets != -100
    rows = operands.hidden.to(weight.device)[mask]
    precision = nullcontext()
    if head.cast_lm_head_to_fp32:  # as TRL: the head's products in float32, outside autocast
        rows, weight, bias = rows.float(), weight.float(), None if bias is None else bias.float()
        precision = torch.autocast(rows.device.type, enabled=False)
    with precision:
        found = token_statistics(rows, weight, bias, targets[mask], head, transform)
    # masked_scatter keeps an all-masked micro-batch connected to the graph, as TRL does.
    per_token = {name: value.new_zeros(mask.shape).masked_scatter(mask, value) for name, value in found.items()}
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -per_token["log_probs"].sum() / count
    aux_loss = None
    if kwargs.get("output_router_logits"):
        aux_loss = router_aux_loss(head.text_config, backbone.router_logits, kwargs.get("attention_mask"))
        loss = loss + getattr(head.text_config, "router_aux_loss_coef", 0.0) * aux_loss
    return FusedCausalLMOutput(loss=loss, label_mask=mask, aux_loss=aux_loss, **per_token)


def router_aux_loss(text_config: Any, router_logits: Any, attention_mask: Tensor | None) -> Tensor:
    """The MoE load-balancing loss as TRL's head computes it: Mixtral's function (every MoE
    family takes it from there), the config's expert counts (``unservable`` checked they exist)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    experts, per_token = text_config.num_experts, text_config.num_experts_per_tok
    return load_balancing_loss_func(router_logits, experts, per_token, attention_mask)
