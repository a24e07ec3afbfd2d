"""The alignment losses against values worked out by hand on small fixed tensors."""
import math

import pytest
import torch

from hpcllm.stages.losses import (dpo_loss, gae, kl_penalized_rewards, ppo_policy_loss, ppo_value_loss,
                                  reward_ranking_loss, sequence_logprobs, whiten)


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


# Two pairs: policy/reference log-probs of chosen and rejected answers.
PC, PR = torch.tensor([-10.0, -12.0]), torch.tensor([-14.0, -11.0])
RC, RR = torch.tensor([-11.0, -12.0]), torch.tensor([-13.0, -12.0])
# h = (pc - rc) - (pr - rr) = [1 - (-1), 0 - 1] = [2, -1]
H = [2.0, -1.0]


@pytest.mark.parametrize("loss_type, smoothing, expected", [
    ("sigmoid", 0.0, [-log_sigmoid(0.5 * h) for h in H]),
    ("sigmoid", 0.2, [-0.8 * log_sigmoid(0.5 * h) - 0.2 * log_sigmoid(-0.5 * h) for h in H]),
    ("ipo", 0.0, [(h - 1 / (2 * 0.5)) ** 2 for h in H]),  # (2 - 1)^2, (-1 - 1)^2
    ("hinge", 0.0, [max(0.0, 1 - 0.5 * h) for h in H]),  # 0, 1.5
])
def test_dpo_variants_match_hand_computed_values(loss_type, smoothing, expected):
    loss, metrics = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type=loss_type, label_smoothing=smoothing)
    assert loss.item() == pytest.approx(sum(expected) / 2)
    # implicit rewards 0.5 (pi - ref): chosen [0.5, 0], rejected [-0.5, 0.5]
    assert metrics["reward_accuracy"] == 0.5
    assert metrics["reward_margin"] == pytest.approx((1.0 + -0.5) / 2)
    assert metrics["reward_chosen"] == pytest.approx(0.25) and metrics["reward_rejected"] == pytest.approx(0.0)


def test_dpo_rejects_an_unknown_variant():
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="kto")


def test_sequence_logprobs_sum_learned_tokens_with_the_shift():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]]))
    labels = torch.tensor([[-100, 0, 1]])  # position 0 (the prompt) is not learned
    expected = math.log(0.5) + math.log(0.75)  # logits at 0 predict label 0, logits at 1 predict label 1
    assert sequence_logprobs(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_reward_loss_and_accuracy():
    loss, metrics = reward_ranking_loss(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0]))
    assert loss.item() == pytest.approx(-(log_sigmoid(1.0) + log_sigmoid(-1.0) + log_sigmoid(0.0)) / 3)
    assert metrics["reward_accuracy"] == pytest.approx(1 / 3)  # a tie is not a win
    assert metrics["reward_margin"] == pytest.approx(0.0)


def test_gae_matches_a_hand_computed_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.2, 0.4], [1.0, 0.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the second row ended after two tokens
    gamma, lam = 0.9, 0.5
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    # row 0: deltas d2 = 1 - 0.4 = 0.6, d1 = 0 + 0.9*0.4 - 0.2 = 0.16, d0 = 0 + 0.9*0.2 - 0.5 = -0.32
    a2 = 0.6
    a1 = 0.16 + 0.45 * a2
    a0 = -0.32 + 0.45 * a1
    # row 1: the value after the last token is 0: d1 = 2 - 0 = 2, d0 = 0.5 + 0.9*0 - 1 = -0.5
    b1, b0 = 2.0, -0.5 + 0.45 * 2.0
    torch.testing.assert_close(advantages, torch.tensor([[a0, a1, a2], [b0, b1, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[a0 + 0.5, a1 + 0.2, a2 + 0.4], [b0 + 1.0, b1, 0.0]]))


def test_kl_penalty_per_token_and_score_on_the_last_token():
    logprobs, ref = torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-1.5, -2.0, -1.0]])
    rewards, kl = kl_penalized_rewards(torch.tensor([4.0]), logprobs, ref, torch.tensor([[1, 1, 0]]), kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 4.0, 0.0]]))
    torch.testing.assert_close(kl, torch.tensor([0.5]))


def test_ppo_policy_loss_clips_the_ratio():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    advantages = torch.tensor([[1.0, -1.0, 2.0]])
    loss, metrics = ppo_policy_loss(new, old, advantages, torch.ones(1, 3), clip_range=0.2)
    # max(-A r, -A clip(r)): [max(-1.5, -1.2), max(0.5, 0.8), max(-2.2, -2.2)] = [-1.2, 0.8, -2.2]
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3)
    assert metrics["clip_fraction"] == pytest.approx(2 / 3)


def test_ppo_value_loss_clips_around_the_old_values():
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 1.0]])
    loss, metrics = ppo_value_loss(values, old, returns, torch.tensor([[1, 0]]), clip_range=0.2)
    # token 0: unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 3.24; token 1 is masked
    assert loss.item() == pytest.approx(0.5 * 3.24)
    assert metrics["value_clip_fraction"] == 1.0


def test_whiten_uses_only_masked_entries():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    out = whiten(x, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(out, torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-4, rtol=0)
