"""X-CoT grounding and subject extraction (mmr1.xcot), and the VQ encoding of subjects (encode_image_tokens)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmr1.errors import InputError
from mmr1.images import letterbox, pil_to_tensor
from mmr1.xcot import (
    SUBJECT_SOURCES,
    Grounding,
    ParsedReasoning,
    extract_subject,
    format_reasoning,
    ground,
    parse_reasoning,
    prepare_references,
)
from tests.conftest import subject_image

PROMPT = "a photo of it on the beach"
TOKENS = 12  # reasoning length in these tests: enough to differ between seeds, cheap on CPU


# ------------------------------------------------------------------------------------------- reasoning text


def test_parse_well_formed_reasoning():
    text = (
        "<think> It is a red square.\nOn blue. </think><subject>a red square toy</subject>"
        "<scene>the toy on the beach</scene>"
    )
    parsed = parse_reasoning(text)
    assert parsed == ParsedReasoning(
        think="It is a red square.\nOn blue.", subject="a red square toy", scene="the toy on the beach", format_ok=True
    )


def test_parse_reasoning_tolerates_text_between_tags():
    parsed = parse_reasoning("Sure!\n<think>a</think>\n<subject>b</subject>\n<scene>c</scene>\nDone.")
    assert (parsed.think, parsed.subject, parsed.scene, parsed.format_ok) == ("a", "b", "c", True)


def test_parse_reasoning_without_tags_uses_raw_text():
    parsed = parse_reasoning("  a red toy on a sunny beach \n")
    assert parsed.format_ok is False
    assert parsed.think == parsed.subject == parsed.scene == "a red toy on a sunny beach"


def test_parse_reasoning_with_partial_tags():
    text = "<think>hmm</think><subject>a red dog"
    parsed = parse_reasoning(text)
    assert parsed.format_ok is False
    assert parsed.think == "hmm"
    assert parsed.subject == "a red dog"  # an unclosed tag runs to the end of the text
    assert parsed.scene == text  # missing: the raw text stands in


def test_parse_reasoning_missing_closing_tag_is_not_format_ok():
    parsed = parse_reasoning("<think>a</think><subject>b</subject><scene>c")
    assert parsed.scene == "c" and parsed.subject == "b"
    assert parsed.format_ok is False


def test_parse_reasoning_empty_subject_is_not_format_ok():
    text = "<think>a</think><subject> </subject><scene>c</scene>"
    parsed = parse_reasoning(text)
    assert parsed.format_ok is False
    assert parsed.subject == text
    assert parsed.scene == "c"


@pytest.mark.parametrize(
    "parts",
    [
        ("think", "subject", "scene"),
        ("step 1: look.\nstep 2: plan.", "a small glossy teapot, white with blue dots", "the teapot in the snow"),
        ("", "a dog", "a dog on the beach"),
        ("ünïcödé ✓", "猫", "le chat à la plage"),
    ],
)
def test_format_reasoning_round_trips(parts):
    think, subject, scene = parts
    text = format_reasoning(think, subject, scene)
    assert parse_reasoning(text) == ParsedReasoning(think, subject, scene, True)


def _grounding(reasoning: str = "just words") -> Grounding:
    parsed = parse_reasoning(reasoning)
    return Grounding(
        prompt=PROMPT,
        reasoning=reasoning,
        subject=parsed.subject,
        scene=parsed.scene,
        format_ok=parsed.format_ok,
        references=[subject_image()],
        subject_tokens=torch.zeros(1, 4, dtype=torch.long),
        settings={"seed": 3},
    )


def test_with_reasoning_reparses_an_edit():
    original = _grounding("just words")
    assert original.rewritten_prompt == PROMPT  # format not ok: the prompt itself
    edited = original.with_reasoning("  " + format_reasoning("look", "a red cube", "the red cube on sand") + "\n")
    assert edited.reasoning == format_reasoning("look", "a red cube", "the red cube on sand")
    assert (edited.subject, edited.scene, edited.format_ok) == ("a red cube", "the red cube on sand", True)
    assert edited.rewritten_prompt == "the red cube on sand"
    # everything else is kept, and the original is not modified
    assert edited.prompt == PROMPT and edited.references is original.references
    assert edited.subject_tokens is original.subject_tokens and edited.settings == original.settings
    assert original.reasoning == "just words" and original.format_ok is False


def test_with_reasoning_untagged_edit_falls_back_to_the_prompt():
    grounding = _grounding(format_reasoning("a", "b", "c"))
    assert grounding.rewritten_prompt == "c"
    edited = grounding.with_reasoning("a blue vase, no tags")
    assert edited.format_ok is False
    assert edited.subject == "a blue vase, no tags"
    assert edited.rewritten_prompt == PROMPT


# ------------------------------------------------------------------------------------------------ references


def _box_mask(size=(48, 40), box=(4, 6, 20, 30)) -> np.ndarray:
    """A float [H,W] mask with ones inside box = (left, top, right, bottom)."""
    mask = np.zeros((size[1], size[0]), dtype=np.float32)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 1.0
    return mask


def test_prepare_references_needs_images():
    with pytest.raises(InputError, match="at least one reference"):
        prepare_references([])


def test_prepare_references_without_masks_converts_to_rgb():
    rgba = Image.new("RGBA", (10, 8), (255, 0, 0, 0))
    for masks in (None, []):
        references = prepare_references([subject_image(), rgba], masks)
        assert [image.mode for image in references] == ["RGB", "RGB"]
        assert [image.size for image in references] == [(48, 40), (10, 8)]
        assert references[1].getpixel((0, 0)) == (127, 127, 127)


def test_prepare_references_one_mask_for_all():
    images = [subject_image(), subject_image(colour=(0, 200, 0))]
    references = prepare_references(images, [_box_mask()])
    assert len(references) == 2
    assert references[0].size == references[1].size
    assert references[0].size[0] < 48 and references[0].size[1] < 40
    assert not np.array_equal(np.asarray(references[0]), np.asarray(references[1]))  # each its own image


def test_prepare_references_one_mask_per_image():
    images = [subject_image(), subject_image()]
    references = prepare_references(images, [_box_mask(box=(0, 0, 10, 10)), _box_mask(box=(0, 0, 30, 20))])
    assert references[0].size != references[1].size
    assert references[0].size[0] < references[1].size[0]


def test_prepare_references_mask_count_mismatch():
    with pytest.raises(InputError, match="2 masks for 3 reference images"):
        prepare_references([subject_image()] * 3, [_box_mask()] * 2)


def test_prepare_references_mask_of_another_size():
    with pytest.raises(InputError) as caught:
        prepare_references([subject_image()], [np.ones((10, 12), dtype=np.float32)])
    message = str(caught.value)
    assert "mask 1" in message and "12x10" in message and "48x40" in message


def test_prepare_references_masks_as_tensors_and_pil_agree():
    mask = _box_mask()
    expected = np.asarray(prepare_references([subject_image()], [mask])[0])
    for given in (
        torch.from_numpy(mask),
        torch.from_numpy(mask).unsqueeze(0),
        Image.fromarray((mask * 255).astype(np.uint8), "L"),
        Image.fromarray(mask > 0.5),
    ):
        np.testing.assert_array_equal(np.asarray(prepare_references([subject_image()], [given])[0]), expected)


def test_prepare_references_empty_mask_is_an_error():
    with pytest.raises(InputError, match="selects nothing"):
        prepare_references([subject_image()], [np.zeros((40, 48), dtype=np.float32)])


# ----------------------------------------------------------------------------------------------- grounding


@pytest.fixture(scope="module")
def grounded(tiny_model):
    return ground(tiny_model, [subject_image()], PROMPT, masks=[_box_mask()], max_new_tokens=TOKENS, seed=0)


def test_ground_returns_grounding(tiny_model, grounded):
    assert isinstance(grounded, Grounding)
    assert grounded.prompt == PROMPT
    assert isinstance(grounded.reasoning, str) and grounded.reasoning == grounded.reasoning.strip()
    parsed = parse_reasoning(grounded.reasoning)
    assert (grounded.subject, grounded.scene, grounded.format_ok) == (parsed.subject, parsed.scene, parsed.format_ok)
    assert grounded.settings == {
        "max_new_tokens": TOKENS,
        "temperature": 0.7,
        "top_p": 0.95,
        "seed": 0,
        "subject_source": "reference",
    }
    # the reference was cropped to its mask before anything else saw it
    expected = prepare_references([subject_image()], [_box_mask()])[0]
    assert len(grounded.references) == 1
    assert grounded.references[0].size == expected.size != (48, 40)
    np.testing.assert_array_equal(np.asarray(grounded.references[0]), np.asarray(expected))


def test_ground_subject_tokens(tiny_model, grounded):
    tokens = grounded.subject_tokens
    assert tokens is not None and tokens.dtype == torch.long and tokens.device.type == "cpu"
    assert tuple(tokens.shape) == (1, tiny_model.num_image_tokens)
    codebook_size = tiny_model.model.config.vq_config.num_embeddings
    assert int(tokens.min()) >= 0 and int(tokens.max()) < codebook_size
    # they are the VQ tokens of the cropped reference
    torch.testing.assert_close(tokens, tiny_model.encode_image_tokens(grounded.references).cpu())


def test_ground_same_seed_same_reasoning(tiny_model, grounded):
    again = ground(tiny_model, [subject_image()], PROMPT, masks=[_box_mask()], max_new_tokens=TOKENS, seed=0)
    assert again.reasoning == grounded.reasoning
    torch.testing.assert_close(again.subject_tokens, grounded.subject_tokens)


def test_the_reasoning_streams_while_it_is_written_and_sampling_is_unchanged(tiny_model, grounded):
    seen: list[list[str]] = []
    again = ground(tiny_model, [subject_image()], PROMPT, masks=[_box_mask()], max_new_tokens=TOKENS, seed=0,
                   stream=seen.append)
    assert again.reasoning == grounded.reasoning  # watching does not change what is sampled
    texts = [batch[0] for batch in seen]
    assert len(texts) >= 2 and texts[-1] == grounded.reasoning
    assert all(later.strip().startswith(earlier.strip()) for earlier, later in zip(texts, texts[1:]))


def test_ground_other_seed_other_reasoning(tiny_model, grounded):
    others = []
    for seed in (1, 2, 3, 4):
        other = ground(tiny_model, [subject_image()], PROMPT, masks=[_box_mask()], max_new_tokens=TOKENS, seed=seed)
        others.append(other.reasoning)
        if other.reasoning != grounded.reasoning:
            break
    assert any(reasoning != grounded.reasoning for reasoning in others)


def test_ground_greedy_ignores_the_seed(tiny_model):
    first = ground(tiny_model, [subject_image()], PROMPT, max_new_tokens=6, temperature=0.0, seed=0)
    second = ground(tiny_model, [subject_image()], PROMPT, max_new_tokens=6, temperature=0.0, seed=99)
    assert first.reasoning == second.reasoning


def test_ground_without_subject_tokens(tiny_model):
    grounding = ground(tiny_model, [subject_image()], PROMPT, max_new_tokens=2, subject_source="none")
    assert grounding.subject_tokens is None and grounding.subject_image is None
    assert grounding.settings["subject_source"] == "none"


def test_ground_reference_source_shows_the_crop_as_the_subject_image(grounded):
    image = grounded.subject_image
    assert image.dtype == torch.float32 and tuple(image.shape) == (1, *pil_to_tensor(grounded.references[0]).shape)
    torch.testing.assert_close(image[0], pil_to_tensor(grounded.references[0]))


def test_generate_source_draws_the_subject_after_the_reasoning_and_generation_attends_to_it(tiny_model):
    from mmr1.generation import generate
    from mmr1.prompting import VQ_IMAGE, build_sequence
    from mmr1.sampling import SamplingSettings

    calls = []
    settings = SamplingSettings(cfg_scale=2.0)
    grounding = ground(tiny_model, [subject_image()], PROMPT, max_new_tokens=TOKENS, seed=3,
                       subject_source="generate", subject_settings=settings,
                       progress=lambda done, total, tokens: calls.append(total))
    assert calls[-1] == tiny_model.num_image_tokens and TOKENS in calls  # reasoning, then the subject's tokens
    tokens, image = grounding.subject_tokens, grounding.subject_image
    assert tuple(tokens.shape) == (1, tiny_model.num_image_tokens)
    assert tuple(image.shape) == (1, tiny_model.image_size, tiny_model.image_size, 3)
    torch.testing.assert_close(image, tiny_model.decode_image_tokens(tokens))
    # the subject is the image the model draws at the chain's first <begin_of_image>, after its own reasoning
    chain = Grounding(PROMPT, grounding.reasoning, "", "", False, grounding.references, None)
    drawn = generate(tiny_model, PROMPT, chain, None, 1, settings, seed=3)
    torch.testing.assert_close(drawn.tokens, tokens)
    # and the final image's sequence holds those tokens in its VQ slots
    sequence = build_sequence(tiny_model, PROMPT, grounding.references, grounding.reasoning, tokens)
    assert int((sequence.slot_kinds == VQ_IMAGE).sum()) == tiny_model.num_image_tokens
    result = generate(tiny_model, PROMPT, grounding, num_images=1, seed=0)
    torch.testing.assert_close(result.subject_image, image)


def test_a_swapped_subject_image_replaces_the_intermediate(tiny_model, grounded):
    swap = subject_image(colour=(0, 250, 0))
    swapped = grounded.with_subject_image(tiny_model, pil_to_tensor(swap).unsqueeze(0))
    torch.testing.assert_close(swapped.subject_tokens, tiny_model.encode_image_tokens([swap]).cpu())
    torch.testing.assert_close(swapped.subject_image[0], pil_to_tensor(swap))
    assert swapped.reasoning == grounded.reasoning and grounded.subject_image.shape != swapped.subject_image.shape \
        or not torch.equal(grounded.subject_tokens, swapped.subject_tokens)


@pytest.mark.parametrize("max_new_tokens", [0, -3])
def test_ground_needs_new_tokens(tiny_model, max_new_tokens):
    with pytest.raises(InputError, match="max_new_tokens"):
        ground(tiny_model, [subject_image()], PROMPT, max_new_tokens=max_new_tokens)


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_ground_empty_prompt(tiny_model, prompt):
    with pytest.raises(InputError, match="prompt is empty"):
        ground(tiny_model, [subject_image()], prompt, max_new_tokens=2)


def test_ground_prompt_beyond_the_context(tiny_model):
    prompt = " ".join(f"word{index}" for index in range(tiny_model.context_length))
    assert len(tiny_model.tokenize(prompt)) > tiny_model.context_length
    with pytest.raises(InputError, match="context") as caught:
        ground(tiny_model, [subject_image()], prompt, max_new_tokens=2)
    assert str(tiny_model.context_length) in str(caught.value)


def test_ground_prompt_plus_new_tokens_beyond_the_context(tiny_model):
    """A prompt that fits alone, but not with the reasoning still to be written."""
    with pytest.raises(InputError, match="context"):
        ground(tiny_model, [subject_image()], PROMPT, max_new_tokens=tiny_model.context_length)


def test_ground_needs_references(tiny_model):
    with pytest.raises(InputError, match="reference"):
        ground(tiny_model, [], PROMPT, max_new_tokens=2)


def test_ground_rejects_unknown_subject_source_before_sampling(tiny_model):
    sampled = []
    with pytest.raises(InputError, match="subject source"):
        ground(
            tiny_model, [subject_image()], PROMPT, max_new_tokens=2, subject_source="dream",
            progress=lambda done, total, tokens: sampled.append(done),
        )
    assert sampled == []


# ---------------------------------------------------------------------------------------- subject extraction


def test_extract_subject_sources(tiny_model):
    assert SUBJECT_SOURCES == ("reference", "none", "generate")  # node options: appended, never reordered
    references = [subject_image(), subject_image(colour=(0, 250, 0))]
    with pytest.raises(InputError, match="Unknown subject source 'latent'"):
        extract_subject(tiny_model, references, "latent")
    assert extract_subject(tiny_model, references, "none") is None
    assert extract_subject(tiny_model, references, "generate") is None  # the model draws it after its reasoning
    assert extract_subject(tiny_model, [], "reference") is None
    one = extract_subject(tiny_model, references, "reference")
    two = extract_subject(tiny_model, references, "reference", count=2)
    assert tuple(one.shape) == (1, tiny_model.num_image_tokens)
    assert tuple(two.shape) == (2, tiny_model.num_image_tokens)
    torch.testing.assert_close(two[:1], one)


# --------------------------------------------------------------------------------------------- VQ encoding


def _vq_images() -> list[Image.Image]:
    noise = np.random.default_rng(5).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    return [
        subject_image(),
        subject_image(size=(30, 60), colour=(250, 250, 20), background=(10, 10, 10)),
        Image.fromarray(noise),
    ]


def _janus_codes(mm, images: list[Image.Image]) -> torch.Tensor:
    """The original Janus VectorQuantizer: both sides L2-normalised, then the nearest code by squared distance."""
    vq = mm.model.model.vqmodel
    pixels = torch.stack([letterbox(image, mm.image_size) for image in images]).to(mm.device, mm.dtype) * 2 - 1
    with torch.no_grad():
        latents = vq.quant_conv(vq.encoder(pixels)).permute(0, 2, 3, 1).float()
        z = F.normalize(latents, dim=-1).reshape(len(images), -1, latents.shape[-1])
        codes = F.normalize(vq.quantize.embedding.weight.float(), dim=-1)
        distances = (z**2).sum(-1, keepdim=True) + (codes**2).sum(-1) - 2 * z @ codes.T
    return distances.argmin(dim=-1)


def _transformers_codes(mm, images: list[Image.Image]) -> torch.Tensor:
    """transformers' JanusVQVAE.encode: nearest code by un-normalised Euclidean distance."""
    vq = mm.model.model.vqmodel
    pixels = torch.stack([letterbox(image, mm.image_size) for image in images]).to(mm.device, mm.dtype) * 2 - 1
    with torch.no_grad():
        output = vq.encode(pixels)
    indices = output.image_tokens if hasattr(output, "image_tokens") else output[2]
    return indices.reshape(len(images), -1)


