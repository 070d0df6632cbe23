"""What a run may do to its output_dir: write only into a new or empty folder or a run of this kit (mmr1_run.json),
remove only what it wrote, hold the folder against a second run at once (mmr1_run.lock), and resume despite
paths spelled otherwise, a moved folder, a corrupt newest checkpoint or a torn last metrics line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.training.test_engine import (ROOT, checkpointed, environment, grpo_command, metric_steps,  # noqa: F401
                                        prompts, refused, weights, write_config)
from training.checkpoints import LOCK, MARKER, FolderLock, RunFolderError
from training.config import ConfigError, build_config, read_toml
from training.grpo import GRPOConfig
from training.grpo import main as grpo_main


# The finished runs these tests resume come from subprocesses on one thread (test_engine.environment); resuming
# in this process on other thread counts would sum in another order and could not be bit-identical.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def copy_of(checkpointed: Path, tmp_path: Path, monkeypatch) -> Path:
    """A copy of the finished 2-step run (checkpoints at steps 1 and 2), as the current directory."""
    case = tmp_path / "case"
    shutil.copytree(checkpointed, case)
    monkeypatch.chdir(case)
    return case


def contents(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def resumed(case: Path, capsys, *extra: str) -> tuple[str, str]:
    """Run the case's config through the command line in this process, which must succeed: (stdout, stderr)."""
    capsys.readouterr()
    assert grpo_main(["--config", str(case / "grpo.toml"), *extra]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


# -- 2: only new or empty folders, or runs of this kit; only the kit's own leftovers go --------------------------


@pytest.mark.parametrize("output_dir", ["", ".", "./"])
def test_output_dir_meaning_the_current_directory_is_refused_naming_the_key(output_dir, prompts):
    with pytest.raises(ConfigError, match="config key 'output_dir'"):
        build_config(GRPOConfig, {"model": "m", "data": str(prompts), "output_dir": output_dir})


def test_a_folder_that_is_not_a_run_of_this_kit_is_refused_and_left_as_it_was(tiny_hf_dir, prompts, tmp_path,
                                                                               capsys):
    """It held someone's final/, metrics.jsonl and hidden folders named like leftovers: a run replaced final/,
    emptied metrics.jsonl and deleted the hidden folders."""
    output = tmp_path / "run"
    (output / "final").mkdir(parents=True)
    (output / "final" / "model.safetensors").write_bytes(b"someone's weights")
    (output / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    for hidden in (".cache.tmp", ".photos.old-2019"):
        (output / hidden).mkdir()
        (output / hidden / "keep.txt").write_text("mine")
    before = contents(output)
    config = write_config(tmp_path, tiny_hf_dir, prompts, steps=1, save_every=0)
    error = refused(tmp_path, capsys)
    assert str(output) in error and MARKER in error and "output_dir" in error
    assert contents(output) == before and not (output / MARKER).exists()
    assert config.is_file()


def test_a_run_of_another_recipe_is_refused(tiny_hf_dir, prompts, tmp_path):
    from training.engine import Run

    output = tmp_path / "run"
    output.mkdir()
    (output / MARKER).write_text(json.dumps({"recipe": "sft"}))
    with pytest.raises(RunFolderError, match="holds a run of recipe 'sft'"):
        Run("grpo", build_config(GRPOConfig, {"model": str(tiny_hf_dir), "data": str(prompts), "device": "cpu",
                                              "output_dir": str(output)}))


def test_a_resume_removes_only_the_leftovers_this_kit_names(checkpointed, tmp_path, monkeypatch, capsys):
    case = copy_of(checkpointed, tmp_path, monkeypatch)
    output, checkpoints = case / "run", case / "run" / "checkpoints"
    kits = [checkpoints / ".step-000003.tmp", checkpoints / ".step-000001.old-4242", output / ".final.tmp",
            output / ".final.old-17"]
    others = [checkpoints / ".notes.tmp", checkpoints / ".step-backup.old-copy", output / ".venv.tmp",
              output / ".data.old-2020", output / ".final.tmp.mine"]
    for folder in kits + others:
        folder.mkdir()
        (folder / "file").write_text("x")
    out, _ = resumed(case, capsys)
    assert "resumed from run/checkpoints/step-000002 (step 2)" in out
    assert not any(folder.exists() for folder in kits)
    assert all((folder / "file").read_text() == "x" for folder in others)


# -- 4: one run at a time in a folder; a killed run's lock is taken over ------------------------------------------


def test_a_second_run_is_refused_while_one_holds_the_folder_and_a_killed_ones_lock_is_taken_over(
        tiny_hf_dir, prompts, tmp_path, capsys):
    """Two runs into one folder both exited 0, each deleting the other's checkpoints."""
    from training.engine import Run

    config = write_config(tmp_path, tiny_hf_dir, prompts, steps=100_000, save_every=0)  # runs until killed
    output = tmp_path / "run"
    first = subprocess.Popen(grpo_command(config), cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not ((output / "metrics.jsonl").is_file() and (output / "metrics.jsonl").read_text()):
            assert first.poll() is None and time.monotonic() < deadline, "the first run ended or never logged"
            time.sleep(0.05)
        with pytest.raises(RunFolderError, match="is in use"):
            Run("grpo", build_config(GRPOConfig, read_toml(config)))
        error = refused(tmp_path, capsys)
        assert str(output) in error and f"pid {first.pid}" in error and LOCK in error
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        assert first.wait(timeout=60) == -signal.SIGKILL
    # kill -9 left the lock file; the kernel released its lock, so the next run takes it over
    taken = Run("grpo", build_config(GRPOConfig, read_toml(config)))
    assert json.loads((output / LOCK).read_text())["pid"] == os.getpid()
    with pytest.raises(RunFolderError, match="is in use"):  # held by this process now (flock, not a process lock)
        Run("grpo", build_config(GRPOConfig, read_toml(config)))
    taken.release_folder()
    Run("grpo", build_config(GRPOConfig, read_toml(config))).release_folder()


def test_under_accelerate_launch_every_process_refuses_a_held_folder(tiny_hf_dir, prompts, tmp_path):
    """The main process alone takes the lock; the others learn its verdict and stop alike, none waits at a barrier
    for a main process that has gone."""
    config = write_config(tmp_path, tiny_hf_dir, prompts, steps=1, save_every=0)
    (tmp_path / "run").mkdir()
    held = FolderLock.take(tmp_path / "run")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
             str(ROOT / "training" / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
             "--main_process_port", "29523", "-m", "training.grpo", "--config", str(config)],
            cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300)
    finally:
        held.release()
    # each process's one error line; the launcher stops the other process once one has exited, maybe before it
    # writes its line, and lines of two processes can share a line of the pipe
    assert result.returncode != 0 and "(exitcode: 2)" in result.stderr, result.stderr
    assert result.stderr.count(f"error: output_dir {tmp_path / 'run'} is in use") >= 1, result.stderr
    assert "Timeout" not in result.stderr and "timed out" not in result.stderr
    assert not (tmp_path / "run" / MARKER).exists()


# -- 13: resuming ---------------------------------------------------------------------------------------------


def test_a_run_resumes_with_its_paths_spelled_otherwise_and_from_a_moved_folder(checkpointed, tiny_hf_dir, tmp_path,
                                                                               monkeypatch, capsys):
    """The model given relative instead of absolute, and the run folder moved (output_dir absolute, elsewhere),
    were refused as a changed config."""
    case = copy_of(checkpointed, tmp_path, monkeypatch)
    (case / "run").rename(case / "moved")
    model = os.path.relpath(tiny_hf_dir, case)
    out, _ = resumed(case, capsys, "--model", model, "--output_dir", str(case / "moved"), "--steps", "3")
    assert f"resumed from {case / 'moved' / 'checkpoints' / 'step-000002'} (step 2)" in out
    assert metric_steps(case / "moved") == [1, 2, 3]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "torn-trainer-state": lambda checkpoint: truncate(checkpoint / "trainer_state.json"),
    "torn-optimizer": lambda checkpoint: truncate(checkpoint / "engine_state" / "optimizer.bin"),
    "torn-weights": lambda checkpoint: truncate(checkpoint / "engine_state" / "model.safetensors"),
    "missing-weights": lambda checkpoint: (checkpoint / "engine_state" / "model.safetensors").unlink(),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_corrupt_newest_checkpoint_falls_back_to_the_older_one(corrupt, checkpointed, tmp_path, monkeypatch,
                                                                 capsys):
    """The run ends bit-identical to the uninterrupted one, from the step-1 checkpoint kept beside step 2."""
    case = copy_of(checkpointed, tmp_path, monkeypatch)
    corrupt(case / "run" / "checkpoints" / "step-000002")
    out, err = resumed(case, capsys)
    assert "resumed from run/checkpoints/step-000001 (step 1)" in out
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and str(Path("run") / "checkpoints" / "step-000002") in warnings[0], err
    again, reference = weights(case / "run" / "final"), weights(checkpointed / "run" / "final")
    assert all(torch.equal(again[key], reference[key]) for key in reference)
    assert metric_steps(case / "run") == [1, 2]


def test_every_checkpoint_corrupt_is_refused_naming_them(checkpointed, tmp_path, monkeypatch, capsys):
    case = copy_of(checkpointed, tmp_path, monkeypatch)
    for checkpoint in (case / "run" / "checkpoints").iterdir():
        truncate(checkpoint / "engine_state" / "optimizer.bin")
    error = refused(case, capsys)
    assert "step-000001" in error and "step-000002" in error and "optimizer.bin" in error


def test_a_torn_last_metrics_line_is_dropped_and_a_corrupt_earlier_line_refused(checkpointed, tmp_path,
                                                                                 monkeypatch, capsys):
    """A crash in the middle of writing a line left it torn, and every later resume crashed on it."""
    case = copy_of(checkpointed, tmp_path, monkeypatch)
    metrics = case / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines) + '\n{"step": 3, "loss": 0.')
    _, err = resumed(case, capsys)
    assert "warning: " in err and str(Path("run") / "metrics.jsonl") in err
    assert metric_steps(case / "run") == [1, 2]
    metrics.write_text("\n".join(["{not json", *lines[1:]]) + "\n")
    error = refused(case, capsys)
    assert str(Path("run") / "metrics.jsonl") in error and "line 1" in error


def test_resuming_with_fewer_steps_than_the_checkpoint_is_refused(checkpointed, tmp_path, monkeypatch, capsys):
    """steps = 1 over a checkpoint of step 2 exported the step-2 weights as final/ of a 1-step run."""
    case = copy_of(checkpointed, tmp_path, monkeypatch)
    before = contents(case / "run" / "final")
    capsys.readouterr()
    assert grpo_main(["--config", str(case / "grpo.toml"), "--steps", "1"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "config key 'steps'" in error and "step 2" in error
    assert contents(case / "run" / "final") == before
