"""The num_items_in_batch probe: static and behavioural verdicts, Trainer's decision, and a
probe that leaves the model exactly as it found it."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from reference.causal_lm_loss import causal_lm_loss
from reference.gradient_accumulation import KwargsIgnoringLlamaForCausalLM, tiny_llama, tiny_llama_config
from reference.num_items_probe import probe_num_items_in_batch, static_routes_num_items, trainer_accepts_loss_kwargs


class NoKwargsLlamaForCausalLM(LlamaForCausalLM):
    """A forward without **kwargs: Trainer passes no count and divides by the steps itself."""

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


class ForwardingLlamaForCausalLM(LlamaForCausalLM):
    """Hands **kwargs on to the stock forward: the count reaches the loss through super()."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        return super().forward(input_ids=input_ids, labels=labels, **kwargs)


class CountDroppingLlamaForCausalLM(LlamaForCausalLM):
    """Passes **kwargs on, but only after removing the count from them."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        kwargs.pop("num_items_in_batch", None)
        return super().forward(input_ids=input_ids, labels=labels, **kwargs)


class ExplicitCountLlamaForCausalLM(LlamaForCausalLM):
    """Divides by an explicit num_items_in_batch parameter but takes no **kwargs, so
    Trainer never passes it: a wrong but harmless False (mean of means)."""

    def forward(self, input_ids=None, labels=None, num_items_in_batch=None):
        logits = super().forward(input_ids=input_ids).logits
        loss = causal_lm_loss(logits, labels, self.config.vocab_size, num_items_in_batch=num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def _flagged_off() -> KwargsIgnoringLlamaForCausalLM:
    model = tiny_llama(KwargsIgnoringLlamaForCausalLM)
    model.accepts_loss_kwargs = False
    return model


# (model factory, static, behavioural, Trainer's decision, decision right)
CASES = {
    "stock": (lambda: tiny_llama(), True, True, True, True),
    "kwargs_ignoring": (lambda: tiny_llama(KwargsIgnoringLlamaForCausalLM), False, False, True, False),
    "kwargs_ignoring_flagged_off": (_flagged_off, False, False, False, True),
    "no_kwargs": (lambda: tiny_llama(NoKwargsLlamaForCausalLM), False, False, False, True),
    "forwarding": (lambda: tiny_llama(ForwardingLlamaForCausalLM), True, True, True, True),
    "count_dropping": (lambda: tiny_llama(CountDroppingLlamaForCausalLM), False, False, True, False),
    "explicit_count": (lambda: tiny_llama(ExplicitCountLlamaForCausalLM), True, True, False, False),
}


@pytest.mark.parametrize("name", CASES)
def test_probe_verdicts(name):
    factory, static, behavioural, accepts, right = CASES[name]
    result = probe_num_items_in_batch(factory())
    assert (result.static, result.behavioural, result.accepts_loss_kwargs) == (static, behavioural, accepts), result
    assert result.uses_num_items_in_batch is behavioural
    assert result.trainer_decision_right is right


def test_reasons_and_ratios():
    stock = probe_num_items_in_batch(tiny_llama())
    # sum / (2n) is sum / n halved, exactly, in binary floating point.
    assert stock.loss_ratio == 2.0
    assert "self.loss_function (ForCausalLMLoss)" in stock.static_reason
    assert "= 2.000000" in stock.behavioural_reason
    assert stock.decision_reason == "forward takes **kwargs"
    buggy = probe_num_items_in_batch(tiny_llama(KwargsIgnoringLlamaForCausalLM))
    assert "takes **kwargs but passes neither" in buggy.static_reason
    assert "= 1.000000, not 2" in buggy.behavioural_reason
    assert buggy.loss_ratio == 1.0
    assert "removes num_items_in_batch" in probe_num_items_in_batch(tiny_llama(CountDroppingLlamaForCausalLM)).static_reason
    no_kwargs = probe_num_items_in_batch(tiny_llama(NoKwargsLlamaForCausalLM))
    assert "takes no **kwargs" in no_kwargs.static_reason
    assert "forward rejects num_items_in_batch" in no_kwargs.behavioural_reason
    assert no_kwargs.loss_ratio is None
    assert trainer_accepts_loss_kwargs(_flagged_off())[1] == "accepts_loss_kwargs attribute is False"


@pytest.mark.parametrize("name", ["stock", "kwargs_ignoring", "kwargs_ignoring_flagged_off", "no_kwargs"])
def test_decision_matches_the_real_trainer(name, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = CASES[name][0]()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=model, args=args)
    assert trainer_accepts_loss_kwargs(model)[0] is trainer.model_accepts_loss_kwargs


def test_gpt2_routes_the_count():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32))
    result = probe_num_items_in_batch(model)
    assert (result.static, result.behavioural, result.trainer_decision_right) == (True, True, True)


def test_an_extra_loss_term_not_divided_by_the_count_fails_the_behavioural_probe():
    # Mixtral adds its router auxiliary loss after the cross entropy, undivided: the count
    # reaches the loss (static) but the total does not halve (behavioural), and Trainer,
    # trusting the count, would add the auxiliary loss once per micro-batch.
    config = MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
    )
    torch.manual_seed(0)
    result = probe_num_items_in_batch(MixtralForCausalLM(config))
    assert (result.static, result.behavioural, result.trainer_decision_right) == (True, False, False)


def test_probe_runs_in_eval_mode_so_dropout_cannot_fake_a_ratio():
    config = tiny_llama_config()
    config.attention_dropout = 0.5
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    assert probe_num_items_in_batch(model).behavioural


def test_probe_leaves_the_model_unchanged():
    model = tiny_llama()
    model.train()
    model.model.layers[0].eval()  # mixed modes must come back as they were, module by module
    model.lm_head.weight.grad = torch.full_like(model.lm_head.weight, 0.25)
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}
    rng = torch.get_rng_state()

    probe_num_items_in_batch(model)

    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    for k, p in model.named_parameters():
        assert (p.grad is None) if grads[k] is None else torch.equal(p.grad, grads[k]), k
    assert torch.equal(torch.get_rng_state(), rng)


def test_bad_inputs_are_rejected():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        probe_num_items_in_batch("not a model")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        static_routes_num_items(object())
    with pytest.raises(ValueError, match="no config"):
        probe_num_items_in_batch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="seq_len"):
        probe_num_items_in_batch(tiny_llama(), seq_len=1)
