"""X-CoT stage 1 and 2: grounding (the MLLM writes what defines the subject and plans the scene) and subject
extraction (the references as VQ image tokens, the visual intermediate that generation attends to).

The reasoning is plain text in the tagged `prompting.REASONING_FORMAT`; users may edit it between the stages,
and `Grounding.with_reasoning` re-parses the edit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from .errors import InputError
from .images import crop_to_mask, image_batch_to_pils, mask_to_array, tensor_to_pil, to_rgb
from .prompting import batch_prefix, build_sequence, check_fits, embed_sequence
from .sampling import CancelCheck, Modality, ProgressCallback, SamplingSettings, sample_tokens

SUBJECT_SOURCES = ("reference", "none")
_TAG = r"<{0}>(.*?)(?:</{0}>|$)"


@dataclass(frozen=True)
class ParsedReasoning:
    think: str
    subject: str
    scene: str
    format_ok: bool  # False when the model ignored the tags: the raw text then stands in for each part


def parse_reasoning(text: str) -> ParsedReasoning:
    """Split tagged reasoning; a model that ignores the format yields its raw text and format_ok=False."""
    parts = {}
    for tag in ("think", "subject", "scene"):
        match = re.search(_TAG.format(tag), text, flags=re.DOTALL)
        parts[tag] = match.group(1).strip() if match else None
    format_ok = all(f"<{tag}>" in text and f"</{tag}>" in text for tag in parts) and bool(parts["subject"])
    raw = text.strip()
    return ParsedReasoning(
        think=parts["think"] if parts["think"] is not None else raw,
        subject=parts["subject"] or raw,
        scene=parts["scene"] or raw,
        format_ok=format_ok,
    )


def format_reasoning(think: str, subject: str, scene: str) -> str:
    """The tagged text the model is trained to write (used by SFT data and tests)."""
    return f"<think>{think}</think><subject>{subject}</subject><scene>{scene}</scene>"


@dataclass
class Grounding:
    """Result of grounding: editable reasoning plus the conditioning generation needs."""

    prompt: str
    reasoning: str
    subject: str
    scene: str
    format_ok: bool
    references: list[Image.Image]  # after mask cropping, RGB
    subject_tokens: torch.Tensor | None  # [M, T] VQ tokens of the subject (the visual intermediate)
    settings: dict = field(default_factory=dict)

    @property
    def rewritten_prompt(self) -> str:
        """The scene plan as a stand-alone prompt, for this or any other text-to-image pipeline."""
        return self.scene if self.format_ok else self.prompt

    def with_reasoning(self, text: str) -> "Grounding":
        """The same grounding with reasoning edited by the user."""
        parsed = parse_reasoning(text)
        return replace(self, reasoning=text.strip(), subject=parsed.subject, scene=parsed.scene, format_ok=parsed.format_ok)


def prepare_references(
    images: list[Image.Image | torch.Tensor] | torch.Tensor, masks: list | torch.Tensor | None = None
) -> list[Image.Image]:
    """RGB references, each cropped to its mask when masks are given (one mask for all, or one per image).

    Images are PIL images, [H,W,C] tensors, or one IMAGE batch [B,H,W,C]; masks are [H,W] each or a [B,H,W] batch.
    """
    if isinstance(images, torch.Tensor):
        images = image_batch_to_pils(images, "reference images")
    if images is None or len(images) == 0:
        raise InputError("Grounding needs at least one reference image of the subject.")
    references = [
        tensor_to_pil(image, f"reference image {index + 1}")
        if isinstance(image, torch.Tensor)
        else to_rgb(image, f"reference image {index + 1}")
        for index, image in enumerate(images)
    ]
    if isinstance(masks, torch.Tensor):
        masks = list(masks if masks.ndim == 3 else masks.unsqueeze(0))
    if masks is None or len(masks) == 0:
        return references
    if len(masks) not in (1, len(references)):
        raise InputError(f"Got {len(masks)} masks for {len(references)} reference images; give one, or one per image.")
    masks = list(masks) * len(references) if len(masks) == 1 else list(masks)
    return [
        crop_to_mask(image, mask_to_array(mask, f"mask {index + 1}"), name=f"mask {index + 1}")
        for index, (image, mask) in enumerate(zip(references, masks))
    ]


def reasoning_stop_tokens(mm) -> tuple[int, ...]:
    """The reasoning ends where the model opens an image (the X-CoT chain goes on to the subject or the new
    image, as trained) or at end-of-sentence (what an untrained chat model writes)."""
    return (mm.tokens.begin_of_image, mm.tokens.eos)


def check_subject_source(source: str) -> None:
    if source not in SUBJECT_SOURCES:
        raise InputError(f"Unknown subject source {source!r}; choose one of {', '.join(SUBJECT_SOURCES)}.")


def extract_subject(mm, references: list[Image.Image], source: str = "reference", count: int = 1) -> torch.Tensor | None:
    """Stage 2: the first `count` references as VQ tokens [count, T], or None for source 'none'."""
    check_subject_source(source)
    if source == "none" or not references:
        return None
    return mm.encode_image_tokens(references[:count]).cpu()


@torch.no_grad()
def ground(
    mm,
    references: list[Image.Image],
    prompt: str,
    masks: list | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.95,
    seed: int = 0,
    subject_source: str = "reference",
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    synced: bool = False,
) -> Grounding:
    """Stage 1 and 2 of X-CoT for one subject: the model reads the references and writes the reasoning.

    `synced`: every process of a sharded (FSDP, ZeRO-3) model steps until all have stopped (see sample_tokens)."""
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    check_subject_source(subject_source)  # before the reasoning is sampled, not after
    settings = SamplingSettings(cfg_scale=1.0, temperature=temperature, top_p=top_p)
    references = prepare_references(references, masks)
    sequence = build_sequence(mm, prompt, references, stage="ground")
    check_fits(mm, sequence, max_new_tokens)
    sampled = sample_tokens(
        mm,
        batch_prefix(mm, [embed_sequence(mm, sequence)]),
        Modality.text(mm),
        max_new_tokens,
        settings,
        seed,
        stop_tokens=reasoning_stop_tokens(mm),
        pad_token=mm.tokens.pad,
        progress=progress,
        cancel=cancel,
        synced=synced,
    )
    text = mm.tokenizer.decode(sampled.tokens[0, : int(sampled.lengths[0])], skip_special_tokens=True).strip()
    parsed = parse_reasoning(text)
    return Grounding(
        prompt=prompt.strip(),
        reasoning=text,
        subject=parsed.subject,
        scene=parsed.scene,
        format_ok=parsed.format_ok,
        references=references,
        subject_tokens=extract_subject(mm, references, subject_source),
        settings={
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "subject_source": subject_source,
        },
    )
