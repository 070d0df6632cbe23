"""training.data: the JSONL round trip, every validation error, mask cropping, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmr1.errors import InputError
from mmr1.images import crop_to_mask, mask_to_array
from mmr1.xcot import format_reasoning
from tests.conftest import marked_photo, save_rotated_photo, subject_image
from training.data import Record, read_records, write_records

ROOT = Path(__file__).resolve().parents[2]


def _save(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _lines(path: Path, *objects: object) -> Path:
    path.write_text("".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in objects))
    return path


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    """A folder with two reference photos, a mask and a target, the images a JSONL file there names."""
    _save(tmp_path / "subj" / "00.jpg", subject_image())
    _save(tmp_path / "subj" / "01.png", subject_image(colour=(20, 200, 20)).convert("RGBA"))
    mask = np.zeros((40, 48), dtype=np.uint8)
    mask[10:20, 12:24] = 255
    _save(tmp_path / "subj" / "00_mask.png", Image.fromarray(mask))
    _save(tmp_path / "subj" / "03.jpg", subject_image(size=(32, 32)))
    _save(tmp_path / "subj" / "alone.png", subject_image(size=(32, 32), background=(128, 128, 128)))
    return tmp_path


def _line(**changes: object) -> dict:
    values = {
        "references": ["subj/00.jpg", "subj/01.png"],
        "masks": ["subj/00_mask.png", None],
        "prompt": "a dog on the beach",
        "target": "subj/03.jpg",
        "subject_image": "subj/alone.png",
        "reasoning": format_reasoning("plan", "a red square", "on the beach"),
        "subject": "dog",
        "id": "dog-0007",
    }
    values.update(changes)
    return {key: value for key, value in values.items() if value is not ...}


def test_round_trip_keeps_every_field(dataset: Path) -> None:
    records = read_records(_lines(dataset / "data.jsonl", _line(),
                                  _line(id=..., masks=..., target=..., subject_image=..., reasoning=...)))
    assert records[0] == Record(
        id="dog-0007",
        references=(dataset / "subj/00.jpg", dataset / "subj/01.png"),
        prompt="a dog on the beach",
        masks=(dataset / "subj/00_mask.png", None),
        target=dataset / "subj/03.jpg",
        reasoning="<think>plan</think><subject>a red square</subject><scene>on the beach</scene>",
        subject="dog",
        subject_image=dataset / "subj/alone.png",
    )
    assert records[1].id == "line-2" and records[1].masks is None and records[1].target is None
    assert records[1].subject_image is None and records[1].load_subject_image() is None
    assert records[0].load_subject_image().getpixel((0, 0)) == (128, 128, 128)

    write_records(dataset / "copy.jsonl", records)
    assert read_records(dataset / "copy.jsonl") == records
    assert json.loads((dataset / "copy.jsonl").read_text().splitlines()[0]) == _line()
    assert [path.name for path in dataset.iterdir() if path.suffix == ".tmp"] == []


def test_paths_resolve_against_the_files_folder(dataset: Path, tmp_path_factory) -> None:
    elsewhere = _save(tmp_path_factory.mktemp("elsewhere") / "far.jpg", subject_image())
    (dataset / "lists").mkdir()
    line = _line(references=["../subj/00.jpg", str(elsewhere)], masks=..., target="../subj/03.jpg",
                 subject_image="../subj/alone.png")
    record = read_records(_lines(dataset / "lists" / "data.jsonl", line))[0]
    assert record.references == (dataset / "subj" / "00.jpg", elsewhere)
    assert record.target == dataset / "subj" / "03.jpg" and record.subject_image == dataset / "subj" / "alone.png"

    # Written from another folder: paths inside it relative, paths outside it absolute.
    assert record.to_json(dataset)["references"] == ["subj/00.jpg", str(elsewhere)]
    assert record.to_json(dataset)["target"] == "subj/03.jpg"


@pytest.mark.parametrize(
    "line, message",
    [
        (_line(prompt=...), "missing required key 'prompt'"),
        (_line(prompt="  "), "'prompt' is empty"),
        (_line(prompt=3), "'prompt' must be a string"),
        (_line(references=[], masks=...), "'references' is empty"),
        (_line(references="subj/00.jpg"), "'references' must be a list of paths"),
        (_line(masks=["subj/00_mask.png"]), "1 masks for 2 references"),
        (_line(refrences=["subj/00.jpg"]), "unknown key 'refrences'"),
        (_line(subject=""), "'subject' must be a non-empty string or null"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"prompt": "a dog", ', "not valid JSON"),
    ],
)
def test_each_invalid_line_is_named_with_file_and_line(dataset: Path, line: object, message: str) -> None:
    path = _lines(dataset / "data.jsonl", _line(id="a"), "", line)
    with pytest.raises(InputError, match=message) as raised:
        read_records(path)
    assert f"{path} line 3:" in str(raised.value)  # the blank line 2 still counts


def test_duplicate_ids_and_empty_files_are_errors(dataset: Path) -> None:
    with pytest.raises(InputError, match="line 2: id 'dog-0007' is already used on line 1"):
        read_records(_lines(dataset / "data.jsonl", _line(), _line()))
    with pytest.raises(InputError, match="has no records"):
        read_records(_lines(dataset / "empty.jsonl", ""))
    with pytest.raises(InputError, match="Cannot read the dataset"):
        read_records(dataset / "absent.jsonl")


def test_missing_files_are_listed(dataset: Path) -> None:
    broken = _line(id="b", target="subj/gone.jpg", masks=[None, "subj/nomask.png"])
    path = _lines(dataset / "data.jsonl", _line(id="a"), broken)
    with pytest.raises(InputError, match="2 files are missing") as raised:
        read_records(path)
    assert f"line 2: {dataset / 'subj' / 'nomask.png'}" in str(raised.value)
    assert f"line 2: {dataset / 'subj' / 'gone.jpg'}" in str(raised.value)


def _corrupt(path: Path) -> Path:
    """Keep the first half of an image file: it still opens (the header is whole) but cannot decode."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_images_that_do_not_decode_are_all_listed_by_line_at_start(dataset: Path) -> None:
    """Each image is decoded when the file is read, not when its record is first drawn: a truncated photo (its
    header intact, so opening alone passes), a text file named .png, and a mask of the wrong size, all at once."""
    big = _save(dataset / "subj" / "big.png", Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    _corrupt(big)
    (dataset / "subj" / "notes.png").write_text("root:x:0:0:root:/root:/bin/bash\n")
    _save(dataset / "subj" / "small_mask.png", Image.new("L", (8, 8), 255))
    path = _lines(dataset / "data.jsonl", _line(id="a"), _line(id="b", target="subj/big.png"),
                  _line(id="c", references=["subj/00.jpg", "subj/notes.png"], target="subj/big.png"),
                  _line(id="d", masks=["subj/small_mask.png", None]))
    with pytest.raises(InputError, match="3 images cannot be used") as raised:
        read_records(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ")
    assert f"line 2 (and 1 more lines): Cannot read image {big}: image file is truncated" in message
    assert f"line 3: Cannot read image {dataset / 'subj' / 'notes.png'}: cannot identify image file" in message
    assert (f"line 4: mask 1 {dataset / 'subj' / 'small_mask.png'} is 8x8 but its reference "
            f"{dataset / 'subj' / '00.jpg'} is 48x40") in message


def test_each_image_is_decoded_once_however_many_records_share_it(dataset: Path, monkeypatch) -> None:
    import training.data

    opened: list[Path] = []
    real = training.data.open_image
    monkeypatch.setattr(training.data, "open_image", lambda file, *rest: (opened.append(file), real(file, *rest))[1])
    read_records(_lines(dataset / "data.jsonl", *(_line(id=f"r{index}") for index in range(30))))
    assert sorted(opened) == sorted(set(_line_files(dataset))) and len(opened) == 5


def _line_files(dataset: Path) -> list[Path]:
    line = _line()
    return [dataset / name for name in (*line["references"], line["masks"][0], line["target"], line["subject_image"])]


def _outside_cases(dataset: Path, elsewhere: Path) -> dict[str, str]:
    """Ways out of the dataset's folder, each as the path a line gives: absolute, ../, a symlink pointing out."""
    _save(elsewhere / "far.jpg", subject_image())
    (dataset / "subj" / "link.jpg").symlink_to(elsewhere / "far.jpg")
    (dataset / "lists").mkdir()
    return {"absolute": str(elsewhere / "far.jpg"), "escape": f"../{elsewhere.name}/far.jpg", "symlink": "subj/link.jpg"}


@pytest.mark.parametrize("case", ["absolute", "escape", "symlink"])
def test_paths_outside_the_folder_are_refused_unless_allowed(dataset: Path, case: str) -> None:
    elsewhere = dataset.parent / f"{dataset.name}-elsewhere"
    given = _outside_cases(dataset, elsewhere)[case]
    path = _lines(dataset / "data.jsonl", _line(id="a"), _line(id="b", target=given))
    with pytest.raises(InputError, match=r"1 image paths lie outside the dataset's folder") as raised:
        read_records(path, allow_outside=False)
    assert f"line 2: {dataset / given if case == 'symlink' else elsewhere / 'far.jpg'}" in str(raised.value)
    if case == "symlink":
        assert f"(-> {elsewhere.resolve() / 'far.jpg'})" in str(raised.value)
    assert read_records(path)[1].target.name in ("far.jpg", "link.jpg")  # training reads them (write_records writes them)


def test_a_symlink_inside_the_folder_is_inside(dataset: Path) -> None:
    (dataset / "subj" / "same.jpg").symlink_to(dataset / "subj" / "03.jpg")
    assert read_records(_lines(dataset / "data.jsonl", _line(target="subj/same.jpg")), allow_outside=False)


def test_require_lists_the_lines_lacking_a_key(dataset: Path) -> None:
    path = _lines(dataset / "data.jsonl", _line(id="a"), _line(id="b", target=...), _line(id="c", target=None))
    assert len(read_records(path, require=("reasoning",))) == 3
    with pytest.raises(InputError, match=r"2 records lack 'target' \(lines 2, 3\)"):
        read_records(path, require=("target", "reasoning"))
    with pytest.raises(InputError, match="Cannot require 'prompts'"):
        read_records(path, require=("prompts",))


def test_load_references_crops_to_masks_and_converts_to_rgb(dataset: Path) -> None:
    record = read_records(_lines(dataset / "data.jsonl", _line()))[0]
    cropped, whole = record.load_references()
    assert cropped.mode == whole.mode == "RGB"
    assert cropped.width < 48 and cropped.height < 40  # the mask's box plus margin, not the photo
    assert whole.size == (48, 40)  # a null mask keeps the whole photo
    assert record.load_target().size == (32, 32)
    assert Record(id="x", references=record.references, prompt="p").load_target() is None

    _save(dataset / "subj" / "00_mask.png", Image.new("L", (8, 8), 255))
    with pytest.raises(InputError, match="Record dog-0007: mask 1 is 8x8 but its image is 48x40"):
        record.load_references()


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_rotated_photos_load_as_displayed(dataset: Path, suffix: str) -> None:
    """Photos stored turned with EXIF orientation 6 load as displayed (as at inference and in ComfyUI), and the
    dataset's mask, drawn on the displayed 48x40 photo, crops them."""
    displayed = save_rotated_photo(dataset / "subj" / f"turned{suffix}", marked_photo())
    turned = f"subj/turned{suffix}"
    line = _line(references=[turned, turned], target=turned, subject_image=turned)
    record = read_records(_lines(dataset / "data.jsonl", line))[0]
    cropped, whole = record.load_references()
    np.testing.assert_array_equal(np.asarray(whole), np.asarray(displayed))
    with Image.open(dataset / "subj" / "00_mask.png") as mask:
        expected = crop_to_mask(displayed, mask_to_array(mask))
    np.testing.assert_array_equal(np.asarray(cropped), np.asarray(expected))
    for image in (record.load_target(), record.load_subject_image()):
        np.testing.assert_array_equal(np.asarray(image), np.asarray(displayed))


def test_records_built_in_code_are_validated() -> None:
    with pytest.raises(InputError, match="'references' is empty"):
        Record(id="x", references=(), prompt="p")
    assert Record(id="x", references=["a.jpg"], prompt="p").references == (Path("a.jpg"),)


def test_cli_runs_as_a_module_and_reports_errors(tmp_path: Path) -> None:
    path = _lines(tmp_path / "data.jsonl", {"references": ["x.jpg"], "prompt": "p", "targte": "y.jpg"})
    done = subprocess.run(
        [sys.executable, "-m", "training.data", "check", str(path)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error:") and "unknown key 'targte'" in done.stderr and "line 1" in done.stderr


def _check(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training.data", "check", *arguments],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )


def test_cli_check_refuses_etc_passwd_and_corrupt_images(dataset: Path) -> None:
    """/etc/passwd is outside the folder (refused without --allow-outside) and no image (refused with it)."""
    path = _lines(dataset / "data.jsonl", _line(id="a"), _line(id="b", target="/etc/passwd"))
    refused = _check(str(path))
    assert refused.returncode == 2 and "lie outside the dataset's folder" in refused.stderr
    assert "line 2: /etc/passwd" in refused.stderr
    allowed = _check(str(path), "--allow-outside")
    assert allowed.returncode == 2 and "line 2: Cannot read image /etc/passwd" in allowed.stderr

    _lines(path, _line(id="a"), _line(id="b"))
    passed = _check(str(path), "--require", "target,reasoning")
    assert passed.returncode == 0, passed.stderr
    assert passed.stdout.strip().endswith("all 5 images decode")
