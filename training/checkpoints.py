"""Checkpoints the nodes and `python -m mmr1 generate` load directly, written so that a crash never leaves a
partial one where a loader or a resume would find it.

A checkpoint is filled in a hidden temporary folder beside its destination and renamed into place; an old one is
renamed to a hidden name before it is deleted. Hidden leftovers of a crash are removed by `remove_leftovers`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

TRAINING_RECORD = "mmr1_training.json"


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
    (folder / TRAINING_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
