"""X-CoT stage 3: image tokens conditioned on references, reasoning, subject tokens and prompt, with CFG."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from PIL import Image

from .errors import InputError
from .prompting import PromptSequence, batch_prefix, build_sequence, check_fits, embed_sequence
from .sampling import CancelCheck, Modality, ProgressCallback, SamplingSettings, sample_tokens
from .xcot import Grounding


@dataclass
class GenerationResult:
    images: torch.Tensor  # [B, H, W, 3] float32 0..1
    tokens: torch.Tensor  # [B, num_image_tokens] long
    logprobs: torch.Tensor | None  # [B, num_image_tokens] fp32, when asked for
    seeds: list[int]  # image i was drawn with seeds[i]
    reasoning: str | None  # the reasoning the images were conditioned on
    subject_image: torch.Tensor | None = None  # [1, H, W, 3] the visual intermediate they attended to, if any

    def pil_images(self) -> list[Image.Image]:
        array = (self.images.clamp(0, 1).numpy() * 255.0 + 0.5).astype("uint8")
        return [Image.fromarray(image) for image in array]


def generation_sequence(mm, prompt: str, grounding: Grounding | None = None, reasoning: str | None = None) -> PromptSequence:
    """The stage-3 sequence; `reasoning` overrides the grounding's own (a user's edit), "" drops it."""
    if grounding is None:
        return build_sequence(mm, prompt, reasoning=reasoning)
    return build_sequence(
        mm,
        prompt,
        grounding.references,
        reasoning=grounding.reasoning if reasoning is None else reasoning,
        subject_tokens=grounding.subject_tokens,
    )


@torch.no_grad()
def generate(
    mm,
    prompt: str,
    grounding: Grounding | None = None,
    reasoning: str | None = None,
    num_images: int = 1,
    settings: SamplingSettings = SamplingSettings(),
    seed: int = 0,
    use_cache: bool = True,
    return_logprobs: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    synced: bool = False,
) -> GenerationResult:
    """`num_images` images for one prompt; image i uses seed + i. Without grounding: plain text-to-image.

    `synced` is sample_tokens' (image tokens have no stop, so every process already runs the same forwards)."""
    if num_images < 1:
        raise InputError(f"num_images must be at least 1, got {num_images}.")
    sequence = generation_sequence(mm, prompt, grounding, reasoning)
    result = _sample_images(mm, [sequence] * num_images, settings, seed, use_cache, return_logprobs, progress,
                            cancel, synced)
    result.reasoning = None if grounding is None and not reasoning else (
        grounding.reasoning if reasoning is None else reasoning)
    result.subject_image = None if grounding is None else grounding.subject_image
    return result


def generate_batches(
    mm,
    prompt: str,
    grounding: Grounding | None = None,
    reasoning: str | None = None,
    num_images: int = 1,
    batch_size: int = 8,
    settings: SamplingSettings = SamplingSettings(),
    seed: int = 0,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> Iterator[tuple[int, GenerationResult]]:
    """`generate` of `num_images` drawn `batch_size` at a time, each batch (first image index, result) yielded as it
    finishes: memory grows with the batch, not the count (CFG doubles the rows), and the images are the pixels
    of one batch, since image i uses seed + i either way. `progress` sees (done, total) over all batches."""
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}.")
    if num_images < 1:
        raise InputError(f"num_images must be at least 1, got {num_images}.")
    starts = range(0, num_images, batch_size)
    steps = len(starts) * mm.num_image_tokens
    for index, start in enumerate(starts):
        done = index * mm.num_image_tokens
        batch_progress = None if progress is None else (
            lambda step, total, tokens=None, done=done: progress(done + step, steps, tokens))
        yield start, generate(mm, prompt, grounding, reasoning, min(batch_size, num_images - start), settings,
                              seed + start, progress=batch_progress, cancel=cancel)


@torch.no_grad()
def generate_chains(
    mm,
    prompts: list[str],
    groundings: list[Grounding | None],
    reasonings: list[str | None] | None = None,
    settings: SamplingSettings = SamplingSettings(),
    seed: int = 0,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> GenerationResult:
    """One image for each of several chains (prompt, grounding, reasoning override) in one batch; image i uses
    seed + i, as `generate` of chain i alone with seed + i would. For evaluations over many subjects."""
    reasonings = reasonings if reasonings is not None else [None] * len(prompts)
    if not len(prompts) == len(groundings) == len(reasonings) or not prompts:
        raise InputError("generate_chains needs as many groundings and reasonings as prompts, and at least one.")
    sequences = [generation_sequence(mm, *chain) for chain in zip(prompts, groundings, reasonings)]
    return _sample_images(mm, sequences, settings, seed, progress=progress, cancel=cancel)


def _sample_images(mm, sequences: list[PromptSequence], settings: SamplingSettings, seed: int, use_cache: bool = True,
                   return_logprobs: bool = False, progress: ProgressCallback | None = None,
                   cancel: CancelCheck | None = None, synced: bool = False) -> GenerationResult:
    """Image tokens after each sequence (row i seeded seed + i), decoded; a sequence repeated is embedded once, and
    when every row has the same sequence (one prompt's images) its prefix is prefilled once for all of them."""
    embedded: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for sequence in sequences:
        if id(sequence) not in embedded:
            check_fits(mm, sequence, mm.num_image_tokens)
            embedded[id(sequence)] = (embed_sequence(mm, sequence), embed_sequence(mm, sequence, unconditional=True)
                                      if settings.guided else None)
    repeats = len(sequences) if len(embedded) == 1 else 1
    rows = [embedded[id(sequence)] for sequence in sequences[::repeats]]
    sampled = sample_tokens(
        mm,
        batch_prefix(mm, [conditional for conditional, _ in rows]),
        Modality.image(mm),
        mm.num_image_tokens,
        settings,
        seed,
        unconditional=batch_prefix(mm, [unconditional for _, unconditional in rows]) if settings.guided else None,
        use_cache=use_cache,
        return_logprobs=return_logprobs,
        progress=progress,
        cancel=cancel,
        synced=synced,
        repeats=repeats,
    )
    return GenerationResult(
        images=decode_rows(mm, sampled.tokens),
        tokens=sampled.tokens.cpu(),
        logprobs=None if sampled.logprobs is None else sampled.logprobs.cpu(),
        seeds=[seed + index for index in range(len(sequences))],
        reasoning=None,
    )


def decode_rows(mm, tokens: torch.Tensor) -> torch.Tensor:
    """Images [B, H, W, 3] of tokens [B, T], each row decoded alone: a batched VQ decode differs in the last float
    bits with the batch size, which can tip a pixel's rounding, and image i must be the same pixels however many
    images are drawn at once (`generate_batches`, --batch-size)."""
    return torch.cat([mm.decode_image_tokens(row.unsqueeze(0)) for row in tokens])
