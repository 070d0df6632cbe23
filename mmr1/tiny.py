"""Tiny random Janus checkpoints, built offline with the real classes.

`make_tiny_checkpoint` writes a complete model folder (config, safetensors or pickle weights, a byte-level BPE
tokenizer with every Janus special token, processor files) in either layout that users meet on disk. Tests load
it through the same path as Janus-Pro-1B/7B, and users can try the CLI and nodes before downloading anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .errors import InputError
from .tokens import BOS, EOS, JANUS_SPECIAL_TOKENS, PAD, PROCESSOR_EXTRA_SPECIAL_TOKENS, janus_tokenizer_class

LAYOUTS = ("hf", "deepseek")

# The text the tiny tokenizer learns its merges from: the chat roles, X-CoT tags and a personalization vocabulary.
TOKENIZER_CORPUS = """
<|User|>: <|Assistant|>: <think> </think> <subject> </subject> <scene> </scene>
The images show one subject. Describe what defines it: class, colours, shape, marks. Then plan the scene.
a photo of a dog cat toy sneaker backpack teapot vase clock candle robot plushie boot sunglasses bowl car
red orange yellow green blue purple pink brown black white grey golden silver striped dotted plain shiny
on the beach in the snow in the jungle on a table in a city street at night under the sky with a wreath
small large round square tall short soft furry wooden metal plastic glossy matte left right center top bottom
"""


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny Janus: small enough for CPU tests, with every component of the real architecture."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_positions: int = 1024
    tokenizer_vocab_size: int = 384
    vocab_size: int = 0  # the language model's embedding rows; 0: the tokenizer's size rounded up to 64
    vision_hidden_size: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_mlp_ratio: float = 2.0
    image_size: int = 32
    patch_size: int = 4
    vq_codebook_size: int = 256
    vq_embed_dim: int = 8
    vq_base_channels: int = 32  # GroupNorm(32) in the VQ needs multiples of 32
    vq_channel_multiplier: tuple[int, ...] = (1, 2, 2)
    vq_latent_channels: int = 32
    vq_res_blocks: int = 1
    initializer_range: float = 0.1  # wider than the real 0.02, so conditioning visibly moves the tiny model


# The real architectures' sizes (see the model cards; 16x VQ, SigLIP-L/16 at 384 px, 576 image tokens): random
# folders of these shapes measure speed, memory and load time without downloading the weights.
SHAPES = {
    "tiny": TinySpec(),
    "janus-pro-1b": TinySpec(
        hidden_size=2048, intermediate_size=5632, num_layers=24, num_heads=16, max_positions=16384,
        vocab_size=102400, vision_hidden_size=1024, vision_layers=24, vision_heads=16, vision_mlp_ratio=4.0,
        image_size=384, patch_size=16, vq_codebook_size=16384, vq_embed_dim=8, vq_base_channels=128,
        vq_channel_multiplier=(1, 1, 2, 2, 4), vq_latent_channels=256, vq_res_blocks=2, initializer_range=0.02,
    ),
}
SHAPES["janus-pro-7b"] = replace(
    SHAPES["janus-pro-1b"], hidden_size=4096, intermediate_size=11008, num_layers=30, num_heads=32
)


def build_tokenizer(vocab_size: int, corpus: str = TOKENIZER_CORPUS):
    """A byte-level BPE tokenizer (like DeepSeek's) wrapped so that JanusProcessor accepts it; its merges are learnt
    from `corpus`, so the words of that text become single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(JANUS_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus.split("\n"), trainer=trainer)
    return janus_tokenizer_class()(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=dict(PROCESSOR_EXTRA_SPECIAL_TOKENS),
        model_max_length=None,
    )


def build_vision_config(spec: TinySpec):
    """The understanding encoder (SigLIP-style ViT) of the tiny sizes."""
    from transformers.models.janus.configuration_janus import JanusVisionConfig

    return JanusVisionConfig(
        hidden_size=spec.vision_hidden_size,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        mlp_ratio=spec.vision_mlp_ratio,
        projection_dim=spec.hidden_size,
        num_image_tokens=(spec.image_size // spec.patch_size) ** 2,
        initializer_range=spec.initializer_range,
    )


def build_vq_config(spec: TinySpec):
    """The VQ tokenizer of the tiny sizes."""
    from transformers.models.janus.configuration_janus import JanusVQVAEConfig

    if (spec.image_size // spec.patch_size) * 2 ** (len(spec.vq_channel_multiplier) - 1) != spec.image_size:
        raise InputError("The VQ downsampling must map image_size onto the vision patch grid (transformers' "
                         "JanusConfig sets the generated token grid to image_size / patch_size).")
    return JanusVQVAEConfig(
        embed_dim=spec.vq_embed_dim,
        num_embeddings=spec.vq_codebook_size,
        base_channels=spec.vq_base_channels,
        channel_multiplier=list(spec.vq_channel_multiplier),
        latent_channels=spec.vq_latent_channels,
        num_res_blocks=spec.vq_res_blocks,
        num_patches=spec.image_size // spec.patch_size,
        projection_dim=spec.hidden_size,
        image_token_embed_dim=spec.hidden_size,
        initializer_range=spec.initializer_range,
    )


def build_janus_config(spec: TinySpec, tokenizer):
    """JanusConfig of the tiny sizes; embeddings untied, as in Janus-Pro."""
    from transformers import JanusConfig, LlamaConfig

    vocab_size = max(spec.vocab_size, -(-len(tokenizer) // 64) * 64)
    text_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=spec.initializer_range,
    )
    return JanusConfig(
        text_config=text_config.to_dict(),
        vision_config=build_vision_config(spec).to_dict(),
        vq_config=build_vq_config(spec).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(PROCESSOR_EXTRA_SPECIAL_TOKENS["image_token"]),
        tie_word_embeddings=False,
    )


def build_processor(tokenizer, image_size: int, num_image_tokens: int):
    """JanusProcessor over the PIL image backend (transformers 5) or the classic one (4.x); no torchvision."""
    import transformers

    image_processor_class = getattr(transformers, "JanusImageProcessorPil", None) or transformers.JanusImageProcessor
    image_processor = image_processor_class(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return transformers.JanusProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=num_image_tokens
    )


def build_random_model(
    spec: TinySpec = TinySpec(),
    seed: int = 0,
    corpus: str = TOKENIZER_CORPUS,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """A random JanusForConditionalGeneration of `spec`'s sizes with its processor, in memory; built directly on
    `device` in `dtype`, so a 7B-shaped model never passes through fp32 host memory."""
    from transformers import JanusForConditionalGeneration

    tokenizer = build_tokenizer(spec.tokenizer_vocab_size, corpus)
    config = build_janus_config(spec, tokenizer)
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = JanusForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    processor = build_processor(tokenizer, spec.image_size, config.vision_config.num_image_tokens)
    return model, processor


def make_tiny_checkpoint(
    out_dir: str | os.PathLike,
    layout: str = "hf",
    seed: int = 0,
    spec: TinySpec = TinySpec(),
    corpus: str = TOKENIZER_CORPUS,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random Janus checkpoint of `spec`'s sizes (tiny by default, or one of `SHAPES`) in `layout`
    ("hf": transformers, "deepseek": original) to `out_dir`, with weights in `dtype`; the tokenizer learns its
    merges from `corpus` (the chat template plus a personalization vocabulary)."""
    if layout not in LAYOUTS:
        raise InputError(f"Unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = build_random_model(spec, seed, corpus, dtype=dtype)
    if layout == "hf":
        model.save_pretrained(out, safe_serialization=True)
        processor.save_pretrained(out)
    else:
        _save_deepseek_layout(out, model, processor.tokenizer, spec.image_size, model.config.vision_config.num_image_tokens)
    return out


def _save_deepseek_layout(out: Path, model, tokenizer, image_size: int, num_image_tokens: int) -> None:
    """The files of deepseek-ai/Janus-Pro-*: multi_modality config, pickled weights, VLChatProcessor configs."""
    from .deepseek_layout import deepseek_config_from_janus, deepseek_state_dict_from_hf

    (out / "config.json").write_text(json.dumps(deepseek_config_from_janus(model.config), indent=2))
    state_dict = deepseek_state_dict_from_hf(model.state_dict())
    torch.save({key: tensor.contiguous() for key, tensor in state_dict.items()}, out / "pytorch_model.bin")
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizerFast",
                "bos_token": BOS,
                "eos_token": EOS,
                "pad_token": None,
                "model_max_length": 16384,
            },
            indent=2,
        )
    )
    special = [token for token in JANUS_SPECIAL_TOKENS if token not in (BOS, EOS, PAD)]
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "additional_special_tokens": special}, indent=2)
    )
    (out / "processor_config.json").write_text(
        json.dumps(
            {
                "add_special_token": False,
                "ignore_id": -100,
                "image_tag": PROCESSOR_EXTRA_SPECIAL_TOKENS["image_token"],
                "mask_prompt": True,
                "num_image_tokens": num_image_tokens,
                "processor_class": "VLChatProcessor",
                "sft_format": "deepseek",
            },
            indent=2,
        )
    )
    (out / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "background_color": [127, 127, 127],
                "do_normalize": True,
                "image_mean": [0.5, 0.5, 0.5],
                "image_processor_type": "VLMImageProcessor",
                "image_size": image_size,
                "image_std": [0.5, 0.5, 0.5],
                "min_size": 14,
                "processor_class": "VLChatProcessor",
                "rescale_factor": 0.00392156862745098,
            },
            indent=2,
        )
    )
