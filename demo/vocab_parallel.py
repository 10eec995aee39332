"""A head sharded over the vocabulary, on CPU processes:
``torchrun --nproc_per_node 2 -m demo.vocab_parallel``.

Every rank holds the same tokens and one ``Shard(0)`` slice of the head's weight, as a
DTensor on a CPU device mesh (gloo); ``fused.linear_cross_entropy`` combines the shards'
statistics with two small all-reduces. Rank 0 prints what each rank held and sent, and how
far the loss and gradients lie from the single-process contract's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import fused
from reference.linear_cross_entropy import linear_cross_entropy as contract

TOKENS, HIDDEN, VOCAB = 12, 8, 11


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    generator = torch.Generator().manual_seed(0)  # the same tokens and weight on every rank
    hidden = torch.randn(TOKENS, HIDDEN, generator=generator, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator)
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=generator)
    labels[::4] = -100
    sharded = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()

    loss = fused.linear_cross_entropy(hidden, sharded, labels)
    loss.backward()
    weight_grad = sharded.grad.full_tensor()  # gathers the shards' gradients, for the comparison

    shard_rows = [None] * world
    dist.all_gather_object(shard_rows, sharded.to_local().shape[0])
    if rank == 0:
        whole = weight.clone().requires_grad_()
        whole_hidden = hidden.detach().clone().requires_grad_()
        expected = contract(whole_hidden, whole, labels)
        expected.backward()
        print(f"vocabulary rows per rank: {shard_rows} of {VOCAB}")
        # Two all-reduces per row: the max (1 float), then the rescaled sum of exponentials,
        # the target logit and the logit sum (3 floats); the hidden gradient is a third.
        print(f"statistics each rank sends: {TOKENS * 4 * 4} bytes (4 floats a token), never {TOKENS}x{VOCAB} logits")
        print(f"loss {loss.item():.5f}, contract {expected.item():.5f}")
        print("weight gradient within 1e-6 of the contract's:", bool((weight_grad - whole.grad).abs().max() < 1e-6))
        print("hidden gradient within 1e-6 of the contract's:", bool((hidden.grad - whole_hidden.grad).abs().max() < 1e-6))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
