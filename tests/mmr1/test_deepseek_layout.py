"""DeepSeek-layout conversion: real configs give Janus-Pro's shapes, and a tiny model survives the round trip
original layout -> transformers with identical outputs."""

import copy
import json

import pytest
import torch
from transformers import JanusConfig, JanusForConditionalGeneration

from mmr1.deepseek_layout import (
    _rope_theta,
    convert_deepseek_state_dict,
    deepseek_config_from_janus,
    deepseek_state_dict_from_hf,
    is_deepseek_config,
    janus_config_from_deepseek,
)
from mmr1.errors import ModelFolderError
from mmr1.tiny import TinySpec, build_janus_config, build_tokenizer

# config.json of deepseek-ai/Janus-Pro-7B and -1B. The files themselves are not in the searchable sources, so
# these are reconstructed: the 7B vision params as llama.cpp's Janus converter copies them from the 7B
# config.json, the aligner / gen_* values as a Janus-Pro-7B config test elsewhere reads them, the 1B widths and
# language_config from the Janus-Pro shapes (2048 hidden, 5632 FFN, 24 layers, 16 heads). The 7B language_config
# lists only a few keys; LlamaConfig's defaults supply 4096 hidden, 11008 FFN and 32 heads.
JANUS_PRO_7B = {
    "aligner_config": {
        "cls": "MlpProjector",
        "model_type": "aligner",
        "params": {"depth": 2, "input_dim": 1024, "n_embed": 4096, "projector_type": "mlp_gelu"},
    },
    "architectures": ["MultiModalityCausalLM"],
    "gen_aligner_config": {
        "cls": "MlpProjector",
        "model_type": "gen_aligner",
        "params": {"depth": 2, "input_dim": 8, "n_embed": 4096, "projector_type": "mlp_gelu"},
    },
    "gen_head_config": {
        "cls": "vision_head",
        "model_type": "gen_head",
        "params": {"image_token_embed": 4096, "image_token_size": 16384, "n_embed": 4096},
    },
    "gen_vision_config": {
        "cls": "VQ-16",
        "model_type": "gen_vision",
        "params": {"image_token_size": 16384, "n_embed": 8},
    },
    "language_config": {
        "max_position_embeddings": 16384,
        "model_type": "llama",
        "num_hidden_layers": 30,
        "torch_dtype": "bfloat16",
        "vocab_size": 102400,
    },
    "model_type": "multi_modality",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "vision_config": {
        "cls": "CLIPVisionTower",
        "model_type": "vision",
        "params": {
            "image_size": 384,
            "model_name": "siglip_large_patch16_384",
            "select_feature": "same",
            "select_layer": -1,
        },
    },
}
JANUS_PRO_1B = copy.deepcopy(JANUS_PRO_7B)
JANUS_PRO_1B["aligner_config"]["params"]["n_embed"] = 2048
JANUS_PRO_1B["gen_aligner_config"]["params"]["n_embed"] = 2048
JANUS_PRO_1B["gen_head_config"]["params"].update(image_token_embed=2048, n_embed=2048)
JANUS_PRO_1B["language_config"] = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "max_position_embeddings": 16384,
    "model_type": "llama",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "num_key_value_heads": 16,
    "torch_dtype": "bfloat16",
    "vocab_size": 102400,
}

IDS_1B = {"pad_token_id": 100002, "bos_token_id": 100000, "eos_token_id": 100001, "image_token_id": 100581}
IDS_7B = {"pad_token_id": 100015, "bos_token_id": 100000, "eos_token_id": 100001, "image_token_id": 100594}
TINY_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "image_token_id": 299}


