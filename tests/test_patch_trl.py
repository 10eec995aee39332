"""A patched model under TRL's fused LM head (trl.trainer.utils.add_fused_lm_head, which TRL's
SFT, DPO and GRPO trainers install in their __init__ and call with ``fused_lm_head=True``).

Patched after TRL's head is added (after the trainer is built) or before (TRL's head then
wraps the patch), a ``fused_lm_head=True`` training call is served by the patch (fused.hf.trl):
the model body runs once, log_probs, entropy and is_top1 come from the project's kernels (on CPU the
reference, or the kernels in Triton's interpreter), the other outputs from
reference.per_token_outputs. Compared
with the same call on an unpatched copy (TRL's own head), float32 on CPU: the loss and each
per-token output to rtol 1e-5 / atol 1e-6, is_top1 and label_mask exactly, the gradients of
``loss + mean(entropy)`` (TRL backpropagates both) for every parameter to rtol 1e-4 / atol 1e-6.
SFTTrainer, DPOTrainer and GRPOTrainer runs, patched before or after they are built, against
the same runs unpatched: tolerances in each test.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, MixtralConfig, MixtralForCausalLM

import fused.hf.trl
from fused.hf import patch_model, patch_report, unpatch_model
from fused.per_token import token_outputs
from tests.test_patch import batch, build, llama, lora_model

trl_utils = pytest.importorskip("trl.trainer.utils")
OUTPUTS = ("log_probs", "entropy", "is_top1", "log_sum_sq_probs", "mean_logits")
MOE = dict(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.5)


def trl_call(model, **inputs):
    """One seeded training call with fused_lm_head=True, and the gradients of loss + mean entropy."""
    model.train()
    torch.manual_seed(0)
    output = model(**inputs, fused_lm_head=True)
    objective = output.loss + output.entropy[output.label_mask].mean()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(objective, [p for _, p in named], allow_unused=True)
    return output, {n: g for (n, _), g in zip(named, grads)}


def compare(patched, expected) -> None:
    (output, grads), (trl_output, trl_grads) = patched, expected
    torch.testing.assert_close(output.loss, trl_output.loss, rtol=1e-5, atol=1e-6)
    assert (output.aux_loss is None) == (trl_output.aux_loss is None)
    if trl_output.aux_loss is not None:
        assert trl_output.aux_loss > 1e-3  # the load-balancing term is really there
        torch.testing.assert_close(output.aux_loss, trl_output.aux_loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(output.label_mask, trl_output.label_mask)
    for name in OUTPUTS:
        if name == "is_top1":
            assert torch.equal(output.is_top1, trl_output.is_top1)
        else:
            torch.testing.assert_close(getattr(output, name), getattr(trl_output, name), rtol=1e-5, atol=1e-6, msg=name)
    for name, grad in trl_grads.items():
        if grad is None:
            assert grads[name] is None, name
        else:
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("make", "temperature"),
    [
        (llama, 1.0),
        (lambda: llama(tie_word_embeddings=True), 0.7),
        (lambda: build(Gemma2ForCausalLM, Gemma2Config, head_dim=8, final_logit_softcapping=2.0), 1.3),
        (lambda: build(MixtralForCausalLM, MixtralConfig, output_router_logits=True, **MOE), 1.0),
    ],
    ids=["llama", "tied-temperature", "gemma2-softcap-temperature", "mixtral-router-aux-loss"],
)
@pytest.mark.parametrize("count", [None, 9])
@pytest.mark.parametrize("order", ["trl-then-patch", "patch-then-trl"])
@pytest.mark.parametrize("backend", ["auto", "triton"], ids=["cpu-reference", "kernels"])
def test_a_trl_fused_lm_head_call_is_served_by_the_patch(make, temperature, count, order, backend, monkeypatch):
    # backend='triton': log_probs, entropy and is_top1 from the Triton kernels (the interpreter on CPU).
    monkeypatch.setattr(fused.hf.trl, "token_outputs", functools.partial(token_outputs, backend=backend))
    model = make()
    if isinstance(model, Gemma2ForCausalLM):
        with torch.no_grad():
            model.lm_head.weight.mul_(30)  # logits large enough for the softcap to bend them
    unpatched = copy.deepcopy(model)
    trl_utils.add_fused_lm_head(unpatched, temperature=temperature, outputs=OUTPUTS)
    if order == "trl-then-patch":
        trl_utils.add_fused_lm_head(model, temperature=temperature, outputs=OUTPUTS)
    report = patch_model(model)
    assert report.patched, report.reason
    if order == "patch-then-trl":  # TRL's forward wraps the patch
        trl_utils.add_fused_lm_head(model, temperature=temperature, outputs=OUTPUTS)
    runs = []
    model.model.register_forward_hook(lambda module, args, output: runs.append(1))
    inputs = batch() | ({} if count is None else {"num_items_in_batch": torch.tensor(count)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        patched = trl_call(model, **inputs)
    compare(patched, trl_call(unpatched, **inputs))
    assert len(runs) == 1
    calls = patch_report(model).calls
    assert (calls.fused, calls.fallback) == (1, 0)


def test_a_call_the_patch_cannot_serve_runs_trls_head_once():
    # TRL's forward wrapped again before the patch: the patch cannot read TRL's settings.
    model = llama()
    trl_utils.add_fused_lm_head(model, outputs=OUTPUTS)
    unpatched = copy.deepcopy(model)
    model.forward = functools.partial(model.forward)
    assert patch_model(model).patched
    runs = []
    model.model.register_forward_hook(lambda module, args, output: runs.append(1))
    with pytest.warns(RuntimeWarning, match=r"cannot serve exactly \(TRL's forward is not one this patch recognises"):
        patched = trl_call(model, **batch())
    compare(patched, trl_call(unpatched, **batch()))
    assert len(runs) == 1
    calls = patch_report(model).calls
    assert (calls.fused, calls.fallback) == (0, 1) and "TRL" in calls.last_fallback
    output = model(**batch())  # an ordinary training call still takes the fused path
    assert output.logits is None and calls.fused == 1


@pytest.mark.parametrize("order", ["trl-then-patch", "patch-then-trl"])
def test_trls_head_cast_to_float32_is_served(order):
    """A bfloat16 model, TRL's cast_lm_head_to_fp32: both heads take the bfloat16 hidden states
    and weight to float32 and compute there, so the outputs agree as float32 computations do
    (measured within 1e-6; asserted rtol 1e-5); the parameters' gradients are float32 sums
    rounded once to bfloat16 on both sides (measured equal; held to one bfloat16 rounding,
    rtol 2**-7)."""
    model = llama().to(torch.bfloat16)
    unpatched = copy.deepcopy(model)
    trl_utils.add_fused_lm_head(unpatched, cast_lm_head_to_fp32=True, outputs=OUTPUTS)
    if order == "trl-then-patch":
        trl_utils.add_fused_lm_head(model, cast_lm_head_to_fp32=True, outputs=OUTPUTS)
    assert patch_model(model).patched
    if order == "patch-then-trl":
        trl_utils.add_fused_lm_head(model, cast_lm_head_to_fp32=True, outputs=OUTPUTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        output, grads = trl_call(model, **batch())
    trl_output, trl_grads = trl_call(unpatched, **batch())
    assert output.log_probs.dtype == torch.float32 == trl_output.log_probs.dtype
    for name in ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        torch.testing.assert_close(getattr(output, name), getattr(trl_output, name), rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(output.is_top1, trl_output.is_top1)
    for name, grad in trl_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=2**-7, atol=1e-5, msg=name)
    calls = patch_report(model).calls
    assert (calls.fused, calls.fallback) == (1, 0)


@pytest.mark.parametrize("order", ["trl-then-patch", "patch-then-trl"])
def test_a_peft_model_under_trls_head_is_served_by_the_patch(order):
    """LoRA on q_proj only: TRL's own head reads ``lm_head.weight``, the base weight, so with an
    adapter on the head it leaves the adapter out (measured: TRL's loss 4.1535, the model's own
    and the patched 4.4321) and is no reference to compare with."""
    model = lora_model(target_modules=["q_proj"])
    unpatched = copy.deepcopy(model)
    trl_utils.add_fused_lm_head(unpatched.get_base_model(), outputs=OUTPUTS)
    if order == "trl-then-patch":
        trl_utils.add_fused_lm_head(model.get_base_model(), outputs=OUTPUTS)
    assert patch_model(model).patched
    if order == "patch-then-trl":
        trl_utils.add_fused_lm_head(model.get_base_model(), outputs=OUTPUTS)
    compare(trl_call(model, **batch()), trl_call(unpatched, **batch()))
    calls = patch_report(model).calls
    assert (calls.fused, calls.fallback) == (1, 0)


def test_unpatch_leaves_no_hook_behind():
    model = llama()
    assert patch_model(model).patched and len(model._forward_pre_hooks) == 1
    assert unpatch_model(model) and not model._forward_pre_hooks and not model._forward_pre_hooks_with_kwargs


def _tokenizer():
    """A word-level tokenizer over the tiny vocabulary: SFTTrainer wants one, the dataset is
    already tokenized."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from tests.test_patch import VOCAB

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")))
    tokenizer.pad_token, tokenizer.eos_token = "t0", "t2"
    return tokenizer


