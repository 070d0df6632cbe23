"""training.world.evaluate: the world report (four conditions, judge and reward scores, files) and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from training.world.evaluate import CONDITIONS, evaluate_world, held_out_tasks, main, reasoning_names_subject
from training.world.judge import AttributeJudge, save_judge
from training.world.scenes import HELD_OUT_SUBJECTS


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("judge")
    save_judge(AttributeJudge(width=8).eval(), folder, {"note": "untrained, for the report's plumbing"})
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from mmr1.rewards import make_tiny_reward_checkpoint

    return make_tiny_reward_checkpoint(tmp_path_factory.mktemp("clip"), "clip_t")


def test_tasks_are_held_out_and_reproducible():
    tasks = held_out_tasks(5, seed=0)
    assert all(task.subject in HELD_OUT_SUBJECTS for task in tasks)
    assert tasks == held_out_tasks(5, seed=0) and tasks != held_out_tasks(5, seed=1)
    assert reasoning_names_subject(tasks[0].reasoning(), tasks[0])
    assert not reasoning_names_subject(tasks[1].reasoning(), tasks[0]) or tasks[1].subject == tasks[0].subject
    assert not reasoning_names_subject(None, tasks[0])


def test_world_report_has_every_condition_with_scores_and_files(tmp_path, tiny_hf_dir, judge_dir, clip_dir):
    report = evaluate_world({"sft": tiny_hf_dir, "grpo": tiny_hf_dir}, clip_dir, judge_dir, tasks=2, seed=0,
                            out_dir=tmp_path)
    assert [row["condition"] for row in report["rows"]] == [name for name, _, _ in CONDITIONS]
    for row in report["rows"]:
        for key in ("subject", "prompt", "shape", "background"):
            assert 0.0 <= row[key] <= 1.0
        assert -1.0 <= row["clip_i"] <= 1.0 and -1.0 <= row["clip_t"] <= 1.0
        assert (row["reasoning_exact"] is None) == (row["mode"] != "xcot")
    assert json.loads((tmp_path / "report.json").read_text()) == report
    table = (tmp_path / "report.md").read_text()
    assert all(name in table for name, _, _ in CONDITIONS) and "| subject attr. | prompt attr. |" in table
    sheet = Image.open(tmp_path / "contact_sheet.png")
    assert sheet.size == (128 * (3 + len(CONDITIONS)), 14 + 128 * 2)
    # the same seed draws the same images, so the report repeats exactly
    again = evaluate_world({"sft": tiny_hf_dir, "grpo": tiny_hf_dir}, clip_dir, judge_dir, tasks=2, seed=0)
    assert again["rows"] == report["rows"]


def test_cli_names_missing_folders(tmp_path, capsys):
    assert main(["--judge", str(tmp_path / "nothing"), "--tasks", "1"]) == 2
    assert "error:" in capsys.readouterr().err
