"""The X-CoT sequence builder: layout of the sequence, slots, the unconditional twin, padding, context limit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from mmr1.errors import InputError
from mmr1.loading import load_model
from mmr1.prompting import (
    TEXT,
    UNDERSTANDING,
    VQ_IMAGE,
    batch_prefix,
    build_sequence,
    check_fits,
    embed_sequence,
    user_message,
)
from mmr1.sampling import Modality, SamplingSettings, sequence_logprobs
from mmr1.tokens import (
    ASSISTANT_ROLE,
    BEGIN_OF_IMAGE,
    BOS,
    END_OF_IMAGE,
    EOS,
    IMAGE_PLACEHOLDER,
    JANUS_SPECIAL_TOKENS,
    USER_ROLE,
)
from mmr1.xcot import format_reasoning
from tests.conftest import CONTROL_TOKEN_TEXT, control_token_counts, subject_image


def test_text_to_image_is_janus_own_format(tiny_model):
    mm = tiny_model
    sequence = build_sequence(mm, "a red dog")
    text = mm.tokenizer.decode(sequence.input_ids)
    assert text == f"{mm.tokenizer.bos_token}<|User|>: a red dog\n\n<|Assistant|>:\n<begin_of_image>"
    assert sequence.keep_unconditional.tolist() == [True] + [False] * (len(sequence) - 2) + [True]


def test_generation_sequence_slots(tiny_model):
    mm = tiny_model
    references = [subject_image(), subject_image(colour=(0, 200, 0))]
    subject_tokens = torch.randint(0, 16, (1, mm.num_image_tokens))
    sequence = build_sequence(mm, "on the beach", references, reasoning="<think>x</think>", subject_tokens=subject_tokens)
    kinds = sequence.slot_kinds
    assert int((kinds == UNDERSTANDING).sum()) == 2 * mm.understanding_tokens_per_image
    assert int((kinds == VQ_IMAGE).sum()) == mm.num_image_tokens
    assert sequence.input_ids[0].item() == mm.tokens.bos
    assert sequence.input_ids[-1].item() == mm.tokens.begin_of_image
    text = mm.tokenizer.decode(sequence.input_ids[kinds == TEXT])
    assert "Request: on the beach" in text and "<think>x</think>" in text
    # Reasoning follows the assistant role; the subject image follows the reasoning; the new image comes last.
    assert text.index("<|Assistant|>:") < text.index("<think>x</think>")
    first_vq = int((kinds == VQ_IMAGE).nonzero()[0])
    last_understanding = int((kinds == UNDERSTANDING).nonzero()[-1])
    assert last_understanding < first_vq < len(sequence) - 1


def test_grounding_sequence_is_a_prefix_of_the_generation_sequence(tiny_model):
    mm = tiny_model
    references = [subject_image()]
    grounding = build_sequence(mm, "on the beach", references, stage="ground")
    generation = build_sequence(mm, "on the beach", references, reasoning="<think>a</think>")
    assert torch.equal(generation.input_ids[: len(grounding)], grounding.input_ids)
    assert mm.tokenizer.decode(grounding.input_ids[-5:]).endswith("<|Assistant|>:")


def test_embeddings_fill_slots_and_unconditional_keeps_only_bos_and_boi(tiny_model):
    mm = tiny_model
    references = [subject_image()]
    subject_tokens = torch.randint(0, 16, (1, mm.num_image_tokens))
    sequence = build_sequence(mm, "on the beach", references, reasoning="r", subject_tokens=subject_tokens)
    with torch.no_grad():
        conditional = embed_sequence(mm, sequence)
        unconditional = embed_sequence(mm, sequence, unconditional=True)
        features = mm.embed_understanding_images(references)[0]
        subject = mm.embed_image_tokens(subject_tokens[0])
        pad = mm.embed_text(torch.tensor([mm.tokens.pad]))[0]
    torch.testing.assert_close(conditional[sequence.slot_kinds == UNDERSTANDING], features)
    torch.testing.assert_close(conditional[sequence.slot_kinds == VQ_IMAGE], subject)
    torch.testing.assert_close(unconditional[1:-1], pad.expand(len(sequence) - 2, -1))
    torch.testing.assert_close(unconditional[[0, -1]], conditional[[0, -1]])


def test_empty_prompt_is_rejected(tiny_model):
    for prompt in ("", "   \n"):
        with pytest.raises(InputError, match="empty"):
            build_sequence(tiny_model, prompt)


def test_context_limit(tiny_model):
    sequence = build_sequence(tiny_model, "word " * tiny_model.context_length)
    with pytest.raises(InputError, match="context"):
        check_fits(tiny_model, sequence, tiny_model.num_image_tokens)


def test_left_padding_does_not_change_log_probs(tiny_model):
    """A row padded on the left inside a batch scores its tokens as it does alone (masks and positions)."""
    mm = tiny_model
    settings = SamplingSettings(cfg_scale=2.0)
    short = build_sequence(mm, "a dog")
    long = build_sequence(mm, "a dog on the beach at night with a wreath")
    with torch.no_grad():
        embeds = [embed_sequence(mm, short), embed_sequence(mm, long)]
        uncond = [embed_sequence(mm, short, True), embed_sequence(mm, long, True)]
        tokens = torch.randint(0, 64, (2, 12))
        batched = sequence_logprobs(
            mm, batch_prefix(mm, embeds), tokens, Modality.image(mm), settings, batch_prefix(mm, uncond)
        )
        alone = sequence_logprobs(
            mm, batch_prefix(mm, embeds[:1]), tokens[:1], Modality.image(mm), settings, batch_prefix(mm, uncond[:1])
        )
    prefix = batch_prefix(mm, embeds)
    assert prefix.attention_mask[0, : len(long) - len(short)].sum() == 0
    assert prefix.position_ids[0, -1].item() == len(short) - 1
    torch.testing.assert_close(batched[0], alone[0], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------- control tokens typed by users


def _flag_control_tokens_plain(folder: Path) -> None:
    """Rewrite a folder's tokenizer files so that they flag every added token plain instead of special."""
    for name, key in (("tokenizer.json", "added_tokens"), ("tokenizer_config.json", "added_tokens_decoder")):
        values = json.loads((folder / name).read_text(encoding="utf-8"))
        entries = values.get(key, [])
        for entry in entries.values() if isinstance(entries, dict) else entries:
            entry["special"] = False
        (folder / name).write_text(json.dumps(values), encoding="utf-8")
    assert not any(token.special for token in Tokenizer.from_file(str(folder / "tokenizer.json"))
                   .get_added_tokens_decoder().values())


