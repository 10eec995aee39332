"""fused.diagnose, the loss doctor: every check fires on a setup broken on purpose and stays
quiet on the correct one, and the examination leaves the model as it found it.

Tiny random Llamas (vocabulary 64) in float32 on CPU; each check module is called on a
``Subject`` the way ``diagnose`` builds it, and a few tests run the whole checklist.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import fused
from fused.doctor import Status, extra_inputs, fused_loss, initial_loss, label_shift, loss_kwargs, packing, padding
from fused.doctor.subject import examining, model_of, subject_of
from reference.gradient_accumulation import KwargsIgnoringLlamaForCausalLM, tiny_llama

VOCAB, EOS = 64, 2


def run(check, model_or_trainer, batch=None, *, pretrained=False):
    """One check on the subject ``diagnose`` would build."""
    with examining(model_of(model_or_trainer)), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the patch's fallback warning: diagnose hides it too
        subject, _ = subject_of(model_or_trainer, batch, pretrained)
        return check.check(subject)


@pytest.fixture
def model():
    llama = tiny_llama()
    llama.config.use_cache = False  # as Trainer sets it (TrainingArguments.use_cache)
    return llama


@pytest.fixture
def ids():
    """``(2, 12)`` tokens in ``[3, 64)``: no eos (2) inside."""
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def padded(ids):
    """Row 1 right-padded with eos as the pad token, masked in ``labels`` by attention_mask;
    each row's real text ends in an eos, which stays a target."""
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    ids = ids.clone()
    ids[0, -1], ids[1, 7] = EOS, EOS
    ids = ids.masked_fill(mask == 0, EOS)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


# ---- fused_loss ---------------------------------------------------------------------------


def test_fused_loss_quiet_when_the_patch_runs(model, padded):
    fused.patch_model(model)
    finding = run(fused_loss, model, padded)
    assert finding.status is Status.OK and "fused +1, stock +0, fallback +0" in finding.evidence


def test_fused_loss_fires_when_a_wrapper_replaced_the_forward(model, padded):
    fused.patch_model(model)
    # A forward assigned after the patch that calls the class's, skipping the patch.
    model.forward = functools.partial(type(model).forward, model)
    finding = run(fused_loss, model, padded)
    assert finding.status is Status.PROBLEM and "silently inactive" in finding.summary
    assert "fused +0, stock +0, fallback +0" in finding.evidence and "model.forward is now" in finding.evidence


def test_fused_loss_fires_on_a_fallback(model, padded):
    fused.patch_model(model)
    model.config.rms_norm_eps = 1e-3  # a config float changed after patching: the patch falls back
    finding = run(fused_loss, model, padded)
    assert finding.status is Status.PROBLEM and "fell back" in finding.summary
    assert "config's float values changed" in finding.evidence


def test_fused_loss_skipped_when_not_patched(model, padded):
    finding = run(fused_loss, model, padded)
    assert finding.status is Status.SKIPPED and "not patched" in finding.summary


# ---- initial_loss -------------------------------------------------------------------------


def test_initial_loss_quiet_for_a_random_model_near_log_v(model, padded):
    finding = run(initial_loss, model, padded)
    assert finding.status is Status.OK and f"ln {VOCAB}" in finding.evidence


def test_initial_loss_fires_for_pretrained_weights_at_log_v(model, padded):
    # Weights said to be trained that score like a uniform guess: broken loading.
    finding = run(initial_loss, model, padded, pretrained=True)
    assert finding.status is Status.PROBLEM and "uniform guess" in finding.summary


def test_initial_loss_warns_for_a_random_model_far_above_log_v(model, padded):
    with torch.no_grad():
        model.lm_head.weight.mul_(300.0)  # logits far from uniform at initialisation
    finding = run(initial_loss, model, padded)
    ratio = float(finding.evidence.rsplit("ratio ", 1)[1])
    assert finding.status is Status.WARNING and ratio > initial_loss.RANDOM_WARNING


