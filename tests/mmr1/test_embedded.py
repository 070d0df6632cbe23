"""The embedded model's name resolution and `python -m mmr1 demo`, on a stand-in assets folder."""

from __future__ import annotations

import json
import shutil

import pytest

import mmr1.embedded as embedded
from mmr1.cli import main
from mmr1.errors import InputError


@pytest.fixture()
def assets(tmp_path, monkeypatch, tiny_hf_dir, reference_image):
    """An assets folder holding a tiny checkpoint under the embedded name, plus demo references."""
    folder = tmp_path / "assets"
    shutil.copytree(tiny_hf_dir, folder / embedded.MODEL_NAME)
    (folder / "demo").mkdir()
    reference_image.save(folder / "demo" / "reference-1.png")
    (folder / "demo" / "demo.json").write_text(json.dumps({"references": ["reference-1.png"],
                                                           "prompt": "a photo of it on the beach"}))
    monkeypatch.setattr(embedded, "ASSETS_DIR", folder)
    monkeypatch.setattr(embedded, "DEMO_DIR", folder / "demo")
    monkeypatch.chdir(tmp_path)  # no local folder named mmr1-world shadows the embedded one
    return folder


def test_the_embedded_name_resolves_to_the_packaged_folder(assets):
    from mmr1.loading import load_model

    assert embedded.resolve(embedded.MODEL_NAME) == assets / embedded.MODEL_NAME
    assert load_model(embedded.MODEL_NAME).source == assets / embedded.MODEL_NAME


def test_demo_generates_from_the_bundled_references(assets, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "out"), "--num-images", "2", "--max-new-tokens", "8"]) == 0
    record = json.loads((tmp_path / "out" / "mmr1_generation.json").read_text())
    assert record["prompt"] == "a photo of it on the beach" and record["model"].endswith(embedded.MODEL_NAME)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["mmr1_seed0.png", "mmr1_seed1.png",
                                                                         "reference-1.png", "subject.png"]
    printed = capsys.readouterr().out
    for name in ("mmr1_seed0.png", "mmr1_seed1.png", "subject.png", "reference-1.png"):
        assert str(tmp_path / "out" / name) in printed  # the demo says where its images are
    assert f"reasoning: {record['reasoning']}" in printed


def test_a_missing_embedded_model_names_its_folder_and_the_rebuild_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(embedded, "ASSETS_DIR", tmp_path / "empty")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="training.world.pipeline"):
        embedded.resolve(embedded.MODEL_NAME)
    assert main(["generate", "--prompt", "a dog", "--out", str(tmp_path / "out")]) == 2
    assert str(tmp_path / "empty") in capsys.readouterr().err
