"""``python -m demo``: fine-tune SmolLM2-135M-Instruct stock and patched, side by side."""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from demo.finetune import finetune, side_by_side  # noqa: E402
from demo.instruction_data import instruction_dataset  # noqa: E402
from reference.pretrained import load_smollm2  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (default 12)")
    parser.add_argument("--batch-size", type=int, default=2, help="micro-batch size (default 2)")
    parser.add_argument("--grad-accum", type=int, default=4, help="gradient accumulation steps (default 4)")
    parser.add_argument("--lora", action="store_true", help="train a PEFT LoRA adapter that includes lm_head")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()

    model, tokenizer = load_smollm2()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "lm_head"]))
    dataset = instruction_dataset(tokenizer)
    print(f"{len(dataset)} instruction examples from the standard library's docstrings; device {device}")
    common = dict(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum)
    stock = finetune(model, dataset, tokenizer, name="stock", patch=False, **common)
    patched = finetune(model, dataset, tokenizer, name="patched", patch=True, **common)
    print(patched.report)
    print(side_by_side(stock, patched))


if __name__ == "__main__":
    main()
