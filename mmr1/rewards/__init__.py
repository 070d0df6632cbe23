"""Reward and metric models for personalized generation: subject fidelity (DINO, DINOv2, CLIP-I), text alignment
(CLIP-T, PickScore) and their weighted combination, all loaded from local folders."""

from .combine import RewardBreakdown, WeightedReward, parse_reward_spec
from .models import REWARD_KINDS, ImageSimilarityReward, RewardModel, TextAlignmentReward, load_reward_model
from .tiny import make_tiny_reward_checkpoint


__all__ = [
    "REWARD_KINDS",
    "ImageSimilarityReward",
    "RewardBreakdown",
    "RewardModel",
    "TextAlignmentReward",
    "WeightedReward",
    "load_reward_model",
    "make_tiny_reward_checkpoint",
    "parse_reward_spec",
]
