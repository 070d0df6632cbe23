"""What `python -m mmr1` writes: whole files renamed into place, never through links, a folder owned by one run,
output paths and text checked before any model loads, and many images drawn in batches that bound memory."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mmr1.generation
import mmr1.outputs
from mmr1.metadata import read_png_record
from tests.conftest import subject_image
from tests.mmr1.test_cli import FAST, PROMPT, REPO_ROOT, _expect_error, pngs, run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def ref_png(tmp_path) -> Path:
    path = tmp_path / "ref.png"
    subject_image().save(path)
    return path


@pytest.fixture()
def no_model_loads(monkeypatch):
    """Fail the test if a Janus or reward model loads: the check under test must come first."""
    def load(*args, **kwargs):
        raise AssertionError("a model loaded before the output path was checked")

    monkeypatch.setattr("mmr1.loading.load_model", load)
    monkeypatch.setattr("mmr1.rewards.load_reward_model", load)


def _generate(model: Path, out: Path, *extra) -> list:
    return ["generate", "--model", model, "--prompt", PROMPT, *extra, "--out", out]


def _record(out: Path) -> dict:
    return json.loads((out / "mmr1_generation.json").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------ the folder of one run


def test_a_second_run_is_refused_and_overwrite_removes_only_the_earlier_runs_files(tiny_hf_dir, tmp_path, capsys):
    """An earlier run's images beside a later record that does not list them: refused, and with --overwrite the
    earlier run's files go first, the user's own files stay."""
    out = tmp_path / "out"
    code, _, err = run(_generate(tiny_hf_dir, out, "--num-images", "3"), capsys)
    assert code == 0, err
    (out / "notes.txt").write_text("mine")
    (out / "mmr1_seed7.jpg").write_text("mine too")  # not a name mmr1 writes
    before = {path.name: path.read_bytes() for path in out.iterdir()}

    _expect_error(_generate(tiny_hf_dir, out, "--seed", "10"), capsys, str(out), "earlier run", "mmr1_seed0.png",
                  "--overwrite")
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # refused: nothing touched

    code, _, err = run(_generate(tiny_hf_dir, out, "--seed", "10", "--overwrite"), capsys)
    assert code == 0, err
    assert sorted(path.name for path in out.iterdir()) == ["mmr1_generation.json", "mmr1_seed10.png",
                                                           "mmr1_seed7.jpg", "notes.txt"]
    assert [entry["file"] for entry in _record(out)["images"]] == [path.name for path in pngs(out)]
    assert (out / "notes.txt").read_text() == "mine" and (out / "mmr1_seed7.jpg").read_text() == "mine too"


def test_a_folder_of_other_files_is_written_into(tiny_hf_dir, tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.png").write_bytes(b"a user's photo")
    code, _, err = run(_generate(tiny_hf_dir, out), capsys)
    assert code == 0, err
    assert (out / "holiday.png").read_bytes() == b"a user's photo" and (out / "mmr1_seed0.png").is_file()


def test_links_under_output_names_are_replaced_never_followed(tiny_hf_dir, tmp_path, ref_png, capsys):
    """Links planted under the names generate writes (to files elsewhere, or to nothing): refused as files of
    another run; with --overwrite the links themselves go, and their targets keep their bytes."""
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    targets = {name: elsewhere / f"target-{name}" for name in ("mmr1_seed0.png", "mmr1_generation.json")}
    for name, target in targets.items():
        target.write_bytes(b"precious")
        (out / name).symlink_to(target)
    (out / "subject.png").symlink_to(elsewhere / "missing.png")  # dangling

    _expect_error(_generate(tiny_hf_dir, out, "--ref", ref_png, *FAST), capsys, "earlier run")
    code, _, err = run(_generate(tiny_hf_dir, out, "--ref", ref_png, *FAST, "--overwrite"), capsys)
    assert code == 0, err
    for name in ("mmr1_seed0.png", "mmr1_generation.json", "subject.png"):
        assert (out / name).is_file() and not (out / name).is_symlink()
    assert all(target.read_bytes() == b"precious" for target in targets.values())
    assert not (elsewhere / "missing.png").exists()
    assert read_png_record(out / "mmr1_seed0.png")["image_seed"] == 0


def test_write_bytes_replaces_a_link_planted_after_the_check(tmp_path):
    """The rename itself never writes through a link, even one planted between the check and the write."""
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    (tmp_path / "out.json").symlink_to(target)
    mmr1.outputs.write_bytes(tmp_path / "out.json", b"new")
    assert not (tmp_path / "out.json").is_symlink() and (tmp_path / "out.json").read_bytes() == b"new"
    assert target.read_bytes() == b"precious"


def test_a_folder_under_an_output_name_is_refused_even_with_overwrite(tiny_hf_dir, tmp_path, capsys, no_model_loads):
    out = tmp_path / "out"
    (out / "mmr1_seed0.png").mkdir(parents=True)
    (out / "mmr1_seed0.png" / "keep.txt").write_text("x")
    _expect_error(_generate(tiny_hf_dir, out, "--overwrite"), capsys, str(out / "mmr1_seed0.png"), "is a folder")
    assert (out / "mmr1_seed0.png" / "keep.txt").read_text() == "x"


# --------------------------------------------------------------------------------------------- failed writes


def _full_disk(monkeypatch) -> None:
    """Half of each file written, then ENOSPC, as a full disk does."""
    def write_half(file, data):
        file.write(data[: len(data) // 2])
        file.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(mmr1.outputs, "_write_all", write_half)


def test_a_failed_write_leaves_no_partial_file(tiny_hf_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    _full_disk(monkeypatch)
    _expect_error(_generate(tiny_hf_dir, out), capsys, str(out / "mmr1_seed0.png"), "No space left on device")
    assert list(out.iterdir()) == []  # no 0-byte or half PNG, no temporary file


def test_a_failed_write_keeps_the_earlier_file(tmp_path, monkeypatch):
    path = tmp_path / "scores.json"
    path.write_bytes(b"earlier")
    _full_disk(monkeypatch)
    with pytest.raises(mmr1.outputs.InputError, match="No space left"):
        mmr1.outputs.write_bytes(path, b"later and longer")
    assert [entry.name for entry in tmp_path.iterdir()] == ["scores.json"] and path.read_bytes() == b"earlier"


# ------------------------------------------------------------------------------------ output paths, up front


def _bad_paths(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Output paths that cannot be written, each with the path its error names."""
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "locked").mkdir()
    return {
        "dangling-link": (tmp_path / "dangling", str(tmp_path / "dangling")),
        "under-a-file": (tmp_path / "a-file" / "sub" / "x.json", str(tmp_path / "a-file")),
        "under-a-dangling-link": (tmp_path / "dangling" / "x.json", str(tmp_path / "dangling")),
        "unwritable": (tmp_path / "locked" / "new" / "x.json", str(tmp_path / "locked")),
    }