def test_encode_image_tokens_is_the_janus_quantizer(tiny_model):
    images = _vq_images()
    tokens = tiny_model.encode_image_tokens(images)
    assert tuple(tokens.shape) == (3, tiny_model.num_image_tokens) and tokens.dtype == torch.long
    torch.testing.assert_close(tokens.cpu(), _janus_codes(tiny_model, images).cpu())
    assert len(set(tokens.flatten().tolist())) > 1


def _rescaled_copy(mm, low: float, high: float):
    """A deep copy whose codebook rows are multiplied by positive factors in [exp(low), exp(high)]."""
    copied = copy.deepcopy(mm)
    weight = copied.model.model.vqmodel.quantize.embedding.weight
    factors = torch.empty(weight.shape[0], 1).uniform_(low, high, generator=torch.Generator().manual_seed(0)).exp()
    with torch.no_grad():
        weight.mul_(factors.to(weight.device, weight.dtype))
    return copied


def test_encode_image_tokens_ignores_codebook_row_norms(tiny_model):
    images = _vq_images()
    before = tiny_model.encode_image_tokens(images)
    shared_weight = tiny_model.model.model.vqmodel.quantize.embedding.weight.clone()
    rescaled = _rescaled_copy(tiny_model, -3.0, 3.0)
    torch.testing.assert_close(rescaled.encode_image_tokens(images), before)
    # the session fixture is untouched
    torch.testing.assert_close(tiny_model.model.model.vqmodel.quantize.embedding.weight, shared_weight)


