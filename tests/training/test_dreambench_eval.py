"""training.dreambench_eval: the DreamBooth protocol on a fake DreamBench folder, a tiny model, tiny metric models."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmr1.errors import InputError
from mmr1.metadata import read_png_record
from mmr1.rewards import load_reward_model, make_tiny_reward_checkpoint
from training.dreambench_eval import DreamBenchResult, evaluate_dreambench, image_seed

SUBJECTS = {"backpack": "backpack", "dog": "dog"}  # subject folder -> class; table order
PHOTOS = 3
OBJECT_PROMPTS = [
    "in the jungle", "in the snow", "on the beach", "on a cobblestone street", "on top of pink fabric",
    "on top of a wooden floor", "with a city in the background", "with a mountain in the background",
    "with a blue house in the background", "on top of a purple rug in a forest", "with a wheat field in the background",
    "with a tree and autumn leaves in the background", "with the Eiffel Tower in the background",
    "floating on top of water", "floating in an ocean of milk", "on top of green grass with sunflowers around it",
    "on top of a mirror", "on top of the sidewalk in a crowded street", "on top of a dirt road",
    "on top of a white rug",
]
LIVE_PROMPTS = [
    *OBJECT_PROMPTS[:10], "wearing a red hat", "wearing a santa hat", "wearing a rainbow scarf",
    "wearing a black top hat and a monocle", "in a chef outfit", "in a firefighter outfit", "in a police outfit",
    "wearing pink glasses", "wearing a yellow shirt", "in a purple wizard outfit",
]
ATTRIBUTES = ["red", "purple", "shiny", "wet", "cube shaped"]  # "a red {0} {1}": the last five of both lists
SMALL = {"prompts_per_subject": 2, "images_per_prompt": 2, "references": 2, "max_new_tokens": 16, "progress": False}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _prompt_list(scenes: list[str]) -> str:
    templates = [f"a {{0}} {{1}} {scene}" for scene in scenes] + [f"a {word} {{0}} {{1}}" for word in ATTRIBUTES]
    lines = [f"'{template}'.format(unique_token, class_token)" for template in templates]
    return "prompt_list = [\n" + ",\n".join(lines) + "\n]\n"


def _photo(seed: int) -> Image.Image:
    """A synthetic subject photo: a coloured block on noise, different per seed."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    pixels[10:30, 12:36] = rng.integers(0, 256, size=3, dtype=np.uint8)
    return Image.fromarray(pixels)


def make_dreambench(root: Path) -> Path:
    """DreamBench's layout with two subjects (an object and a live one) and its prompt file in the exact format."""
    for subject_index, subject in enumerate(SUBJECTS):
        (root / subject).mkdir(parents=True)
        for index in range(PHOTOS):
            _photo(10 * subject_index + index).save(root / subject / f"{index:02d}.jpg", quality=95)
    table = "\n".join(f"{subject},{class_word}" for subject, class_word in SUBJECTS.items())
    (root / "prompts_and_classes.txt").write_text(
        f"Classes\n\nsubject_name,class\n{table}\n\nPrompts\n\n"
        f"Object Prompts\n\n{_prompt_list(OBJECT_PROMPTS)}\nLive Subject Prompts\n\n{_prompt_list(LIVE_PROMPTS)}",
        encoding="utf-8",
    )
    return root


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return make_dreambench(tmp_path_factory.mktemp("dreambench"))


