"""`python -m mmr1`: the new-user flow from the issue, every command, and how bad input is reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mmr1.cli
from mmr1.cli import main
from mmr1.images import crop_to_mask, mask_to_array
from mmr1.metadata import PNG_TEXT_KEY, read_png_record
from mmr1.tiny import TinySpec, make_tiny_checkpoint
from tests.conftest import CONTROL_TOKEN_TEXT, marked_photo, save_rotated_photo, subject_image

REPO_ROOT = Path(mmr1.cli.__file__).resolve().parents[1]
PROMPT = "a photo of it on the beach"
FAST = ["--max-new-tokens", "8"]  # short reasoning keeps in-process runs cheap


def run(argv, capsys) -> tuple[int, str, str]:
    """mmr1.cli.main in-process: (exit code, stdout, stderr); argparse's SystemExit counts as an exit code."""
    capsys.readouterr()
    try:
        code = main([str(arg) for arg in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def pngs(folder: Path) -> list[Path]:
    """The generated images (subject.png, the visual intermediate, aside)."""
    return sorted(folder.glob("mmr1_seed*.png"))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy()


@pytest.fixture()
def ref_png(tmp_path) -> Path:
    path = tmp_path / "ref.png"
    subject_image().save(path)
    return path


@pytest.fixture(scope="module")
def sensitive_dir(tmp_path_factory) -> Path:
    """A tiny checkpoint with larger random weights, so its images visibly depend on the conditioning.

    The session's tiny model (initializer range 0.02) has nearly flat logits: changing the reasoning moves them
    by ~1e-3, which rarely changes a sampled token, so "does the reasoning reach the images" needs this one.
    """
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_sensitive"), seed=0, spec=TinySpec(initializer_range=0.3))


# ------------------------------------------------------------------------------------------- new-user flow


def test_new_user_flow(tmp_path, monkeypatch, capsys):
    """The issue's commands, verbatim, in a fresh interpreter; then the same command again and another seed."""
    subject_image().save(tmp_path / "ref.png")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = ["generate", "--model", "DIR", "--ref", "ref.png", "--prompt", PROMPT, "--seed", "1", "--num-images", "2",
               "--out", "OUT"]
    for argv in (["make-tiny", "DIR"], command):
        done = subprocess.run([sys.executable, "-m", "mmr1", *argv], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
    assert ("wrote OUT/mmr1_seed1.png, OUT/mmr1_seed2.png, OUT/subject.png and OUT/mmr1_generation.json"
            in done.stdout)
    assert "reasoning: " in done.stdout

    out = tmp_path / "OUT"
    assert sorted(path.name for path in out.iterdir()) == ["mmr1_generation.json", "mmr1_seed1.png", "mmr1_seed2.png",
                                                           "subject.png"]
    # the visual intermediate: under subject_source reference, the reference itself
    np.testing.assert_array_equal(pixels(out / "subject.png"), pixels(tmp_path / "ref.png"))
    first = {path.name: path.read_bytes() for path in pngs(out)}
    side = TinySpec().image_size
    for path in pngs(out):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (side, side)

    record = json.loads((out / "mmr1_generation.json").read_text(encoding="utf-8"))
    grounding = record["grounding"]
    assert record["prompt"] == PROMPT and record["seed"] == 1
    assert record["references"] == ["ref.png"] and record["masks"] == []
    assert isinstance(record["reasoning"], str) and record["reasoning"] == grounding["reasoning"]
    assert record["sampling"] == {"cfg_scale": 5.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    assert grounding["settings"] == {"max_new_tokens": 256, "temperature": 0.7, "top_p": 0.95, "seed": 1,
                                     "subject_source": "reference"}
    assert record["images"] == [{"file": "mmr1_seed1.png", "seed": 1}, {"file": "mmr1_seed2.png", "seed": 2}]
    assert record["subject_image"] == "subject.png" and read_png_record(out / "subject.png") == record
    for entry in record["images"]:
        assert read_png_record(out / entry["file"]) == {**record, "image_seed": entry["seed"]}
        with Image.open(out / entry["file"]) as image:
            assert PNG_TEXT_KEY in image.text
    assert not np.array_equal(pixels(out / "mmr1_seed1.png"), pixels(out / "mmr1_seed2.png"))

    # the same command again (in another process than the first run) is refused: OUT holds the first run; with
    # --overwrite it writes the same bytes
    monkeypatch.chdir(tmp_path)
    _expect_error(command, capsys, "OUT", "earlier run", "--overwrite")
    code, _, err = run([*command, "--overwrite"], capsys)
    assert code == 0, err
    assert {path.name: path.read_bytes() for path in pngs(out)} == first
    assert json.loads((out / "mmr1_generation.json").read_text(encoding="utf-8")) == record

    # another seed, other images
    other_seed = ["generate", "--model", "DIR", "--ref", "ref.png", "--prompt", PROMPT, "--seed", "2", "--num-images",
                  "2", "--out", "OUT2"]
    code, _, err = run(other_seed, capsys)
    assert code == 0, err
    other = pngs(tmp_path / "OUT2")
    assert [path.name for path in other] == ["mmr1_seed2.png", "mmr1_seed3.png"]
    assert read_png_record(other[0])["seed"] == 2
    assert not np.array_equal(pixels(other[0]), pixels(out / "mmr1_seed1.png"))
    assert not set(first.values()) & {path.read_bytes() for path in other}


# ------------------------------------------------------------------------------------------------ commands


def test_make_tiny_deepseek_layout_generates(tmp_path, ref_png, capsys):
    folder = tmp_path / "janus-deepseek"
    code, out, err = run(["make-tiny", folder, "--layout", "deepseek"], capsys)
    assert code == 0, err
    assert "deepseek" in out
    assert json.loads((folder / "config.json").read_text())["model_type"] == "multi_modality"
    assert (folder / "pytorch_model.bin").is_file()
    code, _, err = run(["generate", "--model", folder, "--ref", ref_png, "--prompt", PROMPT, *FAST,
                        "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    assert [path.name for path in pngs(tmp_path / "out")] == ["mmr1_seed0.png"]
    record = json.loads((tmp_path / "out" / "mmr1_generation.json").read_text())
    assert record["model"] == str(folder)


def test_ground_prints_and_writes_json(tiny_hf_dir, tmp_path, ref_png, capsys):
    argv = ["ground", "--model", tiny_hf_dir, "--ref", ref_png, "--prompt", PROMPT, "--max-new-tokens", "12",
            "--seed", "4"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    printed = json.loads(out)
    assert {"reasoning", "subject", "scene", "rewritten_prompt", "format_ok", "prompt", "settings"} <= set(printed)
    assert printed["prompt"] == PROMPT
    assert isinstance(printed["reasoning"], str)
    assert printed["rewritten_prompt"] == (printed["scene"] if printed["format_ok"] else PROMPT)
    assert printed["settings"]["seed"] == 4 and printed["settings"]["max_new_tokens"] == 12

    target = tmp_path / "nested" / "grounding.json"
    code, out, err = run([*argv, "--out", target], capsys)
    assert code == 0, err
    assert str(target) in out
    assert json.loads(target.read_text(encoding="utf-8")) == printed  # same seed: same reasoning


def test_ground_with_mask(tiny_hf_dir, tmp_path, ref_png, capsys):
    mask = np.zeros((40, 48), dtype=np.uint8)
    mask[10:30, 12:36] = 255
    Image.fromarray(mask, "L").save(tmp_path / "mask.png")
    code, out, err = run(["ground", "--model", tiny_hf_dir, "--ref", ref_png, "--mask", tmp_path / "mask.png",
                          "--prompt", PROMPT, *FAST], capsys)
    assert code == 0, err
    assert json.loads(out)["prompt"] == PROMPT


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_rotated_reference_is_read_as_displayed(tiny_hf_dir, tmp_path, capsys, suffix):
    """A photo stored turned with EXIF orientation 6 is read as displayed (as ComfyUI's Load Image reads it): a
    mask drawn on the displayed 48x40 photo is accepted, and the crop the images attend to is the displayed one's."""
    displayed = save_rotated_photo(tmp_path / f"ref{suffix}", marked_photo())
    mask = np.zeros((40, 48), dtype=np.uint8)
    mask[2:30, 4:40] = 255
    Image.fromarray(mask, "L").save(tmp_path / "mask.png")
    code, _, err = run(["generate", "--model", tiny_hf_dir, "--ref", tmp_path / f"ref{suffix}", "--mask",
                        tmp_path / "mask.png", "--prompt", PROMPT, *FAST, "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    expected = crop_to_mask(displayed, mask_to_array(mask))
    np.testing.assert_array_equal(pixels(tmp_path / "out" / "subject.png"), np.asarray(expected))


def test_text_to_image_without_reference(tiny_hf_dir, tmp_path, capsys):
    code, out, err = run(["generate", "--model", tiny_hf_dir, "--prompt", "a red teapot in the snow",
                          "--out", tmp_path / "t2i"], capsys)
    assert code == 0, err
    assert [path.name for path in pngs(tmp_path / "t2i")] == ["mmr1_seed0.png"]
    record = json.loads((tmp_path / "t2i" / "mmr1_generation.json").read_text())
    assert record["grounding"] is None and record["references"] == [] and record["reasoning"] is None
    assert read_png_record(tmp_path / "t2i" / "mmr1_seed0.png")["image_seed"] == 0


def test_generate_subject_source_writes_the_drawn_subject(tiny_hf_dir, tmp_path, ref_png, capsys):
    code, out, err = run(["generate", "--model", tiny_hf_dir, "--ref", ref_png, "--prompt", PROMPT, *FAST,
                          "--subject", "generate", "--out", tmp_path / "g"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "g" / "mmr1_generation.json").read_text())
    assert record["grounding"]["settings"]["subject_source"] == "generate"
    side = TinySpec().image_size
    with Image.open(tmp_path / "g" / "subject.png") as image:  # drawn by the model: the model's image size
        assert image.size == (side, side)
    assert not np.array_equal(pixels(tmp_path / "g" / "subject.png")[:40, :40], pixels(Path(ref_png))[:40, :40])


def test_the_subject_source_defaults_to_what_training_taught_the_model(tiny_hf_dir, tmp_path, ref_png, capsys):
    """A checkpoint whose mmr1_training.json says subject_source 'generate' draws its subject unless --subject says
    otherwise; a checkpoint without the record (or with a source this version lacks) uses the reference."""
    import shutil

    model = tmp_path / "trained"
    shutil.copytree(tiny_hf_dir, model)

    def source(*extra) -> str:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        code, _, err = run(["generate", "--model", model, "--ref", ref_png, "--prompt", PROMPT, *FAST, *extra,
                            "--out", out], capsys)
        assert code == 0, err
        return json.loads((out / "mmr1_generation.json").read_text())["grounding"]["settings"]["subject_source"]

    assert source() == "reference"
    (model / "mmr1_training.json").write_text(json.dumps({"recipe": "sft", "config": {"subject_source": "drawn"}}))
    assert source() == "reference"
    (model / "mmr1_training.json").write_text(json.dumps({"recipe": "sft", "config": {"subject_source": "generate"}}))
    assert source() == "generate"
    assert source("--subject", "none") == "none"


def test_reasoning_override_and_no_reasoning_change_the_images(sensitive_dir, tmp_path, ref_png, capsys):
    base = ["generate", "--model", sensitive_dir, "--ref", ref_png, "--prompt", PROMPT, *FAST, "--seed", "3"]
    edited = "<think>look</think><subject>a red square toy</subject><scene>the toy on a beach at night</scene>"
    (tmp_path / "reasoning.txt").write_text(edited, encoding="utf-8")
    variants = {
        "default": [],
        "override": ["--reasoning", edited],
        "file": ["--reasoning-file", tmp_path / "reasoning.txt"],
        "none": ["--no-reasoning"],
    }
    images, records = {}, {}
    for name, extra in variants.items():
        code, _, err = run([*base, *extra, "--out", tmp_path / name], capsys)
        assert code == 0, err
        images[name] = pixels(tmp_path / name / "mmr1_seed3.png")
        records[name] = json.loads((tmp_path / name / "mmr1_generation.json").read_text())
    assert records["override"]["reasoning"] == edited
    assert records["none"]["reasoning"] == ""
    assert records["default"]["reasoning"] == records["default"]["grounding"]["reasoning"]
    # grounding ran the same way in every variant; only the reasoning given to generation differs
    assert len({record["grounding"]["reasoning"] for record in records.values()}) == 1
    assert not np.array_equal(images["override"], images["default"])
    assert not np.array_equal(images["none"], images["default"])
    assert np.array_equal(images["file"], images["override"])


def test_control_token_strings_in_prompt_and_reasoning_are_text(tiny_hf_dir, tmp_path, ref_png, capsys):
    """`--prompt`, `--reasoning` and `--reasoning-file` holding every control token's string generate, recorded as
    typed (that they tokenize as text is tests/mmr1/test_prompting.py's)."""
    prompt = f"{PROMPT} {CONTROL_TOKEN_TEXT}"
    reasoning = f"<subject>{CONTROL_TOKEN_TEXT}</subject>"
    (tmp_path / "reasoning.txt").write_text(reasoning, encoding="utf-8")
    variants = {"option": ["--reasoning", reasoning], "file": ["--reasoning-file", tmp_path / "reasoning.txt"]}
    for name, extra in variants.items():
        code, _, err = run(["generate", "--model", tiny_hf_dir, "--ref", ref_png, "--prompt", prompt, *FAST, *extra,
                            "--out", tmp_path / name], capsys)
        assert code == 0, err
        record = json.loads((tmp_path / name / "mmr1_generation.json").read_text(encoding="utf-8"))
        assert record["prompt"] == prompt and record["reasoning"] == reasoning


# ------------------------------------------------------------------------------------------------ bad input


def _expect_error(argv, capsys, *fragments) -> str:
    code, out, err = run(argv, capsys)
    assert code == 2, (code, out, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_error_model_folder_missing(tmp_path, ref_png, capsys):
    missing = tmp_path / "no-such-model"
    _expect_error(["generate", "--model", missing, "--ref", ref_png, "--prompt", PROMPT, "--out", tmp_path / "o"],
                  capsys, str(missing), "does not exist")
    _expect_error(["ground", "--model", missing, "--ref", ref_png, "--prompt", PROMPT], capsys, str(missing))
    assert not (tmp_path / "o").exists()


def test_error_other_architecture(tmp_path, capsys):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _expect_error(["generate", "--model", folder, "--prompt", PROMPT, "--out", tmp_path / "o"], capsys,
                  "'llama'", "not a Janus checkpoint")


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--num-images", "0"], "--num-images"),
        (["--cfg", "0.5"], "--cfg"),
        (["--top-p", "0"], "--top-p"),
        (["--top-p", "1.5"], "--top-p"),
        (["--temperature", "-1"], "--temperature"),
        (["--top-k", "-2"], "--top-k"),
        (["--cfg", "inf"], "--cfg must be a finite number"),
        (["--temperature", "inf"], "--temperature must be a finite number"),
        (["--temperature", "nan"], "--temperature must be a finite number"),
        (["--top-p", "nan"], "--top-p"),
        (["--ground-temperature", "inf"], "--ground-temperature"),
        (["--ground-top-p", "nan"], "--ground-top-p"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--seed", str(2**70)], f"got {2**70}"),
        (["--seed", "-1"], "--seed"),
        (["--seed", str(2**64 - 1), "--num-images", "2"], "beyond the largest seed"),
    ],
)
def test_error_sampling_settings(tiny_hf_dir, tmp_path, capsys, monkeypatch, extra, fragment):
    """Each numeric option in its setting's range (inf and nan drew flat images recorded as Infinity; seed 2**70
    drew seed 0's pixels), named as typed, before the model loads."""
    def load_model(*args, **kwargs):
        raise AssertionError("the model loaded before the option was checked")

    monkeypatch.setattr("mmr1.loading.load_model", load_model)
    _expect_error(["generate", "--model", tiny_hf_dir, "--prompt", PROMPT, *extra, "--out", tmp_path / "o"],
                  capsys, fragment)
    assert not (tmp_path / "o").exists()  # nothing written


def test_the_largest_seed_generates_and_records_are_strict_json(tiny_hf_dir, tmp_path, capsys):
    """The sampler's largest seed is usable and recorded as given; the JSON record parses under a parser that
    refuses NaN and Infinity, and a record holding one is refused rather than written."""
    from mmr1.metadata import dumps
    from mmr1.sampling import SEEDS

    code, _, err = run(["generate", "--model", tiny_hf_dir, "--prompt", PROMPT, "--seed", SEEDS.high,
                        "--out", tmp_path / "o"], capsys)
    assert code == 0, err

    def refuse(constant):
        raise AssertionError(f"{constant} in a record")

    record = json.loads((tmp_path / "o" / "mmr1_generation.json").read_text(encoding="utf-8"), parse_constant=refuse)
    assert record["seed"] == SEEDS.high and record["images"] == [{"file": f"mmr1_seed{SEEDS.high}.png",
                                                                  "seed": SEEDS.high}]
    with pytest.raises(ValueError):
        dumps({"sampling": {"cfg_scale": float("inf")}})


@pytest.mark.parametrize("command", ["make-tiny", "make-tiny-reward"])
def test_make_tiny_refuses_a_seed_torch_cannot_take(command, tmp_path, capsys):
    options = ["--kind", "dino"] if command == "make-tiny-reward" else []
    _expect_error([command, tmp_path / "m", *options, "--seed", str(2**70)], capsys, "--seed")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("prompt", ["", "   "])
def test_error_empty_prompt(tiny_hf_dir, tmp_path, ref_png, capsys, prompt):
    _expect_error(["generate", "--model", tiny_hf_dir, "--ref", ref_png, "--prompt", prompt, "--out", tmp_path / "o"],
                  capsys, "prompt is empty")
    _expect_error(["generate", "--model", tiny_hf_dir, "--prompt", prompt, "--out", tmp_path / "o"],
                  capsys, "prompt is empty")


def test_error_reference_not_an_image(tiny_hf_dir, tmp_path, capsys):
    fake = tmp_path / "notes.png"
    fake.write_text("not an image at all")
    _expect_error(["generate", "--model", tiny_hf_dir, "--ref", fake, "--prompt", PROMPT, "--out", tmp_path / "o"],
                  capsys, "Cannot read reference image", str(fake))
    missing = tmp_path / "missing.png"
    _expect_error(["ground", "--model", tiny_hf_dir, "--ref", missing, "--prompt", PROMPT], capsys, str(missing))


def test_a_decompression_bomb_is_refused_by_generate_and_score_before_a_model_loads(tmp_path, ref_png, capsys,
                                                                                    monkeypatch):
    """A 30000 x 30000 PNG of a few dozen bytes, as a reference, a mask or an image to score: one error line naming
    it, exit 2, and no model or reward model is loaded for it."""
    from tests.mmr1.test_images import _png_header_only

    def refuse(*args, **kwargs):
        raise AssertionError("a model loaded before the images were read")

    monkeypatch.setattr("mmr1.loading.load_model", refuse)
    monkeypatch.setattr("mmr1.rewards.load_reward_model", refuse)
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 30000, 30000)
    for argv in (["generate", "--ref", bomb, "--prompt", PROMPT, "--out", tmp_path / "o"],
                 ["generate", "--ref", ref_png, "--mask", bomb, "--prompt", PROMPT, "--out", tmp_path / "o"],
                 ["ground", "--ref", bomb, "--prompt", PROMPT],
                 ["score", "--images", bomb, "--ref", ref_png, "--prompt", PROMPT, "--reward", "dino=nowhere"],
                 ["score", "--images", ref_png, "--ref", bomb, "--prompt", PROMPT, "--reward", "dino=nowhere"]):
        _expect_error(argv, capsys, str(bomb), "decompression bomb")


def test_error_mask_of_another_size(tiny_hf_dir, tmp_path, ref_png, capsys):
    Image.new("L", (20, 10), 255).save(tmp_path / "mask.png")
    line = _expect_error(["generate", "--model", tiny_hf_dir, "--ref", ref_png, "--mask", tmp_path / "mask.png",
                          "--prompt", PROMPT, "--out", tmp_path / "o"], capsys, "mask 1")
    assert "20x10" in line and "48x40" in line


def test_error_mask_count(tiny_hf_dir, tmp_path, ref_png, capsys):
    Image.new("L", (48, 40), 255).save(tmp_path / "mask.png")
    _expect_error(["ground", "--model", tiny_hf_dir, "--ref", ref_png, "--ref", ref_png, "--ref", ref_png,
                   "--mask", tmp_path / "mask.png", "--mask", tmp_path / "mask.png", "--prompt", PROMPT],
                  capsys, "2 masks for 3 reference images")


def test_error_reasoning_length_and_context(tiny_hf_dir, ref_png, capsys):
    _expect_error(["ground", "--model", tiny_hf_dir, "--ref", ref_png, "--prompt", PROMPT, "--max-new-tokens", "0"],
                  capsys, "--max-new-tokens")
    long_prompt = " ".join(f"word{index}" for index in range(1100))
    _expect_error(["ground", "--model", tiny_hf_dir, "--ref", ref_png, "--prompt", long_prompt, *FAST],
                  capsys, "context")


@pytest.mark.parametrize(
    "case", ["reasoning-file-missing", "reasoning-file-not-utf8", "device", "out-is-a-file", "mask-without-ref"]
)
def test_error_other_bad_input_without_traceback(tiny_hf_dir, tmp_path, capsys, case):
    (tmp_path / "latin1.txt").write_bytes(b"\xff\xfe caf\xe9")
    (tmp_path / "a-file").write_text("x")
    extra = {
        "reasoning-file-missing": ["--reasoning-file", tmp_path / "missing.txt", "--out", tmp_path / "o"],
        "reasoning-file-not-utf8": ["--reasoning-file", tmp_path / "latin1.txt", "--out", tmp_path / "o"],
        "device": ["--device", "nodevice", "--out", tmp_path / "o"],
        "out-is-a-file": ["--out", tmp_path / "a-file"],
        "mask-without-ref": ["--mask", tmp_path / "a-file", "--out", tmp_path / "o"],
    }[case]
    _expect_error(["generate", "--model", tiny_hf_dir, "--prompt", PROMPT, *extra], capsys)


MAKE_TINY = {"make-tiny": ("mmr1.tiny", "make_tiny_checkpoint", []),
             "make-tiny-reward": ("mmr1.rewards", "make_tiny_reward_checkpoint", ["--kind", "dino"])}


@pytest.mark.parametrize("command", MAKE_TINY)
def test_make_tiny_refuses_a_non_empty_folder_before_building(command, tmp_path, monkeypatch, capsys):
    """A slip on a real model's folder must not replace its weights with random ones."""
    module, builder, options = MAKE_TINY[command]

    def build(*args, **kwargs):
        raise AssertionError(f"{builder} ran before the folder was checked")

    monkeypatch.setattr(f"{module}.{builder}", build)
    folder = tmp_path / "Janus-Pro-7B"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"real weights")
    _expect_error([command, folder, *options], capsys, str(folder), "not empty")
    assert [path.name for path in folder.iterdir()] == ["model.safetensors"]
    assert (folder / "model.safetensors").read_bytes() == b"real weights"
    _expect_error([command, folder / "model.safetensors", *options], capsys, str(folder / "model.safetensors"), "file")
    assert (folder / "model.safetensors").read_bytes() == b"real weights"


def test_make_tiny_reward_writes_into_an_empty_folder(tmp_path, capsys):
    folder = tmp_path / "dino"
    folder.mkdir()
    code, out, err = run(["make-tiny-reward", folder, "--kind", "dino"], capsys)
    assert code == 0, err
    assert (folder / "config.json").is_file()


# ---------------------------------------------------------------------------------------------------- score


def test_score_table_and_weighted_total(tmp_path, capsys):
    dino, clip = tmp_path / "dino", tmp_path / "clip"
    for folder, kind in ((dino, "dino"), (clip, "clip_t")):
        code, out, err = run(["make-tiny-reward", folder, "--kind", kind], capsys)
        assert code == 0 and (folder / "config.json").is_file(), err
    subject_image().save(tmp_path / "a.png")
    subject_image(colour=(20, 200, 20), background=(250, 250, 250)).save(tmp_path / "b.png")
    subject_image(colour=(200, 50, 50)).save(tmp_path / "r.png")
    code, out, err = run(["score", "--images", tmp_path / "a.png", tmp_path / "b.png", "--ref", tmp_path / "r.png",
                          "--prompt", "a photo of a red toy", "--reward", f"dino={dino}",
                          "--reward", f"clip_t={clip}@0.5", "--out", tmp_path / "scores.json"], capsys)
    assert code == 0, err
    lines = [line.split("\t") for line in out.strip().splitlines()]
    assert lines[0] == ["image", "dino", "clip_t", "total"]
    assert [row[0] for row in lines[1:]] == ["a.png", "b.png"]  # one row per image
    scores = json.loads((tmp_path / "scores.json").read_text())["scores"]
    assert [row["image"] for row in scores] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    for row, printed in zip(scores, lines[1:]):
        assert row["total"] == pytest.approx(row["dino"] + 0.5 * row["clip_t"], abs=1e-5)
        assert [float(value) for value in printed[1:]] == pytest.approx(
            [row["dino"], row["clip_t"], row["total"]], abs=1e-4
        )
    assert scores[0]["dino"] != scores[1]["dino"]
