"""The three ways of running decode steps give the same logits: the preallocated cache, the fixed-shape steps of
compiled decoding (eager and through torch.compile) and the no-cache floor."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mmr1 import decoding
from mmr1.decoding import CachedDecoding, CompiledDecoding, UncachedDecoding, decoding_for
from mmr1.generation import generation_sequence
from mmr1.prompting import batch_prefix, embed_sequence
from mmr1.sampling import Modality, SamplingSettings, guided_rows, sample_tokens


def guided_prefix(mm, prompts: list[str]):
    """Rows of prompts of different lengths (left-padded), with their unconditional twins."""
    sequences = [generation_sequence(mm, prompt) for prompt in prompts]
    conditional = batch_prefix(mm, [embed_sequence(mm, sequence) for sequence in sequences])
    unconditional = batch_prefix(mm, [embed_sequence(mm, sequence, unconditional=True) for sequence in sequences])
    return conditional, unconditional


PROMPTS = ["a red square on the beach", "a dog"]


def step_through(decoder, mm, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [steps, rows, V] feeding the same tokens to every decoder."""
    logits = [decoder.prefill()]
    for column in tokens.T[:-1]:
        logits.append(decoder.step(mm.embed_image_tokens(column).unsqueeze(1)))
    return torch.stack(logits)


def test_fixed_shape_steps_equal_the_preallocated_cache_and_the_no_cache_floor(tiny_model, monkeypatch):
    mm = tiny_model
    rows = guided_rows(*guided_prefix(mm, PROMPTS))
    tokens = torch.randint(0, mm.model.config.vq_config.num_embeddings, (rows.embeds.shape[0], 10),
                           generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(decoding, "compiled_decode_step", lambda mode: decoding.decode_step)  # eager steps
    with torch.no_grad():
        cached = step_through(CachedDecoding(mm, rows, 10, mm.image_logits), mm, tokens)
        fixed_decoder = CompiledDecoding(mm, rows, 10, mm.image_logits)
        fixed = step_through(fixed_decoder, mm, tokens)
        uncached = step_through(UncachedDecoding(mm, rows, 10, mm.image_logits), mm, tokens)
    assert torch.allclose(fixed, cached, atol=1e-5)
    assert torch.allclose(uncached, cached, atol=1e-5)
    # One shape for every step: full-capacity buffers, rounded up so that similar prompts share a graph.
    assert fixed_decoder.capacity % decoding.COMPILED_CAPACITY_MULTIPLE == 0
    assert all(keys.shape[-2] == fixed_decoder.capacity for keys, _ in fixed_decoder.cache.buffers)
    assert int(fixed_decoder.cache.slot) == rows.embeds.shape[1] + 9


def test_decoding_for_follows_the_model_option(tiny_model):
    rows = guided_rows(*guided_prefix(tiny_model, PROMPTS))
    compiled = dataclasses.replace(tiny_model, compile_decoding=True)
    assert type(decoding_for(tiny_model, rows, 4, tiny_model.image_logits)) is CachedDecoding
    assert type(decoding_for(compiled, rows, 4, tiny_model.image_logits)) is CompiledDecoding
    assert type(decoding_for(compiled, rows, 4, tiny_model.image_logits, use_cache=False)) is UncachedDecoding


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_torch_compile_samples_what_eager_samples(tiny_model, temperature):
    """Compiled by inductor here (CUDA graphs need a GPU): the same tokens, log-probs equal to float error."""
    conditional, unconditional = guided_prefix(tiny_model, PROMPTS)
    settings = SamplingSettings(cfg_scale=3.0, temperature=temperature)

    def sample(mm):
        return sample_tokens(mm, conditional, Modality.image(mm), 24, settings, seed=5, unconditional=unconditional,
                             return_logprobs=True)

    eager = sample(tiny_model)
    compiled = sample(dataclasses.replace(tiny_model, compile_decoding=True))
    assert torch.equal(compiled.tokens, eager.tokens)
    assert torch.allclose(compiled.logprobs, eager.logprobs, atol=1e-4)


def test_compiled_decoding_reuses_its_buffers_for_runs_of_one_shape(tiny_model, monkeypatch):
    """CUDA graphs replay at fixed addresses: a second run of the same shape writes into the first run's cache,
    slot and positions (and samples what eager sampling does, stale slots notwithstanding)."""
    monkeypatch.setattr(decoding, "compiled_decode_step", lambda mode: decoding.decode_step)
    mm = dataclasses.replace(tiny_model, compile_decoding=True)
    settings = SamplingSettings(cfg_scale=3.0, temperature=0)
    decoding.release_compiled_state(mm.language_model)

    def sample(model, prompts):
        conditional, unconditional = guided_prefix(model, prompts)
        return sample_tokens(model, conditional, Modality.image(model), 16, settings, seed=0,
                             unconditional=unconditional).tokens

    def addresses() -> list[int]:
        state = decoding.compiled_state(mm.language_model)
        return [tensor.data_ptr() for pair in state.cache.buffers for tensor in pair] + [
            state.cache.slot.data_ptr(), state.positions.data_ptr()]

    sample(mm, PROMPTS)
    first = addresses()
    other_prompts = ["a blue dog in the snow", "a small red toy car"]
    assert torch.equal(sample(mm, other_prompts), sample(tiny_model, other_prompts))
    assert addresses() == first
    sample(mm, [*PROMPTS, "a cat"])  # three rows: another shape replaces the state
    assert decoding.compiled_state(mm.language_model).shape[0] == 6
    decoding.release_compiled_state(mm.language_model)
    assert decoding.compiled_state(mm.language_model) is None
