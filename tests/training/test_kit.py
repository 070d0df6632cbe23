"""The general kit (the modules of training/) stands without the embedded world model (training.world): no kit
module imports it or names it, so the world can change, or be left out, without touching the kit."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KIT = sorted(path for path in (ROOT / "training").glob("*.py") if path.name != "__init__.py")
WORLD = re.compile(r"\btraining[./]world\b|from \.world\b|from \. import .*\bworld\b")


def test_the_kit_covers_the_general_modules():
    assert {path.stem for path in KIT} >= {"config", "data", "engine", "sft", "grpo", "grpo_loss", "policy",
                                           "rewards", "memory", "checkpoints", "plots", "timing", "dreambench"}
    assert (ROOT / "training" / "world" / "__init__.py").is_file()


def test_importing_every_kit_module_loads_nothing_of_the_world():
    code = (
        "import importlib, sys\n"
        f"for name in {[path.stem for path in KIT]!r}:\n"
        "    importlib.import_module('training.' + name)\n"
        "print(sorted(m for m in sys.modules if m == 'training.world' or m.startswith('training.world.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_no_kit_module_names_the_world():
    named = [f"training/{path.name}:{number}: {line.strip()}" for path in KIT
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1) if WORLD.search(line)]
    assert not named, "the kit must not depend on training.world:\n" + "\n".join(named)
