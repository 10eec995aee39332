"""Fine-tune a causal LM with ``transformers.Trainer`` twice, stock and patched, and compare.

Both runs start from the same weights, see the same batches in the same order (same
seed) and use gradient accumulation, so the logged loss and gradient norm of every
optimizer step must agree up to the kernel's rounding. On CUDA the patched run goes
through the Triton kernel; elsewhere through the chunked reference path.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

import fused
from reference.peak_memory import peak_memory_bytes


@dataclass
class RunLog:
    """One training run: per optimizer step, the loss and the (pre-clipping) gradient norm
    Trainer logged and the wall time in seconds; the peak tensor memory of one
    forward+backward on a fixed batch."""

    name: str
    losses: list[float]
    grad_norms: list[float]
    step_peak_bytes: int
    step_seconds: list[float]
    report: fused.PatchReport | None = None

    @property
    def typical_step_seconds(self) -> float:
        """Median wall time of the optimizer steps after the first, which pays one-off setup
        (the first step alone when there is only one)."""
        return statistics.median(self.step_seconds[1:] or self.step_seconds)


class _StepTimer(TrainerCallback):
    def __init__(self, seconds: list[float]):
        self.seconds = seconds
        self.start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.start)


def _training_arguments(output_dir: str, *, steps: int, batch_size: int, grad_accum: int, lr: float,
                        seed: int, progress: bool) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        disable_tqdm=not progress,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )


def _one_step_peak(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    device = next(model.parameters()).device

    def step() -> None:
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()

    peak = peak_memory_bytes(step, device)
    model.zero_grad(set_to_none=True)
    return peak


def finetune(model: nn.Module, dataset, tokenizer, *, name: str, patch: bool, steps: int = 20,
             batch_size: int = 4, grad_accum: int = 4, lr: float = 1e-4, seed: int = 0,
             progress: bool = True) -> RunLog:
    """Train a deep copy of ``model`` for ``steps`` optimizer steps; ``patch`` applies
    ``fused.patch_model`` first (and raises if it refuses: a demo that silently ran stock
    twice would prove nothing)."""
    model = copy.deepcopy(model)
    report = None
    if patch:
        report = fused.patch_model(model)
        if not report.patched:
            raise RuntimeError(f"patch_model refused this model: {report.reason}")
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    with tempfile.TemporaryDirectory() as output_dir:
        args = _training_arguments(output_dir, steps=steps, batch_size=batch_size, grad_accum=grad_accum,
                                   lr=lr, seed=seed, progress=progress)
        step_seconds: list[float] = []
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                          callbacks=[_StepTimer(step_seconds)])
        if not progress:  # without progress bars Trainer prints every log line instead
            trainer.remove_callback(PrinterCallback)
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    model.train()
    peak = _one_step_peak(model, collator([dataset[i] for i in range(batch_size)]))
    return RunLog(
        name=name,
        losses=[entry["loss"] for entry in logs],
        grad_norms=[entry["grad_norm"] for entry in logs],
        step_peak_bytes=peak,
        step_seconds=step_seconds,
        report=report,
    )


def side_by_side(stock: RunLog, patched: RunLog) -> str:
    """A text table: step, loss and grad norm of both runs, then memory and time."""
    lines = [f"{'step':>4}  {'loss stock':>10}  {'loss patched':>12}  {'grad norm stock':>15}  {'grad norm patched':>17}"]
    for step, (ls, lp, gs, gp) in enumerate(zip(stock.losses, patched.losses, stock.grad_norms, patched.grad_norms), 1):
        lines.append(f"{step:>4}  {ls:>10.4f}  {lp:>12.4f}  {gs:>15.4f}  {gp:>17.4f}")
    mib = 2**20
    lines.append(
        f"peak tensor memory of one forward+backward: stock {stock.step_peak_bytes / mib:.1f} MiB, "
        f"patched {patched.step_peak_bytes / mib:.1f} MiB"
    )
    lines.append(
        f"time per optimizer step after the first (median): stock {stock.typical_step_seconds:.2f} s, "
        f"patched {patched.typical_step_seconds:.2f} s"
    )
    return "\n".join(lines)
