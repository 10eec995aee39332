"""fused.patch_model / unpatch_model on tiny random transformers models, stock against patched.

Every comparison runs the same model (same weights, RNG reseeded) before and after
patching, in float32 on CPU. Tolerance: the loss and every gradient within rtol 1e-4,
atol 1e-6 (the fused loss sums in another order than torch's cross entropy; measured
differences are around 1e-7). Paths that are the stock forward (labels=None, eval mode,
fallbacks) must be bit-identical.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
from torch import nn
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast

from fused.hf.patch import patch_model, patch_report, unpatch_model
from reference.num_items_probe import trainer_accepts_loss_kwargs

RTOL, ATOL = 1e-4, 1e-6
VOCAB = 64
SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; more only contend on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(model_class, config_class, **overrides):
    torch.manual_seed(0)
    return model_class(config_class(**{**SIZES, **overrides}))


def llama(**overrides) -> LlamaForCausalLM:
    return build(LlamaForCausalLM, LlamaConfig, **overrides)


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (2, 7), generator=generator)
    labels = torch.randint(0, VOCAB, (2, 7), generator=generator)
    labels[0, :2] = -100
    labels[1, 4] = -100
    return {"input_ids": input_ids, "labels": labels}


def run(model: nn.Module, **inputs):
    torch.manual_seed(0)
    return model(**inputs)


def loss_and_grads(model: nn.Module, **inputs):
    """``(output, loss, {name: grad})`` of one seeded training forward; no ``.grad`` touched."""
    model.train()
    output = run(model, **inputs)
    loss = output[0] if isinstance(output, tuple) else output.loss
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return output, loss.detach(), {n: g for (n, _), g in zip(named, grads)}


def assert_same_training(stock, patched) -> None:
    """Loss and every parameter gradient of two ``loss_and_grads`` results agree."""
    _, stock_loss, stock_grads = stock
    _, patched_loss, patched_grads = patched
    torch.testing.assert_close(patched_loss, stock_loss, rtol=RTOL, atol=ATOL)
    assert patched_grads.keys() == stock_grads.keys()
    for name, grad in stock_grads.items():
        if grad is None:
            assert patched_grads[name] is None, name
        else:
            torch.testing.assert_close(patched_grads[name], grad, rtol=RTOL, atol=ATOL, msg=name)


def stock_then_patched(model: nn.Module, **inputs):
    """Training results of ``model`` before and after ``patch_model``, and the report."""
    stock = loss_and_grads(model, **inputs)
    report = patch_model(model)
    assert report.patched, report.reason
    return stock, loss_and_grads(model, **inputs), report


def snapshot(model: nn.Module) -> dict:
    """Everything patch_model may not change on a refused model."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "dict": dict(vars(model)),
        "training": [m.training for m in model.modules()],
        "hooks": [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()],
        "grads": [p.grad for p in model.parameters()],
        "rng": torch.get_rng_state(),
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert after["dict"] == before["dict"]
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert all(a is b for a, b in zip(after["grads"], before["grads"]))
    assert torch.equal(after["rng"], before["rng"])


# ---- the basic contract -------------------------------------------------------------------


def test_llama_loss_and_every_gradient_match_stock():
    model = llama()
    stock, patched, report = stock_then_patched(model, **batch())
    assert_same_training(stock, patched)
    assert patched[0].logits is None  # the point: no (N, V) logits in training
    assert report.head == "plain" and report.transforms == ()
    assert report.verification.passed and report.verification.loss_error < 1e-5
    assert (report.calls.fused, report.calls.stock, report.calls.fallback) == (1, 0, 0)


def test_patch_model_is_idempotent_and_leaves_the_rng_alone():
    model = llama()
    rng = torch.get_rng_state()
    first = patch_model(model)
    forward = vars(model)["forward"]
    assert patch_model(model) is first
    assert vars(model)["forward"] is forward
    assert torch.equal(torch.get_rng_state(), rng)
    loss_and_grads(model, **batch())
    assert first.calls.fused == 1


def test_memory_budget_reaches_the_kernel(monkeypatch):
    import fused.hf.forward

    budgets = []
    kernel = fused.hf.forward.linear_cross_entropy

    def spy(*args, **kwargs):
        budgets.append(kwargs["memory_budget"])
        return kernel(*args, **kwargs)

    model = llama()
    report = patch_model(model, memory_budget=3 << 20)
    monkeypatch.setattr(fused.hf.forward, "linear_cross_entropy", spy)
    loss_and_grads(model, **batch())
    assert patch_model(model, memory_budget=5 << 20) is report  # still idempotent: the budget moves
    loss_and_grads(model, **batch())
    patch_model(model)  # no budget given: the one in use stays
    loss_and_grads(model, **batch())
    assert budgets == [3 << 20, 5 << 20, 5 << 20]
    for bad in (0, -1, 1.5):
        with pytest.raises((ValueError, TypeError), match="memory_budget"):
            patch_model(llama(), memory_budget=bad)


