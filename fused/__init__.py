"""Fused linear + cross entropy: the Triton kernel, its CPU path and the transformers patcher."""
