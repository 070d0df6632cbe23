"""Checkpoints the nodes and `python -m mmr1 generate` load directly: transformers-layout folders, written atomically.

A checkpoint is first written to a hidden temporary folder beside its destination, then renamed into place, so
a crash never leaves a partial checkpoint where a loader would find it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

TRAINING_RECORD = "mmr1_training.json"


def write_atomically(destination: Path, fill) -> Path:
    """Create `destination` as a folder filled by `fill(temporary_folder)`, replacing any previous one whole."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    try:
        fill(temporary)
        if destination.exists():
            retired = destination.with_name(f".{destination.name}.old-{os.getpid()}")
            os.replace(destination, retired)
            os.replace(temporary, destination)
            shutil.rmtree(retired)
        else:
            os.replace(temporary, destination)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return destination


def save_recipe_checkpoint(mm, destination: Path, recipe: str, config: dict, step: int) -> Path:
    """A training run's checkpoint, saved in eval mode; the model's train/eval mode is restored afterwards."""
    training = mm.model.training
    mm.model.eval()
    try:
        return save_model_checkpoint(mm, destination, {"recipe": recipe, "step": step, "config": config})
    finally:
        mm.model.train(training)


def save_model_checkpoint(mm, destination: Path, record: dict) -> Path:
    """The model (safetensors), its processor and a JSON record of how it was trained."""

    def fill(folder: Path) -> None:
        mm.model.save_pretrained(folder, safe_serialization=True)
        mm.processor.save_pretrained(folder)
        (folder / TRAINING_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    return write_atomically(Path(destination), fill)