@pytest.mark.parametrize(
    ("original", "ids", "hidden", "ffn", "layers", "heads", "billions"),
    [(JANUS_PRO_1B, IDS_1B, 2048, 5632, 24, 16, 2.08), (JANUS_PRO_7B, IDS_7B, 4096, 11008, 30, 32, 7.41)],
)
def test_real_configs_convert_to_janus_pro_shapes(original, ids, hidden, ffn, layers, heads, billions):
    assert is_deepseek_config(original)
    config = janus_config_from_deepseek(original, **ids)
    text, vision, vq = config.text_config, config.vision_config, config.vq_config

    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (hidden, ffn, layers)
    assert (text.num_attention_heads, text.num_key_value_heads) == (heads, heads)
    assert (text.vocab_size, text.max_position_embeddings) == (102400, 16384)
    assert (text.rms_norm_eps, _rope_theta(text), text.hidden_act) == (1e-6, 10000.0, "silu")
    assert (text.pad_token_id, text.bos_token_id, text.eos_token_id) == (
        ids["pad_token_id"],
        ids["bos_token_id"],
        ids["eos_token_id"],
    )
    assert config.image_token_id == ids["image_token_id"]
    assert config.tie_word_embeddings is False and text.tie_word_embeddings is False

    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1024, 24, 16)
    assert (vision.image_size, vision.patch_size, vision.mlp_ratio, vision.num_image_tokens) == (384, 16, 4, 576)
    assert (vision.projection_dim, vision.depth, vision.hidden_act, vision.layer_norm_eps) == (hidden, 2, "gelu", 1e-6)

    assert (vq.embed_dim, vq.num_embeddings, vq.latent_channels, vq.base_channels) == (8, 16384, 256, 128)
    assert (list(vq.channel_multiplier), vq.num_res_blocks, vq.num_patches) == ([1, 1, 2, 2, 4], 2, 24)
    assert (vq.projection_dim, vq.image_token_embed_dim, vq.num_hidden_layers) == (hidden, hidden, 2)

    with torch.device("meta"):
        model = JanusForConditionalGeneration(config)
    # notes/janus.md gives 2.09 B / 7.42 B for the original model, which also holds the unused SigLIP attn_pool
    # (12.6 M parameters) that the conversion drops.
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == billions
    assert model.lm_head.weight is not model.model.language_model.embed_tokens.weight


def tiny_janus_config() -> JanusConfig:
    """The project's tiny Janus (mmr1.tiny), with the ids of TINY_IDS."""
    spec = TinySpec()
    config = build_janus_config(spec, build_tokenizer(spec.tokenizer_vocab_size))
    config.image_token_id = TINY_IDS["image_token_id"]
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(config.text_config, name, TINY_IDS[name])
    return config


@pytest.fixture(scope="module")
def tiny_model() -> JanusForConditionalGeneration:
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(tiny_janus_config()).eval()
    with torch.no_grad():  # init leaves biases at zero and norms at one, which would hide a q/k/v mix-up
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


@pytest.fixture(scope="module")
def tiny_original(tiny_model) -> tuple[dict, dict[str, torch.Tensor]]:
    """The tiny model written in DeepSeek's layout: config.json contents (through JSON) and state dict."""
    config = json.loads(json.dumps(deepseek_config_from_janus(tiny_model.config)))
    return config, deepseek_state_dict_from_hf(tiny_model.state_dict())


def test_tiny_model_round_trips_with_identical_outputs(tiny_model, tiny_original):
    original_config, original_state = tiny_original
    config = janus_config_from_deepseek(original_config, **TINY_IDS)
    reloaded = JanusForConditionalGeneration(config).eval()
    reloaded.load_state_dict(convert_deepseek_state_dict(original_state), strict=True)

    image_tokens = config.vision_config.num_image_tokens
    input_ids = torch.tensor([[1, 5, 6] + [TINY_IDS["image_token_id"]] * image_tokens + [7, 8]])
    pixel_values = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    codes = torch.randint(0, 64, (1, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = [m(input_ids=input_ids, pixel_values=pixel_values).logits for m in (tiny_model, reloaded)]
        image_logits = [
            m.model.generation_head(m.model(input_ids=input_ids).last_hidden_state) for m in (tiny_model, reloaded)
        ]
        code_embeds = [m.prepare_embeddings_for_image_generation(codes) for m in (tiny_model, reloaded)]
        decoded = [m.decode_image_tokens(codes) for m in (tiny_model, reloaded)]
        encoded = [m.model.vqmodel.encoder(pixel_values) for m in (tiny_model, reloaded)]
    for ours, theirs in (logits, image_logits, code_embeds, decoded, encoded):
        assert torch.equal(ours, theirs)
    assert decoded[0].shape == (1, 32, 32, 3)


def test_tiny_state_dict_round_trip_is_exact(tiny_model, tiny_original):
    _, original_state = tiny_original
    assert original_state["vision_model.vision_tower.pos_embed"].shape == (1, 64, 32)
    assert original_state["vision_model.vision_tower.blocks.0.attn.qkv.weight"].shape == (96, 32)
    converted = convert_deepseek_state_dict(original_state)
    expected = tiny_model.state_dict()
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[key], expected[key]) for key in expected)


