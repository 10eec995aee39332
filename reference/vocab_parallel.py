"""Vocabulary-parallel cross entropy: the loss when each rank holds a slice of the vocabulary.

Under tensor parallelism the head ``weight (V, D)`` is cut along the vocabulary: rank ``k``
holds rows ``[o_k, o_k + V_k)`` (torch's ``Shard(0)``) and every rank holds the same tokens.
No rank sees a whole row of logits, yet the loss needs a few numbers per row that span the
vocabulary. Each is a sum or a max over columns, so it is computed per shard and combined:

    M_i   = max_k m_ik                                  m_ik = max_{j in shard k} z_ij
    S_i   = sum_k s_ik * exp(m_ik - M_i)                s_ik = sum_{j in shard k} exp(z_ij - m_ik)
    lse_i = M_i + log S_i
    z_iy  = sum_k t_ik                                  t_ik = z_iy if y in shard k, else 0
    sum_j z_ij = sum_k l_ik                             l_ik = sum_{j in shard k} z_ij

A shard with no columns (an uneven ``Shard(0)`` can leave the last ranks empty) has
``m = -inf`` and ``s = t = l = 0`` and adds nothing. From ``lse``, ``z_iy`` and the logit sum,
the loss is the contract's (``reference.linear_cross_entropy``):

    loss_i = (1 - eps) * (lse_i - z_iy) + eps * (lse_i - sum_j z_ij / V) + z_loss * lse_i**2

Backward needs no further exchange of statistics: with the combined ``lse`` each rank
computes the gradient of its own logits columns (``shard_logit_gradient``), hence its
weight-gradient shard; the hidden gradient ``dz @ W`` is a sum over the vocabulary, so each
rank's partial product is summed over ranks.

Everything here is one-process PyTorch on lists of shards: the definition the distributed
op (``fused.vocab_parallel``) is held to, testable without processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.linear_cross_entropy import (
    LossArguments,
    LossOptions,
    prepare_inputs,
    reduce_losses,
    takes_loss_arguments,
    transform_logits,
)


@dataclass(frozen=True)
class ShardStatistics:
    """Per-row statistics of one vocabulary shard's transformed logits, all ``(N,)`` in the
    compute dtype: ``max`` (``-inf`` for an empty shard), ``sumexp`` relative to that max,
    ``target_logit`` (0 where the target lies outside the shard or is ignored) and
    ``logit_sum``."""

    max: Tensor
    sumexp: Tensor
    target_logit: Tensor
    logit_sum: Tensor


@dataclass(frozen=True)
class CombinedStatistics:
    """Whole-vocabulary statistics, ``(N,)`` each: ``lse``, the target's logit and the sum of
    all logits."""

    lse: Tensor
    target_logit: Tensor
    logit_sum: Tensor


def shard_statistics(z: Tensor, targets: Tensor, offset: int, ignore_index: int) -> ShardStatistics:
    """Statistics of transformed logits ``z (N, V_k)`` (float32 or float64) of the shard whose
    first column is vocabulary entry ``offset``, against global ``targets (N,)`` int64."""
    n, width = z.shape
    local = targets - offset
    inside = (targets != ignore_index) & (local >= 0) & (local < width)
    if width == 0:
        zeros = z.new_zeros(n)
        return ShardStatistics(z.new_full((n,), -math.inf), zeros, zeros, zeros)
    m = z.amax(dim=1)
    sumexp = (z - m.unsqueeze(1)).exp().sum(dim=1)
    picked = z.gather(1, torch.where(inside, local, 0).unsqueeze(1)).squeeze(1)
    return ShardStatistics(m, sumexp, torch.where(inside, picked, 0.0), z.sum(dim=1))


def global_max(maxima: Tensor) -> Tensor:
    """``M (N,)`` from the shards' maxima ``(R, N)``: what an all-reduce with MAX computes."""
    return maxima.amax(dim=0)


def rescaled_sumexp(stats: ShardStatistics, row_max: Tensor) -> Tensor:
    """One shard's ``s_k * exp(m_k - M)``: its sum of exponentials relative to the global max
    ``M (N,)``, so that the shards' values add up (an all-reduce with SUM). An empty shard
    gives ``0 * exp(-inf) = 0``."""
    return stats.sumexp * torch.exp(stats.max - row_max)


def combine_statistics(shards: list[ShardStatistics]) -> CombinedStatistics:
    """The whole vocabulary's statistics from every shard's, in the two reductions a
    distributed run does: a max, then a sum of the rescaled exponentials, target logits and
    logit sums."""
    row_max = global_max(torch.stack([s.max for s in shards]))
    sumexp = sum(rescaled_sumexp(s, row_max) for s in shards)
    return CombinedStatistics(
        lse=row_max + torch.log(sumexp),
        target_logit=sum(s.target_logit for s in shards),
        logit_sum=sum(s.logit_sum for s in shards),
    )


