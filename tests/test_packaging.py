"""Packaging: the wheel holds mmr1 with its assets and training/ with its configs (so `python -m training.sft` runs
from any folder once installed), and not the tests. Built offline from a copy of the sources."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "mmr1", "training", "tests")  # tests/: to see it left out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel pip builds from a copy of the sources (the build writes build/ and *.egg-info where it runs)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache")
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, source / name, **({"ignore": skip} if (ROOT / name).is_dir() else {}))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", ".", "-w",
         str(out)], cwd=source, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = out.glob("*.whl")
    return built


def test_the_wheel_ships_training_with_its_configs_and_mmr1_with_its_assets(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"training/__init__.py", "training/sft.py", "training/grpo.py", "training/data.py",
            "training/world/pipeline.py", "mmr1/cli.py", "mmr1/images.py"} <= names
    configs = {path.relative_to(ROOT).as_posix() for folder in ("training/configs", "training/world/configs")
               for path in (ROOT / folder).rglob("*") if path.is_file()}
    assert "training/world/configs/sft.toml" in configs and "training/configs/accelerate/ddp.yaml" in configs
    assert configs <= names
    assets = {path.relative_to(ROOT).as_posix() for path in (ROOT / "mmr1" / "assets").rglob("*") if path.is_file()}
    assert "mmr1/assets/mmr1-world/model.safetensors" in assets and "mmr1/assets/demo/demo.json" in assets
    assert assets <= names  # the embedded model, reward model, judge and demo, as before
    assert not [name for name in names if name.startswith(("tests/", "nodes/", "benchmarks/"))]
    top_level = next(name for name in names if name.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["mmr1", "training"]


def test_the_installed_training_runs_outside_the_repository(wheel: Path, tmp_path: Path) -> None:
    """Unpacked (as pip installs it) into a folder far from the checkout: `python -m training.sft` starts there
    and finds its default configs inside the installed package."""
    installed = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(installed)
    env = {**os.environ, "PYTHONPATH": str(installed), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "training.sft", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "--config" in done.stdout, done.stderr[-2000:]
    where = subprocess.run(
        [sys.executable, "-c", "import training.config as c; print(c.__file__); print((c.CONFIGS / 'sft.toml').is_file())"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert where.stdout.split() == [str(installed / "training" / "config.py"), "True"], where.stderr[-2000:]
