"""Gradient accumulation: only sum / num_items_in_batch reproduces one big batch.

Part 1 checks the three accumulated losses on a linear lm head; part 2 runs the tiny
transformers Trainer (stock, kwargs-ignoring, kwargs-ignoring with accepts_loss_kwargs =
False) and checks its logged losses and captured gradients against part 1.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from reference import gradient_accumulation as ga


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: one thread beats several competing for the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


VOCAB = 11
HIDDEN = 6
# fp32 tolerances for gradients reached by different summation orders (micro-batch by
# micro-batch versus one batch): relative 1e-5, absolute 1e-7 for entries near zero.
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-7


def _linear_head_step(valid_per_row: list[list[int]], seq_len: int = 7, seed: int = 0):
    """Hidden states and labels of one step whose micro-batch ``k`` has rows with
    ``valid_per_row[k]`` real tokens each (the rest labelled -100), and a linear lm head."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator, requires_grad=True)
    hidden, labels = [], []
    for rows in valid_per_row:
        hidden.append(torch.randn(len(rows), seq_len, HIDDEN, generator=generator))
        tokens = torch.randint(0, VOCAB, (len(rows), seq_len), generator=generator)
        valid = torch.arange(seq_len) < torch.tensor(rows).unsqueeze(1)
        labels.append(tokens.where(valid, ga.IGNORE_INDEX))
    return weight, hidden, labels


def _loss_and_grad(loss_fn, weight, hidden, labels):
    loss = loss_fn([h @ weight.T for h in hidden], labels, VOCAB)
    (grad,) = torch.autograd.grad(loss, weight)
    return loss, grad


UNEVEN = [[7, 7], [3, 2], [2]]  # 12, 3 and 1 targets after the shift
EVEN = [[5, 5], [4, 6], [3, 7]]  # 8 targets in every micro-batch


# ---- counting ----------------------------------------------------------------------------


def test_count_target_tokens_skips_first_label_of_each_row_and_ignored_ones():
    labels = torch.tensor([[5, -100, 3, 4], [-100, 1, -100, -100]])
    # Targets are labels[:, 1:] = [[-100, 3, 4], [1, -100, -100]]: three of them.
    assert ga.count_target_tokens(labels).item() == 3
    # With 3 as the ignored id, only the 3 is dropped and every -100 counts.
    assert ga.count_target_tokens(labels, ignore_index=3).item() == 5
    assert ga.count_target_tokens(labels).dtype == torch.int64


def test_num_items_in_batch_of_the_tiny_dataset():
    labels = [batch["labels"] for batch in ga.micro_batches(ga.tiny_lm_dataset(), 4)]
    assert [ga.count_target_tokens(x).item() for x in labels] == [44, 26, 12, 5]
    assert ga.num_items_in_batch(labels).item() == 87


def test_num_items_in_batch_accepts_micro_batches_of_different_lengths():
    assert ga.num_items_in_batch([torch.zeros(2, 5, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)]).item() == 10


# ---- the three losses --------------------------------------------------------------------


def test_one_batch_loss_is_the_token_mean_over_the_whole_step():
    weight, hidden, labels = _linear_head_step(UNEVEN)
    logits = [h @ weight.T for h in hidden]
    per_token_sums = [
        F.cross_entropy(x[:, :-1].reshape(-1, VOCAB), y[:, 1:].reshape(-1), reduction="sum")
        for x, y in zip(logits, labels)
    ]
    expected = sum(per_token_sums) / 16
    torch.testing.assert_close(ga.one_batch_loss(logits, labels, VOCAB), expected, rtol=1e-6, atol=0)


def test_mean_of_means_weighs_every_micro_batch_alike():
    weight, hidden, labels = _linear_head_step(UNEVEN)
    logits = [h @ weight.T for h in hidden]
    means = [
        F.cross_entropy(x[:, :-1].reshape(-1, VOCAB), y[:, 1:].reshape(-1), ignore_index=-100)
        for x, y in zip(logits, labels)
    ]
    torch.testing.assert_close(ga.mean_of_means_loss(logits, labels, VOCAB), sum(means) / 3, rtol=1e-6, atol=0)