def losses_from_statistics(
    stats: CombinedStatistics, targets: Tensor, vocab: int, options: LossOptions
) -> Tensor:
    """Per-token losses ``(N,)`` from whole-vocabulary statistics: the contract's
    ``token_losses`` written with ``lse``, ``z_y`` and ``sum_j z_j`` instead of the logits.
    Ignored rows give 0."""
    loss = stats.lse - stats.target_logit
    if options.label_smoothing:
        eps = options.label_smoothing
        loss = (1 - eps) * loss + eps * (stats.lse - stats.logit_sum / vocab)
    if options.z_loss:
        loss = loss + options.z_loss * stats.lse.square()
    return torch.where(targets != options.ignore_index, loss, torch.zeros_like(loss))


def shard_logit_gradient(
    z: Tensor,
    targets: Tensor,
    offset: int,
    vocab: int,
    lse: Tensor,
    grad_loss: Tensor,
    grad_lse: Tensor | None,
    options: LossOptions,
) -> Tensor:
    """``dL/dx (N, V_k)``: the gradient with respect to one shard's raw logits, from its
    transformed logits ``z`` (first column: vocabulary entry ``offset``), the global
    ``targets``, the whole vocabulary's size ``vocab`` and ``lse``, and the upstream gradients
    ``grad_loss (N,)`` (already 0 on ignored rows) and ``grad_lse (N,)`` or None.

    ``dL/dz_j = g * (p_j * (1 + 2 * z_loss * lse) - (1 - eps) * [j == y] - eps / V) + k * p_j``
    with ``p_j = exp(z_j - lse)``, then through softcap and logit scale: only ``[j == y]``
    depends on where the shard lies."""
    if z.shape[1] == 0:
        return z.clone()
    eps = options.label_smoothing
    coef = grad_loss * (1 + 2 * options.z_loss * lse) if options.z_loss else grad_loss
    if grad_lse is not None:
        coef = coef + grad_lse
    dz = (z - lse.unsqueeze(1)).exp() * coef.unsqueeze(1)
    local = targets - offset
    inside = (targets != options.ignore_index) & (local >= 0) & (local < z.shape[1])
    onehot = F.one_hot(torch.where(inside, local, 0), z.shape[1]).to(z.dtype) * inside.unsqueeze(1)
    dz = dz - ((1 - eps) * grad_loss).unsqueeze(1) * onehot
    if eps:
        dz = dz - (grad_loss * (eps / vocab)).unsqueeze(1)
    if options.softcap is not None:
        dz = dz * (1 - (z / options.softcap).square())
    if options.logit_scale is not None:
        dz = dz * options.logit_scale
    return dz


def shard_offsets(sizes: list[int]) -> list[int]:
    """The first vocabulary entry of each shard, for shards of ``sizes`` in rank order."""
    offsets, start = [], 0
    for size in sizes:
        offsets.append(start)
        start += size
    return offsets


@takes_loss_arguments
def vocab_parallel_linear_cross_entropy(
    hidden: Tensor,
    weight_shards: list[Tensor],
    labels: Tensor,
    arguments: LossArguments,
    *,
    bias_shards: list[Tensor] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``reference.linear_cross_entropy`` of ``hidden`` against the concatenation of
    ``weight_shards`` (each ``(V_k, D)``, some possibly empty) and ``bias_shards``, computed
    from per-shard statistics combined as a distributed run combines them. Same arguments,
    values and returns as the contract; differentiable through autograd (it materialises
    each shard's logits: a definition, not a memory saving). The bias comes in shards too:
    ``bias_shards``, not ``bias``."""
    if arguments.bias is not None:
        raise ValueError("pass the bias as bias_shards, one per weight shard")
    options = arguments.options()
    weight = torch.cat(weight_shards)
    bias = None if bias_shards is None else torch.cat(bias_shards)
    p = prepare_inputs(hidden, weight, labels, arguments._replace(bias=bias))
    offsets = shard_offsets([w.shape[0] for w in weight_shards])
    stats = []
    for k, (w, offset) in enumerate(zip(weight_shards, offsets)):
        b = None if bias_shards is None else bias_shards[k]
        z = transform_logits(F.linear(p.hidden, w, b).float(), options)
        stats.append(shard_statistics(z, p.targets, offset, options.ignore_index))
    combined = combine_statistics(stats)
    losses = losses_from_statistics(combined, p.targets, weight.shape[0], options)
    loss = reduce_losses(losses, p.targets, options, arguments.num_items_in_batch, p.batch_shape)
    return (loss, combined.lse.reshape(p.batch_shape)) if arguments.return_lse else loss
