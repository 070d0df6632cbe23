"""Pretrain Janus's understanding encoder (transformers' JanusVisionModel, a SigLIP-style ViT) on the world.

Janus reads reference images through this encoder; a randomly initialised one would leave SFT to learn vision
and language at once. Here it first learns to tell every attribute apart (linear heads on the mean patch
feature, discarded afterwards), so that its patch features carry what the reasoning must name. SFT then keeps it
frozen, as training/policy.py does for real Janus checkpoints, and trains the aligner and language model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmr1.tiny import TinySpec, build_vision_config

from .fit import batch_indices, fit, to_pixels
from .scenes import ATTRIBUTE_VALUES, ATTRIBUTES


def train_understanding_encoder(
    spec: TinySpec, images, labels, steps: int, batch_size: int = 64, learning_rate: float = 2e-3, seed: int = 0
) -> tuple[nn.Module, list[float]]:
    """(JanusVisionModel, losses) trained to classify the attributes of uint8 images [N, S, S, 3]."""
    from transformers.models.janus.modeling_janus import JanusVisionModel

    torch.manual_seed(seed)
    encoder = JanusVisionModel(build_vision_config(spec)).train()
    heads = nn.Linear(spec.vision_hidden_size, sum(len(ATTRIBUTE_VALUES[name]) for name in ATTRIBUTES))
    sizes = [len(ATTRIBUTE_VALUES[name]) for name in ATTRIBUTES]
    pixels, labels = to_pixels(images), torch.as_tensor(labels)  # the Janus processor's mean 0.5 / std 0.5

    def step_loss(step: int) -> torch.Tensor:
        indices = batch_indices(len(pixels), batch_size, step, seed)
        features = encoder(pixel_values=pixels[indices]).last_hidden_state.mean(dim=1)
        logits = heads(features).split(sizes, dim=1)
        return sum(F.cross_entropy(head, labels[indices, column]) for column, head in enumerate(logits))

    losses = fit([*encoder.parameters(), *heads.parameters()], step_loss, steps, learning_rate, "understanding encoder")
    return encoder.eval(), losses
