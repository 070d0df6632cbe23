"""`MMR1Model`: a loaded Janus model with its processor, and the few operations mmr1 builds on.

Keeping these operations here (embed text, embed reference images for understanding, VQ-encode and decode image
tokens, the two output heads) lets the prompt builder, samplers and trainer stay independent of where each piece
lives inside transformers' `JanusForConditionalGeneration`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image

from .images import letterbox
from .tokens import SpecialTokens

if TYPE_CHECKING:
    from transformers import JanusForConditionalGeneration, JanusProcessor


FEATURES_KEPT = 8  # reference sets whose understanding features stay (a few MB each on the 7B)


def picture_key(image: Image.Image) -> tuple:
    """What identifies a picture's content: mode, size and a digest of its pixels (a millisecond per megapixel)."""
    return image.mode, image.size, hashlib.blake2b(image.tobytes(), digest_size=16).digest()


@dataclass
class MMR1Model:
    model: JanusForConditionalGeneration
    processor: JanusProcessor
    tokens: SpecialTokens
    source: Path
    layout: str  # "hf", "deepseek" or "lora"
    compile_decoding: bool = False  # decode steps through torch.compile (CUDA graphs on CUDA): see mmr1.decoding
    features_kept: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    @property
    def image_grid(self) -> int:
        """Side of the square grid of generated image tokens (24 for Janus-Pro)."""
        return self.model.config.vq_config.num_patches

    @property
    def num_image_tokens(self) -> int:
        """Tokens per generated image (576 for Janus-Pro)."""
        return self.image_grid**2

    @property
    def image_size(self) -> int:
        """Pixel side of generated images: the token grid times the VQ's downsampling (384 for Janus-Pro)."""
        return self.image_grid * 2 ** (len(self.model.config.vq_config.channel_multiplier) - 1)

    @property
    def understanding_tokens_per_image(self) -> int:
        return self.model.config.vision_config.num_image_tokens

    @property
    def context_length(self) -> int:
        return self.model.config.text_config.max_position_embeddings

    def tokenize(self, text: str) -> list[int]:
        """Token ids of text as text, without BOS: a control token's string in it ("<begin_of_image>",
        "<|Assistant|>", end-of-sentence) is spelled out, so prompts and reasoning cannot forge a turn or an
        image boundary. Every loaded tokenizer flags the Janus control tokens special (`mark_control_tokens`),
        which is what `split_special_tokens` spells out."""
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def tokenize_template(self, text: str) -> list[int]:
        """Token ids of the chat template's own text, whose role markers become control tokens as in Janus'
        own format; never for text that a user or the model wrote."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids.to(self.device))

    def embed_image_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Input embeddings of VQ image tokens (generation embeddings through the generation aligner)."""
        return self.model.prepare_embeddings_for_image_generation(tokens.to(self.device))

    @torch.no_grad()
    def understanding_features(self, images: list[Image.Image]) -> torch.Tensor:
        """[N, tokens_per_image, vision_hidden] SigLIP features of reference images. The vision tower is frozen
        (inference and training alike), so the features of the same pictures are computed once: grounding, the
        subject image and the final images of one X-CoT run read them from `features_kept` (by the pictures'
        content, the device, the dtype and inference mode, whose tensors autograd refuses)."""
        vision = self.model.model.vision_model
        dtype = next(vision.parameters()).dtype
        key = (str(self.device), dtype, torch.is_inference_mode_enabled(), tuple(map(picture_key, images)))
        features = self.features_kept.pop(key, None)
        if features is None:
            pixel_values = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
            features = vision(pixel_values.to(self.device, dtype)).last_hidden_state
        self.features_kept[key] = features  # the most recently used last
        while len(self.features_kept) > FEATURES_KEPT:
            self.features_kept.pop(next(iter(self.features_kept)))
        return features

    def align_understanding(self, features: torch.Tensor) -> torch.Tensor:
        """[N, tokens_per_image, hidden] input embeddings from SigLIP features through the (trainable) aligner."""
        aligner = self.model.model.aligner
        return aligner(features.to(next(aligner.parameters()).dtype))

    def embed_understanding_images(self, images: list[Image.Image]) -> torch.Tensor:
        """[N, tokens_per_image, hidden] from the SigLIP encoder and aligner, as Janus does for understanding."""
        return self.align_understanding(self.understanding_features(images))

    def image_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return head_logits(self.model.model.generation_head, hidden_states)

    def text_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return head_logits(self.model.lm_head, hidden_states)

    @torch.no_grad()
    def encode_image_tokens(self, images: list[Image.Image]) -> torch.Tensor:
        """VQ tokens [N, num_image_tokens] of images letterboxed to `image_size`.

        The nearest code is searched between L2-normalised latents and codes, as the original Janus VQ does;
        transformers' quantizer skips the normalisation, which picks other codes than decoding assumes.
        """
        pixels = torch.stack([letterbox(image, self.image_size) for image in images]).to(self.device, self.dtype)
        vq = self.model.model.vqmodel
        latents = vq.quant_conv(vq.encoder(pixels * 2 - 1))
        latents = F.normalize(latents.permute(0, 2, 3, 1).flatten(1, 2).float(), dim=-1)
        codebook = F.normalize(vq.quantize.embedding.weight.float(), dim=-1)
        return (latents @ codebook.T).argmax(dim=-1)

    @torch.no_grad()
    def decode_image_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Images [N, H, W, 3] float32 in 0..1 (the ComfyUI IMAGE convention) from VQ tokens."""
        decoded = self.model.decode_image_tokens(tokens.to(self.device))
        return ((decoded.float().clamp(-1, 1) + 1) / 2).cpu()


def head_logits(head: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The head in its weights' own precision, outside autocast: fp32 master weights give fp32 logits under
    bf16 training (as TRL's cast_lm_head_to_fp32), so sampler and trainer log-probs stay comparable; a bf16
    model is unaffected."""
    dtype = next(head.parameters()).dtype
    with torch.autocast(hidden_states.device.type, enabled=False):
        return head(hidden_states.to(dtype))
