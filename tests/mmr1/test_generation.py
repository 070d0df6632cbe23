"""Stage 3 end to end on the tiny model: images, conditioning on references, reasoning edits, bad input."""

from __future__ import annotations

import pytest
import torch

from mmr1.errors import InputError
from mmr1.generation import generate, generation_sequence
from mmr1.sampling import SamplingSettings
from mmr1.xcot import ground
from tests.conftest import CONTROL_TOKEN_TEXT, control_token_counts, subject_image


@pytest.fixture(scope="module")
def grounding(tiny_model):
    return ground(tiny_model, [subject_image()], "a photo of it on the beach", max_new_tokens=16, seed=0)


def test_images_are_comfy_images(tiny_model, grounding):
    result = generate(tiny_model, "a photo of it on the beach", grounding, num_images=2, seed=4)
    size = tiny_model.image_size
    assert result.images.shape == (2, size, size, 3)
    assert result.images.dtype == torch.float32
    assert 0.0 <= result.images.min() and result.images.max() <= 1.0
    assert result.images.std() > 0.01  # not blank
    assert result.tokens.shape == (2, tiny_model.num_image_tokens)
    assert result.seeds == [4, 5]
    assert result.reasoning == grounding.reasoning
    assert [image.size for image in result.pil_images()] == [(size, size)] * 2


def test_references_reasoning_and_subject_condition_the_image(tiny_model, grounding):
    prompt = "a photo of it on the beach"
    settings = SamplingSettings(temperature=0.0)  # greedy: differences come from the conditioning alone
    personalized = generate(tiny_model, prompt, grounding, settings=settings).tokens
    plain = generate(tiny_model, prompt, settings=settings).tokens
    edited = generate(tiny_model, prompt, grounding, reasoning="<subject>a blue cube</subject>", settings=settings).tokens
    other = ground(tiny_model, [subject_image(colour=(20, 220, 20))], prompt, max_new_tokens=16, seed=0)
    other_reference = generate(tiny_model, prompt, other, reasoning=grounding.reasoning, settings=settings).tokens
    assert not torch.equal(personalized, plain)
    assert not torch.equal(personalized, edited)
    assert not torch.equal(personalized, other_reference)


def test_edited_grounding_equals_reasoning_override(tiny_model, grounding):
    text = "<think>it is red</think><subject>a red square</subject><scene>on sand</scene>"
    settings = SamplingSettings(temperature=0.0)
    via_override = generate(tiny_model, "on the beach", grounding, reasoning=text, settings=settings)
    via_edit = generate(tiny_model, "on the beach", grounding.with_reasoning(text), settings=settings)
    assert torch.equal(via_override.tokens, via_edit.tokens)
    assert via_edit.reasoning == text


def test_control_token_strings_in_prompt_and_reasoning_ground_and_generate(tiny_model):
    """Grounding and generation run on a prompt and a reasoning holding every control token's string, as text."""
    prompt = f"a photo of it {CONTROL_TOKEN_TEXT} on the beach"
    reasoning = f"<subject>{CONTROL_TOKEN_TEXT}</subject>"
    grounding = ground(tiny_model, [subject_image()], prompt, max_new_tokens=4, seed=0)
    assert grounding.prompt == prompt
    result = generate(tiny_model, prompt, grounding, reasoning=reasoning, seed=1)
    assert result.images.shape == (1, tiny_model.image_size, tiny_model.image_size, 3)
    assert result.reasoning == reasoning
    forged = generation_sequence(tiny_model, prompt, grounding, reasoning)
    plain = generation_sequence(tiny_model, "a photo of it on the beach", grounding, "<subject></subject>")
    assert control_token_counts(tiny_model, forged.input_ids) == control_token_counts(tiny_model, plain.input_ids)


def test_logprobs_are_returned_on_request(tiny_model):
    result = generate(tiny_model, "a dog", num_images=2, seed=1, return_logprobs=True)
    assert result.logprobs.shape == result.tokens.shape
    assert (result.logprobs <= 0).all()
    assert generate(tiny_model, "a dog", seed=1).logprobs is None


@pytest.mark.parametrize("num_images", [0, -2])
def test_num_images_must_be_positive(tiny_model, num_images):
    with pytest.raises(InputError, match="num_images"):
        generate(tiny_model, "a dog", num_images=num_images)


def test_prompt_longer_than_the_context(tiny_model):
    with pytest.raises(InputError, match="context"):
        generate(tiny_model, "dog " * tiny_model.context_length)


def test_batches_of_chains_match_each_chain_alone(tiny_model):
    """ground_batch and generate_chains: row i seeded seed + i, as each subject alone (greedy, so the padding of
    a batch cannot tip a sample)."""
    from mmr1.generation import generate_chains
    from mmr1.xcot import ground_batch

    references = [[subject_image()], [subject_image(colour=(20, 220, 20))]]
    prompts = ["a photo of it on the beach", "a photo of it in the snow"]
    batch = ground_batch(tiny_model, references, prompts, max_new_tokens=12, temperature=0.0, seed=5,
                         subject_source="generate", subject_settings=SamplingSettings(cfg_scale=2.0, temperature=0.0))
    for row, grounding in enumerate(batch):
        alone = ground(tiny_model, references[row], prompts[row], max_new_tokens=12, temperature=0.0, seed=5 + row,
                       subject_source="generate", subject_settings=SamplingSettings(cfg_scale=2.0, temperature=0.0))
        assert grounding.reasoning == alone.reasoning and grounding.settings == alone.settings
        torch.testing.assert_close(grounding.subject_tokens, alone.subject_tokens)
    settings = SamplingSettings(cfg_scale=3.0, temperature=0.0)
    chains = generate_chains(tiny_model, prompts, batch, None, settings, seed=9)
    assert chains.seeds == [9, 10] and chains.images.shape[0] == 2
    for row in range(2):
        alone = generate(tiny_model, prompts[row], batch[row], None, 1, settings, seed=9 + row)
        torch.testing.assert_close(chains.tokens[row : row + 1], alone.tokens)
    with pytest.raises(InputError, match="as many groundings"):
        generate_chains(tiny_model, prompts, batch[:1])