def test_unpatch_restores_the_stock_forward():
    model = llama()
    stock_output, stock_loss, _ = loss_and_grads(model, **batch())
    patch_model(model)
    assert model.accepts_loss_kwargs is True and "forward" in vars(model)
    assert unpatch_model(model) is True
    assert "forward" not in vars(model) and "accepts_loss_kwargs" not in vars(model)
    assert patch_report(model) is None and unpatch_model(model) is False
    output, loss, _ = loss_and_grads(model, **batch())
    assert torch.equal(loss, stock_loss) and torch.equal(output.logits, stock_output.logits)


def test_unpatch_refuses_to_remove_a_wrapper_installed_after_the_patch():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model = llama()
    report = patch_model(model)
    # accelerate wraps forward in autocast and an fp32 output conversion, around the patch.
    # Its state is process-wide: an earlier Trainer set it up without mixed precision.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    try:
        model = accelerator.prepare(model)
        wrapped = vars(model)["forward"]
        with pytest.raises(RuntimeError, match="wrapped after patch_model"):
            unpatch_model(model)
        assert vars(model)["forward"] is wrapped and patch_report(model) is report  # nothing changed
        model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        assert unpatch_model(model) is True and "forward" not in vars(model)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # later Trainers start their own


def test_labels_none_and_eval_mode_are_the_stock_forward_bit_for_bit():
    model = llama()
    inputs = batch()
    model.train()
    stock_logits = run(model, input_ids=inputs["input_ids"]).logits
    model.eval()
    stock_eval = run(model, **inputs)
    report = patch_model(model)
    model.train()
    assert torch.equal(run(model, input_ids=inputs["input_ids"]).logits, stock_logits)
    model.eval()
    patched_eval = run(model, **inputs)
    assert torch.equal(patched_eval.loss, stock_eval.loss) and torch.equal(patched_eval.logits, stock_eval.logits)
    assert (report.calls.fused, report.calls.stock) == (0, 2)


def test_return_dict_false_keeps_the_tuple_positions():
    model = llama()
    stock, patched, _ = stock_then_patched(model, **batch(), return_dict=False, use_cache=True)
    assert_same_training(stock, patched)
    stock_tuple, patched_tuple = stock[0], patched[0]
    assert isinstance(patched_tuple, tuple) and len(patched_tuple) == len(stock_tuple) >= 3
    assert isinstance(stock_tuple[1], torch.Tensor) and patched_tuple[1] is None
    assert [type(v) for v in patched_tuple[2:]] == [type(v) for v in stock_tuple[2:]]


def test_logits_to_keep():
    model = llama()
    inputs = batch()
    model.train()
    stock_last = run(model, input_ids=inputs["input_ids"], logits_to_keep=3).logits
    with pytest.raises(ValueError):
        run(model, **inputs, logits_to_keep=3)  # stock cannot pair 3 positions with 7 labels
    stock, patched, _ = stock_then_patched(model, **inputs, logits_to_keep=7)
    assert_same_training(stock, patched)
    assert torch.equal(run(model, input_ids=inputs["input_ids"], logits_to_keep=3).logits, stock_last)
    with pytest.raises(ValueError, match="labels of shape"):
        run(model, **inputs, logits_to_keep=3)


@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
def test_num_items_in_batch(as_tensor):
    model = llama()
    inputs = batch()
    count = int((inputs["labels"][..., 1:] != -100).sum()) + 4  # not the batch's own count
    inputs["num_items_in_batch"] = torch.tensor(count) if as_tensor else count
    stock, patched, report = stock_then_patched(model, **inputs)
    assert_same_training(stock, patched)
    mean = loss_and_grads(model, **batch())[1]
    valid = int((inputs["labels"][..., 1:] != -100).sum())
    torch.testing.assert_close(patched[1], mean * valid / count, rtol=RTOL, atol=ATOL)
    assert report.uses_num_items_in_batch and model.accepts_loss_kwargs is True


