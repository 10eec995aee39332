"""A patched tiny Llama inside DistributedDataParallel, on 2 processes: the loss of each rank's
own batch and the gradients DDP averages over ranks equal those of the same model unpatched,
with ``patch_model`` applied before wrapping the model and after (on ``ddp.module``).

Tolerances: those of tests/test_patch.py (rtol 1e-4, atol 1e-6, float32): the fused loss sums
in another order than torch's cross entropy; DDP's averaging is the same in both runs.
"""

from __future__ import annotations

import copy

import torch

from rank_processes import device, rank, run_ranks

RTOL, ATOL = 1e-4, 1e-6
VOCAB = 64


def tiny_llama(vocab: int = VOCAB):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def rank_batch(seed: int, vocab: int = VOCAB) -> dict:
    """A batch of its own for each rank, with ignored labels."""
    generator = torch.Generator().manual_seed(100 + seed)
    input_ids = torch.randint(0, vocab, (2, 7), generator=generator)
    labels = input_ids.clone()
    labels[0, :2] = -100
    return {"input_ids": input_ids, "labels": labels}


def _train_step(model, batch) -> tuple:
    """Loss and ``{name: grad}`` of one training step (gradients as DDP leaves them)."""
    model.train()
    loss = model(**batch).loss
    loss.backward()
    module = model.module if hasattr(model, "module") else model
    grads = {n: p.grad.detach().cpu().clone() for n, p in module.named_parameters()}
    return loss.detach().cpu(), grads


def _ddp_runs() -> dict:
    import fused
    from torch.nn.parallel import DistributedDataParallel

    dev = device()
    ids = [dev.index] if dev.type == "cuda" else None
    batch = {k: v.to(dev) for k, v in rank_batch(rank()).items()}
    base = tiny_llama().to(dev)
    out = {"stock": _train_step(DistributedDataParallel(copy.deepcopy(base), device_ids=ids), batch)}

    before = copy.deepcopy(base)
    report = fused.patch_model(before)
    assert report.patched, report.reason
    out["patched before DDP"] = _train_step(DistributedDataParallel(before, device_ids=ids), batch)
    calls = [fused.patch_report(before).calls.fused]

    after = DistributedDataParallel(copy.deepcopy(base), device_ids=ids)
    report = fused.patch_model(after.module)
    assert report.patched, report.reason
    out["patched after DDP"] = _train_step(after, batch)
    calls.append(fused.patch_report(after.module).calls.fused)
    out["fused calls"] = calls
    return out


def test_patched_model_under_ddp_has_the_stock_gradients():
    per_rank = run_ranks(_ddp_runs, 2)
    for r, out in enumerate(per_rank):
        assert out["fused calls"] == [1, 1], f"rank {r}: the fused loss did not run"
        stock_loss, stock_grads = out["stock"]
        for order in ("patched before DDP", "patched after DDP"):
            loss, grads = out[order]
            torch.testing.assert_close(loss, stock_loss, rtol=RTOL, atol=ATOL, msg=f"rank {r}, {order}")
            assert grads.keys() == stock_grads.keys()
            for name, grad in stock_grads.items():
                torch.testing.assert_close(grads[name], grad, rtol=RTOL, atol=ATOL, msg=f"rank {r}, {order}: {name}")
    # DDP averaged over ranks whose batches differ: every rank holds the same gradients, and
    # they are not one rank's own (the all-reduce happened).
    assert per_rank[0]["stock"][0] != per_rank[1]["stock"][0]
    for name, grad in per_rank[0]["patched before DDP"][1].items():
        torch.testing.assert_close(per_rank[1]["patched before DDP"][1][name], grad, rtol=0, atol=0, msg=name)
