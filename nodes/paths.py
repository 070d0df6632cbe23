"""Model folders of the pack: `models/mmr1` (Janus checkpoints, training/ outputs) and `models/mmr1_rewards`,
plus the embedded model and reward model shipped inside the pack (`mmr1-world`, `mmr1-world-clip`), listed first.

Both are registered with `folder_paths.add_model_folder_path`, which appends, so extra_model_paths.yaml entries
(`mmr1: /data/janus`) keep working. Combos list folder names relative to a root; only listed names resolve to
paths, so no path written in a workflow reaches the filesystem.
"""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from ..mmr1.embedded import MODEL_NAME, REWARD_NAME, embedded_path
from ..mmr1.errors import MMR1Error, ModelFolderError
from ..mmr1.rewards.dreamsim import holds_dreamsim

MODELS = "mmr1"
REWARDS = "mmr1_rewards"
_MARKERS = ("config.json", "adapter_config.json")
_MAX_DEPTH = 3  # models/mmr1/<organisation>/<run>/<checkpoint>
_EMBEDDED = {MODELS: MODEL_NAME, REWARDS: REWARD_NAME}


def register_model_folders() -> None:
    for name in (MODELS, REWARDS):
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))


def roots(kind: str) -> list[Path]:
    return [Path(root) for root in folder_paths.get_folder_paths(kind)]


def list_model_folders(kind: str) -> list[str]:
    """Names (relative, '/'-separated) of the folders under the roots of `kind` that hold a model."""
    names: set[str] = set()
    for root in roots(kind):
        if not root.is_dir():
            continue
        for folder, subfolders, files in os.walk(root, followlinks=True):
            depth = len(Path(folder).relative_to(root).parts)
            if depth > 0 and (any(marker in files for marker in _MARKERS) or holds_dreamsim(Path(folder))):
                names.add(Path(folder).relative_to(root).as_posix())
                subfolders.clear()  # a model folder's own subfolders are not models
            elif depth >= _MAX_DEPTH:
                subfolders.clear()
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
    embedded = [] if kind not in _EMBEDDED or _EMBEDDED[kind] in names or _embedded_folder(kind) is None else [_EMBEDDED[kind]]
    return embedded + sorted(names)


def _embedded_folder(kind: str) -> Path | None:
    """The shipped folder of `kind`, or None where this copy of the pack lacks its assets."""
    try:
        return embedded_path(_EMBEDDED[kind])
    except MMR1Error:
        return None


def resolve_model_folder(kind: str, name: str) -> Path:
    """The folder of a listed name; a name that is not (or no longer) there is an error naming what was searched."""
    if name in list_model_folders(kind):
        for root in roots(kind):
            if (root / name).is_dir():
                return root / name
        if name == _EMBEDDED.get(kind):
            return embedded_path(name)
    searched = ", ".join(str(root) for root in roots(kind)) or "(no folder registered)"
    raise ModelFolderError(
        f"The model {name!r} is not in models/{kind} any more (searched: {searched}). Put the checkpoint folder "
        f"(config.json, weights, tokenizer and processor files) into one of these folders and refresh the node."
    )
