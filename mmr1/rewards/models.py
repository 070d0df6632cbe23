"""Reward and metric models (DINO, DINOv2, CLIP-I, CLIP-T, PickScore; DreamSim in dreamsim.py) loaded from local
folders.

The definitions follow DreamBooth / DreamBench: subject fidelity is the cosine similarity between the embedding of a
generated image and the embeddings of the real reference images, averaged over the references; text alignment is the
cosine similarity between CLIP's text and image embeddings. PickScore is a CLIP checkpoint scored like its reference
code, `logit_scale.exp() * cosine(text, image)`.

transformers is imported lazily (class lookups at load time) so that importing this module stays cheap and never pulls
in torchvision, which transformers imports with its image utilities whenever it is installed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors import SafetensorError

from ..embedded import resolve as resolve_embedded
from ..errors import InputError, ModelFolderError
from ..images import to_rgb
from ..loading import read_json


REWARD_KINDS = ("dino", "dinov2", "clip_i", "clip_t", "pickscore", "dreamsim")

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
_PICKSCORE_PROCESSOR_HINT = (
    "PickScore's reference code takes its processor and tokenizer from laion/CLIP-ViT-H-14-laion2B-s32B-b79K; "
    "copy preprocessor_config.json and the tokenizer files from there into the PickScore folder."
)


def feature_tensor(output: torch.Tensor | Any) -> torch.Tensor:
    """CLIP's get_*_features return a tensor in transformers 4.x and a ModelOutput with `pooler_output` in 5.x."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _cls_token(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """DINO / DINOv2 embedding: the CLS token of the last hidden state."""
    return model(pixel_values=pixel_values).last_hidden_state[:, 0]


