"""An instruction dataset made locally from the Python standard library's own documentation.

Each example asks what a standard-library function does and answers with the first
paragraph of its docstring: real English text, no download. Tokenised with the model's
chat template; the prompt tokens are masked with -100 so only the answer is learned.
"""

from __future__ import annotations

import importlib
import inspect

from datasets import Dataset

IGNORE_INDEX = -100
MODULES = (
    "json", "os.path", "textwrap", "itertools", "functools", "collections", "shutil", "string",
    "statistics", "random", "re", "math", "heapq", "bisect", "base64", "fnmatch", "glob", "difflib",
)


def stdlib_instructions(limit: int | None = None) -> list[dict[str, str]]:
    """``[{"prompt": ..., "response": ...}]`` from public, documented stdlib callables.

    Deterministic: modules and names are visited in a fixed, sorted order. Answers are the
    docstring's first paragraph, whitespace-normalised, kept when 40-400 characters long.
    """
    examples = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in sorted(dir(module)):
            obj = getattr(module, name)
            if name.startswith("_") or not callable(obj) or inspect.isclass(obj):
                continue
            doc = inspect.getdoc(obj) or ""
            answer = " ".join(doc.split("\n\n")[0].split())
            if 40 <= len(answer) <= 400:
                examples.append({"prompt": f"What does `{module_name}.{name}` do in Python?", "response": answer})
            if limit is not None and len(examples) == limit:
                return examples
    return examples


def tokenize_example(example: dict[str, str], tokenizer, max_length: int) -> dict[str, list[int]]:
    """Chat-formatted ``input_ids``, ``attention_mask`` and ``labels`` (prompt masked with -100).

    The prompt and the answer are tokenised separately and concatenated, so the boundary
    between masked and learned tokens is exact.
    """
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": example["prompt"]}], tokenize=True, add_generation_prompt=True
    )
    if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
        prompt_ids = prompt_ids["input_ids"]
    answer_ids = tokenizer(example["response"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    input_ids = (list(prompt_ids) + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def instruction_dataset(tokenizer, *, limit: int | None = 256, max_length: int = 96) -> Dataset:
    """A ``datasets.Dataset`` of tokenised stdlib instructions (see ``tokenize_example``)."""
    examples = Dataset.from_list(stdlib_instructions(limit))
    return examples.map(
        tokenize_example,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
        remove_columns=examples.column_names,
    )