def test_initial_loss_fires_without_targets(model, padded):
    batch = {**padded, "labels": torch.full_like(padded["labels"], -100)}
    finding = run(initial_loss, model, batch)
    assert finding.status is Status.PROBLEM and "0 target tokens" in finding.evidence


# ---- loss_kwargs --------------------------------------------------------------------------


def test_loss_kwargs_quiet_for_the_stock_model(model):
    finding = run(loss_kwargs, model)
    assert finding.status is Status.OK and "loss(n) / loss(2n) = 2.000000" in finding.evidence


def test_loss_kwargs_fires_when_trainer_would_pass_an_ignored_count():
    finding = run(loss_kwargs, tiny_llama(KwargsIgnoringLlamaForCausalLM))
    assert finding.status is Status.PROBLEM and "ignores it" in finding.summary
    assert "loss(n) / loss(2n) = 1.000000" in finding.evidence and "= False" in finding.fix


def test_loss_kwargs_warns_when_a_used_count_is_withheld(model):
    model.accepts_loss_kwargs = False
    finding = run(loss_kwargs, model)
    assert finding.status is Status.WARNING and "mean of micro-batch means" in finding.summary


def test_loss_kwargs_reads_the_trainers_decision_and_batch(tmp_path):
    from transformers import Trainer, TrainingArguments

    from reference.gradient_accumulation import tiny_lm_dataset

    args = TrainingArguments(
        output_dir=str(tmp_path), gradient_accumulation_steps=4, per_device_train_batch_size=2,
        report_to=[], use_cpu=True, train_sampling_strategy="sequential",
    )
    trainer = Trainer(model=tiny_llama(KwargsIgnoringLlamaForCausalLM), args=args, train_dataset=tiny_lm_dataset())
    diagnosis = fused.diagnose(trainer)
    assert "trainer's train dataloader, input_ids 2x12" in diagnosis.batch
    finding = diagnosis["loss_kwargs"]
    assert finding.status is Status.PROBLEM and "4x too large" in finding.summary
    assert finding.fix.startswith("trainer.model_accepts_loss_kwargs = False")
    assert diagnosis["padding"].status is Status.OK  # the dataset's padding carries -100 labels
    assert not trainer.accelerator.gradient_state.in_dataloader  # the batch was taken without a trace


# ---- label_shift --------------------------------------------------------------------------


def test_label_shift_quiet_for_unshifted_labels(model, padded):
    finding = run(label_shift, model, padded)
    # One ahead matches too where the real eos is followed by eos padding: 1 of 19.
    assert finding.status is Status.OK
    assert "labels equal input_ids at 100.0% and input_ids one ahead at 5.3% of 19" in finding.evidence


def test_label_shift_fires_for_labels_shifted_by_the_collator(model, padded):
    shifted = F.pad(padded["labels"][:, 1:], (0, 1), value=-100)
    finding = run(label_shift, model, {**padded, "labels": shifted})
    assert finding.status is Status.PROBLEM and "shifted twice" in finding.summary
    assert "at 0.0% and input_ids one ahead at 100.0%" in finding.evidence


def test_label_shift_fires_for_unshifted_shift_labels(model, padded):
    finding = run(label_shift, model, {**padded, "shift_labels": padded["labels"]})
    assert finding.status is Status.PROBLEM and "shift_labels are not shifted" in finding.summary


# ---- packing ------------------------------------------------------------------------------


def _packed(ids, mask: bool):
    """Two documents of 5 and 7 tokens per row, position_ids restarting, document starts -100."""
    position_ids = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, -1)
    labels = ids.clone()
    labels[:, 5] = -100
    batch = {"input_ids": ids, "position_ids": position_ids, "labels": labels}
    return {**batch, "attention_mask": torch.ones_like(ids)} if mask else batch


def test_packing_quiet_without_attention_mask(model, ids):
    finding = run(packing, model, _packed(ids, mask=False))
    assert finding.status is Status.OK and "2 documents" in finding.evidence


