"""The causal-LM loss, step by step, in plain PyTorch: the project's definition of correct.

One module per step of the derivation; nothing here imports ``fused``.
"""
