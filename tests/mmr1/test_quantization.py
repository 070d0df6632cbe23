"""Quantized loading (bitsandbytes int8 / nf4 through transformers, on the CPU here) and the attention fallback:
the language model's linear layers shrink, everything that draws pixels stays in full precision, and sampling
stays reproducible."""

from __future__ import annotations

import sys

import pytest
import torch

from mmr1.errors import InputError
from mmr1.generation import generate
from mmr1.loading import load_model
from mmr1.quantization import FULL_PRECISION_MODULES, QUANTIZATIONS, quantized_layers, weight_bytes
from mmr1.sampling import SamplingSettings

transformers_major, transformers_minor = (int(part) for part in __import__("transformers").__version__.split(".")[:2])
pytestmark = pytest.mark.skipif(
    (transformers_major, transformers_minor) < (4, 56),  # the CI's oldest-transformers run; the main run has them
    reason="bitsandbytes on the CPU needs transformers >= 4.56")


@pytest.fixture(scope="module")
def loaded(tiny_hf_dir):
    return {choice: load_model(tiny_hf_dir, dtype="fp32", device="cpu", quantization=choice) for choice in QUANTIZATIONS}


@pytest.mark.parametrize("choice, kind, most", [("int8", "Linear8bitLt", 0.30), ("nf4", "Linear4bit", 0.20)])
def test_the_language_model_is_quantized_and_shrinks(loaded, choice, kind, most):
    full, quantized = loaded["none"], loaded[choice]
    assert {type(layer).__name__ for layer in quantized_layers(quantized.model)} == {kind}
    ratio = sum(map(weight_bytes, quantized_layers(quantized.model))) / sum(map(weight_bytes, quantized_layers(full.model)))
    assert ratio < most  # fp32 -> int8 is a quarter, nf4 an eighth, plus their scales
    for name in FULL_PRECISION_MODULES:  # the VQ, vision tower, aligners and heads keep the loading dtype
        module = quantized.model.get_submodule(name)
        assert {parameter.dtype for parameter in module.parameters()} == {torch.float32}, name
    assert weight_bytes(quantized.model) < weight_bytes(full.model)


@pytest.mark.parametrize("choice", ["int8", "nf4"])
def test_a_quantized_model_generates_the_same_tokens_for_the_same_seed(loaded, choice):
    mm = loaded[choice]
    settings = SamplingSettings(cfg_scale=3.0)
    first, again = (generate(mm, "a red square on the beach", num_images=2, settings=settings, seed=7)
                    for _ in range(2))
    assert torch.equal(first.tokens, again.tokens)
    assert first.images.shape == (2, mm.image_size, mm.image_size, 3) and torch.isfinite(first.images).all()


def test_unknown_quantization_lora_adapters_and_a_missing_backend_are_clear_errors(tiny_hf_dir, monkeypatch, tmp_path):
    with pytest.raises(InputError, match="Unknown quantization 'int3'; choose one of none, int8, nf4"):
        load_model(tiny_hf_dir, device="cpu", quantization="int3")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "config.json").write_text("{}")
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "%s"}' % tiny_hf_dir)
    with pytest.raises(InputError, match="is a LoRA adapter.*quantization int8 applies to full checkpoints"):
        load_model(adapter, device="cpu", quantization="int8")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(InputError, match="quantization nf4 needs the bitsandbytes package: pip install bitsandbytes"):
        load_model(tiny_hf_dir, device="cpu", quantization="nf4")


def test_flash_attention_falls_back_to_sdpa_saying_why(tiny_hf_dir):
    with pytest.warns(UserWarning, match="flash_attention_2 is not available: .*Using sdpa"):
        mm = load_model(tiny_hf_dir, dtype="fp32", device="cpu", attn_implementation="flash_attention_2")
    assert mm.model.config._attn_implementation == "sdpa"
    with pytest.raises(InputError, match="Unknown attention implementation 'flash'"):
        load_model(tiny_hf_dir, device="cpu", attn_implementation="flash")
