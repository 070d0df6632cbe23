"""The model that ships in mmr1/assets (trained by training.world.pipeline): it fits the size budget, its VQ keeps
the world's colours, it names held-out subjects from their references, and the README's first command runs on it
in seconds and draws the subject and the prompted scene, as read by the judge that ships beside it."""

from __future__ import annotations

import json
import time

import pytest
import torch
from PIL import Image

import mmr1.embedded as embedded
from mmr1.cli import main
from mmr1.images import pil_to_tensor
from mmr1.xcot import parse_reasoning
from training.world.diagnosis import BARS, EXACT, FLAT_COLOUR_BAR, GROUNDING, flat_colour_errors, grounding_measure
from training.world.judge import load_judge
from training.world.pipeline import demo_task
from training.world.scenes import SCENE_ATTRIBUTES, SUBJECT_ATTRIBUTES

ASSET_BUDGET_BYTES = 60 * 2**20  # issue 15: the shipped folders at most 60 MB
DEMO_SECONDS = 15  # issue 15: the demo within 15 s on the CPU (the test allows CI's slower, shared machines 4x)


@pytest.fixture(scope="module")
def shipped():
    from mmr1.loading import load_model

    return load_model(embedded.MODEL_NAME, dtype="fp32", device="cpu")


def test_the_shipped_assets_fit_the_budget():
    files = [path for path in embedded.ASSETS_DIR.rglob("*") if path.is_file()]
    folders = {path.relative_to(embedded.ASSETS_DIR).parts[0] for path in files}
    assert {embedded.MODEL_NAME, embedded.REWARD_NAME, embedded.JUDGE_NAME, "demo"} <= folders
    assert sum(path.stat().st_size for path in files) <= ASSET_BUDGET_BYTES


def test_every_flat_world_colour_comes_back_through_the_shipped_vq(shipped):
    errors = flat_colour_errors(shipped.model.model.vqmodel)
    assert max(errors.values()) <= FLAT_COLOUR_BAR, errors


def test_the_shipped_model_names_held_out_subjects_from_their_references(shipped):
    """50 held-out reference pairs (subjects training never showed): every attribute at the grounding bar."""
    from mmr1.xcot import ground_batch
    from training.world.evaluate import GROUND_SETTINGS, held_out_tasks

    tasks = held_out_tasks(50, seed=1)
    groundings = ground_batch(shipped, [task.references() for task in tasks], [task.prompt for task in tasks],
                              GROUND_SETTINGS["max_new_tokens"], GROUND_SETTINGS["ground_temperature"],
                              GROUND_SETTINGS["ground_top_p"], seed=0)
    summary = grounding_measure([grounding.reasoning for grounding in groundings], tasks).summary()
    for key, bar in BARS[GROUNDING].items():
        assert summary[key]["mean"] >= bar, (key, summary[key]["mean"])
    assert EXACT in BARS[GROUNDING]


def test_the_demo_runs_in_seconds_and_draws_the_subject_in_the_prompted_scene(tmp_path):
    started = time.perf_counter()
    assert main(["demo", "--out", str(tmp_path)]) == 0
    assert time.perf_counter() - started < 4 * DEMO_SECONDS
    task = demo_task()  # what install bundled
    record = json.loads((tmp_path / "mmr1_generation.json").read_text())
    assert record["prompt"] == task.prompt
    assert parse_reasoning(record["reasoning"]).subject == task.subject.description()
    paths = sorted(tmp_path.glob("mmr1_seed*.png"))
    assert len(paths) == 4
    images = torch.stack([pil_to_tensor(Image.open(path)) for path in paths])
    read = load_judge(embedded.ASSETS_DIR / embedded.JUDGE_NAME).predict(images)
    truth = task.labels()
    shows = [all(row[name] == truth[name] for name in SUBJECT_ATTRIBUTES + SCENE_ATTRIBUTES) for row in read]
    assert sum(shows) >= 3, read  # the subject and the prompted scene, every attribute, in 3 of the 4 images
