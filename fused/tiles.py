"""The tile loop: the loss of ``hidden @ weight.T (+ bias)`` and its gradients without the
``N x V`` logits.

A tile is ``rows`` tokens by ``cols`` vocabulary entries (``fused.plan.tile_plan``):

1. cuBLAS writes the tile's raw logits ``hidden_rows @ weight_cols.T (+ bias)`` in the
   inputs' dtype into one reused buffer, as the contract computes them before ``.float()``.
   (An epilogue plan computes the tile with a Triton product that does step 2, or with the
   final ``lse`` known step 3, on each block before storing it: ``fused.kernels.logits_product``.)
2. ``logit_statistics`` makes one pass over the tile: online max and sum of exponentials,
   target logit, logit sum, in float32, carried across the vocabulary blocks of the rows.
   After the last block: ``lse`` and the per-token loss (``finish_statistics``).
3. ``logit_gradient`` overwrites the tile with ``dL/dlogits`` (float32 arithmetic, stored in
   the inputs' dtype); cuBLAS turns it into ``grad_hidden`` rows (``G @ W``), a block of
   ``grad_weight`` (``G.T @ hidden``) and of ``grad_bias``.

When the loss is reduced to a scalar, the op (``fused.ops``) runs step 3 in the forward
pass, as Liger's kernel does: the logits are then computed once if a row chunk's whole
vocabulary fits in one tile (three matmuls), else twice (four). For ``reduction='none'`` or a
returned ``lse`` the forward keeps only ``lse`` and the backward recomputes the logits.

Memory beyond the inputs and the returned gradients, with ``s`` the inputs' bytes per element
and ``r = rows``, ``c = cols`` (``s' = 4``, 8 for ``compute_dtype=float64``)::

    r * c * s                     one tile of logits / gradient of logits
  + r * D * 4     (c < V, s < 4)  the float32 sum of a row chunk's grad_hidden over blocks
  + 2 * V * s'    (bias grad)     grad_bias summed in float32, and one tile's column sums
  + 7 * N * s' + 9 * N + 8 KiB   per-token statistics, lse, losses, int64 targets, a temporary
  + 3 * r * ceil(c / 128) * s'   (epilogue plan) partial statistics of the logits product
  + 2 * N * s'    (entropy)       fused.per_token's entropies and a second temporary
  + N * s' + N    (top1)          the largest logit left of each target, and the flags

and on CUDA up to 1 MiB more for each buffer above 1 MiB (the caching allocator's blocks):
``fused.plan.plan_bytes`` is this formula.

Precision: the gradient tile holds ``p - onehot`` (times per-token upstream gradients, if
any); the mean's ``1 / count`` is the matmuls' ``alpha``, applied in cuBLAS's float32
epilogue, so 16-bit tiles neither underflow nor lose the near-exactness of ``p - 1``. Each
gradient element is one matmul's float32 sum rounded once, except: ``grad_hidden`` over
vocabulary blocks off CUDA, a float32 sum of products each rounded once to the inputs' dtype
(on CUDA one float32 sum, rounded once); and ``grad_weight`` over several row chunks
(``N > rows``), summed in the inputs' dtype, one rounding per chunk, so that its error grows
like the square root of the number of row chunks.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor

from fused.kernels.logit_gradient import write_logit_gradient
from fused.kernels.logit_statistics import RowStatistics, accumulate_logit_statistics
from fused.kernels.logit_statistics_and_gradient import write_statistics_and_gradient
from fused.kernels.logits_product import logit_gradient_tile, logits_with_statistics, partial_buffer
from fused.plan import TilePlan
from fused.problem import TileProblem
from reference.linear_cross_entropy import LossOptions


@dataclasses.dataclass(frozen=True)
class TileDtypes:
    """``compute``: the statistics' and losses' dtype; ``logits``: the tile's (the inputs'
    dtype, as transformers rounds its logits, or wider); ``weight_sum``: ``grad_weight``'s
    running sum over row chunks (the weight's dtype, or wider)."""

    compute: torch.dtype
    logits: torch.dtype
    weight_sum: torch.dtype


def logits_tile(buffer: Tensor, hidden_rows: Tensor, weight: Tensor, bias: Tensor | None, cols: slice) -> Tensor:
    """Raw logits ``(r, c)`` of ``hidden_rows`` against vocabulary ``cols``, written by
    cuBLAS into a contiguous view of ``buffer``, in ``buffer``'s dtype: the inputs' (rounded
    as ``lm_head`` rounds them) or wider (the float32 sum of products, never rounded to
    16 bits; off CUDA, the inputs are widened first, which gives the same products)."""
    out = buffer[: hidden_rows.shape[0] * (cols.stop - cols.start)].view(hidden_rows.shape[0], -1)
    if out.dtype == hidden_rows.dtype:
        if bias is None:
            return torch.mm(hidden_rows, weight[cols].t(), out=out)
        return torch.addmm(bias[cols], hidden_rows, weight[cols].t(), out=out)
    if out.is_cuda:
        torch.mm(hidden_rows, weight[cols].t(), out.dtype, out=out)
    else:
        torch.mm(hidden_rows.to(out.dtype), weight[cols].to(out.dtype).t(), out=out)
    return out if bias is None else out.add_(bias[cols])


def _add_product(out: Tensor, a: Tensor, b: Tensor, *, beta: float, alpha: float) -> None:
    """``out = beta * out + alpha * a @ b`` with ``out`` wider than ``a`` and ``b``: on CUDA
    one float32 sum in cuBLAS (addmm's ``out_dtype``); elsewhere from widened inputs."""
    if out.is_cuda:
        torch.addmm(out, a, b, out.dtype, beta=beta, alpha=alpha, out=out)
    else:
        out.addmm_(a.to(out.dtype), b.to(out.dtype), beta=beta, alpha=alpha)


def finish_statistics(
    stats: RowStatistics, problem: TileProblem, rows: slice, options: LossOptions, losses: Tensor, lse: Tensor,
    *, lse_known: bool = False,
) -> None:
    """Write the per-token losses of ``rows`` from their final statistics, and their ``lse``
    unless a kernel wrote it already (``lse_known``). In place, so that the tile's memory
    plan needs room for at most one temporary per token (``fused.plan.statistics_bytes``)."""
    row_lse = lse[rows]
    if not lse_known:
        torch.log(stats.sumexp[rows], out=row_lse).add_(stats.max[rows])
    loss = torch.sub(row_lse, stats.target_logit[rows], out=losses[rows])
    if options.label_smoothing:
        eps = options.label_smoothing
        mean_logit_loss = torch.div(stats.logit_sum[rows], problem.weight.shape[0])
        mean_logit_loss.neg_().add_(row_lse).mul_(eps)
        loss.mul_(1 - eps).add_(mean_logit_loss)
        del mean_logit_loss  # one temporary at a time
    if options.z_loss:
        loss.add_(row_lse.square().mul_(options.z_loss))
    loss.masked_fill_(problem.targets[rows] == options.ignore_index, 0.0)


def queued_targets(problem: TileProblem) -> Tensor:
    """``problem.targets``, and the labels' check queued right behind them. Called once the first
    logits product is queued, so the host's time on the labels' dozen small operations
    overlaps that product instead of delaying it."""
    problem.label_check  # noqa: B018 (queued, not read: the read waits for the device)
    return problem.targets


@dataclasses.dataclass
class TileResults:
    """What the tile loop returns: per-token ``losses`` and ``lse`` (when it computed them),
    the gradients asked for (None otherwise) and each token's ``entropy`` when asked for."""

    losses: Tensor | None
    lse: Tensor
    hidden: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    entropy: Tensor | None = None
    is_top1: Tensor | None = None


def run_tiles(
    problem: TileProblem,
    options: LossOptions,
    plan: TilePlan,
    dtypes: TileDtypes,
    *,
    lse: Tensor | None = None,
    loss_grad: Tensor | None = None,
    lse_grad: Tensor | None = None,
    alpha: Callable[[], float] = lambda: 1.0,
    wanted: tuple[bool, bool, bool] = (False, False, False),
    entropy: bool = False,
    top1: bool = False,
    entropy_grads: tuple[Tensor, Tensor] | None = None,
) -> TileResults:
    """Walk the tiles of ``problem`` once: statistics (unless ``lse`` is given) and the gradients
    ``wanted`` for (hidden, weight, bias).

    ``loss_grad (N,)``: upstream gradient of each token's loss (None: 1 on valid rows);
    ``lse_grad (N,)`` of each lse (None: 0); ``entropy``: also each token's entropy (0 on
    ignored rows) from the statistics pass; ``top1``: also whether each target is its row's
    first maximum (False on ignored rows); ``entropy_grads``: ``(entropy, entropy_grad)``,
    ``(N,)`` each, the forward's entropy and its upstream gradient, whose term the
    gradient tiles then carry; ``alpha()`` multiplies every gradient, inside the
    matmuls' float32 epilogue: it is called once, when the first gradient product is due, so
    that a wait for the device in it (the forward's label check) finds work already queued.
    Returns the losses and lse in ``dtypes.compute`` and the gradients in the dtype of their
    inputs.
    """
    compute_dtype = dtypes.compute
    hidden, weight, bias = problem.hidden, problem.weight, problem.bias
    if plan.epilogue and (entropy or top1 or entropy_grads is not None):
        raise ValueError("an epilogue tile plan keeps no per-token outputs (entropy, top1): plan without epilogue")
    (n, d), vocab, device = hidden.shape, weight.shape[0], hidden.device
    want_hidden, want_weight, want_bias = wanted
    blocks = [slice(start, min(start + plan.cols, vocab)) for start in range(0, vocab, plan.cols)]
    # A forward that computes the gradients needs no lse of ignored rows (their loss is
    # masked, their gradient 0, their lse not returned), so the kernels skip their logits.
    # With a tile spanning the vocabulary it takes statistics and gradient in one launch;
    # the losses then follow for all rows at once, after the loop.
    grads_here = lse is None and any(wanted) and loss_grad is None and lse_grad is None and not (entropy or top1)
    one_launch = grads_here and len(blocks) == 1 and not plan.epilogue
    losses = None
    if lse is None:
        sum_logits = options.label_smoothing > 0
        stats = RowStatistics(
            n, compute_dtype, device, sum_logits=sum_logits, overwritten=one_launch, entropy=entropy, top1=top1
        )
        losses = torch.empty(n, dtype=compute_dtype, device=device)
        lse = torch.empty(n, dtype=compute_dtype, device=device)
    entropies = torch.empty(n, dtype=compute_dtype, device=device) if entropy else None
    top1s = torch.empty(n, dtype=torch.bool, device=device) if top1 else None
    forward_entropy, entropy_grad = entropy_grads if entropy_grads is not None else (None, None)
    tile = torch.empty(plan.rows * plan.cols, dtype=dtypes.logits, device=device)
    # A wider tile's gradient is rounded to the inputs' dtype for the gradient products, as
    # autograd rounds the gradient of lm_head's output.
    rounded = None
    if dtypes.logits != hidden.dtype and any(wanted):
        rounded = torch.empty(plan.rows * plan.cols, dtype=hidden.dtype, device=device)
    grad_hidden = torch.empty(n, d, dtype=hidden.dtype, device=device) if want_hidden else None
    grad_weight = torch.empty(vocab, d, dtype=dtypes.weight_sum, device=device) if want_weight else None
    bias_acc_dtype = torch.promote_types(torch.promote_types(weight.dtype, compute_dtype), dtypes.logits)
    grad_bias = torch.zeros(vocab, dtype=bias_acc_dtype, device=device) if want_bias else None
    # A row chunk's grad_hidden sums one product per vocabulary block. In a 16-bit dtype the
    # running sum would be rounded once per block; the sum is kept in float32 instead. On CUDA
    # cuBLAS adds each product to it in float32 (addmm's out_dtype), so the only rounding is
    # the final one, as in one big matmul; elsewhere each product is rounded once, then added.
    acc = None
    if want_hidden and len(blocks) > 1 and hidden.dtype.itemsize < 4:
        acc = torch.empty(plan.rows, d, dtype=torch.float32, device=device)
    partials = None
    if plan.epilogue and losses is not None:
        partials = partial_buffer(plan.rows, plan.cols, compute_dtype, device)

    scale = None
    for start in range(0, n, plan.rows):
        rows = slice(start, min(start + plan.rows, n))
        h = hidden[rows]
        logits = None
        if one_launch:
            logits = logits_tile(tile, h, weight, bias, blocks[0])
            write_statistics_and_gradient(logits, queued_targets(problem), stats, lse, rows, options)
        elif losses is not None:
            for cols in blocks:
                if plan.epilogue:
                    # Only the last block's logits are read again, by the gradient pass.
                    logits = logits_with_statistics(
                        tile, h, weight, bias, cols, queued_targets(problem), stats, rows, options, partials,
                        store=any(wanted) and cols is blocks[-1], skip_ignored=grads_here,
                    )
                    continue
                logits = logits_tile(tile, h, weight, bias, cols)
                accumulate_logit_statistics(
                    logits, cols.start, queued_targets(problem), stats, rows, options, skip_ignored=grads_here
                )
            finish_statistics(stats, problem, rows, options, losses, lse)
            ignored = problem.targets[rows] == options.ignore_index
            if entropies is not None:
                entropies[rows] = stats.entropy_of(rows, lse[rows]).masked_fill_(ignored, 0.0)
            if top1s is not None:
                top1s[rows] = stats.is_top1(rows).masked_fill_(ignored, False)
        if not any(wanted):
            continue
        if scale is None:
            scale = alpha()
        # Backwards through the blocks: the tile still holds the statistics pass's last block
        # (with a single block, the whole row chunk), which then needs no recomputation.
        for k, cols in enumerate(reversed(blocks)):
            recompute = k > 0 or logits is None
            if recompute and plan.epilogue:
                logits = logit_gradient_tile(
                    tile, h, weight, bias, cols, queued_targets(problem), lse, loss_grad, lse_grad, rows, options
                )
            else:
                if recompute:
                    logits = logits_tile(tile, h, weight, bias, cols)
                if not one_launch:
                    write_logit_gradient(
                        logits, cols.start, queued_targets(problem), lse, loss_grad, lse_grad, rows, vocab, options,
                        entropy=forward_entropy, entropy_grad=entropy_grad,
                    )
            if want_bias:
                grad_bias[cols].add_(logits.sum(0, dtype=bias_acc_dtype), alpha=scale)
            if rounded is not None:
                logits = rounded[: logits.numel()].view_as(logits).copy_(logits)
            if want_hidden:
                out = grad_hidden[rows]
                if acc is None:
                    torch.addmm(out, logits, weight[cols], beta=0 if k == 0 else 1, alpha=scale, out=out)
                else:
                    acc_rows = acc[: out.shape[0]]
                    if acc_rows.is_cuda:
                        _add_product(acc_rows, logits, weight[cols], beta=0 if k == 0 else 1, alpha=scale)
                    else:
                        torch.addmm(out, logits, weight[cols], beta=0, alpha=scale, out=out)
                        if k == 0:
                            acc_rows.copy_(out)
                        else:
                            acc_rows.add_(out)
            if want_weight:
                out, beta = grad_weight[cols], 0 if start == 0 else 1
                if out.dtype == h.dtype:
                    torch.addmm(out, logits.t(), h, beta=beta, alpha=scale, out=out)
                else:
                    _add_product(out, logits.t(), h, beta=beta, alpha=scale)
        if acc is not None:
            grad_hidden[rows].copy_(acc[: rows.stop - rows.start])
    if one_launch:
        finish_statistics(stats, problem, slice(0, n), options, losses, lse, lse_known=True)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return TileResults(losses, lse, grad_hidden, grad_weight, grad_bias, entropies, top1s)
