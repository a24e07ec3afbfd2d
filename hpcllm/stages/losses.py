"""The alignment losses on plain tensors: reward ranking, DPO/IPO/hinge, PPO with GAE and a KL penalty.

Shapes: ``B`` sequences, ``T`` response positions; ``mask`` is 1 on the tokens that count.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (the mean is kept out of PPO advantages this way)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens[b, t]) under logits[b, t] (same positions; shift before calling)."""
    return torch.gather(logits.float().log_softmax(-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label) over the learned tokens (labels != -100, aligned with input_ids: the
    logits at t predict the label at t + 1) of each sequence: shape [B]."""
    labels = labels[:, 1:]
    mask = labels != IGNORE
    logps = token_logprobs(logits[:, :-1], labels.clamp(min=0))
    return (logps * mask).sum(-1)


def reward_ranking_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Pairwise ranking loss of a reward model, mean of ``-log sigma(r_chosen - r_rejected)``.

    Bradley-Terry preference model as used for reward models by InstructGPT (Ouyang et al. 2022,
    eq. 1). Metrics: ``reward_accuracy`` (share with r_chosen > r_rejected), ``reward_margin``.
    """
    margin = chosen.float() - rejected.float()
    loss = -F.logsigmoid(margin).mean()
    return loss, {"reward_accuracy": (margin > 0).float().mean().item(), "reward_margin": margin.mean().item(),
                  "reward_chosen": chosen.float().mean().item(), "reward_rejected": rejected.float().mean().item()}


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Direct preference optimisation on sequence log-probabilities (sums over response tokens).

    With ``h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))``:

    - ``sigmoid``: ``-(1 - e) log sigma(beta h) - e log sigma(-beta h)`` - DPO, Rafailov et al. 2023,
      eq. 7; ``e`` = label_smoothing is conservative DPO (Mitchell 2023, cDPO), 0 = plain DPO;
    - ``ipo``: ``(h - 1 / (2 beta))^2`` - IPO, Azar et al. 2023, eq. 17;
    - ``hinge``: ``max(0, 1 - beta h)`` - SLiC-HF's calibration loss, Zhao et al. 2023.

    Implicit rewards ``beta (log pi - log ref)`` give ``reward_accuracy`` and ``reward_margin``.
    """
    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"method.dpo.loss={loss_type!r} is not one of sigmoid, ipo, hinge")
    chosen_reward = beta * (policy_chosen - reference_chosen).detach()
    rejected_reward = beta * (policy_rejected - reference_rejected).detach()
    return losses.mean(), {
        "reward_accuracy": (chosen_reward > rejected_reward).float().mean().item(),
        "reward_margin": (chosen_reward - rejected_reward).mean().item(),
        "reward_chosen": chosen_reward.mean().item(), "reward_rejected": rejected_reward.mean().item(),
        "logp_chosen": policy_chosen.detach().mean().item(), "logp_rejected": policy_rejected.detach().mean().item()}


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``-kl_coef (log pi - log ref)``, plus the sequence score on its last token.

    The KL penalty against the frozen reference of Ziegler et al. 2019 (eq. 2) and InstructGPT
    (Ouyang et al. 2022, eq. 2), estimated per sampled token. Returns (rewards [B, T], the per-
    sequence KL estimate ``sum_t (log pi - log ref)`` [B]). ``mask`` must be 1 on a prefix of each row.
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    rewards = rewards.scatter_add(1, last.unsqueeze(1), scores.to(rewards.dtype).unsqueeze(1))
    return rewards, kl.sum(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation, Schulman et al. 2016 (eq. 16):
    ``delta_t = r_t + gamma V(t + 1) - V(t)``, ``A_t = sum_l (gamma lam)^l delta_(t+l)``; returns
    ``R_t = A_t + V(t)``. ``mask`` is 1 on a prefix of each row; the value after the last token is 0.
    """
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, advantages + values


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate, Schulman et al. 2017 (eq. 7), as a loss over the masked tokens:
    ``mean max(-A rho, -A clip(rho, 1 - e, 1 + e))`` with ``rho = exp(log pi - log pi_old)``."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask).item()
        approx_kl = masked_mean(0.5 * (logprobs - old_logprobs) ** 2, mask).item()
    return loss, {"policy_loss": loss.item(), "clip_fraction": clipfrac, "approx_kl": approx_kl}


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_range: float) -> tuple[torch.Tensor, dict]:
    """Clipped value loss (PPO2 baselines, as in InstructGPT's PPO):
    ``0.5 mean max((V - R)^2, (clip(V, V_old - e, V_old + e) - R)^2)``."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask).item()
    return loss, {"value_loss": loss.item(), "value_clip_fraction": clipfrac}