def test_tiny_checkpoint_uses_the_original_module_names(tiny_original):
    original_config, original_state = tiny_original
    # Names of the modules in deepseek-ai/Janus: MultiModalityCausalLM (modeling_vlm.py) holds CLIPVisionTower
    # .vision_tower = VisionTransformer with Block(norm1, attn.qkv/proj, norm2, mlp.fc1/fc2) (siglip_vit.py),
    # MlpProjector.layers (projector.py), VQModel with Encoder/Decoder.conv_blocks[i].res/attn/downsample/upsample
    # and mid[0..2] (vq_model.py), VisionHead, gen_embed and LlamaForCausalLM.
    for key in [
        "vision_model.vision_tower.pos_embed",
        "vision_model.vision_tower.patch_embed.proj.weight",
        "vision_model.vision_tower.blocks.0.norm1.weight",
        "vision_model.vision_tower.blocks.0.attn.qkv.weight",
        "vision_model.vision_tower.blocks.0.attn.qkv.bias",
        "vision_model.vision_tower.blocks.1.attn.proj.weight",
        "vision_model.vision_tower.blocks.1.mlp.fc2.bias",
        "vision_model.vision_tower.norm.weight",
        "aligner.layers.0.weight",
        "aligner.layers.2.bias",
        "gen_vision_model.encoder.conv_in.weight",
        "gen_vision_model.encoder.conv_blocks.0.res.0.norm1.weight",
        "gen_vision_model.encoder.conv_blocks.1.res.0.nin_shortcut.weight",
        "gen_vision_model.encoder.conv_blocks.0.downsample.conv.weight",
        "gen_vision_model.encoder.conv_blocks.2.attn.0.proj_out.weight",
        "gen_vision_model.encoder.mid.0.conv1.weight",
        "gen_vision_model.encoder.mid.1.q.weight",
        "gen_vision_model.decoder.mid.2.norm2.bias",
        "gen_vision_model.decoder.conv_blocks.0.res.1.conv2.weight",
        "gen_vision_model.decoder.conv_blocks.0.upsample.conv.weight",
        "gen_vision_model.quantize.embedding.weight",
        "gen_vision_model.quant_conv.weight",
        "gen_vision_model.post_quant_conv.bias",
        "gen_embed.weight",
        "gen_aligner.layers.0.weight",
        "gen_aligner.layers.2.weight",
        "gen_head.output_mlp_projector.weight",
        "gen_head.vision_head.weight",
        "language_model.model.embed_tokens.weight",
        "language_model.model.layers.0.self_attn.q_proj.weight",
        "language_model.model.norm.weight",
        "language_model.lm_head.weight",
    ]:
        assert key in original_state, key
    roots = ("vision_model.vision_tower.", "aligner.", "gen_vision_model.", "gen_embed.", "gen_aligner.", "gen_head.")
    assert all(key.startswith(roots + ("language_model.",)) for key in original_state)
    assert not [key for key in original_state if key.startswith("vision_model.") and "_proj." in key]
    # The decoder's first conv_blocks entry is its lowest resolution, the only one with attention.
    assert "gen_vision_model.decoder.conv_blocks.0.attn.0.q.weight" in original_state
    assert "gen_vision_model.decoder.conv_blocks.2.upsample.conv.weight" not in original_state

    assert is_deepseek_config(original_config)
    assert original_config["vision_config"]["params"] == {
        "model_name": "siglip_large_patch16_384",
        "image_size": 32,
        "select_feature": "same",
        "select_layer": -1,
        "width": 32,
        "layers": 2,
        "heads": 2,
        "patch_size": 4,
        "mlp_ratio": 2.0,
    }
    assert original_config["gen_vision_config"]["params"] == {
        "image_token_size": 256,
        "n_embed": 8,
        "codebook_size": 256,
        "z_channels": 32,
        "encoder_ch_mult": [1, 2, 2],
        "decoder_ch_mult": [1, 2, 2],
        "ch": 32,
        "num_res_blocks": 1,
    }


