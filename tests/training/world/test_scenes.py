"""The procedural subject world: deterministic renders, a fixed held-out split, tasks and datasets."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest

from mmr1.errors import InputError
from mmr1.xcot import parse_reasoning
from training.data import read_records
from training.world.scenes import (
    ATTRIBUTE_VALUES,
    ATTRIBUTES,
    HELD_OUT_SUBJECTS,
    IMAGE_SIZE,
    SUBJECT_ATTRIBUTES,
    SUBJECT_BACKDROP,
    TRAIN_SUBJECTS,
    Scene,
    Subject,
    all_subjects,
    labelled_scenes,
    render,
    render_subject,
    sample_example,
    vocabulary,
    write_dataset,
)


def test_subjects_number_in_the_thousands_and_the_held_out_tenth_never_meets_training():
    assert len(all_subjects()) == 6 * 8 * 4 * 7 == 1344
    assert len(HELD_OUT_SUBJECTS) == 134
    assert not set(HELD_OUT_SUBJECTS) & set(TRAIN_SUBJECTS)
    for name in SUBJECT_ATTRIBUTES:  # every single value is still seen in training, only combinations are new
        assert {getattr(subject, name) for subject in TRAIN_SUBJECTS} == set(ATTRIBUTE_VALUES[name])


def test_render_is_deterministic_and_depends_on_every_input():
    subject, scene = Subject("heart", "red", "stripes", "blue"), Scene("beach", "left", "small")
    image = np.asarray(render(subject, scene))
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8
    assert np.array_equal(image, np.asarray(render(subject, scene)))
    for other in (render(Subject("heart", "red", "spots", "blue"), scene), render(subject, Scene("beach", "left", "large")),
                  render(subject, Scene("grass", "left", "small")), render(subject, Scene("beach", "middle", "small"))):
        assert not np.array_equal(image, np.asarray(other))


def test_a_subject_is_the_same_tokens_wherever_it_stands_and_large_ones_are_the_subject_image():
    """Centres on the 4-pixel token grid: moving a subject shifts its pixels by whole tokens (what lets a tiny
    generator learn one drawing per subject and size); a large one is drawn as in the subject image."""
    subject = Subject("cross", "blue", "grid", "yellow")
    for size, shift in (("small", 8), ("large", 4)):
        left = np.asarray(render(subject, Scene("snow", "left", size))).astype(int)
        middle = np.asarray(render(subject, Scene("snow", "middle", size))).astype(int)
        assert np.array_equal(left[:, 2 : IMAGE_SIZE - shift - 2], middle[:, shift + 2 : IMAGE_SIZE - 2])
    alone = np.asarray(render_subject(subject)).astype(int)
    large = np.asarray(render(subject, Scene("snow", "middle", "large"))).astype(int)
    drawn = (alone != SUBJECT_BACKDROP).any(axis=2)
    same = (np.abs(alone - large).sum(axis=2) == 0)[drawn]
    assert same.mean() > 0.7  # the same drawing; only the anti-aliased rim meets another backdrop


def test_the_subject_is_drawn_where_and_as_large_as_the_scene_says():
    def red_pixels(scene):
        image = np.asarray(render(Subject("square", "red", "ring", "white"), scene)).astype(int)
        red = (image[..., 0] > 180) & (image[..., 1] < 80) & (image[..., 2] < 80)
        return red, np.nonzero(red)[1].mean()

    left, left_x = red_pixels(Scene("snow", "left", "small"))
    right, right_x = red_pixels(Scene("snow", "right", "small"))
    large, _ = red_pixels(Scene("snow", "middle", "large"))
    assert left_x < 0.4 * IMAGE_SIZE < 0.6 * IMAGE_SIZE < right_x
    assert large.sum() > 2 * left.sum()


def test_unknown_attributes_and_equal_colours_are_refused():
    with pytest.raises(InputError, match="shape"):
        Subject("blob", "red", "stripes", "blue")
    with pytest.raises(InputError, match="differ"):
        Subject("heart", "red", "stripes", "red")
    with pytest.raises(InputError, match="background"):
        Scene("moon", "left", "small")


def test_a_task_shows_the_subject_in_other_scenes_and_its_reasoning_names_it():
    example = sample_example(TRAIN_SUBJECTS, seed=5, references=3)
    assert len(example.reference_scenes) == 3
    assert all(scene.background != example.target_scene.background for scene in example.reference_scenes)
    parsed = parse_reasoning(example.reasoning())
    assert parsed.format_ok
    assert parsed.subject == example.subject.description()
    assert example.target_scene.phrase() in parsed.scene
    assert example.prompt == f"a photo of it {example.target_scene.phrase()}"
    assert example == sample_example(TRAIN_SUBJECTS, seed=5, references=3)
    words = set(vocabulary())
    for text in (example.prompt, parsed.think, parsed.scene):
        assert set(text.replace(",", " ").split()) <= words


def test_labelled_scenes_carry_indices_of_their_true_attributes():
    scenes = labelled_scenes(6, seed=1, split="heldout")
    labels = scenes.labels()
    assert scenes.images.shape == (6, IMAGE_SIZE, IMAGE_SIZE, 3) and labels.shape == (6, len(ATTRIBUTES))
    assert all(subject in HELD_OUT_SUBJECTS for subject in scenes.subjects)
    for row, subject, scene in zip(labels, scenes.subjects, scenes.scenes):
        values = {**asdict(subject), **asdict(scene)}
        assert [ATTRIBUTE_VALUES[name][index] for name, index in zip(ATTRIBUTES, row)] == [values[n] for n in ATTRIBUTES]
    assert np.array_equal(scenes.images, labelled_scenes(6, seed=1, split="heldout").images)


def test_written_datasets_read_back_as_training_records(tmp_path):
    path = write_dataset(tmp_path / "sft", "train", records=3, references=2, seed=0)
    records = read_records(path, require=("target", "subject_image", "reasoning", "subject"))
    assert len(records) == 3 and all(len(record.references) == 2 for record in records)
    subjects = {record.subject for record in records}  # one subject image per subject, shared by its records
    assert len(list((tmp_path / "sft" / "images").glob("*.png"))) == 3 * 3 + len(subjects)
    for record in records:
        assert record.subject_image.name == f"subject-{record.subject}.png"
        alone = np.asarray(record.load_subject_image())
        assert alone[0, 0].tolist() == list(SUBJECT_BACKDROP) and (alone != SUBJECT_BACKDROP).any(axis=2).mean() > 0.2  # a cross covers 27 %
    prompts_only = write_dataset(tmp_path / "grpo", "heldout", records=2, references=2, seed=1, with_target=False)
    lines = [json.loads(line) for line in prompts_only.read_text().splitlines()]
    assert all("target" not in line for line in lines)
    held_out_slugs = {subject.slug() for subject in HELD_OUT_SUBJECTS}
    assert all(line["subject"] in held_out_slugs for line in lines)
