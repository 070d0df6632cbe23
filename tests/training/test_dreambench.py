"""training.dreambench: the converter to prompt records and its CLI; the DreamBooth protocol on a fake DreamBench
folder, a tiny model, tiny metric models."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmr1.errors import InputError
from mmr1.metadata import read_png_record
from mmr1.rewards import load_reward_model, make_tiny_reward_checkpoint
from tests.conftest import subject_image
from training.data import main as data_main
from training.dreambench import (
    DreamBenchResult, copy_paste_flags, dreambench_records, evaluate_dreambench, image_seed, main,
)

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


def _listing(templates: list[str]) -> str:
    """A prompt list as prompts_and_classes.txt writes it."""
    lines = [f"'{template}'.format(unique_token, class_token)" for template in templates]
    return "prompt_list = [\n" + ",\n".join(lines) + "\n]\n"


def _prompt_list(scenes: list[str]) -> str:
    return _listing([f"a {{0}} {{1}} {scene}" for scene in scenes] + [f"a {word} {{0}} {{1}}" for word in ATTRIBUTES])


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
    assert result.metrics == ["dino", "clip_i", "clip_t", "copy_paste"]
    for image in result.images:
        assert set(image.scores) == {"dino", "clip_i", "clip_t", "copy_paste"}
        assert image.scores["copy_paste"] in (0.0, 1.0)
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
    assert lines[0] == "| subject | DINO | CLIP-I | CLIP-T | copy-paste | images |"
    assert re.fullmatch(r"\|---\|(---:\|){5}", lines[1])
    assert len(lines) == 2 + len(SUBJECTS) + 1
    for line, row in zip(lines[2:4], result.subjects):
        values = " | ".join(f"{row.scores[kind]:.3f}" for kind in ("dino", "clip_i", "clip_t", "copy_paste"))
        assert line == f"| {row.subject} | {values} | 4 |"
    mean = " | ".join(f"{result.mean[kind]:.3f}" for kind in ("dino", "clip_i", "clip_t", "copy_paste"))
    assert lines[4] == f"| **mean** | {mean} | 8 |"
    assert result.to_dict()["images"][0]["path"].endswith("backpack/00_0.png")


def test_a_pasted_reference_counts_as_copy_paste(rewards) -> None:
    dino = rewards["dino"]
    real = [_photo(seed) for seed in range(3)]
    other = _photo(99)
    flags = copy_paste_flags(dino, [real[1].copy(), other], real)
    assert flags[0] == 1.0  # closer to a photo (identical) than any two real photos are to each other
    among = dino.similarities(real, real)
    ceiling = max(float(among[i, j]) for i in range(3) for j in range(3) if i != j)
    assert flags[1] == float(float(dino.similarities([other], real).max()) > ceiling)
    assert copy_paste_flags(dino, [other], real[:1]) is None  # one photo: no real pair to compare with


def test_the_uno_protocol_draws_six_images_and_needs_clip_b32(tiny_model, bench, rewards, tmp_path) -> None:
    with pytest.raises(InputError, match="ViT-B/32"):
        evaluate_dreambench(tiny_model, bench, rewards, protocol="uno", **SMALL)
    with pytest.raises(InputError, match="protocol 'dreambooth2'"):
        evaluate_dreambench(tiny_model, bench, rewards, protocol="dreambooth2", **SMALL)
    from mmr1.rewards.tiny import build_clip_folder

    (tmp_path / "clip32").mkdir()
    build_clip_folder(tmp_path / "clip32", seed=0, image_size=64, patch_size=32)
    clip32 = {kind: load_reward_model(kind, tmp_path / "clip32") for kind in ("clip_i", "clip_t")}
    small = {**SMALL, "images_per_prompt": None, "prompts_per_subject": 1}
    result = evaluate_dreambench(tiny_model, bench, {**clip32, "dino": rewards["dino"]}, subjects=["backpack"],
                                 protocol="uno", **small)
    assert [image.image_index for image in result.images] == list(range(6))
    assert result.settings["protocol"] == "uno" and result.settings["images_per_prompt"] == 6


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


def test_cli_evaluate_needs_a_metric_model(tmp_path, capsys) -> None:
    assert main(["evaluate", str(tmp_path), "--model", str(tmp_path)]) == 2
    assert "--dino" in capsys.readouterr().err


# --- records: the converter ---------------------------------------------------------------------------------------
RECORD_OBJECT_PROMPTS = ["a {0} {1} in the jungle", "a {0} {1} on top of pink fabric", "a red {0} {1}"]
RECORD_LIVE_PROMPTS = ["a {0} {1} in the jungle", "a {0} {1} wearing a red hat", "a {0} {1} in a chef outfit",
                       "a wet {0} {1}"]


def _dreambench(root: Path, prompts: str | None = None) -> Path:
    """DreamBench's layout in miniature: an object subject and a dog, and the prompt file in the real format."""
    for subject, count in (("backpack", 5), ("dog", 4)):
        (root / subject).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            subject_image(size=(16, 16), colour=(index * 40, 0, 0)).save(root / subject / f"{index:02d}.jpg")
    text = prompts or (
        "Classes\n\nsubject_name,class\nbackpack,backpack\ndog,dog\n\nPrompts\n\n"
        f"Object Prompts\n\n{_listing(RECORD_OBJECT_PROMPTS)}\n"
        f"Live Subject Prompts\n\n{_listing(RECORD_LIVE_PROMPTS)}"
    )
    (root / "prompts_and_classes.txt").write_text(text)
    return root


