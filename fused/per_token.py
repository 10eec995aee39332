"""Per-token log-probabilities, entropy and top-1 flags of ``hidden @ weight.T (+ bias)`` from
the tile kernels.

What RL trainers ask of the head (TRL's ``fused_lm_head=True`` calls, defined in
``reference.per_token_outputs``): for each row, ``log p(target)`` and the entropy of the
softmax of its transformed logits, both differentiable, and whether the target is the first
maximum (``is_top1``), without the ``N x V`` logits. One walk over the tiles computes them
(``fused.tiles.run_tiles`` with ``entropy=True``, ``top1=True``: the statistics pass keeps
``sum_j exp(z_j - m) z_j`` beside its sum of exponentials, and the largest logit left of the
target); the backward walks them once more, each gradient tile carrying the
log-probability's term and the entropy's, ``e * p * (lse - z - H)``.

Each pass plans its tiles as the loss does (``fused.ops.plan_tiles``: on a GPU the fastest
measured, timed as a pass of its own kind, such as ``forward,grads=,entropy,top1`` and
``backward,grads=hw,entropy_grad``), with the default budget for the tile beyond the
per-token statistics and outputs, whose memory ``fused.plan.PlanSizes`` counts (``entropy``,
``top1``).

On the kernels' devices (CUDA, or the interpreter with ``backend='triton'``) this runs the
Triton kernels; elsewhere the reference. Under ``torch.autocast`` the matmuls run in the
autocast dtype and the statistics in float32, as ``fused.linear_cross_entropy`` does.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from fused.api import BACKENDS, KERNELS_INTERPRETED, computes_as_autocast_would
from fused.ops import describe_pass, plan_tiles
from fused.plan import PlanSizes
from fused.problem import TileProblem, tile_problem
from fused.tiles import TileDtypes, run_tiles
from reference.linear_cross_entropy import LossOptions
from reference.per_token_outputs import per_token_outputs


def _tiles(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, options: LossOptions, top1: bool
) -> tuple[TileProblem, PlanSizes, TileDtypes]:
    """The tile loop's problem, the sizes its plan's memory depends on, and its dtypes. Both
    passes' sizes count the forward's per-token outputs (``PlanSizes.token_output_bytes``):
    one budget holds for the forward and the backward, whose own per-token buffers are fewer."""
    problem = tile_problem(hidden, weight, targets, bias, options, shift=False, num_items_in_batch=None)
    (n, d), vocab = problem.hidden.shape, weight.shape[0]
    sizes = PlanSizes(n, vocab, d, hidden.element_size(), has_bias=bias is not None, entropy=True, top1=top1)
    dtypes = TileDtypes(compute=torch.float32, logits=hidden.dtype, weight_sum=weight.dtype)
    return problem, sizes, dtypes


class _TokenOutputs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, logit_scale, softcap, top1):
        options = LossOptions(reduction="none", logit_scale=logit_scale, softcap=softcap)
        problem, sizes, dtypes = _tiles(hidden, weight, bias, targets, options, top1)
        run = functools.partial(run_tiles, problem, options, dtypes=dtypes, entropy=True, top1=top1)
        pass_name = describe_pass(options, (False, False, False), backward=False, entropy=True, top1=top1)
        out = run(plan=plan_tiles(problem, sizes, dtypes, pass_name, run))
        problem.label_check.read()  # nothing computed from bad targets leaves
        ctx.save_for_backward(hidden, weight, bias, targets, out.lse, out.entropy)
        ctx.options, ctx.top1 = options, top1
        is_top1 = out.is_top1 if top1 else torch.zeros(0, dtype=torch.bool, device=hidden.device)
        ctx.mark_non_differentiable(is_top1)
        return -out.losses, out.entropy, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, _):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        problem, sizes, dtypes = _tiles(hidden, weight, bias, targets, ctx.options, ctx.top1)
        loss_grad = -grad_log_probs if grad_log_probs is not None else torch.zeros_like(lse)
        # No entropy gradient (a metric only): the gradient kernel without its entropy term.
        entropy_grads = None if grad_entropy is None else (entropy, grad_entropy.contiguous())
        wanted = tuple(ctx.needs_input_grad[:3])
        run = functools.partial(
            run_tiles, problem, ctx.options, dtypes=dtypes, lse=lse, loss_grad=loss_grad, entropy_grads=entropy_grads,
            wanted=wanted,
        )
        pass_name = describe_pass(ctx.options, wanted, backward=True, entropy_grad=entropy_grads is not None)
        out = run(plan=plan_tiles(problem, sizes, dtypes, pass_name, run))
        return out.hidden, out.weight, out.bias, None, None, None, None


@computes_as_autocast_would
def token_outputs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    top1: bool = False,
    backend: str = "auto",
) -> dict[str, Tensor]:
    """``{'log_probs', 'entropy'}`` (float32 ``(N,)``, differentiable in hidden, weight and
    bias) and with ``top1`` ``'is_top1'`` (bool ``(N,)``) of ``hidden (N, D)`` against ``weight
    (V, D)``, ``bias (V,)`` and ``targets (N,)`` in ``[0, V)`` (``-100``: ignored, 0 and False),
    with the logits transformed as the fused loss transforms them (``softcap *
    tanh(logit_scale * x / softcap)``; a temperature folds into both constants,
    ``reference.per_token_outputs.per_token_transform``). ``backend``: as
    ``fused.linear_cross_entropy``'s."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (N, D), got shape {tuple(hidden.shape)}")
    if backend == "auto":
        backend = "triton" if hidden.is_cuda else "reference"
    names = ("log_probs", "entropy", "is_top1") if top1 else ("log_probs", "entropy")
    if backend == "reference":
        valid = targets != -100
        found = per_token_outputs(
            hidden[valid], weight, targets[valid], bias, softcap=softcap, logit_scale=logit_scale or 1.0, outputs=names
        )
        values = {name: getattr(found, name) for name in names}
        return {name: value.new_zeros(targets.shape).masked_scatter(valid, value) for name, value in values.items()}
    if not hidden.is_cuda and not KERNELS_INTERPRETED:
        raise ValueError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before importing fused")
    return dict(zip(names, _TokenOutputs.apply(hidden, weight, bias, targets, logit_scale, softcap, top1)))
