"""The loss doctor: the checks practitioners run by hand when a fine-tuning loss looks wrong,
run on the user's own model and one batch.

``diagnose(model_or_trainer, batch)`` returns a ``Diagnosis``: one ``Finding`` per check (ok,
warning, problem or skipped, the evidence measured on the batch, the fix). One module per
check, behavioural where it can be (the model is run on variants of the batch), static
where it must be:

- ``fused_loss``: a training forward really takes the patched fused loss (counters);
- ``initial_loss``: the loss against ``ln V``;
- ``loss_kwargs``: Trainer's ``model_accepts_loss_kwargs`` against what the loss does with
  ``num_items_in_batch`` (gradient accumulation inflation);
- ``label_shift``: labels shifted twice;
- ``packing``: packed documents attending to each other;
- ``padding``: padding in the loss, or the real eos masked when pad == eos;
- ``extra_inputs``: token-type inputs the processor adds and a text collator drops.

``python -m fused.doctor MODEL`` runs it from a terminal.
"""

from fused.doctor.checklist import CHECKS, diagnose
from fused.doctor.findings import Diagnosis, Finding, Status

__all__ = ["CHECKS", "Diagnosis", "Finding", "Status", "diagnose"]
