"""training.world.evaluate: the stage diagnosis report (every stage, the four conditions, intervals, bars, files)
and the CLI."""

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


def test_world_report_has_every_stage_and_condition_with_intervals_bars_and_files(tmp_path, tiny_hf_dir, judge_dir,
                                                                                 clip_dir):
    report = evaluate_world({"sft": tiny_hf_dir, "grpo": tiny_hf_dir}, clip_dir, judge_dir, tasks=3, seed=0,
                            out_dir=tmp_path)
    names = [measure["measure"] for measure in report["measures"]]
    assert names == ["renders", "vq", "grounding", "true reasoning + references", "true reasoning, no references",
                     *(name for name, _, _ in CONDITIONS)]
    for measure in report["measures"]:
        keys = ("subject", "shape") if measure["measure"] == "grounding" else ("subject", "prompt", "shape", "size")
        for key in keys:
            value = measure[key]
            assert 0.0 <= value["low"] <= value["mean"] <= value["high"] <= 1.0
        assert measure["tasks"] == 3 and set(measure["passed"]) == set(measure["bars"])
    by_name = {measure["measure"]: measure for measure in report["measures"]}
    assert by_name["renders"]["bars"] == {} and by_name["vq"]["bars"] == {"subject": 0.93, "prompt": 0.97}
    assert set(by_name["vq"]["flat_colour_errors"]) == {"red", "orange", "yellow", "green", "blue", "purple",
                                                         "white", "black"}
    assert "exact" in by_name["grounding"] and "prompt" not in by_name["grounding"]
    for name, _, mode in CONDITIONS:
        assert -1.0 <= by_name[name]["clip_i"] <= 1.0 and -1.0 <= by_name[name]["clip_t"] <= 1.0
        assert ("reasoning_exact" in by_name[name]) == (mode == "xcot")
    assert [(d["better"], d["worse"]) for d in report["differences"]] == [
        (CONDITIONS[2][0], CONDITIONS[1][0]), (CONDITIONS[3][0], CONDITIONS[2][0])]
    # an untrained model misses its bars, and the report says which
    assert any(line.startswith("vq subject:") for line in report["failed"])
    assert json.loads((tmp_path / "report.json").read_text()) == report
    table = (tmp_path / "report.md").read_text()
    assert all(name in table for name in names) and "Bars missed:" in table and "Flat world colours" in table
    sheet = Image.open(tmp_path / "contact_sheet.png")
    assert sheet.size == (128 * (3 + len(CONDITIONS)), 14 + 128 * 3)
    # the same seed draws the same images, so the report repeats exactly
    again = evaluate_world({"sft": tiny_hf_dir, "grpo": tiny_hf_dir}, clip_dir, judge_dir, tasks=3, seed=0)
    assert again["measures"] == report["measures"]


def test_one_stage_runs_alone_and_an_unknown_stage_is_named(tmp_path, tiny_hf_dir, judge_dir):
    from mmr1.errors import InputError

    report = evaluate_world({"sft": tiny_hf_dir}, None, judge_dir, tasks=2, stages=("vq",), out_dir=tmp_path)
    assert [measure["measure"] for measure in report["measures"]] == ["renders", "vq"]
    assert not (tmp_path / "contact_sheet.png").exists()
    with pytest.raises(InputError, match="Unknown evaluation stage.*'vqq'"):
        evaluate_world({"sft": tiny_hf_dir}, None, judge_dir, tasks=2, stages=("vqq",))


def test_cli_names_missing_folders(tmp_path, capsys):
    assert main(["--judge", str(tmp_path / "nothing"), "--tasks", "1"]) == 2
    assert "error:" in capsys.readouterr().err


def test_the_drawn_subject_is_judged_alone_and_shown_under_generate(tmp_path, tiny_hf_dir, judge_dir, clip_dir):
    report = evaluate_world({"sft": tiny_hf_dir, "grpo": tiny_hf_dir}, clip_dir, judge_dir, tasks=2, seed=0,
                            out_dir=tmp_path, stages=("sft", "conditions"), subject_source="generate")
    by_name = {measure["measure"]: measure for measure in report["measures"]}
    for name in ("subject image, true reasoning", "subject image (c)", "subject image (d)"):
        assert "subject" in by_name[name] and "prompt" not in by_name[name] and "background" not in by_name[name]
    assert by_name["subject image (d)"]["bars"] == {"subject": 0.90}
    assert report["subject_source"] == "generate" and "subject source generate" in (tmp_path / "report.md").read_text()
    sheet = Image.open(tmp_path / "contact_sheet.png")  # references, target, (a)-(d), the subjects of (c) and (d)
    assert sheet.size == (128 * (3 + len(CONDITIONS) + 2), 14 + 128 * 2)