@pytest.fixture(scope="module")
def rewards(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("rewards")
    dino = make_tiny_reward_checkpoint(folder / "dino", "dino", seed=0)
    clip = make_tiny_reward_checkpoint(folder / "clip", "clip_i", seed=0)
    return {
        "dino": load_reward_model("dino", dino),
        "clip_i": load_reward_model("clip_i", clip),
        "clip_t": load_reward_model("clip_t", clip),
    }


@pytest.fixture(scope="module")
def run(tiny_model, bench, rewards, tmp_path_factory) -> tuple[DreamBenchResult, Path]:
    out = tmp_path_factory.mktemp("dreambench_out") / "images"
    return evaluate_dreambench(tiny_model, bench, rewards, seed=3, out_dir=out, **SMALL), out


def _numbers(result: DreamBenchResult) -> list:
    return [(image.subject, image.prompt_index, image.image_index, image.seed, image.scores) for image in result.images]


def test_every_image_is_written_and_scored_against_all_real_photos(run, bench, rewards) -> None:
    result, out = run
    written = sorted(path.relative_to(out).as_posix() for path in out.rglob("*") if path.is_file())
    assert written == [
        f"{subject}/{prompt:02d}_{n}.png" for subject in SUBJECTS for prompt in range(2) for n in range(2)
    ]
    assert [(image.subject, image.prompt_index, image.image_index) for image in result.images] == [
        (subject, prompt, n) for subject in SUBJECTS for prompt in range(2) for n in range(2)
    ]
    assert result.metrics == ["dino", "clip_i", "clip_t"]
    for image in result.images:
        assert set(image.scores) == {"dino", "clip_i", "clip_t"}
        assert all(math.isfinite(value) and -1.0 - 1e-5 <= value <= 1.0 + 1e-5 for value in image.scores.values())
        # The prompt has the class noun and no unique token; seeds follow (seed, subject row, prompt index) alone.
        scenes = LIVE_PROMPTS if image.subject == "dog" else OBJECT_PROMPTS
        assert image.prompt == f"a {image.subject} {scenes[image.prompt_index]}"
        assert image.seed == image_seed(3, list(SUBJECTS).index(image.subject), image.prompt_index) + image.image_index
        assert image.path == out / image.subject / f"{image.prompt_index:02d}_{image.image_index}.png"
        record = read_png_record(image.path)
        assert (record["prompt"], record["seed"], record["mode"]) == (image.prompt, image.seed, "xcot")
        assert isinstance(record["reasoning"], str) and len(record["references"]) == 2

    # Recompute one image's metrics from the PNG on disk: fidelity against ALL 3 photos (the model saw 2), text
    # alignment against the class-noun prompt.
    image = result.images[5]
    with Image.open(image.path) as png:
        generated = [png.convert("RGB")]
    photos = [Image.open(path).convert("RGB") for path in sorted((bench / image.subject).glob("*.jpg"))]
    assert len(photos) == PHOTOS
    for kind in ("dino", "clip_i"):
        expected = float(rewards[kind].score(generated, references=photos)[0])
        assert image.scores[kind] == pytest.approx(expected, abs=1e-5)
    expected = float(rewards["clip_t"].score(generated, prompts=image.prompt)[0])
    assert image.scores["clip_t"] == pytest.approx(expected, abs=1e-5)


def test_means_and_markdown(run) -> None:
    result, _ = run
    rows = [(row.subject, row.class_word, row.images) for row in result.subjects]
    assert rows == [("backpack", "backpack", 4), ("dog", "dog", 4)]
    for row in result.subjects:
        mine = [image.scores for image in result.images if image.subject == row.subject]
        for kind in result.metrics:
            assert row.scores[kind] == pytest.approx(np.mean([scores[kind] for scores in mine]), abs=1e-6)
    for kind in result.metrics:
        assert result.mean[kind] == pytest.approx(np.mean([image.scores[kind] for image in result.images]), abs=1e-6)

    lines = result.markdown().strip().splitlines()
    assert lines[0] == "| subject | DINO | CLIP-I | CLIP-T | images |"
    assert re.fullmatch(r"\|---\|(---:\|){4}", lines[1])
    assert len(lines) == 2 + len(SUBJECTS) + 1
    for line, row in zip(lines[2:4], result.subjects):
        values = " | ".join(f"{row.scores[kind]:.3f}" for kind in ("dino", "clip_i", "clip_t"))
        assert line == f"| {row.subject} | {values} | 4 |"
    mean = " | ".join(f"{result.mean[kind]:.3f}" for kind in ("dino", "clip_i", "clip_t"))
    assert lines[4] == f"| **mean** | {mean} | 8 |"
    assert result.to_dict()["images"][0]["path"].endswith("backpack/00_0.png")


def test_same_seed_same_numbers_and_subsets_draw_the_same_images(run, tiny_model, bench, rewards) -> None:
    result, _ = run
    again = evaluate_dreambench(tiny_model, bench, rewards, seed=3, **SMALL)
    assert _numbers(again) == _numbers(result) and again.mean == result.mean
    dogs = evaluate_dreambench(tiny_model, bench, rewards, seed=3, subjects=["dog"], **SMALL)
    assert _numbers(dogs) == [numbers for numbers in _numbers(result) if numbers[0] == "dog"]
    assert dogs.markdown().count("| dog |") == 1 and "| backpack |" not in dogs.markdown()
    other = evaluate_dreambench(tiny_model, bench, rewards, seed=4, subjects=["dog"], **SMALL)
    assert [image.seed for image in other.images] != [image.seed for image in dogs.images]
    assert [image.scores for image in other.images] != [image.scores for image in dogs.images]


def test_references_and_prompt_modes(run, tiny_model, bench, rewards, tmp_path) -> None:
    result, _ = run
    small = {**SMALL, "prompts_per_subject": 1}
    references = evaluate_dreambench(tiny_model, bench, rewards, seed=3, subjects=["backpack"], mode="references",
                                     out_dir=tmp_path / "references", **small)
    assert [image.reasoning for image in references.images] == ["", ""]
    assert read_png_record(tmp_path / "references" / "backpack" / "00_1.png")["mode"] == "references"

    # Plain text-to-image, scored with CLIP-T alone: the other columns read "-".
    plain = evaluate_dreambench(tiny_model, bench, {"clip_t": rewards["clip_t"]}, seed=3, subjects=["backpack"],
                                mode="prompt", **small)
    assert [image.reasoning for image in plain.images] == [None, None]
    assert plain.metrics == ["clip_t"] and all(-1 <= image.scores["clip_t"] <= 1 for image in plain.images)
    assert plain.markdown().splitlines()[2].startswith("| backpack | - | - | ")
    # Same seeds as the X-CoT run, different conditioning: different images.
    xcot = [image for image in result.images if image.subject == "backpack" and image.prompt_index == 0]
    assert [image.seed for image in plain.images] == [image.seed for image in xcot]
    assert [image.scores["clip_t"] for image in plain.images] != [image.scores["clip_t"] for image in xcot]


def test_user_errors_name_the_problem(tiny_model, bench, rewards, tmp_path) -> None:
    def evaluate(root=bench, metrics=rewards, **changes):
        return evaluate_dreambench(tiny_model, root, metrics, **{**SMALL, **changes})

    with pytest.raises(InputError, match=re.escape(f"The DreamBench folder {tmp_path / 'nowhere'} does not exist")):
        evaluate(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'file.txt'} is a file, not a DreamBench folder")):
        evaluate(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'empty'} has no prompts_and_classes.txt")):
        evaluate(tmp_path / "empty")
    unknown = f"Unknown DreamBench subjects cat (not in {bench / 'prompts_and_classes.txt'})"
    with pytest.raises(InputError, match=re.escape(unknown)):
        evaluate(subjects=["dog", "cat"])
    with pytest.raises(InputError, match="subject subset is empty"):
        evaluate(subjects=[])
    with pytest.raises(InputError, match="Unknown DreamBench mode 'edit'"):
        evaluate(mode="edit")
    with pytest.raises(InputError, match="Unknown DreamBench metric 'pickscore'"):
        evaluate(metrics={"pickscore": rewards["clip_t"]})
    with pytest.raises(InputError, match="needs at least one metric model"):
        evaluate(metrics={})
    with pytest.raises(InputError, match="The clip_t metric needs a reward model loaded as kind 'clip_t', got 'dino'"):
        evaluate(metrics={"clip_t": rewards["dino"]})
    with pytest.raises(InputError, match="images_per_prompt must be a positive integer, got 0"):
        evaluate(images_per_prompt=0)
    with pytest.raises(InputError, match="prompts_per_subject must be a positive integer"):
        evaluate(prompts_per_subject=0)
    with pytest.raises(InputError, match=re.escape(f"fewer photos: dog ({PHOTOS})")):
        evaluate(references=PHOTOS + 1, subjects=["dog"])
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'file.txt'} is a file, not a folder")):
        evaluate(out_dir=tmp_path / "file.txt" / "images")
