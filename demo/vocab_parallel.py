"""A head sharded over the vocabulary, on CPU processes:
``torchrun --nproc_per_node 2 -m demo.vocab_parallel``.

Every rank holds the same tokens and one ``Shard(0)`` slice of the head's weight, as a
DTensor on a device mesh: CPU processes joined by gloo, or one GPU each by NCCL where every
rank has its own GPU; ``fused.linear_cross_entropy`` combines the shards' statistics with
two small all-reduces. Rank 0 prints what each rank held and sent, and how
far the loss and gradients lie from the single-process contract's.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import fused
from reference.linear_cross_entropy import linear_cross_entropy as contract

TOKENS, HIDDEN, VOCAB = 12, 8, 11


def main() -> None:
    world = int(os.environ["WORLD_SIZE"])
    on_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= world
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if on_gpus else torch.device("cpu")
    if on_gpus:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if on_gpus else "gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh(device.type, (world,))
    generator = torch.Generator().manual_seed(0)  # the same tokens and weight on every rank
    hidden = torch.randn(TOKENS, HIDDEN, generator=generator).to(device).requires_grad_()
    weight = torch.randn(VOCAB, HIDDEN, generator=generator).to(device)
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=generator).to(device)
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