def test_packing_fires_with_an_all_ones_attention_mask(model, ids):
    finding = run(packing, model, _packed(ids, mask=True))
    assert finding.status is Status.PROBLEM and "attention_mask all ones" in finding.evidence
    assert finding.fix.startswith("drop attention_mask:")


def test_packing_fires_when_the_forward_builds_a_cache(model, ids):
    model.config.use_cache = True  # a plain training loop with the config's default
    finding = run(packing, model, _packed(ids, mask=False))
    assert finding.status is Status.PROBLEM and "use_cache = False" in finding.fix


def test_packing_warns_when_document_starts_are_targets(model, ids):
    batch = {**_packed(ids, mask=False), "labels": ids}
    finding = run(packing, model, batch)
    assert finding.status is Status.WARNING and "2 document starts" in finding.evidence


def test_packing_skipped_for_an_unpacked_batch(model, padded):
    assert run(packing, model, padded).status is Status.SKIPPED


# ---- padding ------------------------------------------------------------------------------


def test_padding_quiet_when_masked_by_attention_mask(model, padded):
    finding = run(padding, model, padded)
    assert finding.status is Status.OK and "4 padding positions, 0 of them labelled" in finding.evidence


def test_padding_fires_when_padding_is_labelled(model, padded):
    finding = run(padding, model, {**padded, "labels": padded["input_ids"]})
    assert finding.status is Status.PROBLEM and "4 of them labelled" in finding.evidence


def test_padding_warns_when_pad_equals_eos_and_every_eos_is_masked(model, padded):
    model.config.pad_token_id = EOS
    # DataCollatorForLanguageModeling masks labels by the pad id: the real eos goes too.
    labels = padded["input_ids"].masked_fill(padded["input_ids"] == EOS, -100)
    finding = run(padding, model, {**padded, "labels": labels})
    assert finding.status is Status.WARNING and "never learns to stop" in finding.summary


# ---- extra_inputs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paligemma():
    from harness.tiny_models import build_tiny_model

    return build_tiny_model("paligemma", "PaliGemmaForConditionalGeneration")


def _prompt_and_answer(model):
    """A prompt of 6 tokens (labels -100) and an answer of 6, from the model's ordinary tokens."""
    from fused.hf.probe import probe_inputs

    ids = probe_inputs(model, torch.Generator().manual_seed(0), 2, 12)["input_ids"]
    return {"input_ids": ids, "labels": ids.masked_fill(torch.arange(12) < 6, -100)}


def test_extra_inputs_fires_when_paligemma_loses_token_type_ids(paligemma):
    finding = run(extra_inputs, paligemma, _prompt_and_answer(paligemma))
    assert finding.status is Status.PROBLEM and "token_type_ids is missing" in finding.summary


def test_extra_inputs_quiet_when_the_batch_carries_them(paligemma):
    batch = _prompt_and_answer(paligemma)
    batch["token_type_ids"] = (batch["labels"] != -100).long()
    assert run(extra_inputs, paligemma, batch).status is Status.OK


def test_extra_inputs_fires_when_gemma3_images_lose_token_type_ids():
    from harness.tiny_models import build_tiny_model

    gemma3 = build_tiny_model("gemma3", "Gemma3ForConditionalGeneration")
    batch = _prompt_and_answer(gemma3)
    image = gemma3.config.image_token_id
    quiet = run(extra_inputs, gemma3, batch)  # text only: this transformers needs no types
    batch["input_ids"][:, 1:5] = image  # image placeholders attend to each other both ways
    fired = run(extra_inputs, gemma3, batch)
    assert quiet.status is Status.OK and "logits equal within 1e-05" in quiet.evidence
    assert fired.status is Status.PROBLEM and "token_type_ids is missing" in fired.summary


def test_extra_inputs_skipped_for_a_text_model(model, padded):
    assert run(extra_inputs, model, padded).status is Status.SKIPPED