# What every trainer below shares: SGD (Adam turns rounding noise in near-zero gradients into
# lr-sized steps), on the CPU, a log entry per step.
TRAINING = dict(
    learning_rate=1e-2, optim="sgd", report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
    disable_tqdm=True, seed=0,
)


def _train(build_trainer, patch: str | None):
    """Build a trainer around a fresh tiny Llama, patched before (TRL's head then wraps the
    patch) or after (the patch wraps TRL's head) or not at all, and train it: the trained
    model, the logged entries and the patch's report."""
    model = llama()
    report = patch_model(model) if patch == "before" else None
    trainer = build_trainer(model)
    if patch == "after":
        report = patch_model(trainer.model)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    return trainer.model, logged, report


def _sft(tmp_path, patch: str | None):
    from trl import SFTConfig, SFTTrainer

    from reference.gradient_accumulation import tiny_lm_dataset

    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        **TRAINING,
    )
    dataset = tiny_lm_dataset().remove_columns(["labels"])
    return _train(
        lambda model: SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=_tokenizer()), patch
    )


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("patch", ["before", "after"])
def test_sft_trainer_trains_on_the_patch_as_on_trls_head(tmp_path, patch):
    """SGD (Adam turns rounding noise in near-zero gradients into lr-sized steps). Measured:
    losses within 1e-5 relative, weights within 6e-6 after 3 steps; asserted: losses and
    logged entropy rtol 1e-4, weights atol 5e-5, token accuracy exactly."""
    stock, stock_log, _ = _sft(tmp_path / "stock", patch=None)
    patched, patched_log, report = _sft(tmp_path / "patched", patch=patch)
    assert report.patched and (report.calls.fused, report.calls.fallback) == (6, 0)  # 3 steps x 2 micro-batches
    for ours, theirs in zip(patched_log, stock_log, strict=True):
        for key in ("loss", "entropy"):
            torch.testing.assert_close(torch.tensor(ours[key]), torch.tensor(theirs[key]), rtol=1e-4, atol=0)
        assert ours["mean_token_accuracy"] == theirs["mean_token_accuracy"]
    for (name, ours), theirs in zip(patched.named_parameters(), stock.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=5e-5, msg=name)