@pytest.mark.parametrize(
    ("original", "converted"),
    [
        # The renames of notes/janus.md, which agree with transformers' convert_janus_weights_to_hf.py. The round
        # trip above cannot catch a mistake made the same way in both directions; these can.
        (
            "vision_model.vision_tower.blocks.3.attn.proj.weight",
            "model.vision_model.encoder.layers.3.self_attn.projection_layer.weight",
        ),
        ("vision_model.vision_tower.blocks.3.norm1.bias", "model.vision_model.encoder.layers.3.layer_norm1.bias"),
        ("vision_model.vision_tower.blocks.3.norm2.weight", "model.vision_model.encoder.layers.3.layer_norm2.weight"),
        ("vision_model.vision_tower.blocks.3.mlp.fc1.weight", "model.vision_model.encoder.layers.3.mlp.fc1.weight"),
        ("vision_model.vision_tower.patch_embed.proj.bias", "model.vision_model.embeddings.patch_embedding.bias"),
        ("vision_model.vision_tower.norm.weight", "model.vision_model.post_layernorm.weight"),
        ("aligner.layers.0.weight", "model.aligner.fc1.weight"),
        ("aligner.layers.2.bias", "model.aligner.hidden_layers.0.bias"),
        (
            "gen_vision_model.encoder.conv_blocks.4.res.1.nin_shortcut.bias",
            "model.vqmodel.encoder.down.4.block.1.nin_shortcut.bias",
        ),
        ("gen_vision_model.encoder.conv_blocks.4.attn.1.k.weight", "model.vqmodel.encoder.down.4.attn.1.k.weight"),
        (
            "gen_vision_model.encoder.conv_blocks.0.downsample.conv.weight",
            "model.vqmodel.encoder.down.0.downsample.conv.weight",
        ),
        (
            "gen_vision_model.decoder.conv_blocks.1.upsample.conv.weight",
            "model.vqmodel.decoder.up.1.upsample.conv.weight",
        ),
        ("gen_vision_model.decoder.conv_blocks.0.res.2.conv1.bias", "model.vqmodel.decoder.up.0.block.2.conv1.bias"),
        ("gen_vision_model.encoder.mid.0.norm1.weight", "model.vqmodel.encoder.mid.block_1.norm1.weight"),
        ("gen_vision_model.decoder.mid.1.proj_out.weight", "model.vqmodel.decoder.mid.attn_1.proj_out.weight"),
        ("gen_vision_model.decoder.mid.2.conv2.bias", "model.vqmodel.decoder.mid.block_2.conv2.bias"),
        ("gen_vision_model.decoder.norm_out.weight", "model.vqmodel.decoder.norm_out.weight"),
        ("gen_vision_model.quantize.embedding.weight", "model.vqmodel.quantize.embedding.weight"),
        ("gen_vision_model.post_quant_conv.weight", "model.vqmodel.post_quant_conv.weight"),
        ("gen_embed.weight", "model.generation_embeddings.weight"),
        ("gen_aligner.layers.0.bias", "model.generation_aligner.fc1.bias"),
        ("gen_aligner.layers.2.weight", "model.generation_aligner.hidden_layers.0.weight"),
        ("gen_head.output_mlp_projector.weight", "model.generation_head.proj_out.weight"),
        ("gen_head.vision_head.bias", "model.generation_head.vision_head.bias"),
        (
            "language_model.model.layers.5.self_attn.k_proj.weight",
            "model.language_model.layers.5.self_attn.k_proj.weight",
        ),
        ("language_model.model.embed_tokens.weight", "model.language_model.embed_tokens.weight"),
        ("language_model.lm_head.weight", "lm_head.weight"),
    ],
)
def test_key_map_renames(original, converted):
    assert list(convert_deepseek_state_dict({original: torch.zeros(1)})) == [converted]


