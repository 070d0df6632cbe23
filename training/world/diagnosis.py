"""Stage diagnosis of the embedded world model: each stage of the chain measured on its own, on the same held-out
tasks, so the stage that limits personalization is read off a table instead of guessed.

A `Measure` holds, per task, whether each attribute came out right; its summary gives means with a 95 %
bootstrap interval over tasks, and `BARS` the target each measure must reach (issue 15):

- `renders`: the judge on the target renders themselves (the ceiling of every other measure);
- `vq`: the judge on VQ reconstructions of those renders (the ceiling of any generator drawing through this VQ),
  beside the flat world colours through the VQ (`flat_colour_errors`);
- `grounding`: the subject attributes the reasoning's `<subject>` names (text, no judge), and all four at once;
- `true reasoning + references` / `true reasoning, no references`: images drawn from the true reasoning;
- the conditions (a)-(d) of evaluate.py, with the paired differences (c) - (b) and (d) - (c);
- under subject_source "generate", the subject images the model draws, judged alone (subject attributes only):
  from the true reasoning, in (c) and in (d).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .scenes import ATTRIBUTES, COLOURS, IMAGE_SIZE, SCENE_ATTRIBUTES, SUBJECT_ATTRIBUTES, Example, parse_description

RENDERS, VQ, GROUNDING = "renders", "vq", "grounding"
TRUE_REASONING, TRUE_REASONING_BARE = "true reasoning + references", "true reasoning, no references"
SUBJECT_IMAGE = "subject image (d)"  # the subject drawn after GRPO's reasoning (subject_source generate)
GROUPS = {"subject": SUBJECT_ATTRIBUTES, "prompt": SCENE_ATTRIBUTES}
EXACT = "exact"  # every subject attribute right at once (grounding)

BARS: dict[str, dict[str, float]] = {  # measure -> summary key -> the least mean that passes
    VQ: {"subject": 0.93, "prompt": 0.97},
    GROUNDING: {**{name: 0.95 for name in SUBJECT_ATTRIBUTES}, EXACT: 0.90},
    TRUE_REASONING: {"subject": 0.90, "prompt": 0.95},
    "(d) X-CoT after GRPO": {"subject": 0.90, "prompt": 0.90},
    SUBJECT_IMAGE: {"subject": 0.90},
}
DIFFERENCE_BARS = {  # (better, worse) -> least mean difference of subject scores, and whether its interval must exclude 0
    ("(c) X-CoT", "(b) references, no reasoning"): (0.10, False),
    ("(d) X-CoT after GRPO", "(c) X-CoT"): (0.0, True),
}
FLAT_COLOUR_BAR = 16  # worst channel error out of 255 of a flat world colour through the VQ
INTERVAL_RESAMPLES = 2000


@dataclass
class Measure:
    """Per task, whether each attribute is right, for one stage; `extra` holds what the stage adds (scores)."""

    name: str
    hits: dict[str, list[bool]]  # attribute -> [tasks]
    extra: dict = field(default_factory=dict)

    def task_scores(self, key: str) -> np.ndarray:
        """[tasks] per-task score of a summary key: an attribute (0/1), a group mean, or `exact`."""
        if key in self.hits:
            return np.asarray(self.hits[key], np.float64)
        names = SUBJECT_ATTRIBUTES if key == EXACT else GROUPS[key]
        present = [name for name in names if name in self.hits]
        table = np.asarray([self.hits[name] for name in present], np.float64)
        return table.min(axis=0) if key == EXACT else table.mean(axis=0)

    def keys(self) -> list[str]:
        keys = [group for group, names in GROUPS.items() if any(name in self.hits for name in names)]
        if self.name == GROUNDING:
            keys.append(EXACT)
        return keys + [name for name in ATTRIBUTES if name in self.hits]

    def summary(self) -> dict:
        """{key: {"mean", "low", "high"}} over every key, plus the bars and whether each holds."""
        values = {key: interval(self.task_scores(key)) for key in self.keys()}
        bars = BARS.get(self.name, {})
        return {"measure": self.name, "tasks": len(next(iter(self.hits.values()))), **values,
                "bars": bars, "passed": {key: values[key]["mean"] >= bar for key, bar in bars.items()},
                **self.extra}


def interval(values: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Mean and 95 % percentile-bootstrap interval over tasks."""
    values = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (INTERVAL_RESAMPLES, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(values.mean()), "low": float(low), "high": float(high)}


def difference(better: Measure, worse: Measure, key: str = "subject") -> dict:
    """Paired (same tasks) difference of two measures' per-task scores, with its bootstrap interval and bar."""
    result = interval(better.task_scores(key) - worse.task_scores(key))
    least, exclude_zero = DIFFERENCE_BARS.get((better.name, worse.name), (None, False))
    passed = None if least is None else result["mean"] >= least and (not exclude_zero or result["low"] > 0)
    return {"better": better.name, "worse": worse.name, "key": key, **result, "bar": least,
            "interval_excludes_zero": exclude_zero, "passed": passed}


