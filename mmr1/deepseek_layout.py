"""Janus-Pro checkpoints in DeepSeek's original layout, converted in memory onto transformers' Janus classes.

deepseek-ai/Janus-Pro-1B and -7B ship a config.json with `model_type "multi_modality"` whose sub-configs are
`{cls, params}` pairs read by deepseek-ai/Janus (janus/models/modeling_vlm.py), and weights named after that
code's modules. transformers' `JanusForConditionalGeneration` holds the same tensors under other names (two of
them reshaped), so instead of shipping DeepSeek's code we translate the config and the state dict.

Where the original code builds a part from a preset name instead of from config values, the preset applies:
- `vision_config`: `CLIPVisionTower` builds `create_siglip_vit(model_name)` (janus/models/siglip_vit.py);
  `image_size` and `select_layer` come from `params`, with CLIPVisionTower's defaults 336 and -2.
- `gen_vision_config`: `VQ-16` builds `VQModel(ModelArgs(...))` (janus/models/vq_model.py) with no arguments
  from the config at all; `params` only sizes `gen_embed`.

mmr1 extension, so that tiny test checkpoints can be written in this layout: these `params` keys override the
preset (the original code ignores them; real checkpoints do not have them):
- `vision_config.params`: `width`, `layers`, `heads`, `patch_size`, `mlp_ratio` (SigLIPVisionCfg fields).
- `gen_vision_config.params`: `codebook_size`, `codebook_embed_dim`, `z_channels`, `encoder_ch_mult`,
  `decoder_ch_mult` (ModelArgs fields), `ch`, `num_res_blocks` (Encoder/Decoder arguments).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

from .errors import ModelFolderError

# siglip_vit.SigLIP_MODEL_CONFIG, the one preset Janus uses (its image_size entry is never read there).
_SIGLIP_PRESETS: dict[str, dict[str, Any]] = {
    "siglip_large_patch16_384": {"width": 1024, "layers": 24, "heads": 16, "patch_size": 16, "mlp_ratio": 4},
}
# vq_model.VQ_models: ModelArgs defaults with VQ-16's multipliers, and the Encoder/Decoder defaults VQModel keeps.
_VQ_PRESETS: dict[str, dict[str, Any]] = {
    "VQ-16": {
        "codebook_size": 16384,
        "codebook_embed_dim": 8,
        "z_channels": 256,
        "encoder_ch_mult": [1, 1, 2, 2, 4],
        "decoder_ch_mult": [1, 1, 2, 2, 4],
        "ch": 128,
        "num_res_blocks": 2,
    },
}
_SUB_CONFIGS = (
    "vision_config",
    "aligner_config",
    "gen_vision_config",
    "gen_aligner_config",
    "gen_head_config",
    "language_config",
)

# One row per module: (original name, transformers name). `{i}` is an index, `{coder}` is encoder or decoder.
# A name ending in "." covers every key under it, any other name is a whole key. Rows match from the start of
# the key, so `vision_model` never matches `gen_vision_model`, nor `aligner` `gen_aligner`; the first matching
# row wins, so specific rows precede general ones. The same table, read right to left, gives the inverse.
_KEY_MAP: tuple[tuple[str, str], ...] = (
    # SigLIP understanding encoder: CLIPVisionTower.vision_tower is a timm-style VisionTransformer.
    (
        "vision_model.vision_tower.blocks.{i}.attn.proj.",
        "model.vision_model.encoder.layers.{i}.self_attn.projection_layer.",
    ),
    # attn.qkv, which the converters split into / join from q_proj, k_proj, v_proj.
    ("vision_model.vision_tower.blocks.{i}.attn.", "model.vision_model.encoder.layers.{i}.self_attn."),
    ("vision_model.vision_tower.blocks.{i}.norm1.", "model.vision_model.encoder.layers.{i}.layer_norm1."),
    ("vision_model.vision_tower.blocks.{i}.norm2.", "model.vision_model.encoder.layers.{i}.layer_norm2."),
    ("vision_model.vision_tower.blocks.{i}.mlp.", "model.vision_model.encoder.layers.{i}.mlp."),
    ("vision_model.vision_tower.patch_embed.proj.", "model.vision_model.embeddings.patch_embedding."),
    ("vision_model.vision_tower.pos_embed", "model.vision_model.embeddings.position_embedding.weight"),
    ("vision_model.vision_tower.norm.", "model.vision_model.post_layernorm."),
    # MlpProjector "mlp_gelu": layers = Linear, GELU, Linear.
    ("aligner.layers.0.", "model.aligner.fc1."),
    ("aligner.layers.2.", "model.aligner.hidden_layers.0."),
    # VQ-16 image tokenizer.
    ("gen_vision_model.encoder.conv_blocks.{i}.res.", "model.vqmodel.encoder.down.{i}.block."),
    ("gen_vision_model.encoder.conv_blocks.{i}.", "model.vqmodel.encoder.down.{i}."),  # attn, downsample
    ("gen_vision_model.decoder.conv_blocks.{i}.res.", "model.vqmodel.decoder.up.{i}.block."),
    ("gen_vision_model.decoder.conv_blocks.{i}.", "model.vqmodel.decoder.up.{i}."),  # attn, upsample
    ("gen_vision_model.{coder}.mid.0.", "model.vqmodel.{coder}.mid.block_1."),
    ("gen_vision_model.{coder}.mid.1.", "model.vqmodel.{coder}.mid.attn_1."),
    ("gen_vision_model.{coder}.mid.2.", "model.vqmodel.{coder}.mid.block_2."),
    ("gen_vision_model.", "model.vqmodel."),
    # Generation path: code embedding, its aligner, and the head that predicts codes.
    ("gen_embed.", "model.generation_embeddings."),
    ("gen_aligner.layers.0.", "model.generation_aligner.fc1."),
    ("gen_aligner.layers.2.", "model.generation_aligner.hidden_layers.0."),
    ("gen_head.output_mlp_projector.", "model.generation_head.proj_out."),
    ("gen_head.vision_head.", "model.generation_head.vision_head."),
    # LlamaForCausalLM.
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
)
# Original weights that transformers' model has no place for: the SigLIP pooling head (never run by Janus) and
# the VQ's training-time usage counter.
_DROPPED = (
    re.compile(r"^vision_model\.vision_tower\.attn_pool\."),
    re.compile(r"^gen_vision_model\.quantize\.codebook_used$"),
)
_PLACEHOLDERS = {"i": r"\d+", "coder": r"encoder|decoder"}
_HF_POS_EMBED = "model.vision_model.embeddings.position_embedding.weight"
_HF_VISION_QKV = re.compile(r"^(model\.vision_model\.encoder\.layers\.\d+\.self_attn\.)([qkv])_proj\.(\w+)$")


def _name_regex(name: str) -> re.Pattern[str]:
    """A `_KEY_MAP` name as a regex anchored at the key's start, placeholders as named groups."""
    parts = re.split(r"\{(\w+)\}", name)  # odd positions hold placeholder names
    body = "".join(
        f"(?P<{part}>{_PLACEHOLDERS[part]})" if k % 2 else re.escape(part) for k, part in enumerate(parts)
    )
    return re.compile(body if name.endswith(".") else body + "$")