def _preference_data():
    from datasets import Dataset

    from tests.test_patch import VOCAB

    generator = torch.Generator().manual_seed(0)

    def text(n: int) -> str:
        return " ".join(f"t{int(i)}" for i in torch.randint(3, VOCAB, (n,), generator=generator))

    rows = [(text(4), text(3), text(3)) for _ in range(8)]
    return Dataset.from_dict({key: [row[i] for row in rows] for i, key in enumerate(("prompt", "chosen", "rejected"))})


def _dpo(tmp_path, patch: str | None):
    from tokenizers import pre_tokenizers
    from trl import DPOConfig, DPOTrainer

    tokenizer = _tokenizer()
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    args = DPOConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        **TRAINING,
    )
    return _train(
        lambda model: DPOTrainer(
            model=model, ref_model=llama(), args=args, train_dataset=_preference_data(), processing_class=tokenizer
        ),
        patch,
    )


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("patch", ["before", "after"])
def test_dpo_trainer_trains_on_the_patch_as_on_trls_head(tmp_path, patch):
    """Measured: losses within 2e-6 and the logged log-probabilities within 1.1e-5 relative (after
    one step, whose weights differ by rounding), weights within 3e-6 after 2 SGD steps;
    asserted: loss, log-probabilities and entropy rtol 1e-4, weights atol 2e-5."""
    stock, stock_log, _ = _dpo(tmp_path / "stock", patch=None)
    patched, patched_log, report = _dpo(tmp_path / "patched", patch=patch)
    assert report.patched and (report.calls.fused, report.calls.fallback) == (4, 0)  # 2 steps x 2 micro-batches
    for ours, theirs in zip(patched_log, stock_log, strict=True):
        for key in ("loss", "logps/chosen", "logps/rejected", "entropy"):
            torch.testing.assert_close(torch.tensor(ours[key]), torch.tensor(theirs[key]), rtol=1e-4, atol=0)
    for (name, ours), theirs in zip(patched.named_parameters(), stock.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5, msg=name)


