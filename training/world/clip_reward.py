"""Train the tiny CLIP-style reward model (transformers' CLIPModel) on rendered scenes and their captions.

Captions name what the image shows at three levels, so both reward uses work: the full caption ("a red heart
with blue stripes on the beach, small, on the left"), the subject alone (CLIP-I compares subjects across scenes)
and the user's scene-only prompt ("a photo of it on the beach, small, on the left", what CLIP-T scores during
GRPO). The loss is CLIP's symmetric contrastive loss with soft targets, since a batch can hold a caption twice,
plus the same loss between images: each image against another render of its subject in another scene, so that
the image embedding holds what identifies a subject whatever the scene (what DreamSim and DINO give CLIP-I on
photos; without it CLIP-I barely separates a right pattern from a wrong one on a small subject).
The folder it writes is a plain CLIP folder: `mmr1.rewards.load_reward_model("clip_t" or "clip_i", folder)`.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

import torch
import torch.nn.functional as F

from mmr1.rewards.models import feature_tensor
from mmr1.rewards.tiny import build_clip_folder

from .fit import batch_indices, fit
from .scenes import IMAGE_SIZE, LabelledScenes, Subject, vocabulary

_CONTEXT = 32
_SIZES = {"hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4}


def captions_of(scenes: LabelledScenes, seed: int) -> list[str]:
    """One caption per image: a third full, a third subject only, a third the scene-only prompt."""
    rng = random.Random(seed)
    captions = []
    for subject, scene in zip(scenes.subjects, scenes.scenes):
        kind = rng.randrange(3)
        captions.append(
            f"{subject.description()} {scene.phrase()}" if kind == 0 else subject.description() if kind == 1 else scene.prompt()
        )
    return captions


def contrastive_loss(logits: torch.Tensor, keys: list[str]) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over a [B, B] similarity matrix whose rows and columns pair up by `keys`,
    with soft targets: every column with the row's key counts as a match (a batch can hold a key twice)."""
    same = torch.tensor([[a == b for b in keys] for a in keys], dtype=torch.float32)
    targets = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def train_clip_reward(
    out_dir: Path, scenes: LabelledScenes, steps: int, batch_size: int = 64, learning_rate: float = 1e-3, seed: int = 0,
    identity_weight: float = 1.0,
) -> list[float]:
    """Write a trained CLIP folder to `out_dir`; returns the losses. `identity_weight` weighs the image-image
    (same subject, other scene) term against the image-text one."""
    from mmr1.rewards import load_reward_model

    out_dir.mkdir(parents=True, exist_ok=True)
    words = list(string.ascii_lowercase + string.digits + string.punctuation) + vocabulary()
    build_clip_folder(out_dir, seed, words=words, image_size=IMAGE_SIZE, patch_size=8, block=_SIZES,
                      intermediate_size=256, context=_CONTEXT, projection_dim=128)
    reward = load_reward_model("clip_t", out_dir, device="cpu", dtype=torch.float32)
    model = reward.model.train().requires_grad_(True)  # reward models load frozen
    from PIL import Image

    pixels = torch.cat([
        reward.image_processor(images=[Image.fromarray(image) for image in scenes.images[start : start + 512]],
                               return_tensors="pt")["pixel_values"]
        for start in range(0, len(scenes.images), 512)
    ])
    captions = captions_of(scenes, seed)
    tokens = reward.tokenizer(captions, padding="max_length", truncation=True, max_length=_CONTEXT, return_tensors="pt")
    renders_of: dict[Subject, list[int]] = {}
    for index, subject in enumerate(scenes.subjects):
        renders_of.setdefault(subject, []).append(index)

    def image_features(indices: torch.Tensor) -> torch.Tensor:
        return F.normalize(feature_tensor(model.get_image_features(pixel_values=pixels[indices])), dim=-1)

    def step_loss(step: int) -> torch.Tensor:
        indices = batch_indices(len(pixels), batch_size, step, seed)
        image = image_features(indices)
        text = F.normalize(feature_tensor(model.get_text_features(
            input_ids=tokens["input_ids"][indices], attention_mask=tokens["attention_mask"][indices])), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        loss = contrastive_loss(scale * image @ text.T, [captions[int(index)] for index in indices])
        if identity_weight:
            rng = random.Random(seed * 1_000_003 + step)
            subjects = [scenes.subjects[int(index)] for index in indices]
            partners = torch.tensor([rng.choice(renders_of[subject]) for subject in subjects])
            loss = loss + identity_weight * contrastive_loss(
                scale * image @ image_features(partners).T, [subject.slug() for subject in subjects])
        return loss

    losses = fit(model.parameters(), step_loss, steps, learning_rate, "reward model", weight_decay=0.1)
    model.eval().save_pretrained(out_dir, safe_serialization=True)
    return losses