_TO_HF = tuple((_name_regex(original), hf) for original, hf in _KEY_MAP)
_TO_ORIGINAL = tuple((_name_regex(hf), original) for original, hf in _KEY_MAP)


def _rename(key: str, rules: tuple[tuple[re.Pattern[str], str], ...]) -> str | None:
    """`key` renamed by the first rule that matches it, or None when none does."""
    for pattern, target in rules:
        match = pattern.match(key)
        if match:
            return target.format(**match.groupdict()) + key[match.end() :]
    return None


def _refuse_unknown(unknown: list[str], layout: str) -> None:
    """Fail on weights we cannot place rather than load a model with holes or silently drop them."""
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ModelFolderError(
            f"{len(unknown)} weights are not part of a Janus-Pro model in the {layout} layout: {shown}."
        )


def convert_deepseek_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original DeepSeek weight names -> `JanusForConditionalGeneration` names.

    SigLIP's fused qkv is split into q/k/v (its rows are ordered q, k, v), `pos_embed` loses its batch axis, and
    the two unused tensors (`attn_pool.*`, `quantize.codebook_used`) are dropped; any other key we cannot place
    raises ModelFolderError.
    """
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        if any(pattern.match(key) for pattern in _DROPPED):
            continue
        new_key = _rename(key, _TO_HF)
        if new_key is None:
            unknown.append(key)
        elif ".self_attn.qkv." in new_key:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                converted[new_key.replace(".qkv.", f".{name}.")] = part
        elif new_key == _HF_POS_EMBED:
            converted[new_key] = tensor.squeeze(0)
        else:
            converted[new_key] = tensor
    _refuse_unknown(unknown, "original DeepSeek")
    return converted


def deepseek_state_dict_from_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`JanusForConditionalGeneration` weight names -> original DeepSeek names: the exact inverse of
    `convert_deepseek_state_dict` (without the dropped tensors), used to write tiny test checkpoints."""
    original: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        qkv = _HF_VISION_QKV.match(key)
        if qkv:
            prefix, which, param = qkv.groups()
            if which != "q":
                continue  # joined with q below
            tensor = torch.cat([state_dict[f"{prefix}{name}_proj.{param}"] for name in "qkv"], dim=0)
            key = f"{prefix}qkv.{param}"
        elif key == _HF_POS_EMBED:
            tensor = tensor.unsqueeze(0)
        old_key = _rename(key, _TO_ORIGINAL)
        if old_key is None:
            unknown.append(key)
        else:
            original[old_key] = tensor
    _refuse_unknown(unknown, "transformers")
    return original


