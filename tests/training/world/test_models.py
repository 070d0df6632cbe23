"""The embedded model's parts, each trained a few steps: VQ tokenizer, understanding encoder, judge, reward model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmr1.errors import InputError
from mmr1.tiny import TinySpec
from training.world.fit import fit, to_pixels
from training.world.scenes import ATTRIBUTES, IMAGE_SIZE, labelled_scenes

SMALL_VQ = TinySpec(image_size=IMAGE_SIZE, patch_size=4, vq_codebook_size=64, vq_base_channels=32,
                    vq_channel_multiplier=(1, 1, 1), vq_latent_channels=32)


@pytest.fixture(scope="module")
def scenes():
    return labelled_scenes(256, seed=0)


def test_fit_lowers_a_loss_with_warmup_and_cosine_decay():
    weight = torch.nn.Parameter(torch.tensor([4.0]))
    losses = fit([weight], lambda step: (weight**2).sum(), steps=60, learning_rate=0.3, description="toy")
    assert len(losses) == 60 and losses[-1] < 0.05 * losses[0]


def test_vq_training_images_hold_the_scenes_the_subjects_alone_and_every_flat_world_colour(scenes):
    """A flat colour outside the VQ's data decodes as some background (159/255 off): the data hold them."""
    from training.world.scenes import COLOURS, TRAIN_SUBJECTS, subject_renders
    from training.world.vq import FLAT_FIELDS, training_images

    alone = subject_renders(TRAIN_SUBJECTS[:5])[0]
    images = training_images(scenes.images[:10], alone, seed=0)
    assert images.shape == (10 + 5 + FLAT_FIELDS, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    assert (images[:10] == scenes.images[:10]).all() and (images[10:15] == alone).all()
    flat = images[15:]
    assert (flat == flat[:, :1, :1]).all()  # each field one colour
    colours = {tuple(field[0, 0]) for field in flat}
    assert {tuple(colour) for colour in COLOURS.values()} <= colours and len(colours) > len(COLOURS) + 100
    assert (training_images(scenes.images[:10], alone, seed=0) == images).all()


def test_vq_training_reconstructs_better_and_transformers_encode_agrees_with_mmr1(scenes):
    from training.world.vq import reconstruct, reconstruction_error, train_vq

    from transformers.models.janus.modeling_janus import JanusVQVAE

    from mmr1.tiny import build_vq_config

    torch.manual_seed(0)
    untrained = JanusVQVAE(build_vq_config(SMALL_VQ)).eval()
    vq, losses = train_vq(SMALL_VQ, scenes.images[:128], steps=40, full_steps=10, batch_size=16, learning_rate=3e-3)
    assert len(losses) == 40
    assert reconstruction_error(vq, scenes.images[128:160]) < 0.8 * reconstruction_error(untrained, scenes.images[128:160])
    codebook = vq.quantize.embedding.weight
    assert torch.allclose(codebook.norm(dim=-1), torch.ones(len(codebook)), atol=1e-5)  # stored normalised
    pixels = to_pixels(scenes.images[:4])
    with torch.no_grad():
        ours = reconstruct(vq, pixels)[1]
        theirs = vq.encode(pixels).image_tokens.flatten()
    assert torch.equal(ours, theirs)


def test_the_understanding_encoder_learns_the_attributes(scenes):
    from training.world.understanding import train_understanding_encoder

    spec = TinySpec(image_size=IMAGE_SIZE, patch_size=8, vision_hidden_size=32, vq_channel_multiplier=(1, 1, 1, 1))
    encoder, losses = train_understanding_encoder(spec, scenes.images, scenes.labels(), steps=40, batch_size=32)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    assert encoder(pixel_values=to_pixels(scenes.images[:2])).last_hidden_state.shape == (2, 16, 32)


def test_the_judge_reads_scene_attributes_and_round_trips(tmp_path, scenes):
    from training.world.judge import attribute_accuracy, load_judge, save_judge, train_judge

    judge, _ = train_judge(scenes.images, scenes.labels(), steps=120, batch_size=32, learning_rate=3e-3)
    test = labelled_scenes(128, seed=9, split="heldout")
    images = torch.as_tensor(test.images).float() / 255
    accuracy = attribute_accuracy(judge, images, test.truths())
    assert accuracy["background"] > 0.9 and accuracy["size"] > 0.8, accuracy
    assert set(accuracy) == {*ATTRIBUTES, "subject", "prompt"}
    save_judge(judge, tmp_path / "judge", {"note": "test"})
    again = load_judge(tmp_path / "judge")
    assert again.predict(images[:8]) == judge.predict(images[:8])
    with pytest.raises(InputError, match="No judge"):
        load_judge(tmp_path / "missing")


def test_the_reward_model_is_a_clip_folder_that_prefers_the_true_caption(tmp_path, scenes):
    from PIL import Image

    from mmr1.rewards import load_reward_model
    from training.world.clip_reward import train_clip_reward

    losses = train_clip_reward(tmp_path / "clip", scenes, steps=60, batch_size=32, learning_rate=2e-3)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    reward = load_reward_model("clip_t", tmp_path / "clip")
    image = Image.fromarray(scenes.images[0])
    scene = scenes.scenes[0]
    other = next(s for s in scenes.scenes if s.background != scene.background)
    right, wrong = reward.score([image, image], None, [scene.prompt(), other.prompt()])
    assert right > wrong


def test_the_identity_term_makes_clip_i_prefer_the_same_subject_in_another_scene(tmp_path):
    """Image-image pairs of one subject in two scenes teach CLIP-I identity: trained with the term, renders of a
    subject in unseen scenes score closer to its other renders than to another subject's, by more than without."""
    import random

    from PIL import Image

    from mmr1.rewards import load_reward_model
    from training.world.clip_reward import train_clip_reward
    from training.world.scenes import TRAIN_SUBJECTS, LabelledScenes, all_scenes, render

    rng = random.Random(0)
    subjects = rng.sample(TRAIN_SUBJECTS, 6)
    backgrounds = all_scenes()
    rng.shuffle(backgrounds)
    train_scenes, test_scenes = backgrounds[:24], backgrounds[24:28]
    pairs = [(subject, scene) for subject in subjects for scene in train_scenes]
    scenes = LabelledScenes(np.stack([np.asarray(render(*pair)) for pair in pairs]),
                            [subject for subject, _ in pairs], [scene for _, scene in pairs])

    def margin(identity_weight: float) -> float:
        folder = tmp_path / f"clip{identity_weight}"
        train_clip_reward(folder, scenes, steps=80, batch_size=32, learning_rate=2e-3, identity_weight=identity_weight)
        clip_i = load_reward_model("clip_i", folder)
        margins = []
        for index, subject in enumerate(subjects):
            other = subjects[(index + 1) % len(subjects)]
            image = render(subject, test_scenes[0])
            same, different = ([render(who, scene) for scene in test_scenes[1:]] for who in (subject, other))
            margins.append(float(clip_i.score([image], same)[0]) - float(clip_i.score([image], different)[0]))
        return float(np.mean(margins))

    with_term = margin(1.0)
    assert with_term > 0
    assert with_term > margin(0.0)
