"""X-CoT stage 1 and 2: grounding (the MLLM writes what defines the subject and plans the scene) and the subject
as an image, the visual intermediate that generation attends to. Its source:

- `generate`: the model draws the subject alone after its reasoning (MM-R1's X-CoT: intermediate text, then an
  image of the extracted subject); the final image attends to those tokens;
- `reference`: the first (cropped) reference's VQ tokens;
- `none`: text reasoning only.

The reasoning is plain text in the tagged `prompting.REASONING_FORMAT`; users may edit it between the stages,
and `Grounding.with_reasoning` re-parses the edit.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from .errors import InputError
from .images import crop_to_mask, image_batch_to_pils, mask_to_array, pil_to_tensor, tensor_to_pil, to_rgb
from .prompting import batch_prefix, build_sequence, check_fits, embed_sequence
from .sampling import CancelCheck, Modality, ProgressCallback, SamplingSettings, sample_tokens

SUBJECT_SOURCES = ("reference", "none", "generate")  # node option order is a contract: append only
SUBJECT_SETTINGS = SamplingSettings()  # how `generate` draws the subject image unless told otherwise
_TAG = r"<{0}>(.*?)(?:</{0}>|$)"
STREAM_EVERY = 4  # reasoning tokens between two `stream` calls: a live view without decoding every token


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
    subject_image: torch.Tensor | None = None  # [1, H, W, 3] float 0..1: the drawn subject, or the reference crop

    @property
    def rewritten_prompt(self) -> str:
        """The scene plan as a stand-alone prompt, for this or any other text-to-image pipeline."""
        return self.scene if self.format_ok else self.prompt

    def with_reasoning(self, text: str) -> "Grounding":
        """The same grounding with reasoning edited by the user."""
        parsed = parse_reasoning(text)
        return replace(self, reasoning=text.strip(), subject=parsed.subject, scene=parsed.scene, format_ok=parsed.format_ok)

    def with_subject_image(self, mm, image: Image.Image | torch.Tensor) -> "Grounding":
        """The same grounding attending to another subject image (a user's swap): its VQ tokens replace the
        intermediate's; `image` is a PIL image or an IMAGE [1, H, W, 3] / [H, W, 3]."""
        if isinstance(image, torch.Tensor):
            image = tensor_to_pil(image[0] if image.ndim == 4 else image, "subject image")
        image = to_rgb(image, "subject image")
        tokens = mm.encode_image_tokens([image]).cpu()
        return replace(self, subject_tokens=tokens, subject_image=pil_to_tensor(image).unsqueeze(0))


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
    """Stage 2 from the references: the first `count` as VQ tokens [count, T]; None for 'none', and for
    'generate', whose tokens the model draws after its reasoning (`draw_subjects`)."""
    check_subject_source(source)
    if source != "reference" or not references:
        return None
    return mm.encode_image_tokens(references[:count]).cpu()


def draw_subjects(
    mm,
    prompts: list[str],
    references: list[list[Image.Image]],
    reasonings: list[str],
    settings: SamplingSettings = SUBJECT_SETTINGS,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
):
    """Stage 2 by the model: for each chain, the subject image it draws after its reasoning, at the chain's first
    image (a GenerationResult, row i seeded seed + i); the final image then attends to those tokens."""
    from .generation import generate_chains  # generation builds on Grounding, defined here

    chains = [Grounding(prompt, reasoning, "", "", False, refs, None)
              for prompt, refs, reasoning in zip(prompts, references, reasonings)]
    return generate_chains(mm, prompts, chains, None, settings, seed, progress=progress, cancel=cancel)


def ground(mm, references: list[Image.Image], prompt: str, masks: list | None = None, **options) -> Grounding:
    """Stage 1 and 2 of X-CoT for one subject: the references are cropped to their masks (see
    `prepare_references`), then the model reads them and writes the reasoning and, under `subject_source`
    'generate', draws the subject image; `options` are ground_batch's (max_new_tokens, temperature, top_p, seed,
    subject_source, progress, cancel, synced, subject_settings, stream)."""
    return ground_batch(mm, [prepare_references(references, masks)], [prompt], **options)[0]


@torch.no_grad()
def ground_batch(
    mm,
    references: list[list[Image.Image]],
    prompts: list[str],
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.95,
    seed: int = 0,
    subject_source: str = "reference",
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    synced: bool = False,
    subject_settings: SamplingSettings = SUBJECT_SETTINGS,
    stream: Callable[[list[str]], None] | None = None,
) -> list[Grounding]:
    """Grounding of several subjects in one batch (prepared RGB references per subject): the model reads each
    subject's references and writes the reasoning, then (`subject_source` 'generate') draws the subject image
    with `subject_settings`. Subject i is seeded seed + i, as it would be grounded alone with seed + i.

    `synced`: every process of a sharded (FSDP, ZeRO-3) model steps until all have stopped (see sample_tokens).
    `stream`: sees each subject's reasoning so far, every STREAM_EVERY tokens while it is written (a live view)."""
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    check_subject_source(subject_source)  # before the reasoning is sampled, not after
    if len(references) != len(prompts) or not prompts:
        raise InputError(f"Got {len(references)} reference sets for {len(prompts)} prompts; give one per prompt.")
    settings = SamplingSettings(cfg_scale=1.0, temperature=temperature, top_p=top_p)
    sequences = [build_sequence(mm, prompt, refs, stage="ground") for prompt, refs in zip(prompts, references)]
    for sequence in sequences:
        check_fits(mm, sequence, max_new_tokens)
    text_progress = progress
    if stream is not None:
        def text_progress(done: int, total: int, tokens: torch.Tensor) -> None:
            if progress is not None:
                progress(done, total, tokens)
            if done % STREAM_EVERY == 0:
                stream([mm.tokenizer.decode(row[:done], skip_special_tokens=True) for row in tokens])
    sampled = sample_tokens(
        mm,
        batch_prefix(mm, [embed_sequence(mm, sequence) for sequence in sequences]),
        Modality.text(mm),
        max_new_tokens,
        settings,
        seed,
        stop_tokens=reasoning_stop_tokens(mm),
        pad_token=mm.tokens.pad,
        progress=text_progress,
        cancel=cancel,
        synced=synced,
    )
    texts = [mm.tokenizer.decode(row[: int(length)], skip_special_tokens=True).strip()
             for row, length in zip(sampled.tokens, sampled.lengths)]
    if stream is not None:
        stream(texts)
    drawn = None
    if subject_source == "generate":
        drawn = draw_subjects(mm, prompts, references, texts, subject_settings, seed, progress, cancel)
    groundings = []
    for row, (prompt, refs, text) in enumerate(zip(prompts, references, texts)):
        parsed = parse_reasoning(text)
        subject_tokens, subject_image = extract_subject(mm, refs, subject_source), None
        if drawn is not None:
            subject_tokens, subject_image = drawn.tokens[row : row + 1], drawn.images[row : row + 1]
        elif subject_source == "reference":
            subject_image = pil_to_tensor(refs[0]).unsqueeze(0)
        groundings.append(Grounding(
            prompt=prompt.strip(),
            reasoning=text,
            subject=parsed.subject,
            scene=parsed.scene,
            format_ok=parsed.format_ok,
            references=refs,
            subject_tokens=subject_tokens,
            subject_image=subject_image,
            settings={
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "seed": seed + row,
                "subject_source": subject_source,
            },
        ))
    return groundings
