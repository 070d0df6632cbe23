"""GRPO's algebra against hand computations: advantages, every loss_type, clipping by sign, GSPO, the KL."""

from __future__ import annotations

import math

import pytest
import torch

from training.grpo_loss import aggregate_rewards, group_advantages, segment_loss

HALF = math.log(0.5)


def test_group_advantages_scale_by_group_batch_or_none():
    rewards = torch.tensor([[1.0, 3.0], [0.0, 4.0]])
    # group: centred, divided by each group's (unbiased) std: sqrt(2) and sqrt(8)
    torch.testing.assert_close(group_advantages(rewards, "group"),
                               torch.tensor([[-1, 1], [-2, 2]]) / torch.tensor([[2**0.5 + 1e-4], [8**0.5 + 1e-4]]))
    # batch: centred per group, divided by the std of all four rewards (1, 3, 0, 4: std 1.8257)
    std = torch.tensor([1.0, 3.0, 0.0, 4.0]).std()
    torch.testing.assert_close(group_advantages(rewards, "batch"), torch.tensor([[-1.0, 1.0], [-2.0, 2.0]]) / (std + 1e-4))
    torch.testing.assert_close(group_advantages(rewards, "none"), torch.tensor([[-1.0, 1.0], [-2.0, 2.0]]))
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(rewards, "rank")


def test_nan_rewards_are_masked_out_of_the_group():
    rewards = torch.tensor([[1.0, float("nan"), 3.0]])
    advantages = group_advantages(rewards, "group")
    # mean and std of (1, 3) alone; the failed rollout gets 0
    torch.testing.assert_close(advantages, torch.tensor([[-1.0, 0.0, 1.0]]) / (2**0.5 + 1e-4))
    assert torch.isfinite(group_advantages(torch.tensor([[float("nan"), float("nan")]]), "batch")).all()


def test_normalize_then_sum_keeps_a_narrow_reward_from_being_drowned():
    # one group of two rollouts: identity prefers the second by 10, the prompt prefers the first by 0.1
    components = torch.tensor([[[0.0, 10.0], [0.1, 0.0]]])  # [P=1, K=2, G=2]
    weights = torch.tensor([1.0, 2.0])
    summed = aggregate_rewards(components, weights, "sum_then_normalize")
    torch.testing.assert_close(summed, torch.tensor([[0.2, 10.0]]))
    assert group_advantages(summed)[0, 1] > 0  # the wide reward decides alone
    # each normalised in the group first: identity (-0.707, +0.707), prompt (+0.707, -0.707), weights 1 and 2
    normalised = aggregate_rewards(components, weights, "normalize_then_sum")
    half = 5 / (50**0.5 + 1e-4)
    torch.testing.assert_close(normalised, torch.tensor([[-half + 2 * 0.05 / (0.005**0.5 + 1e-4),
                                                          half - 2 * 0.05 / (0.005**0.5 + 1e-4)]]))
    assert group_advantages(normalised)[0, 0] > 0  # now the prompt reward, weighted twice, wins


def test_a_failed_reward_leaves_its_rollout_out_under_either_aggregation():
    components = torch.tensor([[[1.0, 2.0, 3.0], [0.5, float("nan"), 0.0]]])
    for aggregation in ("sum_then_normalize", "normalize_then_sum"):
        total = aggregate_rewards(components, torch.ones(2), aggregation)
        assert torch.isnan(total[0, 1]) and torch.isfinite(total[0, [0, 2]]).all()
        assert group_advantages(total)[0, 1] == 0
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        aggregate_rewards(components, torch.ones(2), "max")


def loss(new, old, mask, advantages, **options):
    settings = {"epsilon": 0.2, "epsilon_high": 0.2, **options}
    return segment_loss(new, old, mask, advantages, **settings)


def test_ratio_one_gives_minus_the_mean_advantage_and_no_clipping():
    old = torch.full((2, 2), HALF)
    value, stats = loss(old.clone(), old, torch.ones(2, 2), torch.tensor([1.0, -1.0]))
    assert value.item() == pytest.approx(0.0)
    assert stats["clip_ratio"] == stats["clip_ratio_low"] == stats["clip_ratio_high"] == 0.0


