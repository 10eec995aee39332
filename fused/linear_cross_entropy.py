"""Fused linear + cross entropy: the loss of ``hidden @ weight.T (+ bias)`` without its logits.

The same loss, options and gradients as ``reference.linear_cross_entropy`` (the contract),
computed tile by tile so that the ``N x V`` logits never exist. A tile is ``rows`` tokens by
``cols`` vocabulary entries (``fused.kernels.launch.plan_tiles``):

1. cuBLAS writes the tile's raw logits ``hidden_rows @ weight_cols.T (+ bias)`` in the
   inputs' dtype into one reused buffer, as the contract computes them before ``.float()``.
2. ``logit_statistics`` makes one pass over the tile: online max and sum of exponentials,
   target logit, logit sum, in float32, carried across the vocabulary blocks of the rows.
   After the last block: ``lse`` and the per-token loss.
3. ``logit_gradient`` overwrites the tile with ``dL/dlogits`` (float32 arithmetic, stored in
   the inputs' dtype); cuBLAS turns it into ``grad_hidden`` rows (``G @ W``), a block of
   ``grad_weight`` (``G.T @ hidden``) and of ``grad_bias``.

When the loss is reduced to a scalar (``'mean'``, ``'sum'``, a count), step 3 runs in the
forward pass, as Liger's kernel does: the logits are then computed once if a row chunk's
whole vocabulary fits in one tile (three matmuls), else twice (four). The gradients are kept
and scaled by the upstream gradient in backward. For ``reduction='none'`` or a returned
``lse`` (any upstream gradient per token), the forward pass keeps only ``lse`` and the
backward pass recomputes the logits.

Memory beyond the inputs and the returned gradients, with ``s`` the inputs' bytes per element
and ``r = rows``, ``c = cols`` of the tile plan (``s' = 4``, 8 for ``compute_dtype=float64``)::

    r * c * s                     one tile of logits / gradient of logits
  + r * D * 4     (c < V, s < 4)  the float32 sum of a row chunk's grad_hidden over blocks
  + 2 * V * s'    (bias grad)     grad_bias summed in float32, and one tile's column sums
  + 7 * N * s' + 9 * N + 8 KiB   per-token statistics, lse, losses, int64 targets, a temporary

and on CUDA up to 1 MiB more for each buffer above 1 MiB (the caching allocator's blocks);
``memory_budget`` plans count that too (``fused.kernels.launch.held_bytes``).

By default the plan is the fastest that fits in 512 MiB beyond the per-token statistics
(``fused.kernels.launch.plan_tiles``): whole-vocabulary tiles of ``512 MiB / (V * s)`` rows
(up to 16384) when at least 512 rows fit, so the extra memory never grows with ``N * V``.
``memory_budget`` sets that bound; ``chunk_size`` (tokens) and ``vocab_chunk_size``
(vocabulary entries) set the tile directly. Smaller tiles cost speed: more, smaller matmuls,
more reads of ``W`` and read-modify-writes of ``grad_weight``.

Precision: the gradient tile holds ``p - onehot`` (times per-token upstream gradients, if
any); the mean's ``1 / count`` is the matmuls' ``alpha``, applied in cuBLAS's float32
epilogue, so 16-bit tiles neither underflow nor lose the near-exactness of ``p - 1``. Each
gradient element is one matmul's float32 sum rounded once, except: ``grad_hidden`` over
vocabulary blocks off CUDA, a float32 sum of products each rounded once to the inputs' dtype
(on CUDA one float32 sum, rounded once); and ``grad_weight`` over several row chunks
(``N > rows``), summed in the inputs' dtype, one rounding per chunk: its error grows like
the square root of the number of row chunks (simulated on CPU in bfloat16: 1.4 times
eager's error with 4 chunks, 2.3 times with 16; measured on an H100, where the rounding of
``p - onehot`` dominates, 1.01-1.10 times eager's with 4 to 32 chunks).

Autograd: a scalar loss's gradients become ``.grad`` without a copy, scaled in place by the
upstream gradient (not at all when it is 1, decided on the device: the host never waits);
a second backward through a retained graph raises if an earlier one's was not 1.
No double backward. Under ``torch.compile`` the op is one graph node
(``fused::linear_cross_entropy``, and ``fused::linear_cross_entropy_backward`` for the
recomputation: ``torch.library`` custom ops with fake and autograd registrations); the
compiled backward scales out of place, holding the gradients twice for a moment. Eager
calls on plain tensors run the same forward and backward as a ``torch.autograd.Function``,
without the dispatcher's host time.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import torch
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from fused.kernels.launch import TilePlan, plan_for_budget, plan_tiles, statistics_bytes
from fused.kernels.logit_gradient import write_logit_gradient
from fused.kernels.logit_statistics import RowStatistics, accumulate_logit_statistics, logit_statistics_kernel
from fused.kernels.logit_statistics_and_gradient import write_statistics_and_gradient
from fused.kernels.upstream_scale import scale_unless_one
from fused.vocab_parallel import is_dtensor, vocab_parallel_linear_cross_entropy
from reference.chunked_cross_entropy import COMPUTE_DTYPES, chunked_linear_cross_entropy
from reference.chunked_cross_entropy import check_size as check_positive_size
from reference.linear_cross_entropy import FlatProblem, LossOptions, check_shift, prepare_inputs, reduce_losses

BACKENDS = ("auto", "triton", "reference")
# Set at import: triton.jit reads TRITON_INTERPRET when the kernels are defined.
KERNELS_INTERPRETED = isinstance(logit_statistics_kernel, InterpretedFunction)


# ---------------------------------------------------------------------------------------
# The tile loop.


def _logits_tile(buffer: Tensor, hidden_rows: Tensor, weight: Tensor, bias: Tensor | None, cols: slice) -> Tensor:
    """Raw logits ``(r, c)`` of ``hidden_rows`` against vocabulary ``cols``, written by
    cuBLAS into a contiguous view of ``buffer`` (in the inputs' dtype)."""
    out = buffer[: hidden_rows.shape[0] * (cols.stop - cols.start)].view(hidden_rows.shape[0], -1)
    if bias is None:
        return torch.mm(hidden_rows, weight[cols].t(), out=out)
    return torch.addmm(bias[cols], hidden_rows, weight[cols].t(), out=out)


def _finish_statistics(
    stats: RowStatistics, p: FlatProblem, rows: slice, options: LossOptions, losses: Tensor, lse: Tensor,
    *, lse_known: bool = False,
) -> None:
    """Write the per-token losses of ``rows`` from their final statistics, and their ``lse``
    unless a kernel wrote it already (``lse_known``). In place, so that the tile's memory
    plan needs room for at most one temporary per token (``fused.kernels.launch.statistics_bytes``)."""
    row_lse = lse[rows]
    if not lse_known:
        torch.log(stats.sumexp[rows], out=row_lse).add_(stats.max[rows])
    loss = torch.sub(row_lse, stats.target_logit[rows], out=losses[rows])
    if options.label_smoothing:
        eps = options.label_smoothing
        mean_logit_loss = torch.div(stats.logit_sum[rows], p.weight.shape[0])
        mean_logit_loss.neg_().add_(row_lse).mul_(eps)
        loss.mul_(1 - eps).add_(mean_logit_loss)
        del mean_logit_loss  # one temporary at a time
    if options.z_loss:
        loss.add_(row_lse.square().mul_(options.z_loss))
    loss.masked_fill_(p.targets[rows] == options.ignore_index, 0.0)


def _targets(p: FlatProblem) -> Tensor:
    """``p.targets``, and the labels' check queued right behind them. Called once the first
    logits product is queued, so the host's time on the labels' dozen small operations
    overlaps that product instead of delaying it (on an H100, 2-4% off a forward+backward of
    4096 x 4096 x 32000 and of 8192 x 2048 x 128256 in bfloat16)."""
    p.label_check  # noqa: B018 (queued, not read: the read waits for the device)
    return p.targets


@dataclasses.dataclass
class _TileResults:
    """What the tile loop returns: per-token ``losses`` and ``lse`` (when it computed them)
    and the gradients asked for (None otherwise)."""

    losses: Tensor | None
    lse: Tensor
    hidden: Tensor | None
    weight: Tensor | None
    bias: Tensor | None


def _run_tiles(
    p: FlatProblem,
    options: LossOptions,
    plan: TilePlan,
    compute_dtype: torch.dtype,
    *,
    lse: Tensor | None = None,
    loss_grad: Tensor | None = None,
    lse_grad: Tensor | None = None,
    alpha: Callable[[], float] = lambda: 1.0,
    wanted: tuple[bool, bool, bool] = (False, False, False),
) -> _TileResults:
    """Walk the tiles of ``p`` once: statistics (unless ``lse`` is given) and the gradients
    ``wanted`` for (hidden, weight, bias).

    ``loss_grad (N,)``: upstream gradient of each token's loss (None: 1 on valid rows);
    ``lse_grad (N,)`` of each lse (None: 0); ``alpha()`` multiplies every gradient, inside the
    matmuls' float32 epilogue: it is called once, when the first gradient product is due, so
    that a wait for the device in it (the forward's label check) finds work already queued.
    Returns the losses and lse in ``compute_dtype`` and the gradients in the dtype of their
    inputs.
    """
    hidden, weight, bias = p.hidden, p.weight, p.bias
    (n, d), vocab, device = hidden.shape, weight.shape[0], hidden.device
    want_hidden, want_weight, want_bias = wanted
    blocks = [slice(start, min(start + plan.cols, vocab)) for start in range(0, vocab, plan.cols)]
    # A forward that computes the gradients needs no lse of ignored rows (their loss is
    # masked, their gradient 0, their lse not returned), so the kernels skip their logits.
    # With a tile spanning the vocabulary it takes statistics and gradient in one launch;
    # the losses then follow for all rows at once, after the loop.
    grads_here = lse is None and any(wanted) and loss_grad is None and lse_grad is None
    one_launch = grads_here and len(blocks) == 1
    losses = None
    if lse is None:
        sum_logits = options.label_smoothing > 0
        stats = RowStatistics(n, compute_dtype, device, sum_logits=sum_logits, overwritten=one_launch)
        losses = torch.empty(n, dtype=compute_dtype, device=device)
        lse = torch.empty(n, dtype=compute_dtype, device=device)
    tile = torch.empty(plan.rows * plan.cols, dtype=hidden.dtype, device=device)
    grad_hidden = torch.empty(n, d, dtype=hidden.dtype, device=device) if want_hidden else None
    grad_weight = torch.empty(vocab, d, dtype=weight.dtype, device=device) if want_weight else None
    bias_acc_dtype = torch.promote_types(weight.dtype, compute_dtype)
    grad_bias = torch.zeros(vocab, dtype=bias_acc_dtype, device=device) if want_bias else None
    # A row chunk's grad_hidden sums one product per vocabulary block. In a 16-bit dtype the
    # running sum would be rounded once per block; the sum is kept in float32 instead. On CUDA
    # cuBLAS adds each product to it in float32 (addmm's out_dtype), so the only rounding is
    # the final one, as in one big matmul; elsewhere each product is rounded once, then added.
    acc = None
    if want_hidden and len(blocks) > 1 and hidden.dtype.itemsize < 4:
        acc = torch.empty(plan.rows, d, dtype=torch.float32, device=device)

    scale = None
    for start in range(0, n, plan.rows):
        rows = slice(start, min(start + plan.rows, n))
        h = hidden[rows]
        logits = None
        if one_launch:
            logits = _logits_tile(tile, h, weight, bias, blocks[0])
            write_statistics_and_gradient(logits, _targets(p), stats, lse, rows, options)
        elif losses is not None:
            for cols in blocks:
                logits = _logits_tile(tile, h, weight, bias, cols)
                accumulate_logit_statistics(
                    logits, cols.start, _targets(p), stats, rows, options, skip_ignored=grads_here
                )
            _finish_statistics(stats, p, rows, options, losses, lse)
        if not any(wanted):
            continue
        if scale is None:
            scale = alpha()
        # Backwards through the blocks: the tile still holds the statistics pass's last block
        # (with a single block, the whole row chunk), which then needs no recomputation.
        for k, cols in enumerate(reversed(blocks)):
            if k > 0 or logits is None:
                logits = _logits_tile(tile, h, weight, bias, cols)
            if not one_launch:
                write_logit_gradient(logits, cols.start, _targets(p), lse, loss_grad, lse_grad, rows, vocab, options)
            if want_hidden:
                out = grad_hidden[rows]
                if acc is None:
                    torch.addmm(out, logits, weight[cols], beta=0 if k == 0 else 1, alpha=scale, out=out)
                else:
                    acc_rows = acc[: out.shape[0]]
                    if acc_rows.is_cuda:
                        beta = 0 if k == 0 else 1
                        torch.addmm(acc_rows, logits, weight[cols], torch.float32, beta=beta, alpha=scale, out=acc_rows)
                    else:
                        torch.addmm(out, logits, weight[cols], beta=0, alpha=scale, out=out)
                        if k == 0:
                            acc_rows.copy_(out)
                        else:
                            acc_rows.add_(out)
            if want_weight:
                out = grad_weight[cols]
                torch.addmm(out, logits.t(), h, beta=0 if start == 0 else 1, alpha=scale, out=out)
            if want_bias:
                grad_bias[cols].add_(logits.sum(0, dtype=bias_acc_dtype), alpha=scale)
        if acc is not None:
            grad_hidden[rows].copy_(acc[: rows.stop - rows.start])
    if one_launch:
        _finish_statistics(stats, p, slice(0, n), options, losses, lse, lse_known=True)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return _TileResults(losses, lse, grad_hidden, grad_weight, grad_bias)


# ---------------------------------------------------------------------------------------
# Shared pieces of the custom ops.


def _flat_problem(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    options: LossOptions,
    shift: bool,
    count: Tensor | float | None,
) -> FlatProblem:
    """The contract's validation and flattening, with every tensor made contiguous for the
    kernels and cuBLAS (a copy only for non-contiguous inputs). The labels' values are
    checked on the device and read later (``p.label_check``): the forward reads them once the
    first logits product is queued, rather than leave the device idle while the host waits."""
    p = prepare_inputs(
        hidden, weight, labels, bias, options, shift=shift, num_items_in_batch=count, defer_label_check=True
    )
    return dataclasses.replace(
        p,
        hidden=p.hidden.contiguous(),
        weight=p.weight.contiguous(),
        bias=None if p.bias is None else p.bias.contiguous(),
    )


def _count(num_items: Tensor | None, num_items_value: float | None) -> Tensor | float | None:
    """``num_items_in_batch`` as the caller gave it: a tensor, a Python number or None."""
    return num_items if num_items is not None else num_items_value


def _denominator(p: FlatProblem, options: LossOptions, count: Tensor | float | None) -> Tensor | float:
    """What the summed loss is divided by: every token's loss has gradient ``1 / this``
    (ignored tokens are masked separately). A count given as a tensor stays on the targets'
    device; the valid count was read on the host with the label check."""
    if count is not None:
        return count.to(p.hidden.device) if isinstance(count, Tensor) else count
    if options.reduction == "sum":
        return 1.0
    return p.valid_tokens


def _forward_gradient_scale(p: FlatProblem, options: LossOptions, count: Tensor | float | None) -> float:
    """``1 / denominator`` as a Python number, for the matmuls' ``alpha``: the gradient tile
    holds ``p - onehot``, whose target entries lie next to -1 and 0 and so round to 16 bits
    almost exactly, and the mean's scale is applied in cuBLAS's float32 epilogue. (Scaling
    the tile instead, as eager does, rounds every entry fully: about twice eager's gradient
    error on flat softmaxes, measured on an H100.) A count given as a tensor costs one more
    host read."""
    denominator = float(_denominator(p, options, count))
    if denominator != 0:
        return 1.0 / denominator
    # transformers' edge cases: a count of 0 sends +inf to the valid tokens; with none valid
    # (or a mean over none) every token's gradient is 0.
    return math.inf if p.valid_tokens else 0.0


def _empty_unless(t: Tensor | None, like: Tensor) -> Tensor:
    """A custom op returns tensors: an ungiven gradient becomes an empty one."""
    return t if t is not None else like.new_empty(0)


# ---------------------------------------------------------------------------------------
# The custom ops.


def _forward(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Optional[Tensor],
    num_items: Optional[Tensor],
    num_items_value: Optional[float],
    ignore_index: int,
    shift: bool,
    reduction: str,
    label_smoothing: float,
    softcap: Optional[float],
    logit_scale: Optional[float],
    z_loss: float,
    chunk_size: Optional[int],
    vocab_chunk_size: Optional[int],
    compute_dtype: torch.dtype,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, lse, grad_hidden, grad_weight, grad_bias)``: the reduced loss as the contract
    returns it, ``lse`` shaped like ``labels``, and the gradients of the loss flagged
    ``grad_*`` (computed here, only for a scalar loss; empty otherwise). When gradients are
    computed here, ignored rows are skipped and their ``lse`` is -inf: the public function
    then does not return it."""
    options = LossOptions(ignore_index, reduction, label_smoothing, softcap, logit_scale, z_loss)
    count = _count(num_items, num_items_value)
    p = _flat_problem(hidden, weight, labels, bias, options, shift, count)
    vocab, hidden_dim = p.weight.shape
    plan = plan_tiles(p.hidden.shape[0], vocab, hidden_dim, p.hidden.element_size(), chunk_size, vocab_chunk_size)
    wanted = (grad_hidden, grad_weight, grad_bias)
    alpha = functools.partial(_forward_gradient_scale, p, options, count)
    out = _run_tiles(p, options, plan, compute_dtype, alpha=alpha, wanted=wanted)
    # Nothing computed from bad labels leaves the op: without gradients nothing has read them yet.
    p.label_check.read()
    loss = reduce_losses(out.losses, p.targets, options, count, p.batch_shape)
    return (
        loss,
        out.lse.reshape(p.batch_shape),
        _empty_unless(None if out.hidden is None else out.hidden.view(hidden.shape), hidden),
        _empty_unless(out.weight, hidden),
        _empty_unless(out.bias, hidden),
    )


_forward_op = torch.library.custom_op("fused::linear_cross_entropy", _forward, mutates_args=())


@_forward_op.register_fake
def _forward_fake(
    hidden, weight, labels, bias, num_items, num_items_value, ignore_index, shift, reduction,
    label_smoothing, softcap, logit_scale, z_loss, chunk_size, vocab_chunk_size, compute_dtype,
    grad_hidden, grad_weight, grad_bias,
):
    if reduction == "none":
        loss = hidden.new_empty(labels.shape, dtype=compute_dtype)
    else:
        loss = hidden.new_empty((), dtype=compute_dtype)
        if num_items is not None:  # the division decides shape and dtype, as in reduce_losses
            loss = loss / num_items.to(hidden.device)
    return (
        loss,
        hidden.new_empty(labels.shape, dtype=compute_dtype),
        hidden.new_empty(hidden.shape if grad_hidden else (0,)),
        hidden.new_empty(weight.shape if grad_weight else (0,)),
        hidden.new_empty(0) if not grad_bias else bias.new_empty(bias.shape),
    )


@torch.library.custom_op("fused::linear_cross_entropy_backward", mutates_args=())
def _backward_op(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Optional[Tensor],
    num_items: Optional[Tensor],
    num_items_value: Optional[float],
    ignore_index: int,
    shift: bool,
    reduction: str,
    label_smoothing: float,
    softcap: Optional[float],
    logit_scale: Optional[float],
    z_loss: float,
    chunk_size: Optional[int],
    vocab_chunk_size: Optional[int],
    compute_dtype: torch.dtype,
    lse: Tensor,
    loss_grad: Optional[Tensor],
    lse_grad: Optional[Tensor],
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of (hidden, weight, bias) for upstream gradients of the loss (shaped like the
    forward's loss, or None) and of ``lse`` (shaped like ``labels``, or None), recomputing the
    logits tile by tile from the forward's ``lse``."""
    options = LossOptions(ignore_index, reduction, label_smoothing, softcap, logit_scale, z_loss)
    count = _count(num_items, num_items_value)
    p = _flat_problem(hidden, weight, labels, bias, options, shift, count)
    n = p.hidden.shape[0]
    if loss_grad is None:
        row_grad = lse.new_zeros(()).expand(n)
    elif reduction == "none":
        row_grad = loss_grad.reshape(n)
    else:
        row_grad = (loss_grad / _denominator(p, options, count)).reshape(-1).expand(n)
    plan = plan_tiles(n, *p.weight.shape, p.hidden.element_size(), chunk_size, vocab_chunk_size)
    out = _run_tiles(
        p,
        options,
        plan,
        compute_dtype,
        lse=lse.reshape(n).contiguous(),
        loss_grad=row_grad,
        lse_grad=None if lse_grad is None else lse_grad.reshape(n).contiguous(),
        wanted=(grad_hidden, grad_weight, grad_bias),
    )
    return (
        _empty_unless(None if out.hidden is None else out.hidden.view(hidden.shape), hidden),
        _empty_unless(out.weight, hidden),
        _empty_unless(out.bias, hidden),
    )


@_backward_op.register_fake
def _backward_fake(
    hidden, weight, labels, bias, num_items, num_items_value, ignore_index, shift, reduction,
    label_smoothing, softcap, logit_scale, z_loss, chunk_size, vocab_chunk_size, compute_dtype,
    lse, loss_grad, lse_grad, grad_hidden, grad_weight, grad_bias,
):
    return (
        hidden.new_empty(hidden.shape if grad_hidden else (0,)),
        hidden.new_empty(weight.shape if grad_weight else (0,)),
        hidden.new_empty(0) if not grad_bias else bias.new_empty(bias.shape),
    )


def _scale_by_upstream(ctx, grads: list[Tensor], factor: Tensor) -> list[Tensor]:
    """The forward's gradients times the loss's upstream gradient ``factor``.

    Eagerly in place, so no second copy of a ``V x D`` gradient exists, by a kernel that
    skips the work when ``factor`` is exactly 1 (``loss.backward()``) without the host
    waiting to find out (``fused.kernels.upstream_scale``). A second backward through a
    retained graph reads on the host whether an earlier one scaled them, and then raises
    rather than return gradients scaled twice. While traced (``torch.compile``) out of place:
    a data-dependent branch cannot be traced.
    """
    if type(factor) is not Tensor or torch.compiler.is_compiling():
        return [g * factor for g in grads]
    scaled = getattr(ctx, "scaled", None)
    if scaled is not None and bool(scaled):
        raise RuntimeError(
            "fused.linear_cross_entropy: a scalar loss computes its gradients in the forward pass and "
            "scales them in place by the upstream gradient; a second backward through it with an "
            "upstream gradient other than 1 is not supported. Use reduction='none' (and sum) or "
            "return_lse=True, whose backward recomputes."
        )
    ctx.scaled = scale_unless_one(grads, factor)
    return grads


# _forward_op's number of inputs, and the positions of those that have gradients.
_N_INPUTS = 19
_GRAD_POSITIONS = (0, 1, 3)  # hidden, weight, bias


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, bias, num_items = inputs[:5]
    _, lse, grad_hidden, grad_weight, grad_bias = output
    ctx.grads_in_forward = any(inputs[-3:])
    ctx.set_materialize_grads(False)
    if ctx.grads_in_forward:
        # lse is an internal by-product here: the public function does not return it.
        ctx.mark_non_differentiable(lse, grad_hidden, grad_weight, grad_bias)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    else:
        ctx.mark_non_differentiable(grad_hidden, grad_weight, grad_bias)
        ctx.save_for_backward(hidden, weight, labels, bias, num_items, lse)
        ctx.options = inputs[5:16]


def _backward(ctx, loss_grad, lse_grad, *_):
    needs = [ctx.needs_input_grad[i] for i in _GRAD_POSITIONS]
    if loss_grad is None and lse_grad is None:
        return (None,) * _N_INPUTS
    if ctx.grads_in_forward:
        grads = ctx.saved_tensors
        missing = [name for name, g, need in zip(("hidden", "weight", "bias"), grads, needs) if need and g.numel() == 0]
        if missing:
            raise RuntimeError(f"fused::linear_cross_entropy computed no gradient for {missing}: set grad_<name>=True")
        grads = _scale_by_upstream(ctx, list(grads), loss_grad)
    else:
        hidden, weight, labels, bias, num_items, lse = ctx.saved_tensors
        grads = _backward_op(hidden, weight, labels, bias, num_items, *ctx.options, lse, loss_grad, lse_grad, *needs)
    result = [None] * _N_INPUTS
    for position, g, need in zip(_GRAD_POSITIONS, grads, needs):
        result[position] = g if need else None
    return tuple(result)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerForward(torch.autograd.Function):
    """``_forward_op`` and its autograd without the dispatcher, for eager calls on plain
    tensors. The custom op's dispatch cost about as much host time as the whole forward up
    to its first product, and that host time is time the device sits idle when nothing
    else is queued ahead of the loss."""

    @staticmethod
    def forward(ctx, *inputs):
        # ctx in forward, rather than a setup_context: with one, apply() binds the 19
        # arguments to forward's signature through inspect on every call.
        output = _forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(_backward)


def _needs_dispatcher(*tensors: Tensor | None) -> bool:
    """Whether a call must go through the custom op: while ``torch.compile`` traces it, and
    for tensor subclasses other than parameters (a tracer's fake tensors, DTensor), which
    the dispatcher routes to their own handling."""
    return torch.compiler.is_compiling() or any(
        t is not None and type(t) is not Tensor and type(t) is not torch.nn.Parameter for t in tensors
    )


# ---------------------------------------------------------------------------------------
# The public function.


def check_size(name: str, value: int | None) -> None:
    """``reference.chunked_cross_entropy.check_size``, with None (the knob unset) allowed."""
    if value is not None:
        check_positive_size(name, value)


def _cast_for_autocast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # autocast's own rule for a matmul's inputs: floating tensors other than float64.
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64:
        return t.to(dtype)
    return t


def _computes_as_autocast_would(function: Callable) -> Callable:
    """Under ``torch.autocast``, run ``function`` as the model's own head and loss would run:
    the head's inputs cast to the autocast dtype (what ``nn.Linear`` does under autocast),
    then the loss with autocast off, so that its float32 statistics stay float32 and the
    backward, which autocast does not reach, recomputes the same half-precision logits as
    the forward. The casts are autograd ops: float32 parameters get float32 gradients, as in
    stock mixed-precision training."""

    @functools.wraps(function)
    def run(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None, **options):
        device_type = hidden.device.type if isinstance(hidden, Tensor) else None
        if device_type is None or not torch.is_autocast_enabled(device_type):
            return function(hidden, weight, labels, bias=bias, **options)
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight, bias = (_cast_for_autocast(t, dtype) for t in (hidden, weight, bias))
        with torch.autocast(device_type, enabled=False):
            return function(hidden, weight, labels, bias=bias, **options)

    return run


@_computes_as_autocast_would
def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    shift: bool = False,
    reduction: str = "mean",
    num_items_in_batch: int | float | Tensor | None = None,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    logit_scale: float | None = None,
    z_loss: float = 0.0,
    return_lse: bool = False,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    memory_budget: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Cross entropy of ``hidden @ weight.T + bias`` against ``labels``, never materialising
    the logits: ``reference.linear_cross_entropy``'s arguments, values and gradients.

    ``hidden (N, D)`` or ``(B, T, D)`` float16/bfloat16/float32/float64; ``weight (V, D)``,
    ``bias (V,)`` of the same dtype and device; ``labels`` integer, shaped like
    ``hidden[..., 0]``, in ``[0, V)`` or ``ignore_index``. Returns the loss (0-d, or shaped
    like ``labels`` for ``reduction='none'``) in ``compute_dtype`` (float32: the contract's
    upcast), and with ``return_lse=True`` also the per-token log-sum-exp shaped like
    ``labels``. Both are differentiable in ``hidden``, ``weight`` and ``bias``.

    Memory knobs (see the module docstring for the formula): ``chunk_size`` tokens per row
    chunk, ``vocab_chunk_size`` vocabulary entries per tile (Triton path only); or
    ``memory_budget``, bytes of extra memory beyond the inputs and the returned gradients,
    from which the fastest tile that fits is chosen (``fused.kernels.launch.plan_for_budget``;
    on the reference path, chunks of two float32 row blocks of logits).
    ``compute_dtype=torch.float64`` keeps float64 inputs in float64 throughout (for
    ``gradcheck``). ``backend``: ``'auto'`` runs the Triton kernels on CUDA tensors and
    ``reference.chunked_cross_entropy`` elsewhere; ``'triton'`` forces the kernels (CPU
    tensors need ``TRITON_INTERPRET=1`` set before ``fused`` is imported); ``'reference'``
    forces the chunked PyTorch path.

    Under ``torch.autocast`` the loss is what ``F.linear`` + the loss compute there: the
    matmuls in the autocast dtype (float32 ``hidden``, ``weight`` and ``bias`` are cast to it;
    the gradients reach them in float32), the statistics in float32.

    A ``weight`` that is a DTensor sharded over the vocabulary (``Shard(0)`` on a 1-D mesh,
    tensor parallelism) runs ``fused.vocab_parallel``: the same loss, combined across ranks.
    """
    # --- Vocabulary-parallel dispatch (issue 17; to be re-homed in fused/api.py). Here
    # locals() are exactly this function's arguments.
    if is_dtensor(weight):
        return vocab_parallel_linear_cross_entropy(**locals())
    # --- End of the vocabulary-parallel dispatch.
    options = LossOptions(ignore_index, reduction, label_smoothing, softcap, logit_scale, z_loss)
    check_shift(shift)
    check_size("chunk_size", chunk_size)
    check_size("vocab_chunk_size", vocab_chunk_size)
    check_size("memory_budget", memory_budget)
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype}")
    if memory_budget is not None:
        if chunk_size is not None or vocab_chunk_size is not None:
            raise ValueError("memory_budget chooses chunk_size and vocab_chunk_size; pass either it or them")
        if isinstance(hidden, Tensor) and isinstance(weight, Tensor) and hidden.dim() >= 1 and weight.dim() == 2:
            n_rows, vocab = hidden.numel() // max(1, hidden.shape[-1]), weight.shape[0]
            if backend == "reference" or (backend == "auto" and not hidden.is_cuda):
                # The chunked reference holds about two float32 chunks of logits at once.
                chunk_size = max(1, (memory_budget - statistics_bytes(n_rows)) // (2 * 4 * vocab))
            else:
                plan = plan_for_budget(
                    n_rows, vocab, weight.shape[1], hidden.element_size(), memory_budget,
                    compute_itemsize=compute_dtype.itemsize, has_bias=bias is not None,
                )
                chunk_size, vocab_chunk_size = plan.rows, plan.cols
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if isinstance(hidden, Tensor) and hidden.is_cuda else "reference"
    if backend == "reference":
        return chunked_linear_cross_entropy(
            hidden, weight, labels, bias=bias, ignore_index=ignore_index, shift=shift, reduction=reduction,
            num_items_in_batch=num_items_in_batch, label_smoothing=label_smoothing, softcap=softcap,
            logit_scale=logit_scale, z_loss=z_loss, return_lse=return_lse, compute_dtype=compute_dtype,
            **({} if chunk_size is None else {"chunk_size": chunk_size}),
        )

    count_is_number = isinstance(num_items_in_batch, (int, float)) and not isinstance(num_items_in_batch, bool)
    op_types_fit = (
        all(isinstance(t, Tensor) for t in (hidden, weight, labels))
        and (bias is None or isinstance(bias, Tensor))
        and (num_items_in_batch is None or count_is_number or isinstance(num_items_in_batch, Tensor))
    )
    if not op_types_fit:
        # The op's schema would reject these with a generic message; the contract names them.
        prepare_inputs(hidden, weight, labels, bias, options, shift=shift, num_items_in_batch=num_items_in_batch)
    if not hidden.is_cuda and not KERNELS_INTERPRETED:
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got {hidden.device}; to run the kernels on CPU set "
            "TRITON_INTERPRET=1 before importing fused"
        )

    grads_in_forward = reduction != "none" and not return_lse and torch.is_grad_enabled()
    flags = [grads_in_forward and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    count_tensor = num_items_in_batch if isinstance(num_items_in_batch, Tensor) else None
    forward = _forward_op if _needs_dispatcher(hidden, weight, labels, bias, count_tensor) else _EagerForward.apply
    loss, lse, *_ = forward(
        hidden, weight, labels, bias,
        count_tensor,
        float(num_items_in_batch) if count_is_number else None,
        ignore_index, bool(shift), reduction, float(label_smoothing),
        None if softcap is None else float(softcap),
        None if logit_scale is None else float(logit_scale),
        float(z_loss), chunk_size, vocab_chunk_size, compute_dtype,
        *flags,
    )
    return (loss, lse) if return_lse else loss
