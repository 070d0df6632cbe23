"""training.world.diagnosis: per-task measures, bootstrap intervals, paired differences, bars and the grounding
read from text."""

from __future__ import annotations

import numpy as np
import pytest

from training.world.diagnosis import (
    GROUNDING, VQ, Measure, difference, failed_bars, grounding_measure, interval, markdown,
)
from training.world.evaluate import held_out_tasks
from training.world.scenes import SUBJECT_ATTRIBUTES, Subject, parse_description


def test_interval_brackets_the_mean_and_narrows_with_more_tasks():
    rng = np.random.default_rng(0)
    small, large = interval(rng.random(20) < 0.7), interval(rng.random(2000) < 0.7)
    for value in (small, large):
        assert value["low"] <= value["mean"] <= value["high"]
    assert large["high"] - large["low"] < 0.4 * (small["high"] - small["low"])
    assert interval(np.ones(10)) == {"mean": 1.0, "low": 1.0, "high": 1.0}


def test_summary_groups_attributes_and_checks_the_bars():
    hits = {"shape": [True, True, False, True], "colour": [True] * 4, "pattern": [True] * 4,
            "pattern_colour": [True] * 4, "background": [True] * 4, "position": [True, False, True, True],
            "size": [True] * 4}
    summary = Measure(VQ, hits).summary()
    assert summary["subject"]["mean"] == pytest.approx(15 / 16) and summary["prompt"]["mean"] == pytest.approx(11 / 12)
    assert summary["passed"] == {"subject": True, "prompt": False}
    assert failed_bars([summary]) == ["vq prompt: 91.7 % < 97 %"]


def test_grounding_is_read_attribute_by_attribute_from_the_subject_tag():
    tasks = held_out_tasks(3, seed=0)
    right = tasks[0].reasoning()
    subject = tasks[1].subject
    wrong_shape = next(shape for shape in ("circle", "square") if shape != subject.shape)
    off_by_one = tasks[1].reasoning().replace(f" {subject.shape} ", f" {wrong_shape} ")
    measure = grounding_measure([right, off_by_one, None], tasks)
    assert measure.hits["shape"] == [True, False, False] and measure.hits["colour"] == [True, True, False]
    summary = measure.summary()
    assert summary["exact"]["mean"] == pytest.approx(1 / 3) and "prompt" not in summary
    assert set(summary["bars"]) == {*SUBJECT_ATTRIBUTES, "exact"} and summary["measure"] == GROUNDING


def test_descriptions_round_trip_with_the_right_article_and_tolerate_the_wrong_one():
    subject = Subject("cross", "orange", "grid", "white")
    assert subject.description() == "an orange cross with a white grid"
    assert Subject("heart", "red", "stripes", "orange").description() == "a red heart with orange stripes"
    assert parse_description("a orange cross with a white grid") == {
        "shape": "cross", "colour": "orange", "pattern": "grid", "pattern_colour": "white"}
    assert parse_description("a red blue heart") == {"shape": "heart", "colour": None, "pattern": None,
                                                     "pattern_colour": None}


def test_paired_differences_have_their_bars():
    tasks = 50
    worse = Measure("(b) references, no reasoning", {name: [False] * tasks for name in SUBJECT_ATTRIBUTES})
    better = Measure("(c) X-CoT", {name: [index % 2 == 0 for index in range(tasks)] for name in SUBJECT_ATTRIBUTES})
    gain = difference(better, worse)
    assert gain["mean"] == pytest.approx(0.5) and gain["low"] > 0.3 and gain["passed"] is True
    tie = difference(Measure("(d) X-CoT after GRPO", better.hits), better)
    assert tie["mean"] == 0 and tie["passed"] is False  # (d) must beat (c) with an interval above zero
    lines = failed_bars([], [gain, tie])
    assert len(lines) == 1 and lines[0].startswith("(d) X-CoT after GRPO - (c) X-CoT: +0.0 points")
    assert "| (c) X-CoT - (b) references, no reasoning | +50.0 |" in markdown([], [gain, tie])