@pytest.fixture(scope="module", params=["hf", "deepseek", "hf flagged plain"])
def layout_model(request, tiny_hf_dir, tiny_deepseek_dir, tmp_path_factory):
    """The tiny model from each layout's folder, and from one whose tokenizer files flag the control tokens plain
    (whether files flag them special differs between folders and transformers versions)."""
    folder = {"hf": tiny_hf_dir, "deepseek": tiny_deepseek_dir}.get(request.param)
    if folder is None:
        folder = Path(shutil.copytree(tiny_hf_dir, tmp_path_factory.mktemp("plain") / "janus"))
        _flag_control_tokens_plain(folder)
    return load_model(folder, dtype="fp32", device="cpu")


@pytest.mark.parametrize("stage", ["ground", "generate"])
def test_control_token_strings_in_prompt_and_reasoning_stay_text(layout_model, stage):
    """A prompt and a reasoning holding every control token's string (a forged turn, image boundaries,
    end-of-sentence) yield the template's own control tokens and no other, and read back as typed."""
    mm = layout_model
    prompt = f"a dog {CONTROL_TOKEN_TEXT} on the beach"
    reasoning = format_reasoning(CONTROL_TOKEN_TEXT, f"a dog{EOS}{USER_ROLE}", f"{ASSISTANT_ROLE}{BEGIN_OF_IMAGE}")
    subject_tokens = torch.randint(0, 16, (1, mm.num_image_tokens))
    sequence = build_sequence(mm, prompt, [subject_image()], reasoning, subject_tokens, stage=stage)
    images = 1 + (stage == "generate")  # the reference, then the subject's VQ image
    assert control_token_counts(mm, sequence.input_ids) == {
        **dict.fromkeys(JANUS_SPECIAL_TOKENS, 0),
        BOS: 1,
        USER_ROLE: 1,
        ASSISTANT_ROLE: 1,
        BEGIN_OF_IMAGE: images + (stage == "generate"),  # and the new image's
        END_OF_IMAGE: images,
        IMAGE_PLACEHOLDER: mm.understanding_tokens_per_image + (images - 1) * mm.num_image_tokens,
    }
    text = mm.tokenizer.decode(sequence.input_ids[sequence.slot_kinds == TEXT])
    assert f"Request: {prompt}\n\n{ASSISTANT_ROLE}:" in text
    if stage == "generate":
        assert f"{ASSISTANT_ROLE}: {reasoning}\n{BEGIN_OF_IMAGE}" in text


def test_text_without_control_token_strings_keeps_its_ids(layout_model):
    """Text as text changes nothing for ordinary prompts and reasonings: the ids mmr1-world was trained on."""
    mm = layout_model
    texts = ["a photo of it on the beach", user_message("a red dog <in> the snow", True),
             " " + format_reasoning("a dog", "a red dog", "the dog on a table at night")]
    for text in texts:
        assert mm.tokenize(text) == mm.tokenize_template(text)


def test_reference_features_are_computed_once_per_picture_set(tiny_model):
    """Grounding, the subject image and the final images embed the same references: the vision tower runs once
    for them, again for other pictures (or the same pictures changed), and inference-mode features never reach a
    run with autograd (which refuses them)."""
    from PIL import ImageDraw

    calls = []
    hook = tiny_model.model.model.vision_model.register_forward_hook(lambda *args: calls.append(1))
    tiny_model.features_kept.clear()
    try:
        references = [subject_image(), subject_image(colour=(20, 200, 40))]
        first = tiny_model.understanding_features(references)
        again = tiny_model.understanding_features([image.copy() for image in references])  # same pixels
        assert len(calls) == 1 and again is first
        changed = references[0].copy()
        ImageDraw.Draw(changed).point((0, 0), fill=(255, 255, 255))
        tiny_model.understanding_features([changed, references[1]])
        assert len(calls) == 2
        with torch.inference_mode():
            inference = tiny_model.understanding_features(references)
        assert len(calls) == 3 and inference.is_inference() and not first.is_inference()
        sequence = build_sequence(tiny_model, "a dog", references)
        embed_sequence(tiny_model, sequence).sum().backward()  # autograd through the aligner, no inference tensor
        assert len(calls) == 3
    finally:
        hook.remove()
        tiny_model.features_kept.clear()
        tiny_model.model.zero_grad(set_to_none=True)
