"""``transformers.Trainer`` on a tiny Llama sharded by FSDP2 on 2 processes, stock and patched.

The FSDP2 configuration is transformers' own: ``from_pretrained(..., distributed_config=
DistributedConfig(fsdp_size=2))`` applies ``fully_shard`` at load time (each layer, the
embeddings, ``[norm, lm_head]`` as one group with ``reshard_after_forward=False``, then the
model), and Trainer then trains the sharded model as it is: no DDP on top, gradient
accumulation through FSDP2's ``set_requires_gradient_sync``. Trainer's other FSDP
configuration, ``fsdp_config={"fsdp_version": 2}``, goes through accelerate, which enables
FSDP only on accelerator devices: on CPU processes the same arguments give DDP (the README
says where; the last test pins it, so that it fails once accelerate shards on CPU).

3 optimizer steps of 2 accumulated micro-batches of 2 rows per rank, SGD. Against the stock
run: every training call fused (6 of 6, no fallback), the logged losses within rtol 1e-5
(float32, the fused loss sums in another order) and the weights after training within
atol 1e-5; in both runs every call's ``num_items_in_batch`` is what transformers defines, the
label tokens (``labels[..., 1:] != -100``) of the step's micro-batches summed over processes.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from rank_processes import device, rank, run_ranks, set_launcher_environment, world
from test_distributed_ddp import tiny_llama

STEPS, ACCUMULATION = 3, 2
RTOL, WEIGHT_ATOL = 1e-5, 1e-5


def _train(folder: str, patched: bool) -> dict:
    """One Trainer run on this rank: its logged losses, each call's label-token count and
    ``num_items_in_batch``, the full weights after training, and the patch's counters."""
    import fused
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments
    from transformers.distributed import DistributedConfig

    from reference.gradient_accumulation import tiny_lm_dataset

    model = LlamaForCausalLM.from_pretrained(folder, distributed_config=DistributedConfig(fsdp_size=world()))
    if patched:
        report = fused.patch_model(model)
        assert report.patched, report.reason
    calls = []

    def record(module, args, kwargs):
        count = kwargs.get("num_items_in_batch")
        calls.append((int((kwargs["labels"][..., 1:] != -100).sum()), None if count is None else int(count)))

    model.register_forward_pre_hook(record, with_kwargs=True)
    args = TrainingArguments(
        output_dir=os.path.join(folder, f"run-{rank()}-{patched}"), max_steps=STEPS, per_device_train_batch_size=2,
        gradient_accumulation_steps=ACCUMULATION, learning_rate=0.1, optim="sgd", report_to=[],
        use_cpu=device().type == "cpu", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=tiny_lm_dataset())
    assert trainer.is_distributed_loading_by_transformers and trainer.model_wrapped is model  # no DDP on top
    trainer.train()
    return {
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "calls": calls,
        "weights": {n: p.full_tensor().detach().cpu() for n, p in model.named_parameters()},
        "patch calls": (fused.patch_report(model).calls.fused, fused.patch_report(model).calls.fallback)
        if patched else None,
    }


def _accelerate_fsdp_on_cpu(folder: str) -> tuple[bool, str]:
    """What Trainer's accelerate FSDP2 configuration becomes on CPU processes: whether FSDP is
    enabled, and how accelerate distributes the model."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=os.path.join(folder, f"accelerate-{rank()}"), use_cpu=True, fsdp=True,
        fsdp_config={"fsdp_version": 2}, report_to=[], save_strategy="no",
    )
    trainer = Trainer(model=tiny_llama(), args=args)
    return trainer.is_fsdp_enabled, str(trainer.accelerator.state.distributed_type)


def _stock_and_patched(folder: str) -> dict:
    set_launcher_environment()  # accelerate's process state reads them
    if rank() == 0:
        tiny_llama().save_pretrained(folder)
    dist.barrier()
    out = {"stock": _train(folder, False), "patched": _train(folder, True)}
    if device().type == "cpu":
        out["accelerate fsdp on cpu"] = _accelerate_fsdp_on_cpu(folder)
    return out


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory) -> list[dict]:
    """Every rank's results, one process group for the module."""
    return run_ranks(_stock_and_patched, 2, str(tmp_path_factory.mktemp("trainer")))


def test_patched_trainer_under_fsdp2_logs_the_stock_losses(per_rank):
    for run in ("stock", "patched"):
        counts = [[c for c, _ in out[run]["calls"]] for out in per_rank]
        for r, out in enumerate(per_rank):
            received = [n for _, n in out[run]["calls"]]
            assert len(received) == STEPS * ACCUMULATION, f"{run}, rank {r}: {received}"
            for call, n in enumerate(received):
                step = slice(call - call % ACCUMULATION, call - call % ACCUMULATION + ACCUMULATION)
                expected = sum(sum(rank_counts[step]) for rank_counts in counts)
                assert n == expected, f"{run}, rank {r}, call {call}: num_items_in_batch {n}, expected {expected}"
    assert counts[0] != counts[1]  # the ranks trained on different rows
    for r, out in enumerate(per_rank):
        assert out["patched"]["patch calls"] == (STEPS * ACCUMULATION, 0), f"rank {r}: {out['patched']['patch calls']}"
        assert len(out["stock"]["losses"]) == STEPS
        torch.testing.assert_close(out["patched"]["losses"], out["stock"]["losses"], rtol=RTOL, atol=0, msg=f"rank {r}")
        for name, weight in out["stock"]["weights"].items():
            torch.testing.assert_close(
                out["patched"]["weights"][name], weight, rtol=0, atol=WEIGHT_ATOL, msg=f"rank {r}: {name}"
            )


def test_accelerate_keeps_its_fsdp_configuration_off_cpu_processes(per_rank):
    """The README's account of accelerate 1.16: with ``use_cpu=True`` Trainer's
    ``fsdp_config={"fsdp_version": 2}`` yields DDP on CPU processes (``DistributedType.MULTI_CPU``),
    FSDP off. When this fails, accelerate shards on CPU: test that configuration above too."""
    if any("accelerate fsdp on cpu" not in out for out in per_rank):
        pytest.skip("the ranks ran on GPUs")
    for r, out in enumerate(per_rank):
        assert out["accelerate fsdp on cpu"] == (False, "DistributedType.MULTI_CPU"), f"rank {r}"
