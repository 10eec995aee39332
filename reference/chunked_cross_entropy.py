"""Linear + cross entropy without the ``(N, V)`` logits: chunk over tokens, recompute in backward.

``reference.linear_cross_entropy`` materialises float32 logits for all ``N`` tokens and lets
autograd keep them (and a few tensors of the same size) for the backward pass: ``N * V * 4``
bytes each, 8 GiB for 16k tokens and a 128k vocabulary. Nothing in the loss needs them all
at once. Rows are independent, so the forward pass walks over ``chunk_size`` rows at a time
and keeps only two numbers per token, the loss and the log-sum-exp ``lse``. The backward
pass recomputes each chunk's logits and applies the gradient analytically: with
``p = softmax(z) = exp(z - lse)`` and the upstream gradients ``g`` of the loss (zero on
ignored rows) and ``k`` of the lse (if it is returned and used),

    dL/dz_ij = g_i * (p_ij * (1 + 2 * z_loss * lse_i) - (1 - eps) * [j == y_i] - eps / V) + k_i * p_ij

then through the transforms: ``softcap`` ``z = c * tanh(u / c)`` multiplies by
``1 - (z / c)**2``, ``logit_scale`` ``u = s * x`` by ``s``. The gradient ``dx`` of a chunk's
raw logits ``x = hidden_c @ W.T + b`` gives its rows of ``grad_hidden = dx @ W`` and adds
``dx.T @ hidden_c`` to ``grad_weight`` and ``dx.sum(0)`` to ``grad_bias``.

The values are the contract's: the same ``prepare_inputs``, ``transform_logits``,
``token_losses`` and ``reduce_losses``, applied to chunks of rows instead of all of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from reference.input_checks import check_size
from reference.linear_cross_entropy import (
    LossArguments,
    LossOptions,
    prepare_inputs,
    reduce_losses,
    token_losses,
    takes_loss_arguments,
    transform_logits,
)

COMPUTE_DTYPES = (torch.float32, torch.float64)


def _chunk_logits(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, options: LossOptions, dtype: torch.dtype, wide: bool
) -> Tensor:
    """Transformed logits ``(rows, V)`` in ``dtype`` of a chunk of rows: as the contract
    computes them (the product in the inputs' dtype, then upcast), or with ``wide`` the
    product of the inputs widened to ``dtype``, never rounded to the inputs' dtype."""
    if wide:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return transform_logits(F.linear(hidden, weight, bias).to(dtype), options)


def _logit_grad_(
    z: Tensor, targets: Tensor, lse: Tensor, grad_loss: Tensor, grad_lse: Tensor | None, options: LossOptions
) -> Tensor:
    """Overwrite the transformed logits ``z (rows, V)`` with ``dL/dx``, the gradient w.r.t. the
    logits before the transforms. ``grad_loss (rows,)`` is already zero on ignored rows."""
    eps, vocab = options.label_smoothing, z.shape[1]
    cap_slope = (z / options.softcap).square_().neg_().add_(1) if options.softcap is not None else None
    coef = grad_loss * (1 + 2 * options.z_loss * lse) if options.z_loss else grad_loss
    if grad_lse is not None:
        coef = coef + grad_lse
    dz = z.sub_(lse.unsqueeze(1)).exp_().mul_(coef.unsqueeze(1))
    valid = targets != options.ignore_index
    # Ignored rows have grad_loss 0, so sending them to column 0 subtracts nothing.
    dz.scatter_add_(1, torch.where(valid, targets, 0).unsqueeze(1), (-(1 - eps) * grad_loss).unsqueeze(1))
    if eps:
        dz.sub_((grad_loss * (eps / vocab)).unsqueeze(1))
    if cap_slope is not None:
        dz.mul_(cap_slope)
    if options.logit_scale is not None:
        dz.mul_(options.logit_scale)
    return dz


class ChunkedLinearCrossEntropyFunction(torch.autograd.Function):
    """Per-token losses and lse of ``hidden @ weight.T + bias``, ``chunk_size`` rows at a time.

    ``forward(hidden (N, D), weight (V, D), bias (V,) | None, targets (N,) int64, options,
    chunk_size, compute_dtype, wide_logits) -> (losses (N,), lse (N,))`` in ``compute_dtype``;
    the inputs are those of a ``FlatProblem``; ``wide_logits``: see ``_chunk_logits``. Saves
    the inputs and ``lse``, never logits.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        options: LossOptions,
        chunk_size: int,
        compute_dtype: torch.dtype,
        wide_logits: bool,
    ) -> tuple[Tensor, Tensor]:
        n = hidden.shape[0]
        losses = hidden.new_empty(n, dtype=compute_dtype)
        lse = hidden.new_empty(n, dtype=compute_dtype)
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            z = _chunk_logits(hidden[rows], weight, bias, options, compute_dtype, wide_logits)
            losses[rows], lse[rows] = token_losses(z, targets[rows], options)
            del z  # before the next chunk's logits exist, not after
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.options, ctx.chunk_size, ctx.compute_dtype, ctx.wide_logits = options, chunk_size, compute_dtype, wide_logits
        # Only one of the two outputs may be used: its partner's gradient then arrives as None.
        ctx.set_materialize_grads(False)
        return losses, lse

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, grad_losses: Tensor | None, grad_lse: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        options, chunk_size, compute_dtype = ctx.options, ctx.chunk_size, ctx.compute_dtype
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        valid = targets != options.ignore_index
        # where, not a product: a mean over zero valid targets sends an inf gradient, which
        # must give zero on ignored rows, not inf * 0 = nan.
        if grad_losses is None:
            grad_losses = torch.zeros_like(lse)
        grad_losses = torch.where(valid, grad_losses.to(compute_dtype), 0)
        if grad_lse is not None:
            grad_lse = grad_lse.to(compute_dtype)

        # Weight and bias gradients are sums over all chunks: kept in at least float32 (the
        # accumulator is the returned gradient itself when its dtype already is that).
        acc_dtype = torch.promote_types(weight.dtype, compute_dtype)
        grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) if need_bias else None

        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h = hidden[rows]
            dx = _logit_grad_(
                _chunk_logits(h, weight, bias, options, compute_dtype, ctx.wide_logits),
                targets[rows],
                lse[rows],
                grad_losses[rows],
                None if grad_lse is None else grad_lse[rows],
                options,
            )
            if need_hidden:
                # In the inputs' dtype, as autograd does through the contract's upcast.
                torch.mm(dx.to(hidden.dtype), weight, out=grad_hidden[rows])
            if need_weight:
                grad_weight.addmm_(dx.t().to(acc_dtype), h.to(acc_dtype))
            if need_bias:
                grad_bias.add_(dx.sum(0).to(acc_dtype))
            del dx, h  # before the next chunk's logits exist, not after

        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


@takes_loss_arguments
def chunked_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    arguments: LossArguments,
    *,
    chunk_size: int = 1024,
    compute_dtype: torch.dtype = torch.float32,
    logits_dtype: torch.dtype | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``reference.linear_cross_entropy`` computed ``chunk_size`` tokens at a time.

    Same arguments (``LossArguments``), shapes, validation, values and returns as the contract: ``hidden (N, D)``
    or ``(B, T, D)`` in float16/bfloat16/float32/float64, ``weight (V, D)`` and ``bias (V,)``
    of the same dtype, ``labels`` shaped like ``hidden[..., 0]``; returns the loss (0-d, or
    shaped like ``labels`` for ``reduction='none'``) and with ``return_lse=True`` the lse
    shaped like ``labels``, both in ``compute_dtype``. Differentiable in ``hidden``,
    ``weight`` and ``bias`` (gradients in their own dtype) for any upstream gradient of the
    loss and of the lse.

    ``chunk_size``: rows of logits alive at once (positive int; ``>= N`` means one chunk).
    ``compute_dtype``: the dtype the logits are upcast to. ``torch.float32`` is the contract
    (transformers' ``logits.float()``, a downcast for float64 inputs); ``torch.float64``
    computes float64 inputs in float64 throughout, which ``torch.autograd.gradcheck`` needs.
    ``logits_dtype``: None rounds the logits to the inputs' dtype before the upcast, as the
    contract and transformers do; ``torch.float32`` (for 16-bit inputs, accuracy beyond
    stock) computes the products from the inputs widened to ``compute_dtype`` instead.

    Memory beyond the inputs and outputs, with ``C = min(chunk_size, N)``, ``s = 4`` bytes
    (8 for ``compute_dtype=float64``) and ``b`` the inputs' bytes per element:

    * kept from forward to backward: ``lse``, ``N * s`` bytes; nothing per (token, vocab) pair.
    * temporaries, one chunk at a time, forward and backward: the chunk's logits
      ``C * V * s`` and at most two more buffers of that size (``logsumexp``'s, the
      transforms' intermediates, the softcap slope); for ``b != s`` also ``C * V * b`` for
      the matmul's output before the upcast and the gradient cast back for ``grad_hidden``.
    * backward: ``grad_weight`` and ``grad_bias`` are summed over chunks in ``promote(b, s)``,
      ``(V * D + V) * 4`` bytes for float32 inputs, where that sum is the returned gradient
      itself. For 16-bit inputs the float32 sum is extra (cast to the input dtype once, at
      the end), and so is the chunk's ``hidden`` rows upcast, ``C * D * 4``. ``grad_hidden``
      is written block of rows by block of rows, never summed.

    Measured with ``reference.peak_memory``, float32, no transforms: forward ``2 * C * V * 4``,
    backward ``C * V * 4`` plus the gradients; the contract's autograd needs ``5 * N * V * 4``.
    """
    options = arguments.options()
    check_size("chunk_size", chunk_size)
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype}")
    if logits_dtype not in (None, torch.float32):
        raise ValueError(f"logits_dtype must be None (the inputs' dtype) or torch.float32, got {logits_dtype}")
    problem = prepare_inputs(hidden, weight, labels, arguments)
    wide_logits = logits_dtype is not None and logits_dtype.itemsize > problem.hidden.element_size()
    losses, lse = ChunkedLinearCrossEntropyFunction.apply(
        problem.hidden, problem.weight, problem.bias, problem.targets, options, chunk_size, compute_dtype, wide_logits
    )
    loss = reduce_losses(losses, problem.targets, options, arguments.num_items_in_batch, problem.batch_shape)
    return (loss, lse.reshape(problem.batch_shape)) if arguments.return_lse else loss
