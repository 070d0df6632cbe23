"""Reward functions for GRPO: programmatic ones (for tests and sanity runs) and mmr1's reward models.

A reward maps a group of rollouts to one float per rollout (higher is better):
`reward(images: [N,H,W,3] float 0..1, references: list of PIL, prompts: list[str], reasonings: list[str]) -> [N]`.
Specs on the command line and in configs are "name@weight" for programmatic rewards or "kind=folder@weight" for
reward models (see mmr1.rewards.parse_reward_spec).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from mmr1.errors import InputError
from mmr1.xcot import parse_reasoning

RewardFunction = Callable[[torch.Tensor, list, list[str], list[str]], torch.Tensor]


def redness(images: torch.Tensor, references, prompts, reasonings) -> torch.Tensor:
    """Mean of red minus the mean of green and blue: a reward any image model can learn quickly."""
    return (images[..., 0] - (images[..., 1] + images[..., 2]) / 2).mean(dim=(1, 2))


def reasoning_format(images: torch.Tensor, references, prompts, reasonings) -> torch.Tensor:
    """1 when the reasoning follows the <think>/<subject>/<scene> format, else 0."""
    return torch.tensor([float(parse_reasoning(text).format_ok) for text in reasonings])


PROGRAMMATIC = {"redness": redness, "format": reasoning_format}


def parse_spec(spec: str) -> tuple[str, Path | None, float]:
    """(name or kind, folder or None, weight) of "redness@1" or "dino=/models/dino@0.5", checked without loading
    anything, so a config can be validated before a run starts."""
    from mmr1.rewards import parse_reward_spec

    if "=" in spec:
        return parse_reward_spec(spec)
    name, _, weight = spec.partition("@")
    if name not in PROGRAMMATIC:
        raise InputError(f"Unknown reward {name!r}; programmatic rewards: {sorted(PROGRAMMATIC)}, "
                         "or a reward model as kind=folder@weight.")
    try:
        value = float(weight or 1.0)
    except ValueError as error:
        raise InputError(f"Reward weight in {spec!r} is not a number.") from error
    if not math.isfinite(value):  # a NaN weight makes every total NaN, which GRPO masks as failed rewards
        raise InputError(f"Reward weight in {spec!r} must be a finite number.")
    return name, None, value


def build_reward(spec: str, device: str = "cpu") -> tuple[str, RewardFunction, float]:
    """(name, function, weight) from "redness@1" or "dino=/models/dino@0.5"."""
    from mmr1.images import image_batch_to_pils
    from mmr1.rewards import load_reward_model

    kind, folder, weight = parse_spec(spec)
    if folder is None:
        return kind, PROGRAMMATIC[kind], weight
    model = load_reward_model(kind, folder, device=device)

    def score(images, references, prompts, reasonings):
        return model.score(image_batch_to_pils(images), references or None, prompts)

    return kind, score, weight


def build_rewards(specs: tuple[str, ...] | list[str], device: str = "cpu") -> list[tuple[str, RewardFunction, float]]:
    """`build_reward` for each spec; a kind given twice (two CLIP folders, say) keeps its own metrics as
    kind, kind_2, ..."""
    rewards, seen = [], {}
    for spec in specs:
        name, function, weight = build_reward(spec, device)
        seen[name] = seen.get(name, 0) + 1
        rewards.append((name if seen[name] == 1 else f"{name}_{seen[name]}", function, weight))
    return rewards
