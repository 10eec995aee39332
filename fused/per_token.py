"""Per-token log-probabilities and entropy of ``hidden @ weight.T (+ bias)`` from the tile kernels.

What RL trainers ask of the head (TRL's ``fused_lm_head=True`` calls, defined in
``reference.per_token_outputs``): for each row, ``log p(target)`` and the entropy of the
softmax of its transformed logits, both differentiable, without the ``N x V`` logits. One
walk over the tiles computes both (``fused.tiles.run_tiles`` with ``entropy=True``: the
statistics pass keeps ``sum_j exp(z_j - m) z_j`` beside its sum of exponentials); the
backward walks them once more, each gradient tile carrying the log-probability's term and
the entropy's, ``e * p * (lse - z - H)``.

On the kernels' devices (CUDA, or the interpreter with ``backend='triton'``) this runs the
Triton kernels; elsewhere the reference. Under ``torch.autocast`` the matmuls run in the
autocast dtype and the statistics in float32, as ``fused.linear_cross_entropy`` does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fused.api import BACKENDS, KERNELS_INTERPRETED, computes_as_autocast_would
from fused.plan import PlanSizes, tile_plan
from fused.problem import tile_problem
from fused.tiles import TileDtypes, run_tiles
from reference.linear_cross_entropy import LossOptions
from reference.per_token_outputs import per_token_outputs


def _tiles(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, options: LossOptions):
    problem = tile_problem(hidden, weight, targets, bias, options, shift=False, num_items_in_batch=None)
    sizes = PlanSizes(hidden.shape[0], weight.shape[0], hidden.shape[1], hidden.element_size(), has_bias=bias is not None)
    dtypes = TileDtypes(compute=torch.float32, logits=hidden.dtype, weight_sum=weight.dtype)
    return problem, tile_plan(sizes), dtypes


class _LogProbsAndEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, logit_scale, softcap):
        options = LossOptions(reduction="none", logit_scale=logit_scale, softcap=softcap)
        problem, plan, dtypes = _tiles(hidden, weight, bias, targets, options)
        out = run_tiles(problem, options, plan, dtypes, entropy=True)
        problem.label_check.read()  # nothing computed from bad targets leaves
        ctx.save_for_backward(hidden, weight, bias, targets, out.lse, out.entropy)
        ctx.options = options
        return -out.losses, out.entropy

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        problem, plan, dtypes = _tiles(hidden, weight, bias, targets, ctx.options)
        loss_grad = -grad_log_probs if grad_log_probs is not None else torch.zeros_like(lse)
        entropy_grad = grad_entropy.contiguous() if grad_entropy is not None else torch.zeros_like(lse)
        wanted = tuple(ctx.needs_input_grad[:3])
        out = run_tiles(
            problem, ctx.options, plan, dtypes, lse=lse, loss_grad=loss_grad, entropy_grads=(entropy, entropy_grad),
            wanted=wanted,
        )
        return out.hidden, out.weight, out.bias, None, None, None


@computes_as_autocast_would
def log_probs_and_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """``(log_probs, entropy)``, float32 ``(N,)`` each, of ``hidden (N, D)`` against ``weight
    (V, D)``, ``bias (V,)`` and ``targets (N,)`` in ``[0, V)`` (``-100``: ignored, both 0),
    with the logits transformed as the fused loss transforms them (``softcap *
    tanh(logit_scale * x / softcap)``; a temperature folds into both constants,
    ``reference.per_token_outputs.per_token_transform``). Differentiable in hidden, weight and
    bias. ``backend``: as ``fused.linear_cross_entropy``'s."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (N, D), got shape {tuple(hidden.shape)}")
    if backend == "auto":
        backend = "triton" if hidden.is_cuda else "reference"
    if backend == "reference":
        valid = targets != -100
        found = per_token_outputs(
            hidden[valid], weight, targets[valid], bias, softcap=softcap, logit_scale=logit_scale or 1.0,
            outputs=("log_probs", "entropy"),
        )
        return tuple(
            value.new_zeros(targets.shape).masked_scatter(valid, value) for value in (found.log_probs, found.entropy)
        )
    if not hidden.is_cuda and not KERNELS_INTERPRETED:
        raise ValueError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before importing fused")
    return _LogProbsAndEntropy.apply(hidden, weight, bias, targets, logit_scale, softcap)
