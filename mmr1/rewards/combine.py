"""Weighted combinations of rewards, and the `kind=folder[@weight]` spec that front ends use to name them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..errors import InputError
from .models import REWARD_KINDS, RewardModel


@dataclass
class RewardBreakdown:
    """The combined reward and each component's raw (unweighted) score, kept for logging."""

    total: torch.Tensor
    components: dict[str, torch.Tensor]


class WeightedReward:
    """Sum of `weight * reward.score(...)` over (RewardModel, weight) pairs, e.g. DINO for the subject plus CLIP-T."""

    def __init__(self, components: Sequence[tuple[RewardModel, float]]) -> None:
        if not components:
            raise InputError("A weighted reward needs at least one (reward, weight) pair.")
        names = [reward.name for reward, _ in components]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise InputError(f"Each reward may appear once in a weighted reward; repeated: {', '.join(duplicates)}.")
        for reward, weight in components:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise InputError(f"The weight of the {reward.name} reward must be a finite number, got {weight!r}.")
        self.components = [(reward, float(weight)) for reward, weight in components]

    @property
    def needs_references(self) -> bool:
        return any(reward.needs_references for reward, _ in self.components)

    @property
    def needs_prompt(self) -> bool:
        return any(reward.needs_prompt for reward, _ in self.components)

    def score(
        self,
        images: list[Image.Image],
        references: list[Image.Image] | None = None,
        prompts: list[str] | str | None = None,
        batch_size: int = 16,
    ) -> RewardBreakdown:
        """Score every component on the same inputs; `total` is float32 [len(images)] on CPU."""
        scores = {
            reward.name: reward.score(images, references=references, prompts=prompts, batch_size=batch_size)
            for reward, _ in self.components
        }
        total = sum(weight * scores[reward.name] for reward, weight in self.components)
        return RewardBreakdown(total=total, components=scores)


def parse_reward_spec(spec: str) -> tuple[str, Path, float]:
    """Parse `kind=folder[@weight]` (e.g. `clip_t=/models/clip@0.5`); the weight defaults to 1.0.

    The text after the last `@` is always the weight, so a folder whose name contains `@` needs an explicit weight.
    """
    kind, separator, rest = spec.partition("=")
    kind = kind.strip()
    if not separator:
        raise InputError(f"Reward spec {spec!r} should look like kind=folder[@weight], e.g. clip_t=/models/clip@0.5.")
    if kind not in REWARD_KINDS:
        raise InputError(
            f"Reward spec {spec!r} names unknown kind {kind!r}; expected one of {', '.join(REWARD_KINDS)}."
        )
    folder, weight = rest, 1.0
    if "@" in rest:
        folder, _, weight_text = rest.rpartition("@")
        weight = _finite_float(weight_text)
        if weight is None:
            raise InputError(f"Reward spec {spec!r} has weight {weight_text!r}; expected a finite number after '@'.")
    folder = folder.strip()
    if not folder:
        raise InputError(f"Reward spec {spec!r} has no folder; expected kind=folder[@weight].")
    return kind, Path(folder).expanduser(), weight


def _finite_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
