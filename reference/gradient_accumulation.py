"""Gradient accumulation: why the loss of each micro-batch is a sum divided by a shared count.

One optimizer step over ``K`` micro-batches should follow the gradient of one big batch,
whose loss is the mean over every target token of the step:

    L = (sum over all K micro-batches of the per-token losses) / N,    N = sum_k n_k,

``n_k`` being the number of target tokens of micro-batch ``k`` after the causal shift. Each
micro-batch can only see its own tokens, so the loss it backpropagates must be its own sum
divided by the *step's* count ``N``: ``L = sum_k S_k / N``. That count is what
transformers' Trainer passes to the model as ``num_items_in_batch``.

The older recipe, each micro-batch's mean divided by ``K``, gives
``(1/K) sum_k S_k / n_k``: every micro-batch weighs the same however many tokens it holds,
so it equals ``L`` only when all ``n_k`` are equal. A model whose forward accepts
``**kwargs`` but ignores ``num_items_in_batch`` is worse still under Trainer: Trainer
believes the model divided by ``N``, skips its own division by ``K``, and both the logged
loss and the gradient come out ``K`` times the mean of means.

This module computes the three losses from per-micro-batch logits, and runs a tiny
transformers Trainer to show the same three numbers in a real training loop.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.trainer_callback import PrinterCallback

from reference.causal_lm_loss import IGNORE_INDEX, causal_lm_loss, count_target_tokens
from reference.input_checks import check_logits_and_targets

if TYPE_CHECKING:
    from datasets import Dataset

# Valid lengths of the 16 rows of the tiny training set, padded to 12 tokens. Read four at a
# time they make micro-batches of 44, 26, 12 and 5 target tokens: far from equal, so the
# mean of means and the token mean disagree visibly.
UNEVEN_LENGTHS = (12, 12, 12, 12, 9, 8, 7, 6, 5, 4, 4, 3, 3, 2, 2, 2)


def num_items_in_batch(micro_batch_labels: Sequence[Tensor], ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Target tokens of one optimizer step: the sum of :func:`count_target_tokens` over its
    micro-batches (each ``(..., T_k)``, lengths may differ). 0-d int64 tensor."""
    if len(micro_batch_labels) == 0:
        raise ValueError("an optimizer step needs at least one micro-batch")
    return sum(count_target_tokens(labels, ignore_index) for labels in micro_batch_labels)


def one_batch_loss(micro_logits: Sequence[Tensor], micro_labels: Sequence[Tensor], vocab_size: int) -> Tensor:
    """The loss of the step's micro-batches concatenated into one batch: the target of
    gradient accumulation.

    ``micro_logits[k] (B_k, T, V)`` float, ``micro_labels[k] (B_k, T)`` integer; every
    micro-batch must have the same ``T`` (pad with ``-100`` labels). Mean over all target
    tokens; 0-d float32.
    """
    _check_micro_batches(micro_logits, micro_labels, vocab_size)
    if len({labels.shape[-1] for labels in micro_labels}) != 1:
        raise ValueError("one_batch_loss concatenates micro-batches, so they need one sequence length")
    return causal_lm_loss(torch.cat(list(micro_logits)), torch.cat(list(micro_labels)), vocab_size)


def mean_of_means_loss(micro_logits: Sequence[Tensor], micro_labels: Sequence[Tensor], vocab_size: int) -> Tensor:
    """Accumulated loss when each micro-batch returns its own mean and the total is divided
    by the number of micro-batches ``K``: ``(1/K) sum_k S_k / n_k``.

    What Trainer does for a model with ``accepts_loss_kwargs = False``. Shapes as in
    :func:`one_batch_loss`, except that ``T`` may differ between micro-batches. 0-d float32.
    """
    _check_micro_batches(micro_logits, micro_labels, vocab_size)
    steps = len(micro_logits)
    return sum(causal_lm_loss(logits, labels, vocab_size) / steps for logits, labels in zip(micro_logits, micro_labels))


def sum_over_count_loss(micro_logits: Sequence[Tensor], micro_labels: Sequence[Tensor], vocab_size: int) -> Tensor:
    """Accumulated loss when each micro-batch returns its sum divided by the step's count
    ``N`` (:func:`num_items_in_batch`): ``sum_k S_k / N``, the loss of one big batch.

    What Trainer does for a model that routes ``num_items_in_batch`` into its loss. Shapes
    as in :func:`mean_of_means_loss`. 0-d float32.
    """
    _check_micro_batches(micro_logits, micro_labels, vocab_size)
    count = num_items_in_batch(micro_labels)
    return sum(
        causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=count)
        for logits, labels in zip(micro_logits, micro_labels)
    )


def _check_micro_batches(micro_logits: Sequence[Tensor], micro_labels: Sequence[Tensor], vocab_size: int) -> None:
    if len(micro_logits) == 0:
        raise ValueError("an optimizer step needs at least one micro-batch")
    if len(micro_logits) != len(micro_labels):
        raise ValueError(f"{len(micro_logits)} micro-batches of logits but {len(micro_labels)} of labels")
    for logits, labels in zip(micro_logits, micro_labels):
        check_logits_and_targets(logits, labels, IGNORE_INDEX, vocab_size, "labels")


# ---- The same three losses inside transformers' Trainer ---------------------------------