def test_encode_image_tokens_ignores_latent_scale(tiny_model):
    images = _vq_images()
    before = tiny_model.encode_image_tokens(images)
    copied = copy.deepcopy(tiny_model)
    conv = copied.model.model.vqmodel.quant_conv
    with torch.no_grad():
        conv.weight.mul_(7.5)
        conv.bias.mul_(7.5)
    torch.testing.assert_close(copied.encode_image_tokens(images), before)


def test_normalisation_matters_when_row_norms_differ(tiny_model):
    """Un-normalised nearest codes (transformers' quantizer) change with row norms; mmr1's do not."""
    images = _vq_images()
    ours = tiny_model.encode_image_tokens(images).cpu()
    rescaled = _rescaled_copy(tiny_model, -4.0, 4.0)
    theirs = _transformers_codes(rescaled, images).cpu()
    assert tuple(theirs.shape) == tuple(ours.shape)
    assert (theirs != ours).any()
    assert (theirs != _transformers_codes(tiny_model, images).cpu()).any()
    torch.testing.assert_close(rescaled.encode_image_tokens(images).cpu(), ours)


def test_prepare_references_accepts_comfy_tensors():
    """An IMAGE batch [B,H,W,C] with a MASK batch [B,H,W] crops like the same images and masks as PIL."""
    images = [subject_image(), subject_image(colour=(0, 200, 0))]
    batch = torch.stack([pil_to_tensor(image) for image in images])
    masks = torch.zeros(2, 40, 48)
    masks[:, 10:30, 12:36] = 1.0
    from_tensors = prepare_references(batch, masks)
    from_pils = prepare_references(images, [Image.fromarray((mask.numpy() * 255).astype("uint8")) for mask in masks])
    assert [image.size for image in from_tensors] == [image.size for image in from_pils]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(from_tensors, from_pils))
    with pytest.raises(InputError, match=r"\[B,H,W,C\]"):
        prepare_references(torch.zeros(2, 40, 48, 3, 1))