def _grpo(tmp_path, patch: str | None, bf16: bool):
    from datasets import Dataset
    from tokenizers import pre_tokenizers
    from trl import GRPOConfig, GRPOTrainer

    def reward(completions, **kwargs) -> list[float]:
        return [float(len(completion)) for completion in completions]

    tokenizer = _tokenizer()
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    args = GRPOConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=4, bf16=bf16, **TRAINING,
    )
    dataset = Dataset.from_dict({"prompt": ["t5 t6 t7", "t8 t9 t10"] * 4})
    return _train(
        lambda model: GRPOTrainer(
            model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer
        ),
        patch,
    )


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("patch", ["before", "after"])
@pytest.mark.parametrize("bf16", [True, False], ids=["bf16-autocast", "float32"])
def test_grpo_trainer_trains_on_the_patch_as_on_trls_head(tmp_path, patch, bf16):
    """A reward of the completion's length; generation runs the stock forward (eval calls),
    the policy's log-probabilities the patch. The second step moves the weights (the first
    one's advantages are 0).

    GRPOConfig's default bf16=True makes accelerate run the step under CPU autocast: both
    heads then compute bfloat16 products, each rounded its own way. Measured: gradient norm
    1.025437 patched against TRL's 1.025084 (3.4e-4 relative), 7.5e-4 and 1.1e-3 off the
    float64 gradient (1.026211) of the same call; replaying that call under autocast gives
    both norms bit for bit. Against the model's own head under the same autocast, the patch's
    backbone gradients are equal (layer 0's q_proj: 0; TRL's 4.5e-3 relative) and lm_head's
    differs by 2.9e-3 (TRL's 1.6e-3): bfloat16 rounding, asserted within its unit roundoff 2**-8.
    With bf16=False both norms are 1.0262113 to the last bit (asserted rtol 1e-6). Both: the same rewards, loss and
    entropy rtol 1e-4, weights atol 2e-5 after 2 SGD steps (max_grad_norm 1 clips both)."""
    stock, stock_log, _ = _grpo(tmp_path / "stock", patch=None, bf16=bf16)
    patched, patched_log, report = _grpo(tmp_path / "patched", patch=patch, bf16=bf16)
    assert report.patched and (report.calls.fused, report.calls.fallback) == (2, 0)  # one training call a step
    for ours, theirs in zip(patched_log, stock_log, strict=True):
        assert ours["reward"] == theirs["reward"]
        for key in ("loss", "entropy"):
            torch.testing.assert_close(torch.tensor(ours[key]), torch.tensor(theirs[key]), rtol=1e-4, atol=1e-7)
        rtol = 2**-8 if bf16 else 1e-6
        norms = torch.tensor(ours["grad_norm"]), torch.tensor(theirs["grad_norm"])
        torch.testing.assert_close(*norms, rtol=rtol, atol=0)
    assert patched_log[-1]["grad_norm"] > 0.1  # a step that moved the weights
    for (name, ours), theirs in zip(patched.named_parameters(), stock.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5, msg=name)


@pytest.mark.parametrize(
    ("installed", "patched"), [("1.14.2", False), ("0.29.1", False), ("1.15.0", True), (None, True)]
)
def test_an_installed_trl_older_than_1_15_is_refused_at_patch_time(monkeypatch, installed, patched):
    """TRL < 1.15 reads ``outputs.logits`` of its training calls (1.14.2's SFTTrainer:
    ``outputs.logits[..., :-1, :]``; 0.29.1: ``entropy_from_logits``) and ``forward.__func__``:
    patching would crash its first training step, so patch_model refuses, the model untouched.
    The installed version is faked where importlib.metadata reports it."""
    import importlib.metadata

    real = importlib.metadata.version

    def version(name: str) -> str:
        if name != "trl":
            return real(name)
        if installed is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed

    monkeypatch.setattr(importlib.metadata, "version", version)
    model = llama()
    report = patch_model(model)
    assert report.patched is patched
    if not patched:
        assert f"TRL {installed} is installed" in report.reason and "trl>=1.15" in report.reason
        assert "forward" not in vars(model) and not model._forward_pre_hooks
