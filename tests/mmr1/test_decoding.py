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


def addresses(state) -> list[int]:
    return [tensor.data_ptr() for pair in state.cache.buffers for tensor in pair] + [
        state.cache.slot.data_ptr(), state.positions.data_ptr()]


def test_compiled_decoding_keeps_one_state_per_shape_and_reuses_it(tiny_model, monkeypatch):
    """CUDA graphs replay at fixed addresses: a run of a shape seen before writes into that shape's cache, slot and
    positions (and samples what eager sampling does, stale slots notwithstanding), even after runs of other shapes;
    past COMPILED_SHAPES_KEPT shapes the least recently used goes."""
    monkeypatch.setattr(decoding, "compiled_decode_step", lambda mode: decoding.decode_step)
    mm = dataclasses.replace(tiny_model, compile_decoding=True)
    settings = SamplingSettings(cfg_scale=3.0, temperature=0)
    decoding.release_compiled_state(mm.language_model)

    def sample(model, prompts):
        conditional, unconditional = guided_prefix(model, prompts)
        return sample_tokens(model, conditional, Modality.image(model), 16, settings, seed=0,
                             unconditional=unconditional).tokens

    def states() -> dict[int, list[int]]:  # rows of each kept shape -> its addresses
        return {state.shape[0]: addresses(state) for state in decoding.compiled_states(mm.language_model)}

    sample(mm, PROMPTS)
    first = states()
    other_prompts = ["a blue dog in the snow", "a small red toy car"]
    assert torch.equal(sample(mm, other_prompts), sample(tiny_model, other_prompts))
    assert states() == first
    sample(mm, [*PROMPTS, "a cat"])  # three rows: a second shape beside the first
    sample(mm, PROMPTS)
    assert states()[4] == first[4] and set(states()) == {4, 6}
    for extra in range(2, 2 + decoding.COMPILED_SHAPES_KEPT):
        sample(mm, [*PROMPTS, *["a cat"] * extra])  # the shape of 4 rows is now the least recently used
    assert 4 not in states() and len(states()) == decoding.COMPILED_SHAPES_KEPT
    decoding.release_compiled_state(mm.language_model)
    assert decoding.compiled_states(mm.language_model) == []


def test_an_xcot_run_twice_reallocates_nothing(tiny_model, monkeypatch):
    """Grounding text and image tokens have shapes of their own: the second X-CoT run finds both states."""
    from mmr1.generation import generate
    from mmr1.xcot import ground
    from tests.conftest import subject_image

    monkeypatch.setattr(decoding, "compiled_decode_step", lambda mode: decoding.decode_step)
    mm = dataclasses.replace(tiny_model, compile_decoding=True)
    decoding.release_compiled_state(mm.language_model)

    def xcot() -> torch.Tensor:
        grounding = ground(mm, [subject_image()], "a dog on the beach", max_new_tokens=6, seed=1)
        return generate(mm, "a dog on the beach", grounding, num_images=2,
                        settings=SamplingSettings(cfg_scale=3.0), seed=3).tokens

    first_tokens = xcot()
    first = [addresses(state) for state in decoding.compiled_states(mm.language_model)]
    assert len(first) == 2
    assert torch.equal(xcot(), first_tokens)
    assert [addresses(state) for state in decoding.compiled_states(mm.language_model)] == first
    decoding.release_compiled_state(mm.language_model)


@pytest.mark.parametrize("compiled, use_cache", [(False, True), (True, True), (False, False)])
def test_a_shared_prefix_is_prefilled_once_and_samples_what_repeated_rows_sample(tiny_model, monkeypatch, compiled,
                                                                               use_cache):
    """Rows that share a prefix (repeats) draw the tokens and log-probs the same prefix repeated row by row
    draws, while the language model's prefill sees one row per distinct prefix and guidance twin."""
    monkeypatch.setattr(decoding, "compiled_decode_step", lambda mode: decoding.decode_step)
    mm = dataclasses.replace(tiny_model, compile_decoding=compiled)
    decoding.release_compiled_state(mm.language_model)
    conditional, unconditional = guided_prefix(mm, PROMPTS)
    settings = SamplingSettings(cfg_scale=3.0, temperature=1.0)
    repeated = [decoding.repeat_rows(prefix, 3) for prefix in (conditional, unconditional)]
    widths = []
    hook = mm.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True)
    try:
        shared = sample_tokens(mm, conditional, Modality.image(mm), 12, settings, seed=4, unconditional=unconditional,
                               return_logprobs=True, repeats=3, use_cache=use_cache)
        prefill_shape = widths[0]
        each = sample_tokens(mm, repeated[0], Modality.image(mm), 12, settings, seed=4, unconditional=repeated[1],
                             return_logprobs=True)
    finally:
        hook.remove()
        decoding.release_compiled_state(mm.language_model)
    # 2 prompts x (conditional, unconditional); the no-cache floor shares nothing
    assert prefill_shape == (4 if use_cache else 12, conditional.embeds.shape[1])
    assert shared.tokens.shape == (6, 12)
    assert torch.equal(shared.tokens, each.tokens)
    assert torch.allclose(shared.logprobs, each.logprobs, atol=1e-5)
