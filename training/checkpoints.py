"""Checkpoints the nodes and `python -m mmr1 generate` load directly, written so that a crash never leaves a
partial one where a loader or a resume would find it, and read so that a file planted in one never runs code.

A checkpoint is filled in a hidden temporary folder beside its destination and renamed into place; an old one is
renamed to a hidden name before it is deleted. Hidden leftovers of a crash are removed by `remove_leftovers`.
Before a resume reads an engine state, `check_code_free` refuses every file in it that could run code.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path
from pickle import UnpicklingError

import torch

from .config import ConfigError

TRAINING_RECORD = "mmr1_training.json"
CODE_FREE_SUFFIXES = (".safetensors", ".json")


def temporary_name(destination: Path) -> Path:
    return destination.with_name(f".{destination.name}.tmp")


def publish(temporary: Path, destination: Path) -> Path:
    """Rename a finished `temporary` folder to `destination`, replacing a previous folder whole."""
    if destination.exists():
        retired = destination.with_name(f".{destination.name}.old-{os.getpid()}")
        os.replace(destination, retired)
        os.replace(temporary, destination)
        shutil.rmtree(retired)
    else:
        os.replace(temporary, destination)
    return destination


def retire(folder: Path) -> None:
    """Delete `folder` without it ever existing half-deleted under its own name."""
    hidden = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    os.replace(folder, hidden)
    shutil.rmtree(hidden)


def remove_leftovers(parent: Path) -> list[Path]:
    """Remove the hidden temporary and retired folders a killed run left in `parent`; returns them."""
    leftovers = [path for path in parent.glob(".*") if path.is_dir() and (".tmp" in path.name or ".old-" in path.name)]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def write_training_record(folder: Path, record: dict) -> None:
    (folder / TRAINING_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n",
                                          encoding="utf-8")


def check_code_free(folder: Path) -> None:
    """Refuse `folder` (an engine state) unless every file in it is safetensors, JSON or a torch archive whose
    pickle names only what torch.load(weights_only=True) allows (with the numpy types accelerate adds for its RNG
    states): a resume unpickles the other files (torch's sharded checkpoints and DeepSpeed with
    weights_only=False), and a planted pickle would run its code. Raises ConfigError naming the file."""
    for path in sorted(path for path in folder.rglob("*") if path.is_file()):
        problem = None if path.suffix in CODE_FREE_SUFFIXES else _pickle_problem(path)
        if problem:
            raise ConfigError(
                f"{path} {problem}: a resume would unpickle it, and a pickle can run code, so {folder.parent} is not "
                "resumed (only states of tensors and plain data are). Delete that checkpoint to resume from an older "
                "one, or choose another output_dir."
            )


def _pickle_problem(path: Path) -> str | None:
    """Why unpickling `path` could run code, found without unpickling it (a static scan of its pickle); None if
    it cannot."""
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    if not zipfile.is_zipfile(path):
        return "is not a torch archive of tensors"
    try:
        with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (UnpicklingError, ValueError, RuntimeError, EOFError, KeyError) as error:
        return f"is not a plain torch archive ({(str(error) or type(error).__name__).splitlines()[0]})"
    return f"would call {', '.join(sorted(unsafe))} when unpickled" if unsafe else None