@pytest.fixture()
def locked_folders(monkeypatch):
    """Folders named `locked` read as unwritable (permission bits do not stop root, who runs some CI)."""
    access = os.access

    def locked_access(path, mode, *args, **kwargs):
        return False if Path(path).name == "locked" and mode & os.W_OK else access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", locked_access)


@pytest.mark.parametrize("case", ["dangling-link", "under-a-file", "under-a-dangling-link", "unwritable"])
def test_generate_checks_its_folder_before_the_model_loads(tiny_hf_dir, tmp_path, capsys, case, no_model_loads,
                                                           locked_folders):
    out, named = _bad_paths(tmp_path)[case]
    _expect_error(_generate(tiny_hf_dir, out), capsys, named)


@pytest.mark.parametrize("command", ["ground", "score"])
@pytest.mark.parametrize("case", ["a-folder", "a-link", "dangling-link", "under-a-file", "under-a-dangling-link",
                                  "unwritable"])
def test_file_outputs_are_checked_before_a_model_loads(tiny_hf_dir, tmp_path, ref_png, capsys, command, case,
                                                      no_model_loads, locked_folders):
    paths = _bad_paths(tmp_path)
    (tmp_path / "real.json").write_text("{}")
    (tmp_path / "a-link").symlink_to(tmp_path / "real.json")
    paths["a-folder"] = (tmp_path / "locked", str(tmp_path / "locked"))
    paths["a-link"] = (tmp_path / "a-link", str(tmp_path / "a-link"))
    out, named = paths[case]
    argv = {"ground": ["ground", "--model", tiny_hf_dir, "--ref", ref_png, "--prompt", PROMPT],
            "score": ["score", "--images", ref_png, "--reward", f"dino={tmp_path / 'dino'}"]}[command]
    _expect_error([*argv, "--out", out], capsys, "--out", named)
    assert (tmp_path / "real.json").read_text() == "{}"


def test_score_writes_under_a_missing_folder(tmp_path, ref_png, capsys):
    code, _, err = run(["make-tiny-reward", tmp_path / "dino", "--kind", "dino"], capsys)
    assert code == 0, err
    out = tmp_path / "new" / "deeper" / "scores.json"
    code, _, err = run(["score", "--images", ref_png, "--ref", ref_png, "--reward", f"dino={tmp_path / 'dino'}",
                        "--out", out], capsys)
    assert code == 0, err
    assert json.loads(out.read_text(encoding="utf-8"))["scores"][0]["image"] == str(ref_png)


# ----------------------------------------------------------------------------------------------------- text


@pytest.mark.parametrize("option", ["--prompt", "--reasoning"])
def test_text_that_is_not_utf8_is_refused_naming_the_option(tiny_hf_dir, tmp_path, capsys, option, no_model_loads):
    """sys.argv carries bytes that are not UTF-8 as lone surrogates ("caf\\xe9" in Latin-1 arrives as
    "caf\\udce9"): refused, named, before the model loads, not a UnicodeEncodeError traceback."""
    argv = _generate(tiny_hf_dir, tmp_path / "o")
    if option == "--prompt":
        argv[argv.index("--prompt") + 1] = "caf\udce9 on the beach"
    else:
        argv[-2:-2] = ["--reasoning", "<subject>caf\udce9</subject>"]
    _expect_error(argv, capsys, option, "UTF-8", "\\udce9")
    _expect_error(["ground", "--model", tiny_hf_dir, "--ref", tmp_path / "r.png", "--prompt", "caf\udce9"], capsys,
                  "--prompt", "UTF-8")
    assert not (tmp_path / "o").exists()