def test_qkv_rows_split_in_q_k_v_order_and_pos_embed_loses_its_batch_axis():
    qkv = torch.arange(6.0).repeat_interleave(2).view(6, 2)
    converted = convert_deepseek_state_dict(
        {
            "vision_model.vision_tower.blocks.7.attn.qkv.weight": qkv,
            "vision_model.vision_tower.pos_embed": torch.zeros(1, 576, 1024),
        }
    )
    prefix = "model.vision_model.encoder.layers.7.self_attn."
    assert torch.equal(converted[prefix + "q_proj.weight"], qkv[0:2])
    assert torch.equal(converted[prefix + "k_proj.weight"], qkv[2:4])
    assert torch.equal(converted[prefix + "v_proj.weight"], qkv[4:6])
    assert converted["model.vision_model.embeddings.position_embedding.weight"].shape == (576, 1024)


def test_documented_drops_are_dropped(tiny_model, tiny_original):
    _, original_state = tiny_original
    extended = {
        **original_state,
        "vision_model.vision_tower.attn_pool.latent": torch.zeros(1, 1, 32),
        "vision_model.vision_tower.attn_pool.kv.weight": torch.zeros(64, 32),
        "gen_vision_model.quantize.codebook_used": torch.zeros(65536),
    }
    assert convert_deepseek_state_dict(extended).keys() == tiny_model.state_dict().keys()


def test_unknown_weights_are_refused_by_name(tiny_original):
    _, original_state = tiny_original
    strays = {
        "vision_model.vision_tower.cls_token": torch.zeros(1, 1, 32),
        "gen_vision_model_extra.weight": torch.zeros(1),
        "aligner.layers.4.weight": torch.zeros(1),
    }
    with pytest.raises(ModelFolderError, match=r"3 weights .*cls_token.*gen_vision_model_extra.*aligner\.layers\.4"):
        convert_deepseek_state_dict({**original_state, **strays})


def test_select_layer_cuts_the_tower_as_create_siglip_vit_does():
    original = copy.deepcopy(JANUS_PRO_1B)
    del original["vision_config"]["params"]["select_layer"]  # CLIPVisionTower's default is -2
    assert janus_config_from_deepseek(original, **IDS_1B).vision_config.num_hidden_layers == 23
    original["vision_config"]["params"]["select_layer"] = 12
    assert janus_config_from_deepseek(original, **IDS_1B).vision_config.num_hidden_layers == 12


def test_transformers_layout_is_not_deepseek(tiny_model):
    assert not is_deepseek_config(tiny_model.config.to_dict())


def broken(path: str, value) -> dict:
    """JANUS_PRO_1B with the entry at dotted `path` set to `value` (or removed when value is None)."""
    original = copy.deepcopy(JANUS_PRO_1B)
    *parents, last = path.split(".")
    node = original
    for name in parents:
        node = node[name]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return original


@pytest.mark.parametrize(
    ("original", "message"),
    [
        (broken("vision_config.params.model_name", "siglip_so400m_patch14_384"), "not a SigLIP preset"),
        (broken("vision_config.cls", "SamVisionTower"), "vision_config.cls"),
        (broken("gen_vision_config.cls", "VQ-8"), "not a VQ preset"),
        (broken("aligner_config.params.projector_type", "linear"), "projector_type"),
        (broken("gen_head_config.cls", "MlpProjector"), "gen_head_config.cls"),
        (broken("gen_head_config", None), "no gen_head_config"),
        (broken("gen_head_config.params.n_embed", None), "has no 'n_embed'"),
        (broken("gen_head_config.params.image_token_size", 8192), "codebook sizes must agree"),
        (broken("gen_head_config.params.image_token_embed", 1024), "generation aligner and head widths"),
        (broken("aligner_config.params.input_dim", 1152), "SigLIP width and aligner input"),
    ],
)
def test_unsupported_configs_are_refused(original, message):
    with pytest.raises(ModelFolderError, match=message):
        janus_config_from_deepseek(original, **IDS_1B)