def test_sum_over_count_gives_the_loss_and_gradient_of_one_big_batch():
    weight, hidden, labels = _linear_head_step(UNEVEN)
    big_loss, big_grad = _loss_and_grad(ga.one_batch_loss, weight, hidden, labels)
    loss, grad = _loss_and_grad(ga.sum_over_count_loss, weight, hidden, labels)
    torch.testing.assert_close(loss, big_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, big_grad, rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_mean_of_means_misses_the_big_batch_when_counts_differ():
    weight, hidden, labels = _linear_head_step(UNEVEN)
    big_loss, big_grad = _loss_and_grad(ga.one_batch_loss, weight, hidden, labels)
    loss, grad = _loss_and_grad(ga.mean_of_means_loss, weight, hidden, labels)
    # Far outside any rounding: the one-target micro-batch weighs a third instead of 1/16.
    assert abs(loss.item() - big_loss.item()) > 1e-2 * big_loss.item()
    assert (grad - big_grad).norm() > 0.1 * big_grad.norm()


def test_mean_of_means_matches_the_big_batch_when_counts_are_equal():
    # The control for the test above: equal counts make the two recipes the same sum.
    weight, hidden, labels = _linear_head_step(EVEN)
    big_loss, big_grad = _loss_and_grad(ga.one_batch_loss, weight, hidden, labels)
    loss, grad = _loss_and_grad(ga.mean_of_means_loss, weight, hidden, labels)
    torch.testing.assert_close(loss, big_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, big_grad, rtol=GRAD_RTOL, atol=GRAD_ATOL)


# ---- bad inputs --------------------------------------------------------------------------


def test_bad_inputs_are_rejected():
    logits, labels = torch.zeros(1, 4, VOCAB), torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(TypeError, match="integer class indices"):
        ga.count_target_tokens(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="0-d"):
        ga.count_target_tokens(torch.tensor(3))
    with pytest.raises(ValueError, match="at least one"):
        ga.num_items_in_batch([])
    with pytest.raises(ValueError, match="at least one"):
        ga.sum_over_count_loss([], [], VOCAB)
    with pytest.raises(ValueError, match="2 micro-batches of logits but 1"):
        ga.mean_of_means_loss([logits, logits], [labels], VOCAB)
    with pytest.raises(ValueError, match="labels has shape"):
        ga.sum_over_count_loss([torch.zeros(1, 5, VOCAB)], [labels], VOCAB)
    with pytest.raises(ValueError, match="vocab_size is 12"):
        ga.mean_of_means_loss([logits], [labels], VOCAB + 1)
    with pytest.raises(TypeError, match="floating point"):
        ga.one_batch_loss([labels.unsqueeze(-1)], [labels], VOCAB)
    with pytest.raises(ValueError, match="one sequence length"):
        ga.one_batch_loss([logits, torch.zeros(1, 3, VOCAB)], [labels, labels[:, :3]], VOCAB)
    with pytest.raises(ValueError, match="every length"):
        ga.tiny_lm_dataset(lengths=(0, 3))
    with pytest.raises(ValueError, match="batch_size"):
        ga.micro_batches(ga.tiny_lm_dataset(), 0)


# ---- the same inside transformers' Trainer -----------------------------------------------

STEPS = 4  # gradient_accumulation_steps of run_tiny_trainer


@pytest.fixture(scope="module")
def runs() -> dict[str, ga.TrainerRun]:
    dataset = ga.tiny_lm_dataset()
    fixed = ga.tiny_llama(ga.KwargsIgnoringLlamaForCausalLM)
    fixed.accepts_loss_kwargs = False
    models = {
        "stock": ga.tiny_llama(),
        "buggy": ga.tiny_llama(ga.KwargsIgnoringLlamaForCausalLM),
        "fixed": fixed,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {name: ga.run_tiny_trainer(model, dataset, gradient_accumulation_steps=STEPS) for name, model in models.items()}


@pytest.fixture(scope="module")
def first_step():
    """The untrained model's logits on the first step's micro-batches, and their labels."""
    model = ga.tiny_llama()
    model.train()  # as Trainer runs it; the tiny config has no dropout
    batches = ga.micro_batches(ga.tiny_lm_dataset(), 4)
    logits = [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches]
    return model, logits, [b["labels"] for b in batches]


def _flat_grad(loss, model):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)])


def test_all_runs_start_from_the_same_weights():
    stock, buggy = ga.tiny_llama(), ga.tiny_llama(ga.KwargsIgnoringLlamaForCausalLM)
    assert all(torch.equal(a, b) for a, b in zip(stock.state_dict().values(), buggy.state_dict().values()))


def test_trainer_decisions(runs):
    assert runs["stock"].accepts_loss_kwargs is True
    assert runs["buggy"].accepts_loss_kwargs is True  # wrong: the model drops the count
    assert runs["fixed"].accepts_loss_kwargs is False
    assert all(len(run.losses) == len(run.grad_norms) == len(run.grads) == 3 for run in runs.values())


def test_stock_trainer_step_is_one_big_batch(runs, first_step):
    model, logits, labels = first_step
    big_loss = ga.one_batch_loss(logits, labels, model.config.vocab_size)
    assert math.isclose(runs["stock"].losses[0], ga.sum_over_count_loss(logits, labels, model.config.vocab_size).item(), rel_tol=1e-6)
    assert math.isclose(runs["stock"].losses[0], big_loss.item(), rel_tol=1e-6)
    big_grad = _flat_grad(big_loss, model)
    torch.testing.assert_close(runs["stock"].grads[0], big_grad, rtol=GRAD_RTOL, atol=GRAD_ATOL)
    assert math.isclose(runs["stock"].grad_norms[0], big_grad.norm().item(), rel_tol=1e-5)


def test_fixed_trainer_step_is_the_mean_of_means(runs, first_step):
    model, logits, labels = first_step
    mean_of_means = ga.mean_of_means_loss(logits, labels, model.config.vocab_size)
    assert math.isclose(runs["fixed"].losses[0], mean_of_means.item(), rel_tol=1e-6)
    torch.testing.assert_close(runs["fixed"].grads[0], _flat_grad(mean_of_means, model), rtol=GRAD_RTOL, atol=GRAD_ATOL)
    # Right scale, wrong weighting: the 5-target micro-batch counts as much as the 44-target one.
    assert (runs["fixed"].grads[0] - runs["stock"].grads[0]).norm() > 0.5 * runs["stock"].grads[0].norm()


def test_kwargs_ignoring_model_inflates_loss_and_gradient_by_the_steps(runs):
    buggy, fixed, stock = runs["buggy"], runs["fixed"], runs["stock"]
    # Dividing by 4 is exact in binary floating point, so the inflation is exact.
    assert buggy.losses[0] == STEPS * fixed.losses[0]
    assert torch.equal(buggy.grads[0], STEPS * fixed.grads[0])
    assert math.isclose(buggy.grad_norms[0], STEPS * fixed.grad_norms[0], rel_tol=1e-6)
    # Against the stock model: the loss of a random init is near ln(64) per token whatever
    # the weighting, so the logged loss is about 4 times too large.
    assert math.isclose(buggy.losses[0] / stock.losses[0], STEPS, rel_tol=0.02)
    assert buggy.grad_norms[0] > 3 * stock.grad_norms[0]