def test_latin1_bytes_on_the_command_line_are_refused(tiny_hf_dir, tmp_path):
    """The real thing: a Latin-1 terminal's bytes in a fresh interpreter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "mmr1", "generate", "--model", str(tiny_hf_dir), "--prompt",
                           b"caf\xe9 on the beach", "--out", str(tmp_path / "o")], env=env, capture_output=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    assert b"Traceback" not in done.stderr and b"error: --prompt is not valid UTF-8" in done.stderr


def test_a_reasoning_file_that_is_not_utf8_is_named(tiny_hf_dir, tmp_path, capsys, no_model_loads):
    (tmp_path / "latin1.txt").write_bytes(b"<subject>caf\xe9</subject>")
    _expect_error(_generate(tiny_hf_dir, tmp_path / "o", "--reasoning-file", tmp_path / "latin1.txt"), capsys,
                  "--reasoning-file", str(tmp_path / "latin1.txt"), "not UTF-8", "0xe9", "offset 12")


# ------------------------------------------------------------------------------------------------- batches


@pytest.fixture()
def batch_rows(monkeypatch) -> list[int]:
    """The rows of each image batch sampled (CFG doubles them), as generate_batches draws them."""
    rows, sample = [], mmr1.generation.sample_tokens

    def spy(mm, prefix, *args, **kwargs):
        rows.append(prefix.embeds.shape[0] * kwargs.get("repeats", 1)
                    * (2 if kwargs.get("unconditional") is not None else 1))
        return sample(mm, prefix, *args, **kwargs)

    monkeypatch.setattr(mmr1.generation, "sample_tokens", spy)
    return rows


def test_batches_write_the_images_of_one_batch(tiny_hf_dir, tmp_path, ref_png, capsys, batch_rows):
    """3 images drawn 2 at a time are the bytes of 3 in one batch (image i uses seed + i either way), and the
    records are the same: --batch-size is not recorded, since it changes nothing."""
    outputs = {}
    for size in ("2", "3"):
        out = tmp_path / f"batch{size}"
        code, _, err = run(_generate(tiny_hf_dir, out, "--ref", ref_png, *FAST, "--seed", "5", "--num-images", "3",
                                     "--batch-size", size), capsys)
        assert code == 0, err
        outputs[size] = {path.name: path.read_bytes() for path in out.iterdir()}
    assert batch_rows == [4, 2, 6]  # batches of 2 and 1, then 3 in one; with CFG each row twice
    assert outputs["2"] == outputs["3"]
    assert sorted(outputs["2"]) == ["mmr1_generation.json", "mmr1_seed5.png", "mmr1_seed6.png", "mmr1_seed7.png",
                                    "subject.png"]
    assert len({outputs["2"][f"mmr1_seed{seed}.png"] for seed in (5, 6, 7)}) == 3


def test_many_images_are_drawn_in_bounded_batches_and_written_as_they_finish(tiny_hf_dir, tmp_path, capsys,
                                                                            monkeypatch):
    """--num-images 10 draws 8 then 2 by default (not one batch of 20 rows); the first 8 are on disk while the
    last 2 are drawn."""
    out, seen, sample = tmp_path / "out", [], mmr1.generation.sample_tokens

    def spy(mm, prefix, *args, **kwargs):
        rows = prefix.embeds.shape[0] * kwargs.get("repeats", 1)  # one prompt's images share one prefix row
        seen.append((rows, [path.name for path in pngs(out)] if out.is_dir() else []))
        return sample(mm, prefix, *args, **kwargs)

    monkeypatch.setattr(mmr1.generation, "sample_tokens", spy)
    code, stdout, err = run(_generate(tiny_hf_dir, out, "--num-images", "10", "--cfg", "1"), capsys)
    assert code == 0, err
    assert seen == [(8, []), (2, [f"mmr1_seed{seed}.png" for seed in range(8)])]
    assert len(pngs(out)) == 10 and len(_record(out)["images"]) == 10
    assert f"{out / 'mmr1_seed0.png'} ... {out / 'mmr1_seed9.png'} (10 images)" in stdout


def test_generate_batches_reports_progress_over_all_batches(tiny_model):
    calls = []
    batches = list(mmr1.generation.generate_batches(tiny_model, PROMPT, num_images=3, batch_size=2, seed=1,
                                                    progress=lambda done, total, tokens=None: calls.append(
                                                        (done, total))))
    assert [(start, result.seeds) for start, result in batches] == [(0, [1, 2]), (2, [3])]
    steps = tiny_model.num_image_tokens
    assert calls[-1] == (2 * steps, 2 * steps) and {total for _, total in calls} == {2 * steps}
    assert [done for done, _ in calls] == list(range(1, 2 * steps + 1))
    with pytest.raises(mmr1.outputs.InputError, match="batch_size"):
        next(mmr1.generation.generate_batches(tiny_model, PROMPT, batch_size=0))