def test_shift_labels_are_used_as_given():
    model = llama()
    inputs = batch()
    shift_labels = torch.roll(inputs["labels"], 1, dims=-1)  # not shift(labels): must be used as is
    stock, patched, _ = stock_then_patched(model, **inputs, shift_labels=shift_labels)
    assert_same_training(stock, patched)
    plain = loss_and_grads(model, **inputs)[1]
    assert abs(float(plain) - float(patched[1])) > 1e-3


def test_gradient_checkpointing():
    model = llama(num_hidden_layers=2)
    # Renamed activation_checkpointing_enable in transformers 5.2x.
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    stock, patched, _ = stock_then_patched(model, **batch())
    assert_same_training(stock, patched)


def test_tied_embeddings_gradient_reaches_the_shared_parameter():
    model = llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    inputs = batch()
    stock, patched, report = stock_then_patched(model, **inputs)
    assert report.head == "tied"
    assert_same_training(stock, patched)
    # Rows of tokens absent from the input get gradient only through the head.
    absent = sorted(set(range(VOCAB)) - set(inputs["input_ids"].flatten().tolist()))
    assert patched[2]["model.embed_tokens.weight"][absent].abs().sum() > 0


# ---- logit transforms, MoE, custom losses ---------------------------------------------------


def test_gemma2_softcap_is_folded():
    model = build(Gemma2ForCausalLM, Gemma2Config, head_dim=8, final_logit_softcapping=2.0)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # logits of a few units, where a softcap of 2 bends them
    uncapped = copy.deepcopy(model)
    uncapped.config.final_logit_softcapping = None
    inputs = batch()
    stock, patched, report = stock_then_patched(model, **inputs)
    assert report.transforms == ("softcap=2 (config.final_logit_softcapping)",)
    assert_same_training(stock, patched)
    # A patch that dropped the softcap would be caught: it changes the loss.
    assert abs(float(loss_and_grads(uncapped, **inputs)[1]) - float(stock[1])) > 1e-2


def test_cohere_logit_scale_is_folded():
    model = build(CohereForCausalLM, CohereConfig, logit_scale=0.25)
    stock, patched, report = stock_then_patched(model, **batch())
    assert report.transforms == ("logit_scale=0.25 (config.logit_scale)",)
    assert_same_training(stock, patched)


def test_granite_logits_scaling_is_folded():
    model = build(GraniteForCausalLM, GraniteConfig, logits_scaling=4.0)
    stock, patched, report = stock_then_patched(model, **batch())
    assert report.transforms == ("logit_scale=0.25 (1/config.logits_scaling)",)
    assert_same_training(stock, patched)


def test_mixtral_auxiliary_loss_is_kept():
    model = build(
        MixtralForCausalLM, MixtralConfig, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.5
    )
    inputs = batch()
    without_aux = loss_and_grads(model, **inputs)[1]
    stock, patched, _ = stock_then_patched(model, **inputs, output_router_logits=True)
    assert_same_training(stock, patched)
    assert float(stock[1]) - float(without_aux) > 1e-3  # the auxiliary term is really there


def test_custom_loss_function_is_refused_then_respected():
    def doubled(*args, **kwargs):
        return 2 * ForCausalLMLoss(*args, **kwargs)

    model = llama()
    model.loss_function = doubled
    before = snapshot(model)
    report = patch_model(model)
    assert not report.patched and "loss_function" in report.reason
    assert_untouched(model, before)

    model = llama()
    stock_loss = loss_and_grads(model, **batch())[1]
    report = patch_model(model)
    model.loss_function = doubled
    with pytest.warns(RuntimeWarning, match="loss_function"):
        loss = loss_and_grads(model, **batch())[1]
    assert torch.equal(loss, 2 * stock_loss)  # the custom loss, on the stock path
    assert report.calls.fallback == 1 and "loss_function" in report.calls.last_fallback


def test_a_config_change_after_patching_falls_back_to_stock():
    config = dict(head_dim=8, final_logit_softcapping=0.5)
    model = build(Gemma2ForCausalLM, Gemma2Config, **config)
    report = patch_model(model)
    model.config.final_logit_softcapping = 1.0
    unpatched = build(Gemma2ForCausalLM, Gemma2Config, **{**config, "final_logit_softcapping": 1.0})
    with pytest.warns(RuntimeWarning, match="config"):
        loss = loss_and_grads(model, **batch())[1]
    assert torch.equal(loss, loss_and_grads(unpatched, **batch())[1])
    assert report.calls.fallback == 1 and report.calls.fused == 0