class KwargsIgnoringLlamaForCausalLM(LlamaForCausalLM):
    """A Llama whose forward takes ``**kwargs`` but computes its own per-micro-batch mean.

    Trainer sees ``**kwargs`` in the signature, concludes that the model divides by
    ``num_items_in_batch``, passes the count and skips its division by the accumulation
    steps. The count is dropped here, so each micro-batch's mean is backpropagated in full.
    Setting ``accepts_loss_kwargs = False`` on the class or instance tells Trainer the
    truth. The class name keeps the ``ForCausalLM`` suffix, so Trainer counts shifted
    labels as it does for the stock model.
    """

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        logits = super().forward(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = None if labels is None else causal_lm_loss(logits, labels, self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def tiny_llama_config(vocab_size: int = 64) -> LlamaConfig:
    """A two-layer Llama config small enough to train for a few steps on a CPU in a second."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def tiny_llama(model_class: type[LlamaForCausalLM] = LlamaForCausalLM, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised ``model_class`` on :func:`tiny_llama_config`, float32.

    The same seed gives the same weights for any subclass that adds no parameters, so the
    stock and the kwargs-ignoring model start from identical points.
    """
    torch.manual_seed(seed)
    return model_class(tiny_llama_config())


def tiny_lm_dataset(
    lengths: Sequence[int] = UNEVEN_LENGTHS, seq_len: int = 12, vocab_size: int = 64, seed: int = 0
) -> Dataset:
    """An in-memory ``datasets.Dataset`` of random token rows, right-padded to ``seq_len``.

    Row ``i`` holds ``lengths[i]`` random tokens in ``[1, vocab_size)``, then padding (id 0,
    attention 0, label ``-100``). Columns ``input_ids``, ``attention_mask``, ``labels``.
    """
    # Imported here: datasets is a [dev] dependency, needed only by the Trainer half.
    from datasets import Dataset

    if any(not 1 <= n <= seq_len for n in lengths):
        raise ValueError(f"every length must lie in [1, {seq_len}], got {list(lengths)}")
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab_size, (len(lengths), seq_len), generator=generator)
    valid = torch.arange(seq_len) < torch.tensor(list(lengths)).unsqueeze(1)
    return Dataset.from_dict(
        {
            "input_ids": tokens.where(valid, 0).tolist(),
            "attention_mask": valid.long().tolist(),
            "labels": tokens.where(valid, IGNORE_INDEX).tolist(),
        }
    )


def micro_batches(dataset: Dataset, batch_size: int) -> list[dict[str, Tensor]]:
    """``dataset`` cut in order into batches of ``batch_size`` rows, as tensors: what Trainer
    feeds with ``train_sampling_strategy="sequential"`` and the default collator."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    columns = ("input_ids", "attention_mask", "labels")
    return [
        {name: torch.tensor(dataset[start : start + batch_size][name]) for name in columns}
        for start in range(0, len(dataset), batch_size)
    ]


@dataclass
class TrainerRun:
    """What one tiny Trainer run logged, one entry per optimizer step.

    ``losses`` and ``grad_norms`` are read from ``trainer.state.log_history``; ``grads[s]``
    is every parameter's gradient at step ``s`` (just before the optimizer uses it),
    flattened and concatenated in ``model.parameters()`` order, float32.
    ``accepts_loss_kwargs`` is Trainer's ``model_accepts_loss_kwargs`` decision.
    """

    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    accepts_loss_kwargs: bool | None = None


class _GradientRecorder(TrainerCallback):
    """Copies every gradient just before the optimizer step: all K backward passes are in,
    and neither clipping nor the optimizer has touched them yet."""

    def __init__(self, grads: list[Tensor]):
        self.grads = grads

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(
            torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().clone()
                    for p in model.parameters()
                ]
            )
        )


def run_tiny_trainer(
    model: PreTrainedModel,
    dataset: Dataset,
    *,
    gradient_accumulation_steps: int = 4,
    per_device_train_batch_size: int = 4,
    max_steps: int = 3,
    learning_rate: float = 0.1,
    seed: int = 0,
) -> TrainerRun:
    """Train ``model`` in place with transformers' Trainer on the CPU and return what it logged.

    Plain SGD at a constant learning rate and no gradient clipping, so the logged gradient
    norm is the accumulated gradient itself and a gradient ``K`` times too large moves the
    weights ``K`` times too far. Rows are read in order (``train_sampling_strategy=
    "sequential"``), so micro-batch ``k`` of every step is known in advance (see
    :func:`micro_batches`). Logs every step; reports nowhere, saves nothing (the output
    directory is a temporary one), prints nothing.
    """
    run = TrainerRun()
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=per_device_train_batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps,
            max_steps=max_steps,
            learning_rate=learning_rate,
            lr_scheduler_type="constant",
            optim="sgd",
            max_grad_norm=0.0,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=True,
            seed=seed,
            train_sampling_strategy="sequential",
            dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[_GradientRecorder(run.grads)])
        trainer.remove_callback(PrinterCallback)
        run.accepts_loss_kwargs = trainer.model_accepts_loss_kwargs
        trainer.train()
    steps = [entry for entry in trainer.state.log_history if "loss" in entry and "grad_norm" in entry]
    run.losses = [entry["loss"] for entry in steps]
    run.grad_norms = [entry["grad_norm"] for entry in steps]
    return run
