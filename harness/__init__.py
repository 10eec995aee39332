"""The coverage harness: tiny random models of every transformers causal-LM architecture,
stock against patched (``python -m harness.architectures``)."""