def _clip_image_features(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """CLIP image embedding: the projected pooled vision output."""
    return feature_tensor(model.get_image_features(pixel_values=pixel_values))


@dataclass(frozen=True)
class _KindSpec:
    """What a reward kind expects in its folder, which transformers classes read it, and how it embeds images."""

    model_type: str
    model_class: str
    image_processor_class: str  # the classic name; its PIL-backend variant is preferred where transformers has one
    image_features: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    uses_text: bool
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # Position embeddings for one image size only (ViT, CLIP); DINOv2 interpolates them, and its checkpoints pair
    # image_size 518 with 224-pixel crops.
    fixed_image_size: bool = True


_KIND_SPECS = {
    # DINO checkpoints ship without a trained pooler; the score only uses the CLS token.
    "dino": _KindSpec("vit", "ViTModel", "ViTImageProcessor", _cls_token, False, {"add_pooling_layer": False}),
    "dinov2": _KindSpec("dinov2", "Dinov2Model", "BitImageProcessor", _cls_token, False, fixed_image_size=False),
    "clip_i": _KindSpec("clip", "CLIPModel", "CLIPImageProcessor", _clip_image_features, False),
    "clip_t": _KindSpec("clip", "CLIPModel", "CLIPImageProcessor", _clip_image_features, True),
    "pickscore": _KindSpec("clip", "CLIPModel", "CLIPImageProcessor", _clip_image_features, True),
}


def _as_rgb(images: Sequence[Image.Image], what: str) -> list[Image.Image]:
    """Reward models read 8-bit RGB; other modes (alpha, palette, 16-bit, float) go through mmr1's shared rules."""
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise InputError(f"{what}[{index}] is a {type(image).__name__}, expected a PIL image.")
    return [to_rgb(image, f"{what}[{index}]") for index, image in enumerate(images)]


def _batches(items: Sequence[Any], batch_size: int) -> list[Sequence[Any]]:
    return [items[start : start + batch_size] for start in range(0, len(items), batch_size)]


class RewardModel:
    """A frozen scoring model: one float per generated image, higher is better.

    Subclasses define what the images are compared with (`_score`); this class validates inputs, converts images and
    encodes them in batches so every reward shares the same input rules.
    """

    needs_references: bool = False
    needs_prompt: bool = False

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        image_processor: Any,
        image_features: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.name = name
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.image_processor = image_processor
        self.image_features = image_features

    @property
    def device(self) -> torch.device:
        """Where the weights are now: a host such as ComfyUI may move the model between devices."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device}, dtype={self.dtype})"

    def score(
        self,
        images: list[Image.Image],
        references: list[Image.Image] | None = None,
        prompts: list[str] | str | None = None,
        batch_size: int = 16,
    ) -> torch.Tensor:
        """Score each image; returns float32 [len(images)] on CPU. Arguments the reward does not use are ignored."""
        if not images:
            raise InputError(f"The {self.name} reward got no images to score.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}.")
        images = _as_rgb(images, "images")
        with torch.inference_mode():
            scores = self._score(images, references, prompts, batch_size)
        return scores.float().cpu()

    def _score(
        self,
        images: list[Image.Image],
        references: list[Image.Image] | None,
        prompts: list[str] | str | None,
        batch_size: int,
    ) -> torch.Tensor:
        raise NotImplementedError

    def _encode_images(self, images: list[Image.Image], batch_size: int) -> torch.Tensor:
        """Unit-norm float32 embeddings [len(images), dim], computed `batch_size` images at a time."""
        embeddings = []
        for batch in _batches(images, batch_size):
            pixel_values = self.image_processor(images=list(batch), return_tensors="pt")["pixel_values"]
            features = self.image_features(self.model, pixel_values.to(device=self.device, dtype=self.dtype))
            embeddings.append(F.normalize(features.float(), dim=-1))
        return torch.cat(embeddings)


class ImageSimilarityReward(RewardModel):
    """Subject fidelity (DINO, DINOv2, CLIP-I): mean cosine similarity to the reference images."""

    needs_references = True

    def _score(
        self,
        images: list[Image.Image],
        references: list[Image.Image] | None,
        prompts: list[str] | str | None,
        batch_size: int,
    ) -> torch.Tensor:
        return self._similarities(images, references, batch_size).mean(dim=1)

    def similarities(self, images: list[Image.Image], references: list[Image.Image] | None,
                     batch_size: int = 16) -> torch.Tensor:
        """Cosine similarity [len(images), len(references)] of every image to every reference, on CPU (the score
        is its row mean; DreamBench's copy-paste measure needs the single closest reference)."""
        with torch.inference_mode():
            return self._similarities(_as_rgb(images, "images"), references, batch_size).float().cpu()

    def _similarities(self, images: list[Image.Image], references: list[Image.Image] | None,
                      batch_size: int) -> torch.Tensor:
        """`similarities` of RGB images, on the model's device."""
        if not references:
            raise InputError(f"The {self.name} reward compares with reference images, but none were given.")
        reference_embeddings = self._encode_images(_as_rgb(references, "references"), batch_size)  # once
        return self._encode_images(images, batch_size) @ reference_embeddings.T


class TextAlignmentReward(RewardModel):
    """Text alignment (CLIP-T, PickScore): cosine similarity of CLIP text and image embeddings.

    PickScore multiplies by the learned temperature `logit_scale.exp()`, as its reference code does.
    """

    needs_prompt = True

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        image_processor: Any,
        tokenizer: Any,
        device: torch.device,
        dtype: torch.dtype,
        use_logit_scale: bool,
    ) -> None:
        super().__init__(name, model, image_processor, _clip_image_features, device, dtype)
        self.tokenizer = tokenizer
        self.use_logit_scale = use_logit_scale

    def _score(
        self,
        images: list[Image.Image],
        references: list[Image.Image] | None,
        prompts: list[str] | str | None,
        batch_size: int,
    ) -> torch.Tensor:
        prompts = self._prompt_per_image(prompts, len(images))
        unique_prompts = list(dict.fromkeys(prompts))  # a GRPO group shares one prompt: encode it once
        position = {prompt: index for index, prompt in enumerate(unique_prompts)}
        text_embeddings = self._encode_texts(unique_prompts, batch_size)[[position[prompt] for prompt in prompts]]
        scores = (self._encode_images(images, batch_size) * text_embeddings).sum(dim=-1)
        if self.use_logit_scale:
            scores = self.model.logit_scale.float().exp() * scores
        return scores

    def _prompt_per_image(self, prompts: list[str] | str | None, count: int) -> list[str]:
        if prompts is None:
            raise InputError(f"The {self.name} reward compares with the prompt, but none was given.")
        if isinstance(prompts, str):
            return [prompts] * count
        if len(prompts) != count or not all(isinstance(prompt, str) for prompt in prompts):
            raise InputError(
                f"The {self.name} reward needs one prompt string or one per image ({count}), got {len(prompts)} items."
            )
        return list(prompts)

    def _encode_texts(self, prompts: list[str], batch_size: int) -> torch.Tensor:
        """Unit-norm float32 text embeddings; prompts longer than CLIP's context are truncated."""
        max_length = self.model.config.text_config.max_position_embeddings
        embeddings = []
        for batch in _batches(prompts, batch_size):
            tokens = self.tokenizer(
                list(batch), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            ).to(self.device)
            features = feature_tensor(
                self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            )
            embeddings.append(F.normalize(features.float(), dim=-1))
        return torch.cat(embeddings)


def _image_processor_class(name: str) -> type:
    """The PIL-backend class where transformers has one (5.x defaults to torchvision), else the classic class.

    In transformers 4.x the classic class is the PIL/numpy one, so neither path needs torchvision.
    """
    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def _read_config(folder: Path) -> dict[str, Any]:
    if not folder.exists():
        raise ModelFolderError(f"Reward model folder {folder} does not exist.")
    if not folder.is_dir():
        raise ModelFolderError(f"{folder} is a file, not a reward model folder.")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelFolderError(f"Reward model folder {folder} has no config.json.")
    return read_json(config_file)


def _missing_files(folder: Path, spec: _KindSpec) -> list[str]:
    missing = []
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        missing.append(f"model weights ({' or '.join(_WEIGHT_FILES)})")
    if not (folder / _IMAGE_PROCESSOR_FILE).is_file():
        missing.append(_IMAGE_PROCESSOR_FILE)
    has_fast_tokenizer = (folder / "tokenizer.json").is_file()
    has_bpe_files = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if spec.uses_text and not (has_fast_tokenizer or has_bpe_files):
        missing.append("tokenizer (tokenizer.json, or vocab.json and merges.txt)")
    return missing


def _processed_size(image_processor: Any) -> tuple[int, int] | None:
    """(height, width) of the pixels the processor hands the model, when fixed (a crop, or a resize to both)."""
    if getattr(image_processor, "do_center_crop", False) and getattr(image_processor, "crop_size", None):
        size = image_processor.crop_size
    else:
        size = image_processor.size
    height, width = size.get("height"), size.get("width")
    return (height, width) if height and width else None


def _check_processor_fits(folder: Path, spec: _KindSpec, image_processor: Any, config: Any) -> None:
    """Refuse a preprocessor made for another resolution than the model's, which would fail at scoring time."""
    if not spec.fixed_image_size:
        return
    expected = getattr(config, "vision_config", config).image_size
    found = _processed_size(image_processor)
    if found is not None and found != (expected, expected):
        raise ModelFolderError(
            f"{folder / _IMAGE_PROCESSOR_FILE} gives the model {found[0]}x{found[1]} images, but config.json's "
            f"vision model takes {expected}x{expected}; the preprocessor belongs to another model."
        )


def load_reward_model(
    kind: str,
    folder: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> RewardModel:
    """Load a reward of `kind` from a local folder, checking it is that architecture before reading weights.

    Only local files are read, remote code is never trusted, and weights come through transformers' safe loaders
    (a `.bin` only as plain tensors); weights that do not fit the architecture (a tensor missing, which would be
    random) or that hold NaN or inf are refused.
    """
    from ..loading import check_finite, check_load_report, pickle_error, refused_pickle, resolve_device

    if kind not in REWARD_KINDS:
        raise InputError(f"Unknown reward kind {kind!r}; expected one of {', '.join(REWARD_KINDS)}.")
    device = resolve_device(device)  # the check the Janus loader makes: `score --device cuda` without CUDA
    folder = resolve_embedded(folder)
    if kind == "dreamsim":  # the dreamsim package's own classes, not a transformers folder
        from .dreamsim import load_dreamsim

        return load_dreamsim(folder, device, dtype)
    spec = _KIND_SPECS[kind]
    model_type = _read_config(folder).get("model_type")
    if model_type != spec.model_type:
        raise ModelFolderError(
            f"Reward model folder {folder} holds a model of type {model_type!r}, "
            f"but the {kind} reward expects model_type {spec.model_type!r} in config.json."
        )
    missing = _missing_files(folder, spec)
    if missing:
        hint = f" {_PICKSCORE_PROCESSOR_HINT}" if kind == "pickscore" else ""
        raise ModelFolderError(
            f"Reward model folder {folder} is incomplete for {kind}; missing: {', '.join(missing)}.{hint}"
        )

    model_class = getattr(transformers, spec.model_class)
    try:
        image_processor = _image_processor_class(spec.image_processor_class).from_pretrained(
            folder, local_files_only=True
        )
        config = model_class.config_class.from_pretrained(folder, local_files_only=True)
        _check_processor_fits(folder, spec, image_processor, config)
        model, report = model_class.from_pretrained(
            folder, config=config, local_files_only=True, output_loading_info=True, **spec.model_kwargs
        )
        tokenizer = (
            transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
            if spec.uses_text
            else None
        )
    except (UnpicklingError, OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
        refused = refused_pickle(error)
        if refused is not None:
            raise pickle_error(sorted(folder.glob("pytorch_model*.bin")), refused, "model.safetensors") from error
        raise ModelFolderError(f"Cannot load the {kind} reward model from {folder}: {error}") from error
    check_load_report(folder, report)

    if spec.uses_text:
        reward = TextAlignmentReward(
            kind, model, image_processor, tokenizer, device, dtype, use_logit_scale=kind == "pickscore"
        )
    else:
        reward = ImageSimilarityReward(kind, model, image_processor, spec.image_features, device, dtype)
    # In the reward's dtype and on its device: a weight beyond fp16's range turns inf only there.
    check_finite(folder, [*reward.model.named_parameters(), *reward.model.named_buffers()], dtype)
    return reward
