"""The independent judge: an attribute classifier trained on rendered scenes with their true labels.

It reads back what a generated image shows (shape, colours, pattern, background, position, size), so
evaluation can count attributes right instead of trusting a learned reward. It is never used as a reward:
GRPO optimises the CLIP-style reward model, and the judge only measures. Blur of random strength and noise
during training keep it fair to VQ-decoded images, whose edges are softer than the renderer's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmr1.errors import InputError

from .fit import batch_indices, fit, to_pixels
from .scenes import ATTRIBUTE_VALUES, ATTRIBUTES, IMAGE_SIZE, SCENE_ATTRIBUTES, SUBJECT_ATTRIBUTES

WEIGHTS_FILE = "judge.safetensors"
CONFIG_FILE = "judge.json"


class AttributeJudge(nn.Module):
    """A small CNN with one classification head per attribute (heads share one linear layer)."""

    def __init__(self, width: int = 48) -> None:
        super().__init__()

        def block(inputs: int, outputs: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(inputs, outputs, 3, stride, 1), nn.BatchNorm2d(outputs), nn.GELU())

        self.features = nn.Sequential(
            block(3, width, 1), block(width, width, 2), block(width, 2 * width, 2), block(2 * width, 2 * width, 2)
        )
        grid = IMAGE_SIZE // 8
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * grid * grid, 256), nn.GELU(),
            nn.Linear(256, sum(len(ATTRIBUTE_VALUES[name]) for name in ATTRIBUTES)),
        )
        self.width = width

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Logits per attribute (ATTRIBUTES order) of pixels [N, 3, IMAGE_SIZE, IMAGE_SIZE] in -1..1."""
        logits = self.classifier(self.features(pixels))
        return list(logits.split([len(ATTRIBUTE_VALUES[name]) for name in ATTRIBUTES], dim=1))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[dict[str, str]]:
        """Attribute values of images [N, H, W, 3] float 0..1 (the ComfyUI/mmr1 layout), resized to IMAGE_SIZE if needed."""
        pixels = images.permute(0, 3, 1, 2).float() * 2 - 1
        if pixels.shape[-1] != IMAGE_SIZE:
            pixels = F.interpolate(pixels, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
        indices = torch.stack([logits.argmax(dim=1) for logits in self.eval()(pixels)], dim=1)
        return [
            {name: ATTRIBUTE_VALUES[name][int(index)] for name, index in zip(ATTRIBUTES, row)} for row in indices
        ]


def _augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur of random strength (VQ decoding softens edges and fine patterns), a little noise and a colour shift."""
    blurred = F.avg_pool2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    softened = F.interpolate(F.avg_pool2d(pixels, 2), scale_factor=2, mode="bilinear", align_corners=False)
    amount = torch.rand(len(pixels), 1, 1, 1, generator=generator)
    pick = torch.rand(len(pixels), 1, 1, 1, generator=generator) < 0.25
    pixels = torch.lerp(pixels, torch.where(pick, softened, blurred), amount)
    shift = 0.06 * (torch.rand(len(pixels), 3, 1, 1, generator=generator) - 0.5)
    return pixels + shift + 0.04 * torch.randn(pixels.shape, generator=generator)


def train_judge(images, labels, steps: int, batch_size: int = 64, learning_rate: float = 2e-3, seed: int = 0,
                subjects_alone=None):
    """(judge, losses) trained on uint8 images [N, 64, 64, 3] and label indices [N, len(ATTRIBUTES)].

    `subjects_alone`: optional (uint8 images [M, 64, 64, 3], label indices [M, len(SUBJECT_ATTRIBUTES)]) of
    subjects on the plain backdrop (scenes.render_subject), a quarter-batch of them in every step with the
    subject heads' loss only, so the judge also reads the subject images the model draws."""
    torch.manual_seed(seed)
    judge = AttributeJudge().train()
    pixels, labels = to_pixels(images), torch.as_tensor(labels)
    alone = None if subjects_alone is None else (to_pixels(subjects_alone[0]), torch.as_tensor(subjects_alone[1]))

    def step_loss(step: int) -> torch.Tensor:
        indices = batch_indices(len(pixels), batch_size, step, seed)
        generator = torch.Generator().manual_seed(seed + step)
        logits = judge(_augment(pixels[indices], generator))
        loss = sum(F.cross_entropy(head, labels[indices, column]) for column, head in enumerate(logits))
        if alone is not None:
            picks = batch_indices(len(alone[0]), batch_size // 4, step, seed + 1)
            heads = judge(_augment(alone[0][picks], generator))[: len(SUBJECT_ATTRIBUTES)]
            loss = loss + sum(F.cross_entropy(head, alone[1][picks, column]) for column, head in enumerate(heads))
        return loss

    losses = fit(judge.parameters(), step_loss, steps, learning_rate, "judge")
    return judge.eval(), losses


@torch.no_grad()
def attribute_hits(judge: AttributeJudge, images: torch.Tensor, truths: list[dict[str, str]]) -> dict[str, list[bool]]:
    """Per attribute, whether the judge reads each image's true value (images [N, H, W, 3] float 0..1)."""
    predictions = []
    for start in range(0, len(images), 256):
        predictions += judge.predict(images[start : start + 256])
    return {name: [p[name] == t[name] for p, t in zip(predictions, truths)] for name in ATTRIBUTES}


def attribute_accuracy(judge: AttributeJudge, images: torch.Tensor, truths: list[dict[str, str]]) -> dict[str, float]:
    """Fraction right per attribute, plus 'subject' and 'prompt': means over the subject and scene attributes."""
    hits = attribute_hits(judge, images, truths)
    accuracy = {name: sum(values) / max(1, len(values)) for name, values in hits.items()}
    accuracy["subject"] = sum(accuracy[name] for name in SUBJECT_ATTRIBUTES) / len(SUBJECT_ATTRIBUTES)
    accuracy["prompt"] = sum(accuracy[name] for name in SCENE_ATTRIBUTES) / len(SCENE_ATTRIBUTES)
    return accuracy


def save_judge(judge: AttributeJudge, folder: Path, record: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in judge.state_dict().items()}, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(
        json.dumps({"width": judge.width, "attributes": {name: list(ATTRIBUTE_VALUES[name]) for name in ATTRIBUTES},
                    **record}, indent=2) + "\n", encoding="utf-8")


def load_judge(folder: Path) -> AttributeJudge:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        raise InputError(f"No judge in {folder}: expected {WEIGHTS_FILE} and {CONFIG_FILE} "
                         "(python -m training.world.pipeline writes one).")
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    if config["attributes"] != {name: list(ATTRIBUTE_VALUES[name]) for name in ATTRIBUTES}:
        raise InputError(f"The judge in {folder} was trained on another version of the world's attributes.")
    judge = AttributeJudge(config["width"])
    judge.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return judge.eval()