def test_a_transform_switched_on_after_patching_falls_back_to_stock():
    model = build(Gemma2ForCausalLM, Gemma2Config, head_dim=8, final_logit_softcapping=None)
    report = patch_model(model)
    model.config.final_logit_softcapping = 0.5
    with pytest.warns(RuntimeWarning, match="config"):
        loss_and_grads(model, **batch())
    assert report.calls.fallback == 1 and report.calls.fused == 0


def test_changes_that_leave_the_transform_alone_keep_the_fused_path():
    model = llama()
    report = patch_model(model)
    model.config.use_cache = False
    # Trainer sets use_cache on every model; on a composite config that has none, the key is new.
    model.config.added_after_patching = False
    model.resize_token_embeddings(VOCAB + 6, mean_resizing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        loss_and_grads(model, **batch())
    assert (report.calls.fused, report.calls.fallback) == (1, 0)


# ---- refusals ---------------------------------------------------------------------------------


class MaskedColumnsLlama(LlamaForCausalLM):
    """Sets two vocabulary columns to the dtype's minimum before the loss, as Chameleon does
    with its image tokens: no softcap or scale, so the patch must refuse it."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids=input_ids).last_hidden_state)
        logits[..., :2] = torch.finfo(logits.dtype).min
        loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


class CountIgnoringLlama(LlamaForCausalLM):
    """Takes **kwargs but never hands num_items_in_batch to its loss (Trainer would pass it)."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids=input_ids).last_hidden_state)
        loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


class DoubledHead(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: build(MaskedColumnsLlama, LlamaConfig), "logits reaching the loss"),
        (lambda: _with_head(llama(), DoubledHead(16, VOCAB, bias=False)), "DoubledHead"),
    ],
    ids=["unsupported-transform", "unsupported-head"],
)
def test_refusal_leaves_the_model_untouched(make, reason):
    model = make()
    model.train()
    before = snapshot(model)
    report = patch_model(model)
    assert not report.patched and reason in report.reason
    assert_untouched(model, before)
    assert patch_report(model) is None


def _with_head(model: nn.Module, head: nn.Module) -> nn.Module:
    model.lm_head = head
    return model


def test_accepts_loss_kwargs_follows_what_the_forward_does():
    model = build(CountIgnoringLlama, LlamaConfig)
    inputs = batch()
    stock, patched, report = stock_then_patched(model, **inputs, num_items_in_batch=3)
    assert_same_training(stock, patched)
    assert report.stock_accepts_loss_kwargs is True  # Trainer's guess from **kwargs: wrong here
    assert report.uses_num_items_in_batch is False and model.accepts_loss_kwargs is False
    assert trainer_accepts_loss_kwargs(model)[0] is False  # what Trainer now decides
    unpatch_model(model)
    assert "accepts_loss_kwargs" not in vars(model)


# ---- the patched instance in the wider world -------------------------------------------------


def test_a_deep_copy_gets_its_own_patched_forward():
    model = llama()
    report = patch_model(model)
    loss_and_grads(model, **batch())  # one call the copy did not make
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.lm_head.weight.mul_(2)
    clone_loss = loss_and_grads(clone, **batch())[1]
    assert patch_report(clone).calls.fused == 1 and report.calls.fused == 1
    unpatch_model(clone)
    assert torch.allclose(loss_and_grads(clone, **batch())[1], clone_loss, rtol=RTOL)


def test_forward_signature_is_the_stock_one():
    model = llama()
    stock = inspect.signature(model.forward)
    patch_model(model)
    assert inspect.signature(model.forward) == stock  # Trainer keeps the columns it names


def test_example_inputs_drive_the_probe():
    model = llama()
    report = patch_model(model, example_inputs=batch(seed=5))
    assert report.patched and report.verification.passed
    refused = patch_model(llama(), example_inputs={"attention_mask": torch.ones(2, 7)})
    assert not refused.patched and "neither labels nor input_ids" in refused.reason


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        patch_model("a model")
    model = llama()
    patch_model(model)
    inputs = batch()
    inputs["labels"][0, 3] = VOCAB + 5
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a caller error is raised, never a silent fallback
        with pytest.raises(ValueError, match="labels must lie in"):
            model(**inputs)


# ---- PEFT ---------------------------------------------------------------------------------


def lora_model(dropout: float = 0.0, **config):
    from peft import LoraConfig, get_peft_model

    config = {"target_modules": ["lm_head", "q_proj"]} | config
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False, **config)
    return get_peft_model(llama(), lora)


