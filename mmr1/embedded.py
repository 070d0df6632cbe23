"""The embedded model: a tiny Janus trained by training/world/pipeline.py on the procedural subject world,
shipped in the package (mmr1/assets/) so that the CLI, the nodes and the workflows run out of the box without
downloads.

It draws toy subjects (a red heart with blue stripes...) in small scenes, not photos: it is a demonstration and a
test bed whose quality is measured (training/world/evaluate.py), not a replacement for Janus-Pro.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
MODEL_NAME = "mmr1-world"  # the name the CLI and the loader node accept
REWARD_NAME = "mmr1-world-clip"
JUDGE_NAME = "mmr1-world-judge"
DEMO_DIR = ASSETS_DIR / "demo"  # references of a held-out subject and the prompt: demo.json


def embedded_path(name: str = MODEL_NAME) -> Path:
    """The folder of an embedded model, with a clear error when this copy of the package lacks it."""
    folder = ASSETS_DIR / name
    if not (folder / "config.json").is_file():
        raise InputError(
            f"The embedded model {name!r} is missing from {folder} (a source checkout without its assets?). "
            "Rebuild it with: python -m training.world.pipeline --install"
        )
    return folder


def resolve(folder: str | Path) -> Path:
    """A folder path as given, except the embedded names, which mean the packaged folders unless a folder of that
    name exists where the caller runs."""
    path = Path(folder).expanduser()
    if str(folder) in (MODEL_NAME, REWARD_NAME) and not path.exists():
        return embedded_path(str(folder))
    return path


def demo_task() -> tuple[list[Path], str]:
    """(reference image paths, prompt) of the bundled demo."""
    manifest = DEMO_DIR / "demo.json"
    if not manifest.is_file():
        raise InputError(f"The demo references are missing from {DEMO_DIR}.")
    task = json.loads(manifest.read_text(encoding="utf-8"))
    return [DEMO_DIR / name for name in task["references"]], task["prompt"]
