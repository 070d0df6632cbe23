"""The one place where X-CoT sequences are assembled; no other module writes template text.

A sequence is the DeepSeek chat format of Janus-Pro with three kinds of slots:

    BOS "<|User|>: " [<begin_of_image> understanding slots x T <end_of_image> "\\n"] per reference
        USER_MESSAGE "\\n\\n<|Assistant|>:" [" " reasoning] ["\\n" <begin_of_image> VQ slots x T <end_of_image>] "\\n"
        <begin_of_image>

- Understanding slots hold SigLIP features of the references (how Janus reads images).
- VQ slots hold the subject's image tokens, embedded like generated image tokens: the visual intermediate.
- USER_MESSAGE is GROUNDING_INSTRUCTION with the user's prompt when there are references; without references it
  is the prompt alone, which makes the sequence exactly Janus-Pro's own text-to-image format.
The grounding stage stops after "<|Assistant|>:" (the model writes the reasoning); the generation stage continues
the same sequence with the reasoning, the subject tokens and the final <begin_of_image>, so grounding and
generation form one chain. For classifier-free guidance the unconditional twin keeps only BOS and the final
<begin_of_image> and replaces every other position (reference slots included) by the pad embedding, as Janus does.
Only the template's own text is tokenized with its markers as control tokens (`mm.tokenize_template`);
USER_MESSAGE and the reasoning, which users and the model write, are tokenized as text (`mm.tokenize`), so a
control token's string typed in them ("<begin_of_image>", "<|Assistant|>") stays text: SFT and GRPO build their
sequences here too, so training teaches exactly what inference feeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from .errors import InputError
from .tokens import ASSISTANT_ROLE, USER_ROLE

# The X-CoT answer format the model is asked for (and trained on); `mmr1.xcot` parses it.
REASONING_FORMAT = "<think>...</think><subject>...</subject><scene>...</scene>"
GROUNDING_INSTRUCTION = (
    "The images show one subject. Look at them and answer as "
    + REASONING_FORMAT
    + ": think step by step, describe what defines the subject (class, colours, shape, marks), "
    "then plan the scene of a new image for the request.\nRequest: {prompt}"
)

TEXT, UNDERSTANDING, VQ_IMAGE = 0, 1, 2  # slot kinds


@dataclass
class PromptSequence:
    """Token ids of one sequence, with the images that fill its non-text slots."""

    input_ids: torch.Tensor  # [L] long; image slots hold placeholder ids
    slot_kinds: torch.Tensor  # [L] long: TEXT, UNDERSTANDING or VQ_IMAGE
    keep_unconditional: torch.Tensor  # [L] bool: kept in the unconditional twin
    references: list[Image.Image]  # fill the UNDERSTANDING slots, in order
    subject_tokens: torch.Tensor | None  # [M, T] long VQ tokens that fill the VQ_IMAGE slots

    def __len__(self) -> int:
        return int(self.input_ids.numel())


def user_message(prompt: str, has_references: bool) -> str:
    return GROUNDING_INSTRUCTION.format(prompt=prompt) if has_references else prompt


def build_sequence(
    mm,
    prompt: str,
    references: list[Image.Image] = (),
    reasoning: str | None = None,
    subject_tokens: torch.Tensor | None = None,
    stage: str = "generate",
) -> PromptSequence:
    """Assemble the grounding ("ground") or image generation ("generate") sequence of one X-CoT chain."""
    if stage not in ("ground", "generate"):
        raise ValueError(f"stage must be 'ground' or 'generate', got {stage!r}")
    if not prompt or not prompt.strip():
        raise InputError("The prompt is empty; describe the image to generate.")
    tokens = mm.tokens
    ids: list[int] = []
    kinds: list[int] = []

    def add(piece_ids: list[int], kind: int = TEXT) -> None:
        ids.extend(piece_ids)
        kinds.extend([kind] * len(piece_ids))

    def add_image(kind: int, length: int, placeholder: int) -> None:
        add([tokens.begin_of_image])
        add([placeholder] * length, kind)
        add([tokens.end_of_image])

    add([tokens.bos])
    add(mm.tokenize_template(f"{USER_ROLE}: "))
    for _ in references:
        add_image(UNDERSTANDING, mm.understanding_tokens_per_image, tokens.image_placeholder)
        add(mm.tokenize_template("\n"))
    add(mm.tokenize(user_message(prompt.strip(), bool(references))))
    add(mm.tokenize_template(f"\n\n{ASSISTANT_ROLE}:"))
    if stage == "generate":
        if reasoning and reasoning.strip():
            add(mm.tokenize(" " + reasoning.strip()))
        for _ in range(0 if subject_tokens is None else subject_tokens.shape[0]):
            add(mm.tokenize_template("\n"))
            add_image(VQ_IMAGE, mm.num_image_tokens, tokens.image_placeholder)
        add(mm.tokenize_template("\n"))
        add([tokens.begin_of_image])

    input_ids = torch.tensor(ids, dtype=torch.long)
    keep = torch.zeros(len(ids), dtype=torch.bool)
    keep[0] = True
    if stage == "generate":
        keep[-1] = True
    return PromptSequence(input_ids, torch.tensor(kinds, dtype=torch.long), keep, list(references), subject_tokens)


def check_fits(mm, sequence: PromptSequence, new_tokens: int) -> None:
    """A sequence plus the tokens still to be sampled must fit the model's context."""
    if len(sequence) + new_tokens > mm.context_length:
        raise InputError(
            f"The prompt takes {len(sequence)} tokens and {new_tokens} more are to be generated, beyond the "
            f"model's context of {mm.context_length} tokens; shorten the prompt or the reasoning, or use fewer "
            "reference images."
        )