def is_deepseek_config(config: Mapping[str, Any]) -> bool:
    """Whether a config.json is in DeepSeek's original layout. DeepSeek-VL shares it; janus_config_from_deepseek
    tells Janus apart and says what is wrong otherwise."""
    return config.get("model_type") == "multi_modality" or "MultiModalityCausalLM" in (
        config.get("architectures") or ()
    )


def _params(config: Mapping[str, Any], name: str, classes: tuple[str, ...]) -> Mapping[str, Any]:
    """The `params` of sub-config `name`, once its `cls` is known to be one we can convert."""
    sub = config[name]
    if sub.get("cls") not in classes:
        raise ModelFolderError(
            f"config.json: {name}.cls is {sub.get('cls')!r}; only {', '.join(classes)} can be loaded."
        )
    return sub.get("params") or {}


def _param(params: Mapping[str, Any], name: str, key: str) -> Any:
    """A required `params` entry, missing ones named in the error."""
    if key not in params:
        raise ModelFolderError(f"config.json: {name}.params has no {key!r}.")
    return params[key]


def _same(what: str, sources: Mapping[str, Any]) -> Any:
    """The value several original fields must share, because transformers' config stores it once."""
    values = list(sources.values())
    if any(value != values[0] for value in values[1:]):
        listed = ", ".join(f"{field}={value!r}" for field, value in sources.items())
        raise ModelFolderError(f"config.json: the {what} must agree, got {listed}.")
    return values[0]


