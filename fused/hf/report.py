"""What ``patch_model`` did to a model and how its patched forward has been called since."""

from __future__ import annotations

from dataclasses import dataclass, field

from fused.hf.probe import Verification


@dataclass
class PatchCalls:
    """Live counts of the patched forward's calls since patching (or since ``copy.deepcopy``
    made the model they count for).

    ``fused``: training calls with labels whose loss came from the fused kernel.
    ``stock``: calls without labels or in eval mode, passed to the stock forward untouched.
    ``fallback``: training calls with labels whose loss the stock code computed instead (the
    stock forward, or the stock loss on the head's captured input: the body runs once either
    way), warned once per reason; ``last_fallback`` says why and what ran.
    Under ``torch.compile`` the counts are kept when the model itself is compiled
    (``torch.compile(model)``); a call inlined into a larger compiled function is not counted.
    """

    fused: int = 0
    stock: int = 0
    fallback: int = 0
    last_fallback: str = ""

    def __deepcopy__(self, memo: dict) -> PatchCalls:
        # A copied model has made no calls yet: its counters start at zero.
        return PatchCalls()


@dataclass
class PatchReport:
    """What ``patch_model`` did to a model, and why.

    ``patched``: whether the fused loss is installed; ``reason``: why (not).
    ``head``: ``'plain'``, ``'tied'``, ``'lora'`` or ``'modules_to_save'`` (None if unknown).
    ``loss``: the loss call the fused kernel replaces, ``'model.loss_function'``
    (``ForCausalLMLoss``: shifted labels, ``num_items_in_batch``) or
    ``'torch.nn.functional.cross_entropy'`` (older heads: labels as given, no count).
    ``transforms``: the logit transforms folded into the kernel, one line each.
    ``uses_num_items_in_batch``: whether the forward hands ``num_items_in_batch`` to the
    loss. ``accepts_loss_kwargs``: the value set on the instance for Trainer (equal to the
    former); ``stock_accepts_loss_kwargs``: Trainer's decision before the patch.
    ``verification``: stock against patched on the probe batch. ``calls``: live counters.
    """

    patched: bool
    reason: str
    model: str
    head: str | None = None
    loss: str | None = None
    transforms: tuple[str, ...] = ()
    uses_num_items_in_batch: bool | None = None
    accepts_loss_kwargs: bool | None = None
    stock_accepts_loss_kwargs: bool | None = None
    verification: Verification | None = None
    calls: PatchCalls = field(default_factory=PatchCalls)
    layout: str = ""  # how the head's weight is laid out across processes (fused.fsdp.head_layout)

    def __str__(self) -> str:
        lines = [f"{self.model}: {'patched' if self.patched else 'not patched'} ({self.reason})"]
        if self.patched:
            lines += [
                f"  head: {self.head}; loss: {self.loss}",
                f"  layout: {self.layout}",
                f"  transforms: {', '.join(self.transforms) or 'none'}",
                f"  num_items_in_batch reaches the loss: {self.uses_num_items_in_batch}; "
                f"accepts_loss_kwargs {self.stock_accepts_loss_kwargs} -> {self.accepts_loss_kwargs}",
                f"  verification: {self.verification.describe()}",
                f"  calls: fused {self.calls.fused}, stock {self.calls.stock}, fallback {self.calls.fallback}"
                + (f" (last: {self.calls.last_fallback})" if self.calls.fallback else ""),
            ]
        return "\n".join(lines)