def embed_sequence(
    mm, sequence: PromptSequence, unconditional: bool = False, reference_features: torch.Tensor | None = None
) -> torch.Tensor:
    """[L, hidden] input embeddings: text embeddings, with reference features and subject tokens in their slots.

    `reference_features` are the references' `mm.understanding_features`, when the caller embeds many sequences
    over the same references and computes them once.
    """
    ids = sequence.input_ids.to(mm.device)
    if unconditional:
        ids = torch.where(sequence.keep_unconditional.to(mm.device), ids, torch.full_like(ids, mm.tokens.pad))
    embeds = mm.embed_text(ids)
    if unconditional:
        return embeds
    kinds = sequence.slot_kinds.to(mm.device)
    if sequence.references:
        if reference_features is None:
            reference_features = mm.understanding_features(sequence.references)
        features = mm.align_understanding(reference_features)
        embeds = embeds.masked_scatter((kinds == UNDERSTANDING).unsqueeze(-1), features.to(embeds.dtype))
    if sequence.subject_tokens is not None:
        subject = mm.embed_image_tokens(sequence.subject_tokens.reshape(-1))
        embeds = embeds.masked_scatter((kinds == VQ_IMAGE).unsqueeze(-1), subject.to(embeds.dtype))
    return embeds


@dataclass
class BatchedPrefix:
    """Left-padded input embeddings of a batch, ready for the language model."""

    embeds: torch.Tensor  # [rows, L, hidden]
    attention_mask: torch.Tensor  # [rows, L] long, 0 on left padding
    position_ids: torch.Tensor  # [rows, L] long, counting from the first real token


def batch_prefix(mm, embeddings: list[torch.Tensor]) -> BatchedPrefix:
    """Stack [L_i, hidden] embeddings with left padding (pad embedding, masked out, positions from 0)."""
    length = max(embedding.shape[0] for embedding in embeddings)
    pad = mm.embed_text(torch.tensor([mm.tokens.pad]))[0]
    rows, masks = [], []
    for embedding in embeddings:
        missing = length - embedding.shape[0]
        rows.append(torch.cat([pad.expand(missing, -1), embedding]) if missing else embedding)
        masks.append(torch.cat([torch.zeros(missing, dtype=torch.long), torch.ones(embedding.shape[0], dtype=torch.long)]))
    attention_mask = torch.stack(masks).to(mm.device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return BatchedPrefix(torch.stack(rows), attention_mask, position_ids)