def _mlp_projector(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """An aligner's params; only the "mlp_gelu" MlpProjector (Linear, GELU, Linear...) exists in transformers."""
    params = _params(config, name, ("MlpProjector",))
    if params.get("projector_type") != "mlp_gelu":
        raise ModelFolderError(
            f"config.json: {name}.params.projector_type is {params.get('projector_type')!r}; only 'mlp_gelu' "
            "can be loaded."
        )
    return params


def _vision_config(config: Mapping[str, Any]) -> JanusVisionConfig:
    """SigLIP tower as CLIPVisionTower builds it, with the understanding aligner's sizes."""
    params = _params(config, "vision_config", ("CLIPVisionTower",))
    model_name = params.get("model_name", "siglip_large_patch16_384")
    if model_name not in _SIGLIP_PRESETS:
        raise ModelFolderError(
            f"config.json: vision_config.params.model_name {model_name!r} is not a SigLIP preset Janus uses "
            f"({', '.join(_SIGLIP_PRESETS)})."
        )
    if "pixel_mean" in params or "pixel_std" in params:
        raise ModelFolderError(
            "config.json: vision_config.params has pixel_mean/pixel_std, which make the original model normalise "
            "pixels itself; transformers' Janus leaves that to the image processor, so this is not supported."
        )
    tower = {**_SIGLIP_PRESETS[model_name], **{k: params[k] for k in _SIGLIP_PRESETS[model_name] if k in params}}
    aligner = _mlp_projector(config, "aligner_config")
    _same(
        "SigLIP width and aligner input",
        {
            "SigLIP width": tower["width"],
            "aligner_config.params.input_dim": _param(aligner, "aligner_config", "input_dim"),
        },
    )
    image_size = params.get("image_size", 336)  # CLIPVisionTower's default, as is select_layer's -2
    return JanusVisionConfig(
        hidden_size=tower["width"],
        num_hidden_layers=_selected_layers(tower["layers"], params.get("select_layer", -2)),
        num_attention_heads=tower["heads"],
        patch_size=tower["patch_size"],
        mlp_ratio=tower["mlp_ratio"],
        image_size=image_size,
        num_image_tokens=(image_size // tower["patch_size"]) ** 2,
        projection_dim=_param(aligner, "aligner_config", "n_embed"),
        depth=aligner.get("depth", 1),  # MlpProjector's default
    )


def _selected_layers(layers: int, select_layer: int) -> int:
    """Blocks create_siglip_vit keeps: it cuts the tower after the selected layer."""
    return min(layers, layers + select_layer + 1) if select_layer <= 0 else min(layers, select_layer)


def _vq_config(config: Mapping[str, Any]) -> JanusVQVAEConfig:
    """VQ tokenizer from its preset, with the generation aligner's and head's sizes."""
    cls = config["gen_vision_config"].get("cls")
    if cls not in _VQ_PRESETS:
        raise ModelFolderError(
            f"config.json: gen_vision_config.cls {cls!r} is not a VQ preset Janus uses ({', '.join(_VQ_PRESETS)})."
        )
    params = config["gen_vision_config"].get("params") or {}
    vq = {**_VQ_PRESETS[cls], **{k: params[k] for k in _VQ_PRESETS[cls] if k in params}}
    gen_aligner = _mlp_projector(config, "gen_aligner_config")
    gen_head = _params(config, "gen_head_config", ("vision_head",))
    return JanusVQVAEConfig(
        num_embeddings=_same(
            "codebook sizes",
            {
                "VQ codebook_size": vq["codebook_size"],
                "gen_vision_config.params.image_token_size": _param(params, "gen_vision_config", "image_token_size"),
                "gen_head_config.params.image_token_size": _param(gen_head, "gen_head_config", "image_token_size"),
            },
        ),
        embed_dim=_same(
            "code widths",
            {
                "VQ codebook_embed_dim": vq["codebook_embed_dim"],
                "gen_vision_config.params.n_embed": _param(params, "gen_vision_config", "n_embed"),
                "gen_aligner_config.params.input_dim": _param(gen_aligner, "gen_aligner_config", "input_dim"),
            },
        ),
        channel_multiplier=list(
            _same("VQ channel multipliers", {key: vq[key] for key in ("encoder_ch_mult", "decoder_ch_mult")})
        ),
        latent_channels=vq["z_channels"],
        base_channels=vq["ch"],
        num_res_blocks=vq["num_res_blocks"],
        # transformers sizes the generation aligner's output and the head's hidden layer with one value.
        projection_dim=_same(
            "generation aligner and head widths",
            {
                "gen_aligner_config.params.n_embed": _param(gen_aligner, "gen_aligner_config", "n_embed"),
                "gen_head_config.params.image_token_embed": _param(gen_head, "gen_head_config", "image_token_embed"),
            },
        ),
        num_hidden_layers=gen_aligner.get("depth", 1),  # MlpProjector's default
        image_token_embed_dim=_param(gen_head, "gen_head_config", "n_embed"),
    )


def janus_config_from_deepseek(
    config: Mapping[str, Any], *, pad_token_id: int, bos_token_id: int, eos_token_id: int, image_token_id: int
) -> JanusConfig:
    """The `JanusConfig` for an original-layout config.json; token ids come from the tokenizer, which the
    original config does not record. Raises ModelFolderError for anything that is not Janus-Pro's architecture."""
    missing = [name for name in _SUB_CONFIGS if not isinstance(config.get(name), Mapping)]
    if missing:
        raise ModelFolderError(
            f"config.json has no {', '.join(missing)}: not a Janus checkpoint in DeepSeek's original layout "
            "(DeepSeek-VL uses the same model_type without the image generation parts)."
        )
    # As MultiModalityCausalLM does: LlamaConfig(**language_config), missing keys taking LlamaConfig's defaults.
    # Janus keeps lm_head apart from embed_tokens, so nothing is tied.
    text_config = LlamaConfig(
        **{
            **config["language_config"],
            "pad_token_id": pad_token_id,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "tie_word_embeddings": False,
        }
    )
    return JanusConfig(
        text_config=text_config,
        vision_config=_vision_config(config),
        vq_config=_vq_config(config),
        image_token_id=image_token_id,
        tie_word_embeddings=False,
    )


def _overrides(values: Mapping[str, Any], preset: Mapping[str, Any]) -> dict[str, Any]:
    """The mmr1 override keys needed to describe `values` on top of `preset`."""
    return {key: value for key, value in values.items() if value != preset[key]}


def deepseek_config_from_janus(config: JanusConfig) -> dict[str, Any]:
    """Original-layout config.json contents for a `JanusConfig` that `janus_config_from_deepseek` can produce:
    its inverse, used to write tiny test checkpoints. Sizes that differ from the presets go in as mmr1 overrides."""
    vision, vq, text = config.vision_config, config.vq_config, config.text_config
    tower = {
        "width": vision.hidden_size,
        "layers": vision.num_hidden_layers,
        "heads": vision.num_attention_heads,
        "patch_size": vision.patch_size,
        "mlp_ratio": vision.mlp_ratio,
    }
    tokenizer = {
        "codebook_size": vq.num_embeddings,
        "codebook_embed_dim": vq.embed_dim,
        "z_channels": vq.latent_channels,
        "encoder_ch_mult": list(vq.channel_multiplier),
        "decoder_ch_mult": list(vq.channel_multiplier),
        "ch": vq.base_channels,
        "num_res_blocks": vq.num_res_blocks,
    }
    return {
        "architectures": ["MultiModalityCausalLM"],
        "model_type": "multi_modality",
        "vision_config": {
            "cls": "CLIPVisionTower",
            "model_type": "vision",
            "params": {
                "model_name": "siglip_large_patch16_384",
                "image_size": vision.image_size,
                "select_feature": "same",
                "select_layer": -1,
                **_overrides(tower, _SIGLIP_PRESETS["siglip_large_patch16_384"]),
            },
        },
        "aligner_config": {
            "cls": "MlpProjector",
            "model_type": "aligner",
            "params": {
                "projector_type": "mlp_gelu",
                "depth": vision.depth,
                "input_dim": vision.hidden_size,
                "n_embed": vision.projection_dim,
            },
        },
        "gen_vision_config": {
            "cls": "VQ-16",
            "model_type": "gen_vision",
            "params": {
                "image_token_size": vq.num_embeddings,
                "n_embed": vq.embed_dim,
                **_overrides(tokenizer, _VQ_PRESETS["VQ-16"]),
            },
        },
        "gen_aligner_config": {
            "cls": "MlpProjector",
            "model_type": "gen_aligner",
            "params": {
                "projector_type": "mlp_gelu",
                "depth": vq.num_hidden_layers,
                "input_dim": vq.embed_dim,
                "n_embed": vq.projection_dim,
            },
        },
        "gen_head_config": {
            "cls": "vision_head",
            "model_type": "gen_head",
            "params": {
                "n_embed": vq.image_token_embed_dim,
                "image_token_embed": vq.projection_dim,
                "image_token_size": vq.num_embeddings,
            },
        },
        "language_config": {
            "model_type": "llama",
            "vocab_size": text.vocab_size,
            "hidden_size": text.hidden_size,
            "intermediate_size": text.intermediate_size,
            "num_hidden_layers": text.num_hidden_layers,
            "num_attention_heads": text.num_attention_heads,
            "num_key_value_heads": text.num_key_value_heads,
            "max_position_embeddings": text.max_position_embeddings,
            "rms_norm_eps": text.rms_norm_eps,
            "rope_theta": _rope_theta(text),
            "hidden_act": text.hidden_act,
        },
    }


def _rope_theta(text_config) -> float:
    """transformers 5 keeps rope_theta in rope_parameters; 4.x as an attribute."""
    parameters = getattr(text_config, "rope_parameters", None) or {}
    return parameters.get("rope_theta", getattr(text_config, "rope_theta", 10000.0))
