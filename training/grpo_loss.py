"""GRPO's algebra, with TRL's names: group-relative advantages and the clipped surrogate with its k3 KL.

Pure tensor functions (no model), so every option has a unit test against a hand computation:

- `scale_rewards`: "group" divides each group's centred rewards by the group's std (GRPO), "batch" by the std of
  every reward of the step (all groups, all processes), "none" leaves them centred (Dr. GRPO);
- `loss_type`: how a segment's per-token terms become one number. "grpo": mean over each sequence's tokens, then
  over the group; "bnpo": mean over the group's tokens; "dr_grpo": sum over the group's tokens divided by rows x
  the segment's token limit (a constant, so long and short sequences weigh the same per token); "dapo": sum over
  the group's tokens divided by the mean token count per group of the whole step (`tokens_per_group`), so that
  after the trainer's mean over groups and processes every token of the step weighs the same;
- `multi_objective_aggregation`: "sum_then_normalize" weighs and sums the rewards, then normalises the total;
  "normalize_then_sum" (GDPO) normalises each reward within its group first, so that a reward of wide range
  (an identity score) cannot drown one of narrow range (a prompt score) that conflicts with it;
- `importance_sampling_level`: "token" (PPO/GRPO) or "sequence" (GSPO: one ratio per sequence, the exponential
  of the mean token log-ratio);
- `epsilon` / `epsilon_high`: the lower and upper clip range (DAPO's clip-higher when they differ).
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
STD_FLOOR = 1e-4  # added to a std before dividing, as TRL does


def group_advantages(rewards: torch.Tensor, scale_rewards: str = "group") -> torch.Tensor:
    """Advantages [P, G] from the rewards [P, G] of P groups of G rollouts.

    A NaN reward (a reward model that failed on an image) is masked: it takes no part in its group's mean and
    std, and its rollout's advantage is 0, so it neither pushes nor pulls the policy.
    """
    valid = ~torch.isnan(rewards)
    count = valid.sum(dim=1, keepdim=True).clamp(min=1)
    filled = torch.where(valid, rewards, torch.zeros_like(rewards))
    mean = filled.sum(dim=1, keepdim=True) / count
    centred = torch.where(valid, rewards - mean, torch.zeros_like(rewards))
    if scale_rewards == "group":
        std = (centred.pow(2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
        return centred / (std + STD_FLOOR)
    if scale_rewards == "batch":
        values = rewards[valid]
        std = values.std() if values.numel() > 1 else values.new_zeros(())
        return centred / (std + STD_FLOOR)
    if scale_rewards == "none":
        return centred
    raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")


def aggregate_rewards(components: torch.Tensor, weights: torch.Tensor,
                      aggregation: str = "sum_then_normalize") -> torch.Tensor:
    """The rewards [P, G] that `group_advantages` turns into advantages, from each reward's scores.

    Args:
        components: [P, K, G] the scores of K rewards for P groups of G rollouts (NaN where a reward failed).
        weights: [K] each reward's weight.
        aggregation: one of MULTI_OBJECTIVE_AGGREGATIONS. A rollout with a failed reward stays NaN either way.
    """
    weights = weights.to(components.dtype)[None, :, None]
    if aggregation == "sum_then_normalize":
        return (weights * components).sum(dim=1)
    if aggregation == "normalize_then_sum":
        groups, count, size = components.shape
        normalised = group_advantages(components.reshape(groups * count, size), "group").view(groups, count, size)
        total = (weights * normalised).sum(dim=1)
        return torch.where(torch.isnan(components).any(dim=1), torch.full_like(total, float("nan")), total)
    raise ValueError(f"multi_objective_aggregation must be one of {MULTI_OBJECTIVE_AGGREGATIONS}, got {aggregation!r}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return float((values * mask).sum() / mask.sum().clamp(min=1))


def segment_loss(
    new: torch.Tensor,
    old: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float,
    epsilon_high: float,
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
    beta: float = 0.0,
    kl_new: torch.Tensor | None = None,
    kl_reference: torch.Tensor | None = None,
    max_tokens: int | None = None,
    tokens_per_group: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped surrogate plus beta x k3 KL of one segment of one group, and its statistics.

    Args:
        new: [G, N] log-probs of the sampled tokens under the current policy (differentiable).
        old: [G, N] log-probs under the policy that sampled them (`new.detach()` when on-policy).
        mask: [G, N] float, 1 on the tokens that count.
        advantages: [G].
        kl_new, kl_reference: [G, N] log-probs of the sampled tokens under the untruncated policy and reference
            distributions (the KL is taken there: top-k/top-p would give the reference -inf where the policy
            kept a token); needed when beta > 0.
        max_tokens: the segment's token limit, for loss_type "dr_grpo".
        tokens_per_group: the step's mean number of masked tokens per group, for loss_type "dapo".
    """
    log_ratio = new - old
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).unsqueeze(1)
    elif importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}")
    ratio = torch.exp(log_ratio)
    advantage = advantages.unsqueeze(1)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    per_token = -torch.minimum(ratio * advantage, clipped * advantage)
    kl = None
    if beta > 0:
        if kl_new is None or kl_reference is None:
            raise ValueError("beta > 0 needs the policy's and the reference's untruncated log-probs")
        difference = kl_reference - kl_new
        kl = torch.exp(difference) - difference - 1
        per_token = per_token + beta * kl
    per_token = per_token.expand_as(mask)
    rows = mask.shape[0]
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        if not max_tokens:
            raise ValueError("loss_type 'dr_grpo' needs the segment's max_tokens")
        loss = (per_token * mask).sum() / (rows * max_tokens)
    elif loss_type == "dapo":
        if not tokens_per_group:
            raise ValueError("loss_type 'dapo' needs the step's tokens_per_group")
        loss = (per_token * mask).sum() / tokens_per_group
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    with torch.no_grad():
        ratio_tokens = ratio.expand_as(mask)
        low = ((ratio_tokens < 1 - epsilon) & (advantage < 0)).float()
        high = ((ratio_tokens > 1 + epsilon_high) & (advantage > 0)).float()
        stats = {
            "kl": 0.0 if kl is None else masked_mean(kl, mask),
            "clip_ratio_low": masked_mean(low, mask),
            "clip_ratio_high": masked_mean(high, mask),
            "clip_ratio": masked_mean(torch.maximum(low, high), mask),
        }
    return loss, stats
