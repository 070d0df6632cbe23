"""Records from users' photo folders and pair datasets (JSONL, parquet, Subjects200K's side-by-side images)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow
import pyarrow.parquet as parquet
import pytest
from PIL import Image

from mmr1.errors import InputError
from training.data import main as data_main
from training.data import read_records
from training.importers import convert_folders, convert_pairs


def photo(path: Path, colour=(200, 30, 30), size=(24, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture
def folders(tmp_path) -> Path:
    root = tmp_path / "photos"
    for index in range(3):
        photo(root / "my_dog" / f"{index:02d}.png", (40 * index, 80, 120))
    Image.new("L", (24, 20), 255).save(root / "my_dog" / "01_mask.png")
    (root / "my_dog" / "prompts.txt").write_text("my dog on the beach\n\nmy dog in the snow\n", encoding="utf-8")
    photo(root / "red-toy" / "only.jpg")
    return root


def test_each_photo_is_a_target_once_with_the_others_as_references(folders, tmp_path):
    out = tmp_path / "data" / "records.jsonl"
    summary = convert_folders(folders, out, references=2)
    assert summary.startswith(f"{out}: 4 records")
    records = {record.id: record for record in read_records(out)}
    dog = [records[f"my_dog-{index:04d}"] for index in range(3)]
    assert [record.target.name for record in dog] == ["00.png", "01.png", "02.png"]
    assert [[path.name for path in record.references] for record in dog] == [
        ["01.png", "02.png"], ["02.png", "00.png"], ["00.png", "01.png"]]
    assert [record.prompt for record in dog] == ["my dog on the beach", "my dog in the snow", "my dog on the beach"]
    assert dog[0].masks[0].name == "01_mask.png" and dog[0].masks[1] is None  # 01 has a mask, 02 none
    assert dog[1].masks is None  # neither 02 nor 00 has one
    assert {record.subject for record in dog} == {"my dog"}
    toy = records["red-toy-0000"]  # a single photo: a prompt record for GRPO, no target
    assert (toy.target, toy.prompt, [path.name for path in toy.references]) == (None, "a photo of red toy", ["only.jpg"])


def test_bad_photos_stop_the_conversion_naming_each_file_unless_skipped(folders, tmp_path):
    (folders / "my_dog" / "02.png").write_bytes(b"not an image")
    Image.new("L", (8, 8), 255).save(folders / "my_dog" / "00_mask.png")  # another size than its photo
    (folders / "empty").mkdir()
    out = tmp_path / "records.jsonl"
    with pytest.raises(InputError) as error:
        convert_folders(folders, out)
    message = str(error.value)
    assert "3 problems, nothing written" in message and "--skip-bad" in message
    assert "02.png" in message and "00_mask.png is 8x8 but its photo is 24x20" in message and "no photos" in message
    assert not out.exists()
    summary = convert_folders(folders, out, skip_bad=True)
    assert "2 left out for 3 problems" in summary
    assert [record.id for record in read_records(out)] == ["my_dog-0000", "red-toy-0000"]


def test_folder_errors_are_clear(tmp_path, folders):
    with pytest.raises(InputError, match="is not a folder"):
        convert_folders(tmp_path / "nowhere", tmp_path / "out.jsonl")
    with pytest.raises(InputError, match=r"needs \{subject\}"):
        convert_folders(folders, tmp_path / "out.jsonl", prompt="a photo")
    (folders / "my_dog" / "prompts.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(InputError, match="prompts.txt: no prompts"):
        convert_folders(folders, tmp_path / "out.jsonl")


def test_the_command_line_writes_the_same_records(folders, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    assert data_main(["folders", str(folders), "--out", str(out), "--prompt", "a photo of my {subject}"]) == 0
    assert f"{out}: 4 records" in capsys.readouterr().out
    assert read_records(out)[-1].prompt == "a photo of my red toy"


# -------------------------------------------------------------------------------------------------------- pairs


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_pairs_from_jsonl_give_each_view_as_the_other_ones_target(tmp_path):
    photo(tmp_path / "pairs" / "a.png", (255, 0, 0))
    photo(tmp_path / "pairs" / "b.png", (0, 0, 255))
    rows = [{"image_a": "a.png", "image_b": "b.png", "description_a": "a mug on a desk",
             "description_b": "the mug in a garden", "subject": "mug"},
            {"image_a": "a.png", "image_b": "b.png", "description_a": " ", "description_b": "empty a"},
            {"image_a": "missing.png", "image_b": "b.png", "description_a": "x", "description_b": "y"}]
    source = tmp_path / "pairs" / "pairs.jsonl"
    source.write_text("\n".join(json.dumps(row) for row in rows) + "\n{broken\n", encoding="utf-8")
    out = tmp_path / "out" / "records.jsonl"
    with pytest.raises(InputError) as error:
        convert_pairs(source, out)
    message = str(error.value)
    assert "line 2: a description is empty" in message and "line 3:" in message and "missing.png" in message
    assert "line 4: not valid JSON" in message
    assert not out.exists() and not any(out.parent.iterdir())  # nothing half-written, no staging folder left
    convert_pairs(source, out, skip_bad=True)
    first, second = read_records(out)
    assert (first.target.name, first.references[0].name, first.prompt) == ("a.png", "b.png", "a mug on a desk")
    assert (second.target.name, second.references[0].name, second.prompt) == ("b.png", "a.png", "the mug in a garden")
    assert first.subject == second.subject == "mug"


def test_subjects200k_parquet_is_split_into_its_two_views(tmp_path):
    padding, side = 8, 32
    composite = Image.new("RGB", (2 * (side + 2 * padding), side + 2 * padding), (255, 255, 255))
    composite.paste((200, 0, 0), (padding, padding, padding + side, padding + side))
    composite.paste((0, 0, 200), (side + 3 * padding, padding, 2 * side + 3 * padding, padding + side))
    rows = [{"image": {"bytes": png_bytes(composite), "path": None},
             "description": json.dumps({"item": "red box", "description_0": "a red box on a table",
                                        "description_1": "the box on a shelf"})}]
    source = tmp_path / "subjects200k.parquet"
    parquet.write_table(pyarrow.Table.from_pylist(rows), source)
    out = tmp_path / "records.jsonl"
    convert_pairs(source, out, padding=padding)
    first, second = read_records(out)
    assert first.subject == "red box" and first.prompt == "a red box on a table"
    left, right = (np.asarray(Image.open(path)) for path in (first.target, second.target))
    assert left.shape == right.shape == (side, side, 3)  # the border is gone
    assert (left == (200, 0, 0)).all() and (right == (0, 0, 200)).all()
    assert first.target.parent == tmp_path / "records_images"


def test_hugging_face_image_columns_in_parquet(tmp_path):
    rows = [{"image_a": {"bytes": png_bytes(Image.new("RGB", (16, 16), (0, 255, 0)))},
             "image_b": {"bytes": png_bytes(Image.new("RGB", (16, 16), (0, 0, 255)))},
             "description_a": "a green cube", "description_b": "a blue cube", "subject": "cube"},
            {"image_a": {"bytes": b"garbage"}, "image_b": {"bytes": b"garbage"},
             "description_a": "x", "description_b": "y"}]
    source = tmp_path / "pairs.parquet"
    parquet.write_table(pyarrow.Table.from_pylist(rows), source)
    out = tmp_path / "records.jsonl"
    with pytest.raises(InputError, match="row 2: Cannot read embedded image"):
        convert_pairs(source, out)
    assert convert_pairs(source, out, skip_bad=True).startswith(f"{out}: 2 records; 2 left out for 1 problems")
    records = read_records(out)
    assert len(records) == 2 and np.asarray(Image.open(records[0].target))[0, 0].tolist() == [0, 255, 0]
