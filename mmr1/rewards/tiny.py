"""Tiny random reward checkpoints with the real folder layout, so tests exercise the loaders without a download."""

from __future__ import annotations

import json
import os
import string
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from ..errors import InputError
from .models import REWARD_KINDS


_IMAGE_SIZE = 32
_PATCH_SIZE = 8
_TINY_BLOCK = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}

_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_TEXT_CONTEXT = 16
# Single characters first, so every letter, digit and punctuation mark also exists as a word end ("x</w>").
_TOKENIZER_CORPUS = list(string.ascii_lowercase + string.digits + string.punctuation) + (
    "a photo of the dog cat backpack teapot sneaker toy vase bowl on in with beach grass snow city table red blue "
    "green purple wearing sitting standing floating next to top wooden shiny fluffy cube sphere"
).split()


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _save_random_model(model_class: str, config: Any, out_dir: Path, seed: int, **model_kwargs: Any) -> None:
    with torch.random.fork_rng(devices=[]):  # deterministic weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = getattr(transformers, model_class)(config, **model_kwargs)
    model.save_pretrained(out_dir, safe_serialization=True)


def _build_clip_tokenizer(out_dir: Path, words: list[str], context: int) -> Tokenizer:
    """A CLIP-style byte-level BPE (same normalizer, split and `</w>` word ends) trained offline on a word list."""
    tokenizer = Tokenizer(BPE(unk_token=_EOS, end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=512,
        special_tokens=[_BOS, _EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tokenizer.train_from_iterator(words, trainer)
    tokenizer.post_processor = processors.RobertaProcessing(  # <|startoftext|> ... <|endoftext|>, as CLIP
        (_EOS, tokenizer.token_to_id(_EOS)),
        (_BOS, tokenizer.token_to_id(_BOS)),
        trim_offsets=False,
        add_prefix_space=False,
    )
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "CLIPTokenizer",
            "bos_token": _BOS,
            "eos_token": _EOS,
            "pad_token": _EOS,
            "unk_token": _EOS,
            "model_max_length": context,
        },
    )
    return tokenizer


def _build_dino(out_dir: Path, seed: int) -> None:
    config = transformers.ViTConfig(
        **_TINY_BLOCK, intermediate_size=64, image_size=_IMAGE_SIZE, patch_size=_PATCH_SIZE
    )
    _save_random_model("ViTModel", config, out_dir, seed, add_pooling_layer=False)
    _write_json(
        out_dir / "preprocessor_config.json",
        {
            "image_processor_type": "ViTImageProcessor",
            "do_resize": True,
            "size": {"height": _IMAGE_SIZE, "width": _IMAGE_SIZE},
            "resample": 2,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": _IMAGENET_MEAN,
            "image_std": _IMAGENET_STD,
        },
    )


def _center_crop_preprocessor(
    processor_type: str, mean: list[float], std: list[float], image_size: int = _IMAGE_SIZE
) -> dict:
    """Resize the short side, then centre-crop: the preprocessing of the real DINOv2 and CLIP checkpoints."""
    return {
        "image_processor_type": processor_type,
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean,
        "image_std": std,
        "do_convert_rgb": True,
    }


def _build_dinov2(out_dir: Path, seed: int) -> None:
    config = transformers.Dinov2Config(**_TINY_BLOCK, mlp_ratio=2, image_size=_IMAGE_SIZE, patch_size=_PATCH_SIZE)
    _save_random_model("Dinov2Model", config, out_dir, seed)
    _write_json(out_dir / "preprocessor_config.json", _center_crop_preprocessor("BitImageProcessor", _IMAGENET_MEAN, _IMAGENET_STD))


def build_clip_folder(
    out_dir: Path,
    seed: int,
    words: list[str] = _TOKENIZER_CORPUS,
    image_size: int = _IMAGE_SIZE,
    patch_size: int = _PATCH_SIZE,
    block: dict[str, int] = _TINY_BLOCK,
    intermediate_size: int = 64,
    context: int = _TEXT_CONTEXT,
    projection_dim: int = 16,
) -> None:
    """A random CLIP folder (weights, tokenizer, preprocessor) of the given sizes; training/world/clip_reward.py
    trains one of these on the procedural world, the tests use the tiny defaults."""
    tokenizer = _build_clip_tokenizer(out_dir, words, context)
    config = transformers.CLIPConfig(
        text_config={
            **block,
            "intermediate_size": intermediate_size,
            "vocab_size": tokenizer.get_vocab_size(),
            "max_position_embeddings": context,
            "bos_token_id": tokenizer.token_to_id(_BOS),
            "eos_token_id": tokenizer.token_to_id(_EOS),
            "pad_token_id": tokenizer.token_to_id(_EOS),
        },
        vision_config={**block, "intermediate_size": intermediate_size, "image_size": image_size, "patch_size": patch_size},
        projection_dim=projection_dim,
    )
    _save_random_model("CLIPModel", config, out_dir, seed)
    _write_json(
        out_dir / "preprocessor_config.json",
        _center_crop_preprocessor("CLIPImageProcessor", _CLIP_MEAN, _CLIP_STD, image_size),
    )


def _build_clip(out_dir: Path, seed: int) -> None:
    build_clip_folder(out_dir, seed)


def _build_dreamsim(out_dir: Path, seed: int) -> None:
    """A random DreamSim clip_vitb32 folder (dreamsim's ViT-B/32 backbone and a LoRA adapter, as its release zip
    unpacks). dreamsim's classes fix the ViT-B size, so this one is not tiny: 88 M parameters, stored in fp16."""
    from ..offline import hub_offline

    with hub_offline():  # peft's import may ask the Hub for bitsandbytes kernels
        from dreamsim.config import dreamsim_args
        from dreamsim.feature_extraction.vision_transformer import vit_base
        from dreamsim.model import PerceptualModel
        from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    backbone = vit_base(patch_size=32)
    backbone.pos_drop = torch.nn.LayerNorm(backbone.embed_dim)  # where dreamsim's CLIP backbones keep ln_pre
    state = {**backbone.state_dict(), "proj": torch.randn(backbone.embed_dim, 512) * backbone.embed_dim ** -0.5}
    # fp16 backbone (half the file); the projection stays fp32, as dreamsim keeps it outside the module's tensors
    torch.save({"state_dict": {name: tensor if name == "proj" else tensor.half() for name, tensor in state.items()}},
               out_dir / "clip_vitb32_pretrain.pth.tar")
    model = PerceptualModel(**dreamsim_args["model_config"]["clip_vitb32"], device="cpu", load_dir=str(out_dir),
                            normalize_embeds=True)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none", target_modules=["qkv"],
                      init_lora_weights=False)  # random B as well as A: the adapter changes the scores
    get_peft_model(model, lora).save_pretrained(out_dir / "clip_vitb32_single_lora")


_BUILDERS = {
    "dino": _build_dino,
    "dinov2": _build_dinov2,
    "clip_i": _build_clip,
    "clip_t": _build_clip,
    "pickscore": _build_clip,
    "dreamsim": _build_dreamsim,
}


def make_tiny_reward_checkpoint(out_dir: str | os.PathLike, kind: str, seed: int = 0) -> Path:
    """Write a complete tiny random folder (weights, config, preprocessor, tokenizer) that `load_reward_model` reads.

    clip_i, clip_t and pickscore share one CLIP layout, as their real checkpoints do; dreamsim needs the dreamsim
    package.
    """
    if kind not in _BUILDERS:
        raise InputError(f"Unknown reward kind {kind!r}; expected one of {', '.join(REWARD_KINDS)}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _BUILDERS[kind](out_dir, seed)
    return out_dir
