"""training.data: the JSONL round trip, every validation error, mask cropping, the DreamBench converter, the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmr1.errors import InputError
from mmr1.xcot import format_reasoning
from tests.conftest import subject_image
from training.data import Record, dreambench_records, main, read_records, write_records

ROOT = Path(__file__).resolve().parents[2]
OBJECT_PROMPTS = ["a {0} {1} in the jungle", "a {0} {1} on top of pink fabric", "a red {0} {1}"]
LIVE_PROMPTS = ["a {0} {1} in the jungle", "a {0} {1} wearing a red hat", "a {0} {1} in a chef outfit", "a wet {0} {1}"]


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
    return tmp_path


def _line(**changes: object) -> dict:
    values = {
        "references": ["subj/00.jpg", "subj/01.png"],
        "masks": ["subj/00_mask.png", None],
        "prompt": "a dog on the beach",
        "target": "subj/03.jpg",
        "reasoning": format_reasoning("plan", "a red square", "on the beach"),
        "subject": "dog",
        "id": "dog-0007",
    }
    values.update(changes)
    return {key: value for key, value in values.items() if value is not ...}


def test_round_trip_keeps_every_field(dataset: Path) -> None:
    records = read_records(_lines(dataset / "data.jsonl", _line(), _line(id=..., masks=..., target=..., reasoning=...)))
    assert records[0] == Record(
        id="dog-0007",
        references=(dataset / "subj/00.jpg", dataset / "subj/01.png"),
        prompt="a dog on the beach",
        masks=(dataset / "subj/00_mask.png", None),
        target=dataset / "subj/03.jpg",
        reasoning="<think>plan</think><subject>a red square</subject><scene>on the beach</scene>",
        subject="dog",
    )
    assert records[1].id == "line-2" and records[1].masks is None and records[1].target is None

    write_records(dataset / "copy.jsonl", records)
    assert read_records(dataset / "copy.jsonl") == records
    assert json.loads((dataset / "copy.jsonl").read_text().splitlines()[0]) == _line()
    assert [path.name for path in dataset.iterdir() if path.suffix == ".tmp"] == []


def test_paths_resolve_against_the_files_folder(dataset: Path, tmp_path_factory) -> None:
    elsewhere = _save(tmp_path_factory.mktemp("elsewhere") / "far.jpg", subject_image())
    (dataset / "lists").mkdir()
    line = _line(references=["../subj/00.jpg", str(elsewhere)], masks=..., target="../subj/03.jpg")
    record = read_records(_lines(dataset / "lists" / "data.jsonl", line))[0]
    assert record.references == (dataset / "subj" / "00.jpg", elsewhere)
    assert record.target == dataset / "subj" / "03.jpg"

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


def test_records_built_in_code_are_validated() -> None:
    with pytest.raises(InputError, match="'references' is empty"):
        Record(id="x", references=(), prompt="p")
    assert Record(id="x", references=["a.jpg"], prompt="p").references == (Path("a.jpg"),)


def _dreambench(root: Path, prompts: str | None = None) -> Path:
    """DreamBench's layout in miniature: an object subject and a dog, and the prompt file in the real format."""
    for subject, count in (("backpack", 5), ("dog", 4)):
        for index in range(count):
            _save(root / subject / f"{index:02d}.jpg", subject_image(size=(16, 16), colour=(index * 40, 0, 0)))

    def listing(templates: list[str]) -> str:
        lines = [f"'{template}'.format(unique_token, class_token)" for template in templates]
        return "prompt_list = [\n" + ",\n".join(lines) + "\n]\n"

    text = prompts or (
        "Classes\n\nsubject_name,class\nbackpack,backpack\ndog,dog\n\nPrompts\n\n"
        f"Object Prompts\n\n{listing(OBJECT_PROMPTS)}\nLive Subject Prompts\n\n{listing(LIVE_PROMPTS)}"
    )
    (root / "prompts_and_classes.txt").write_text(text)
    return root


def test_dreambench_gives_each_subject_its_prompt_list(tmp_path: Path) -> None:
    records = dreambench_records(_dreambench(tmp_path), references_per_record=3)
    assert len(records) == len(OBJECT_PROMPTS) + len(LIVE_PROMPTS)
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


def test_cli_dreambench_then_check(tmp_path: Path, capsys) -> None:
    root = _dreambench(tmp_path / "bench")
    out = tmp_path / "bench" / "grpo.jsonl"
    options = ["--references", "2", "--unique-token", "sks", "--subjects", "dog", "--seed", "3"]
    assert main(["dreambench", str(root), str(out), *options]) == 0
    assert "wrote 4 records (1 subjects)" in capsys.readouterr().out
    first = json.loads(out.read_text().splitlines()[0])
    assert first["prompt"] == "a sks dog in the jungle" and len(first["references"]) == 2
    assert all(path.startswith("dog/") for path in first["references"])  # relative to the output's folder

    assert main(["check", str(out)]) == 0
    assert "4 records" in capsys.readouterr().out
    assert main(["check", str(out), "--require", "target,reasoning"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error:") and "4 records lack 'target' (lines 1, 2, 3, 4)" in error


def test_cli_runs_as_a_module_and_reports_errors(tmp_path: Path) -> None:
    path = _lines(tmp_path / "data.jsonl", {"references": ["x.jpg"], "prompt": "p", "targte": "y.jpg"})
    done = subprocess.run(
        [sys.executable, "-m", "training.data", "check", str(path)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error:") and "unknown key 'targte'" in done.stderr and "line 1" in done.stderr