def judged(name: str, judge, images: torch.Tensor, tasks: list[Example], subject_only: bool = False,
           **extra) -> Measure:
    """The judge's reading of one image per task ([tasks, H, W, 3] float 0..1) against the task's labels
    (`subject_only`: the subject's attributes alone, for subject images, which show no scene)."""
    from .judge import attribute_hits

    hits = attribute_hits(judge, images, [task.labels() for task in tasks])
    if subject_only:
        hits = {name: hits[name] for name in SUBJECT_ATTRIBUTES}
    return Measure(name, hits, extra)


def targets(tasks: list[Example]) -> torch.Tensor:
    """[tasks, IMAGE_SIZE, IMAGE_SIZE, 3] float 0..1: each task's target render."""
    return torch.stack([torch.from_numpy(np.array(task.target())) for task in tasks]).float() / 255


def vq_measures(judge, vq, tasks: list[Example]) -> list[Measure]:
    """The judge on the target renders and on their VQ reconstructions (the flat colours ride on the second)."""
    from .vq import reconstructed_images

    rendered = targets(tasks)
    reconstructed = reconstructed_images(vq, (rendered * 255).round().to(torch.uint8))
    return [judged(RENDERS, judge, rendered, tasks),
            judged(VQ, judge, reconstructed, tasks, flat_colour_errors=flat_colour_errors(vq))]


def flat_colour_errors(vq) -> dict[str, int]:
    """Each world colour as a flat image through encode and decode: its worst channel error out of 255."""
    from .vq import flat_fields, reconstructed_images

    colours = list(COLOURS.values())
    decoded = reconstructed_images(vq, flat_fields(colours, IMAGE_SIZE)).mean(dim=(1, 2)) * 255
    errors = (decoded - torch.tensor(colours, dtype=torch.float32)).abs().amax(dim=1)
    return {name: int(round(float(error))) for name, error in zip(COLOURS, errors)}


def grounding_measure(reasonings: list[str | None], tasks: list[Example]) -> Measure:
    """What each reasoning's `<subject>` names, attribute by attribute, against the task's subject."""
    from mmr1.xcot import parse_reasoning

    named = [parse_description(parse_reasoning(text).subject) if text else {} for text in reasonings]
    hits = {name: [found.get(name) == getattr(task.subject, name) for found, task in zip(named, tasks)]
            for name in SUBJECT_ATTRIBUTES}
    return Measure(GROUNDING, hits)


def failed_bars(summaries: list[dict], differences: list[dict] = ()) -> list[str]:
    """Every bar a diagnosis misses, as 'measure key: value < bar' lines (empty when all hold)."""
    lines = []
    for summary in summaries:
        for key, bar in summary["bars"].items():
            if not summary["passed"][key]:
                lines.append(f"{summary['measure']} {key}: {100 * summary[key]['mean']:.1f} % < {100 * bar:.0f} %")
        errors = summary.get("flat_colour_errors")
        if errors and max(errors.values()) > FLAT_COLOUR_BAR:
            worst = max(errors, key=errors.get)
            lines.append(f"{summary['measure']} flat colours: {worst} off by {errors[worst]}/255 > {FLAT_COLOUR_BAR}")
    for item in differences:
        if item["passed"] is False:
            lines.append(f"{item['better']} - {item['worse']}: {100 * item['mean']:+.1f} points "
                         f"[{100 * item['low']:+.1f}, {100 * item['high']:+.1f}], bar {100 * item['bar']:+.0f}")
    return lines


def markdown(summaries: list[dict], differences: list[dict] = ()) -> str:
    """The diagnosis table: one row per measure (mean and interval of subject and prompt, each attribute)."""
    header = ("| measure | subject | prompt | exact | " + " | ".join(ATTRIBUTES).replace("_", " ") + " | bars |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]

    def cell(summary: dict, key: str, with_interval: bool = False) -> str:
        if key not in summary:
            return ""
        value = summary[key]
        text = f"{100 * value['mean']:.1f}"
        return text + (f" [{100 * value['low']:.1f}, {100 * value['high']:.1f}]" if with_interval else "")

    for summary in summaries:
        passed = summary["passed"]
        verdict = "-" if not passed else ("met" if all(passed.values()) else
                                          "missed: " + ", ".join(key for key, ok in passed.items() if not ok))
        cells = [summary["measure"], cell(summary, "subject", True), cell(summary, "prompt", True),
                 cell(summary, EXACT, True), *(cell(summary, name) for name in ATTRIBUTES), verdict]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    flat = [summary["flat_colour_errors"] for summary in summaries if "flat_colour_errors" in summary]
    if flat:
        text += ("\nFlat world colours through the VQ, worst channel error out of 255 (bar "
                 f"{FLAT_COLOUR_BAR}): " + ", ".join(f"{name} {error}" for name, error in flat[0].items()) + "\n")
    if differences:
        text += "\n| difference (subject, paired) | points | 95 % interval | bar |\n|---|---|---|---|\n"
        for item in differences:
            bar = "-" if item["bar"] is None else (f">= {100 * item['bar']:+.0f}"
                                                   + (", interval above 0" if item["interval_excludes_zero"] else ""))
            verdict = "" if item["passed"] is None else (" met" if item["passed"] else " missed")
            text += (f"| {item['better']} - {item['worse']} | {100 * item['mean']:+.1f} | "
                     f"[{100 * item['low']:+.1f}, {100 * item['high']:+.1f}] | {bar}{verdict} |\n")
    return text