def test_lora_on_lm_head_is_folded_so_the_adapter_gets_its_gradient():
    model = lora_model()
    stock, patched, report = stock_then_patched(model, **batch())
    assert report.head == "lora"
    assert_same_training(stock, patched)
    adapter = [n for n in patched[2] if "lm_head.lora_B" in n]
    assert adapter and all(patched[2][n].abs().sum() > 0 for n in adapter)


def test_lora_dropout_draws_the_same_mask_patched_and_stock():
    model = lora_model(dropout=0.5)
    stock, patched, _ = stock_then_patched(model, **batch())
    assert_same_training(stock, patched)


def test_modules_to_save_trains_the_copy():
    model = lora_model(target_modules=["q_proj"], modules_to_save=["lm_head"])
    stock, patched, report = stock_then_patched(model, **batch())
    assert report.head == "modules_to_save"
    assert_same_training(stock, patched)
    copy_grads = [g for n, g in patched[2].items() if "lm_head.modules_to_save" in n]
    assert copy_grads and all(g.abs().sum() > 0 for g in copy_grads)


def test_lora_trains_the_same_patched_and_unpatched():
    def train(model, steps: int = 3) -> list[float]:
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        losses = []
        for step in range(steps):
            optimizer.zero_grad()
            loss = run(model, **batch(seed=step)).loss
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        return losses

    stock = lora_model()
    patched = copy.deepcopy(stock)
    initial = stock.base_model.model.lm_head.lora_B["default"].weight.detach().clone()
    assert patch_model(patched).patched
    stock.train()
    patched.train()
    stock_losses, patched_losses = train(stock), train(patched)
    assert patch_report(patched).calls.fused == 3
    torch.testing.assert_close(torch.tensor(patched_losses), torch.tensor(stock_losses), rtol=RTOL, atol=ATOL)
    stock_state, patched_state = stock.state_dict(), patched.state_dict()
    for name, value in stock_state.items():
        torch.testing.assert_close(patched_state[name], value, rtol=RTOL, atol=ATOL, msg=name)
    trained = patched.base_model.model.lm_head.lora_B["default"].weight
    assert not torch.allclose(trained, initial)  # the adapter on the head did train


# ---- fallbacks run the body once ------------------------------------------------------------


class WeightedLlama(LlamaForCausalLM):
    """An older head (``nn.CrossEntropyLoss`` on the labels as given) that weighs classes once
    ``class_weight`` is set: a call the patch cannot serve, found only at the loss. Counts its
    backbone runs."""

    class_weight = None
    backbone_runs = 0

    def forward(self, input_ids=None, labels=None, **kwargs):
        type(self).backbone_runs += 1
        logits = self.lm_head(self.model(input_ids=input_ids).last_hidden_state)
        loss = None
        if labels is not None:
            loss = nn.CrossEntropyLoss(weight=self.class_weight)(logits.view(-1, logits.size(-1)), labels.view(-1))
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def test_a_call_found_unservable_at_the_loss_gets_the_stock_loss_without_a_second_body_run():
    model = build(WeightedLlama, LlamaConfig, attention_dropout=0.3)  # dropout: a rerun would draw anew
    inputs = batch()
    model.class_weight = torch.linspace(0.5, 2.0, VOCAB)
    stock = loss_and_grads(model, **inputs)
    model.class_weight = None
    report = patch_model(model)
    model.class_weight = torch.linspace(0.5, 2.0, VOCAB)
    WeightedLlama.backbone_runs = 0
    with pytest.warns(RuntimeWarning, match="class weights.*the stock loss ran on the head's captured input instead"):
        patched = loss_and_grads(model, **inputs)
    assert WeightedLlama.backbone_runs == 1
    assert_same_training(stock, patched)  # the same dropout masks: the body ran once
    assert (report.calls.fused, report.calls.fallback) == (0, 1)
    assert "the stock loss ran on the head's captured input instead" in report.calls.last_fallback
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per reason
        loss_and_grads(model, **inputs)
    assert report.calls.fallback == 2 and WeightedLlama.backbone_runs == 2


def test_a_call_found_unservable_before_the_forward_runs_the_stock_forward_once():
    model = build(WeightedLlama, LlamaConfig)
    report = patch_model(model)
    model.config.rms_norm_eps = 1e-3  # a float of the config: the transform may have changed
    WeightedLlama.backbone_runs = 0
    with pytest.warns(RuntimeWarning, match="the unpatched forward ran instead"):
        output = loss_and_grads(model, **batch())[0]
    assert WeightedLlama.backbone_runs == 1 and output.logits is not None
    assert (report.calls.fused, report.calls.fallback) == (0, 1)