def test_clipping_by_sign_with_clip_higher():
    old = torch.zeros(2, 1)
    new = torch.tensor([[0.5], [-0.5]])  # ratios e^0.5 = 1.65 and e^-0.5 = 0.61
    # Row 0 has A > 0 and a ratio above 1 + 0.28: clipped high to 1.28. Row 1 has A < 0 and a ratio below 0.8:
    # clipped low to 0.8. Loss per row: -min(r A, clip(r) A).
    value, stats = loss(new, old, torch.ones(2, 1), torch.tensor([1.0, -1.0]), epsilon_high=0.28)
    expected = (-1.28 + 0.8) / 2
    assert value.item() == pytest.approx(expected, rel=1e-6)
    assert stats["clip_ratio_high"] == 0.5 and stats["clip_ratio_low"] == 0.5 and stats["clip_ratio"] == 1.0
    # The same ratios with the advantages' signs swapped are not clipped (the min takes the unclipped term).
    value, stats = loss(new, old, torch.ones(2, 1), torch.tensor([-1.0, 1.0]), epsilon_high=0.28)
    assert value.item() == pytest.approx((math.exp(0.5) - math.exp(-0.5)) / 2, rel=1e-6)
    assert stats["clip_ratio"] == 0.0


def per_token_case():
    """Two rows, three slots; row 0 has 3 tokens, row 1 has 1. Per-token loss -r A with r = 1 (no clipping):
    row 0 tokens give -2 each, row 1's token gives +1."""
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    return old.clone(), old, mask, torch.tensor([2.0, -1.0])


@pytest.mark.parametrize("loss_type, options, expected", [
    ("grpo", {}, (-2.0 + 1.0) / 2),  # per-sequence means (-2, +1), then their mean
    ("bnpo", {}, (-6.0 + 1.0) / 4),  # over the group's 4 tokens
    ("dr_grpo", {"max_tokens": 5}, (-6.0 + 1.0) / (2 * 5)),  # rows x the segment's token limit
    ("dapo", {"tokens_per_group": 10.0}, (-6.0 + 1.0) / 10),  # the step's tokens per group
])
def test_loss_types(loss_type, options, expected):
    value, _ = loss(*per_token_case(), loss_type=loss_type, **options)
    assert value.item() == pytest.approx(expected)


def test_dr_grpo_and_dapo_need_their_normalisers():
    for loss_type in ("dr_grpo", "dapo"):
        with pytest.raises(ValueError, match=loss_type):
            loss(*per_token_case(), loss_type=loss_type)


def test_sequence_level_importance_sampling_uses_the_mean_log_ratio():
    old = torch.zeros(1, 3)
    new = torch.tensor([[0.3, -0.1, 5.0]])  # the masked third token does not count
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    ratio = math.exp((0.3 - 0.1) / 2)  # one ratio for the sequence: 1.105, inside the clip range
    value, stats = loss(new, old, mask, torch.tensor([1.0]), importance_sampling_level="sequence")
    assert value.item() == pytest.approx(-ratio, rel=1e-6) and stats["clip_ratio"] == 0.0
    # Token level: e^0.3 = 1.35 is clipped to 1.2 (A > 0), e^-0.1 = 0.905 is not.
    token_value, stats = loss(new, old, mask, torch.tensor([1.0]))
    assert token_value.item() == pytest.approx(-(1.2 + math.exp(-0.1)) / 2, rel=1e-6) and stats["clip_ratio"] == 0.5


def test_k3_kl_on_the_given_untruncated_log_probs():
    old = torch.full((1, 2), HALF)
    kl_new, kl_reference = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -2.0]])
    value, stats = loss(old.clone(), old, torch.ones(1, 2), torch.tensor([0.0]), beta=0.5,
                        kl_new=kl_new, kl_reference=kl_reference)
    k3 = (math.exp(-0.5) + 0.5 - 1 + 0.0) / 2  # per token e^(ref-new) - (ref-new) - 1, then the mean
    assert stats["kl"] == pytest.approx(k3, rel=1e-6) and value.item() == pytest.approx(0.5 * k3, rel=1e-6)
    with pytest.raises(ValueError, match="beta"):
        loss(old.clone(), old, torch.ones(1, 2), torch.tensor([0.0]), beta=0.5)


def test_masked_tokens_do_not_count():
    old = torch.zeros(2, 2)
    new = torch.tensor([[0.5, 9.0], [0.0, 0.0]])
    half = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    value, stats = loss(new, old, half, torch.tensor([1.0, -1.0]))
    assert value.item() == pytest.approx((-1.2 + 1.0) / 2) and stats["clip_ratio_high"] == pytest.approx(1 / 3)
