"""The random-checkpoint builder's real-architecture shapes: what the benchmarks measure must be Janus-Pro's."""

from __future__ import annotations

import pytest

from mmr1.tiny import SHAPES, build_janus_config, build_tokenizer


@pytest.mark.parametrize(("shape", "hidden", "layers", "ffn"), [("janus-pro-1b", 2048, 24, 5632),
                                                                 ("janus-pro-7b", 4096, 30, 11008)])
def test_real_shapes_give_janus_pro_configs(shape, hidden, layers, ffn):
    spec = SHAPES[shape]
    config = build_janus_config(spec, build_tokenizer(spec.tokenizer_vocab_size))
    text, vision, vq = config.text_config, config.vision_config, config.vq_config
    assert (text.hidden_size, text.num_hidden_layers, text.intermediate_size, text.vocab_size) == (hidden, layers, ffn, 102400)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.hidden_size * vision.mlp_ratio) == (1024, 24, 4096)
    assert vision.num_image_tokens == vq.num_patches**2 == 576
    assert (vq.num_embeddings, vq.embed_dim, vq.base_channels, vq.num_res_blocks) == (16384, 8, 128, 2)
    assert vq.projection_dim == vq.image_token_embed_dim == hidden