def test_dreambench_gives_each_subject_its_prompt_list(tmp_path: Path) -> None:
    records = dreambench_records(_dreambench(tmp_path), references_per_record=3)
    assert len(records) == len(RECORD_OBJECT_PROMPTS) + len(RECORD_LIVE_PROMPTS)
    backpack = [record for record in records if record.id.startswith("backpack-")]
    dog = [record for record in records if record.id.startswith("dog-")]
    assert [record.prompt for record in backpack] == [
        "a backpack in the jungle", "a backpack on top of pink fabric", "a red backpack"
    ]
    assert [record.prompt for record in dog][1:3] == ["a dog wearing a red hat", "a dog in a chef outfit"]
    assert [record.id for record in dog] == ["dog-00", "dog-01", "dog-02", "dog-03"]
    for record in records:
        assert record.subject == record.id.split("-")[0] and record.target is None and record.masks is None
        assert len(set(record.references)) == 3
        assert all(path.parent == tmp_path / record.id.split("-")[0] for path in record.references)


def test_dreambench_reference_choice_depends_only_on_seed(tmp_path: Path) -> None:
    root = _dreambench(tmp_path)
    first = dreambench_records(root, seed=1)
    assert dreambench_records(root, seed=1) == first
    assert [record.references for record in dreambench_records(root, seed=2)] != [record.references for record in first]
    dogs = [record for record in first if record.id.startswith("dog-")]
    assert dreambench_records(root, seed=1, subjects=["dog"]) == dogs  # a subset picks the same photos


def test_dreambench_unique_token(tmp_path: Path) -> None:
    records = dreambench_records(_dreambench(tmp_path), unique_token="sks", subjects=["backpack"])
    assert [record.prompt for record in records] == [
        "a sks backpack in the jungle", "a sks backpack on top of pink fabric", "a red sks backpack"
    ]


def test_dreambench_errors(tmp_path: Path) -> None:
    root = _dreambench(tmp_path / "a")
    with pytest.raises(InputError, match="Unknown DreamBench subjects cat; known: backpack, dog"):
        dreambench_records(root, subjects=["dog", "cat"])
    with pytest.raises(InputError, match=r"fewer photos: dog \(4\)"):
        dreambench_records(root, references_per_record=5)
    no_live = "subject_name,class\ndog,dog\n\nObject Prompts\n'a {0} {1}'.format(unique_token, class_token)\n"
    broken = _dreambench(tmp_path / "b", prompts=no_live)
    prompts_file = broken / "prompts_and_classes.txt"
    with pytest.raises(InputError, match=re.escape(f"{prompts_file} lacks the 'Live Subject Prompts' section")):
        dreambench_records(broken)


def test_cli_records_then_check(tmp_path: Path, capsys) -> None:
    root = _dreambench(tmp_path / "bench")
    out = tmp_path / "bench" / "grpo.jsonl"
    options = ["--references", "2", "--unique-token", "sks", "--subjects", "dog", "--seed", "3"]
    assert main(["records", str(root), str(out), *options]) == 0
    assert "wrote 4 records (1 subjects)" in capsys.readouterr().out
    first = json.loads(out.read_text().splitlines()[0])
    assert first["prompt"] == "a sks dog in the jungle" and len(first["references"]) == 2
    assert all(path.startswith("dog/") for path in first["references"])  # relative to the output's folder

    assert data_main(["check", str(out)]) == 0
    assert "4 records" in capsys.readouterr().out
    assert data_main(["check", str(out), "--require", "target,reasoning"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error:") and "4 records lack 'target' (lines 1, 2, 3, 4)" in error