# ---- the whole checklist ------------------------------------------------------------------


def test_diagnose_leaves_the_model_as_it_was(model, padded):
    fused.patch_model(model)
    model.train()
    model.model.layers[0].eval()  # mixed modes must come back mixed
    for parameter in model.parameters():
        parameter.grad = torch.full_like(parameter, 0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    calls = fused.patch_report(model).calls
    counts = dataclasses.replace(calls)
    rng = torch.get_rng_state()

    diagnosis = fused.diagnose(model, padded)

    assert diagnosis.healthy, str(diagnosis)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)
    assert fused.patch_report(model).calls is calls and calls == counts


def test_diagnose_prints_a_checklist(padded):
    broken = tiny_llama(KwargsIgnoringLlamaForCausalLM)
    text = str(fused.diagnose(broken, {**padded, "labels": padded["input_ids"]}))
    lines = text.splitlines()
    assert lines[0] == "Loss doctor: KwargsIgnoringLlamaForCausalLM on the batch given, input_ids 2x12"
    assert any(line.startswith("  [problem] loss_kwargs") for line in lines)
    assert any(line.startswith("  [problem] padding") for line in lines)
    assert lines[-1] == "  2 ok, 0 warning, 2 problem, 3 skipped"


def test_diagnose_without_a_batch_runs_only_the_model_checks(model):
    diagnosis = fused.diagnose(model)
    assert diagnosis.batch == "random tokens (no batch given), input_ids 2x16"
    assert {f.check for f in diagnosis.with_status(Status.OK)} == {"initial_loss", "loss_kwargs"}
    assert "ln V = ln 64 = 4.159" in diagnosis["initial_loss"].evidence


@pytest.mark.parametrize(
    ("batch", "error", "message"),
    [
        ([1, 2], TypeError, "mapping of model inputs"),
        ({"input_ids": torch.zeros(2, 4, dtype=torch.long)}, ValueError, "batch['labels'] must be a tensor"),
        ({"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": torch.zeros(2, 3, dtype=torch.long)},
         ValueError, "has shape (2, 3), input_ids (2, 4)"),
        ({"input_ids": torch.zeros(2, 4), "labels": torch.zeros(2, 4, dtype=torch.long)},
         ValueError, "must be an integer tensor"),
    ],
)
def test_diagnose_names_what_is_wrong_with_the_batch(model, batch, error, message):
    with pytest.raises(error, match=re.escape(message)):
        fused.diagnose(model, batch)


def test_diagnose_runs_the_checks_asked_for(model, padded):
    diagnosis = fused.diagnose(model, padded, checks=["padding", "label_shift"])
    assert [f.check for f in diagnosis.findings] == ["label_shift", "padding"]
    with pytest.raises(ValueError, match=r"unknown checks \['paddding'\]"):
        fused.diagnose(model, padded, checks=["paddding"])


def test_diagnose_refuses_what_is_not_a_model():
    with pytest.raises(TypeError, match="Linear is not a transformers model: it has no config"):
        fused.diagnose(torch.nn.Linear(2, 2))


# ---- the command line ---------------------------------------------------------------------


def test_command_line_diagnoses_a_config_file(tmp_path, capsys):
    from fused.doctor.__main__ import main
    from reference.gradient_accumulation import tiny_llama_config

    tiny_llama_config().save_pretrained(tmp_path)
    status = main([str(tmp_path / "config.json"), "--patch", "--random-weights"])
    out = capsys.readouterr().out
    assert status == 0
    assert "Loss doctor: LlamaForCausalLM on random tokens (no batch given), input_ids 2x16" in out
    assert "[ok]      fused_loss" in out and "[ok]      loss_kwargs" in out


def test_command_line_names_a_model_it_cannot_find():
    from fused.doctor.__main__ import main

    with pytest.raises(SystemExit, match="'no-such-model' is neither a directory, a config file nor a model type"):
        main(["no-such-model"])
