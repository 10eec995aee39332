"""Patched architectures under ``transformers.Trainer``: are the training calls fused?

The architecture harness calls the model itself; users call it through Trainer, which
changes the model first (``Trainer.__init__`` sets ``config.use_cache = False``, a new key in
composite configs), wraps the forward (accelerate) and passes ``num_items_in_batch``. For each
architecture: build the tiny model (``harness.tiny_models``), patch it, train ``STEPS``
optimizer steps of ``ACCUMULATION`` micro-batches of text on CPU, and read the patch's
counters: every micro-batch must have been fused, none fallen back.

    python -m harness.trainer llava gemma3   # some; no argument: the vision-language families
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass

# Vision-language families whose training calls once all fell back under Trainer.
VLM_FAMILIES = (
    ("llava", "LlavaForConditionalGeneration"),
    ("llava_next", "LlavaNextForConditionalGeneration"),
    ("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
    ("qwen3_vl", "Qwen3VLForConditionalGeneration"),
    ("gemma3", "Gemma3ForConditionalGeneration"),
    ("paligemma", "PaliGemmaForConditionalGeneration"),
    ("mllama", "MllamaForConditionalGeneration"),
    ("internvl", "InternVLForConditionalGeneration"),
    ("mistral3", "Mistral3ForConditionalGeneration"),
    ("idefics3", "Idefics3ForConditionalGeneration"),
    ("smolvlm", "SmolVLMForConditionalGeneration"),
)
STEPS, ACCUMULATION, BATCH, LENGTH = 2, 2, 2, 12


@dataclass(frozen=True)
class TrainerCalls:
    """The patch's counters after ``STEPS`` Trainer steps; ``fused_every_call`` when each of the
    ``STEPS * ACCUMULATION`` micro-batches took the fused path."""

    model_type: str
    patched: bool
    fused: int
    stock: int
    fallback: int
    reason: str

    @property
    def fused_every_call(self) -> bool:
        return self.patched and self.fused == STEPS * ACCUMULATION and self.fallback == 0


def train_patched(model_type: str, class_name: str) -> TrainerCalls:
    """Patch the tiny ``class_name`` model, train it with Trainer, return its counters."""
    import torch
    from transformers import Trainer, TrainingArguments

    from fused.hf import patch_model
    from fused.hf.probe import probe_inputs, probe_labels
    from harness.tiny_models import build_tiny_model

    model = build_tiny_model(model_type, class_name)
    report = patch_model(model)
    if not report.patched:
        return TrainerCalls(model_type, False, 0, 0, 0, report.reason)
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = []
    for _ in range(STEPS * ACCUMULATION * BATCH):
        input_ids = probe_inputs(model, generator, 1, LENGTH)["input_ids"][0]
        rows.append({"input_ids": input_ids, "labels": probe_labels(input_ids, vocab, generator)})
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=ACCUMULATION,
            max_steps=STEPS,
            learning_rate=1e-3,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            save_strategy="no",
            train_sampling_strategy="sequential",
        )
        Trainer(model=model, args=args, train_dataset=rows).train()
    calls = report.calls
    return TrainerCalls(model_type, True, calls.fused, calls.stock, calls.fallback, calls.last_fallback)


def main(argv: list[str] | None = None) -> int:
    wanted = set(sys.argv[1:] if argv is None else argv)
    failures = 0
    for model_type, class_name in VLM_FAMILIES:
        if wanted and model_type not in wanted:
            continue
        result = train_patched(model_type, class_name)
        failures += not result.fused_every_call
        print(
            f"{model_type}: {'patched' if result.patched else 'not patched'}; fused {result.fused}, "
            f"stock {result.stock}, fallback {result.fallback} {result.reason}"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
