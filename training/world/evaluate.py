"""Measure the embedded model on the procedural world's held-out subjects, stage by stage, read back by the judge.

    python -m training.world.evaluate --sft runs/world/sft/final --grpo runs/world/grpo/final \\
        --reward runs/world/reward --judge runs/world/judge --tasks 200 --out runs/world/eval [--stages vq,sft,...]

It draws `tasks` held-out tasks (a subject never trained on, two references in other scenes, a target scene in
the prompt) and runs the stage diagnosis of diagnosis.py on them, in chain order:

- `vq`: the judge on the target renders, on their VQ reconstructions, and flat colours through the VQ;
- `sft`: the grounding's per-attribute accuracy, and images drawn from the true reasoning with and without the
  references (the generator on its own, whatever the grounding writes);
- `conditions`: (a) prompt alone, (b) references without reasoning, (c) X-CoT, (d) X-CoT after GRPO, each drawn
  as DreamBench's evaluation does (training.dreambench.generate_in_mode), with the paired differences (c) - (b)
  and (d) - (c) and the reward model's CLIP-I and CLIP-T beside.

Every measure has its bar (diagnosis.BARS); report.md and report.json say which are missed, contact_sheet.png
shows references, target and each condition's image. The pipeline runs the stages as soon as their models exist,
so a VQ below its bar stops it before SFT.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from mmr1.errors import InputError, report_user_errors
from mmr1.sampling import SamplingSettings
from mmr1.xcot import SUBJECT_SOURCES, parse_reasoning

from .diagnosis import (
    SUBJECT_IMAGE, TRUE_REASONING, TRUE_REASONING_BARE, Measure, difference, failed_bars, grounding_measure, judged,
    markdown, vq_measures,
)
from .scenes import HELD_OUT_SUBJECTS, Example, sample_example

CONDITIONS = (  # (name, model key, mode)
    ("(a) prompt alone", "sft", "prompt"),
    ("(b) references, no reasoning", "sft", "references"),
    ("(c) X-CoT", "sft", "xcot"),
    ("(d) X-CoT after GRPO", "grpo", "xcot"),
)
STAGES = ("vq", "sft", "conditions")
GROUND_SETTINGS = {"max_new_tokens": 96, "ground_temperature": 0.7, "ground_top_p": 0.95}
_SHEET_ROWS = 8
BATCH = 25  # tasks sampled together: the tiny model's per-token overhead is shared by the batch


def held_out_tasks(count: int, seed: int) -> list[Example]:
    """`count` tasks on held-out subjects, the same for every model evaluated with this seed."""
    return [sample_example(HELD_OUT_SUBJECTS, seed=10_000_019 * (seed + 1) + index) for index in range(count)]


def reasoning_names_subject(reasoning: str | None, example: Example) -> bool:
    """Whether the reasoning's <subject> names exactly the task's subject (the grounding got every attribute)."""
    return reasoning is not None and parse_reasoning(reasoning).subject.strip() == example.subject.description()


def diagnose_vq(vq, judge, tasks: list[Example]) -> list[Measure]:
    """Stage `vq`: renders and VQ reconstructions through the judge (`vq` a JanusVQVAE)."""
    return vq_measures(judge, vq, tasks)


def batches(tasks: list[Example], seed: int, size: int = BATCH):
    """(first index, its seed, the tasks) in chunks: task i is always drawn with seed + i, whatever the chunking."""
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(tasks), size), desc="tasks", unit="batch", leave=False):
        yield start, seed + start, tasks[start : start + size]


def diagnose_sft(mm, judge, tasks: list[Example], seed: int, settings: SamplingSettings,
                 subject_source: str = "reference") -> list[Measure]:
    """Stage `sft`: the grounding's reasoning read as text, then the generator given the true chain (the true
    reasoning and, under 'generate', the true subject image), and under 'generate' the subject image the model
    draws from the true reasoning."""
    from mmr1.generation import generate_chains
    from mmr1.xcot import Grounding, draw_subjects, extract_subject, ground_batch

    reasonings, with_references, bare, drawn = [], [], [], []
    for _, chunk_seed, chunk in batches(tasks, seed):
        prompts, references = [task.prompt for task in chunk], [task.references() for task in chunk]
        truths = [task.reasoning() for task in chunk]
        reasonings += [grounding.reasoning for grounding in ground_batch(
            mm, references, prompts, GROUND_SETTINGS["max_new_tokens"], GROUND_SETTINGS["ground_temperature"],
            GROUND_SETTINGS["ground_top_p"], chunk_seed)]
        if subject_source == "generate":  # the true chain's subject image
            subjects = list(mm.encode_image_tokens([task.subject_image() for task in chunk]).cpu().split(1))
            drawn.append(draw_subjects(mm, prompts, references, truths, settings, chunk_seed).images)
        else:
            subjects = [extract_subject(mm, refs, subject_source) for refs in references]
        chains = [Grounding(prompt, truth, "", "", True, refs, subject)
                  for prompt, truth, refs, subject in zip(prompts, truths, references, subjects)]
        with_references.append(generate_chains(mm, prompts, chains, None, settings, chunk_seed).images)
        # without references: the true reasoning, and under 'generate' the true subject image it leads to (the
        # chain's next image; without it the model would draw the subject alone where the scene belongs)
        bare_chains = [replace(chain, references=[]) if subject_source == "generate" else None for chain in chains]
        bare.append(generate_chains(mm, prompts, bare_chains, truths, settings, chunk_seed).images)
    measures = [grounding_measure(reasonings, tasks),
                judged(TRUE_REASONING, judge, torch.cat(with_references), tasks),
                judged(TRUE_REASONING_BARE, judge, torch.cat(bare), tasks)]
    if drawn:
        measures.append(judged("subject image, true reasoning", judge, torch.cat(drawn), tasks, subject_only=True))
    return measures


def diagnose_conditions(models: dict, judge, reward: Path, tasks: list[Example], seed: int,
                        settings: SamplingSettings, subject_source: str = "reference"
                        ) -> tuple[list[Measure], dict[str, list[Image.Image]]]:
    """Stage `conditions`: (a)-(d) through the judge, with CLIP-I/CLIP-T, and under 'generate' the subject images
    of (c) and (d) judged alone; returns (measures, images per sheet column)."""
    from mmr1.generation import generate_chains
    from mmr1.rewards import load_reward_model

    from ..dreambench import mode_chains

    clip_i, clip_t = (load_reward_model(kind, reward) for kind in ("clip_i", "clip_t"))
    references = [task.references() for task in tasks]  # rendered once for every condition and score
    measures, columns, subjects = [], {}, []
    for name, model_key, mode in CONDITIONS:
        images, reasonings, subject_images = [], [], []
        for start, chunk_seed, chunk in batches(tasks, seed):
            prompts = [task.prompt for task in chunk]
            groundings, overrides = mode_chains(
                models[model_key], prompts, references[start : start + len(chunk)], mode, chunk_seed,
                GROUND_SETTINGS["max_new_tokens"], GROUND_SETTINGS["ground_temperature"],
                GROUND_SETTINGS["ground_top_p"], subject_source)
            images.append(generate_chains(models[model_key], prompts, groundings, overrides, settings,
                                          chunk_seed).images)
            reasonings += [None if grounding is None else grounding.reasoning for grounding in groundings]
            if mode == "xcot" and subject_source == "generate":
                subject_images += [grounding.subject_image[0] for grounding in groundings]
        images = torch.cat(images)
        pils = [Image.fromarray((image.numpy() * 255 + 0.5).astype("uint8")) for image in images]
        scores_i = [float(clip_i.score([pil], refs)[0]) for pil, refs in zip(pils, references)]
        extra = {"mode": mode, "model": model_key, "clip_i": sum(scores_i) / len(scores_i),
                 "clip_t": float(clip_t.score(pils, None, [task.prompt for task in tasks]).mean())}
        if mode == "xcot":
            extra["reasoning_exact"] = sum(map(reasoning_names_subject, reasonings, tasks)) / len(tasks)
        measures.append(judged(name, judge, images, tasks, **extra))
        columns[name] = pils[:_SHEET_ROWS]
        if subject_images:
            label = SUBJECT_IMAGE if model_key == "grpo" else "subject image (c)"
            subjects.append(judged(label, judge, torch.stack(subject_images), tasks, subject_only=True))
            columns[label] = [Image.fromarray((image.numpy() * 255 + 0.5).astype("uint8"))
                              for image in subject_images[:_SHEET_ROWS]]
    return measures + subjects, columns


def evaluate_world(
    models: dict[str, Path],
    reward: Path | None,
    judge: Path,
    tasks: int = 200,
    seed: int = 0,
    out_dir: Path | None = None,
    settings: SamplingSettings = SamplingSettings(cfg_scale=3.0),
    stages: tuple[str, ...] = STAGES,
    vq=None,
    subject_source: str = "reference",
) -> dict:
    """The diagnosis `stages` on `tasks` held-out tasks; writes report.json, report.md (and contact_sheet.png with
    the conditions) to `out_dir`. `models` maps "sft" / "grpo" to checkpoint folders; `vq` is a JanusVQVAE for
    the `vq` stage when no model is given (the pipeline's components); `subject_source` is the chain's visual
    intermediate, as the models were trained (mmr1.xcot.SUBJECT_SOURCES)."""
    from mmr1.loading import load_model

    from .judge import load_judge

    unknown = set(stages) - set(STAGES)
    if unknown:
        raise InputError(f"Unknown evaluation stage {sorted(unknown)}; choose from {', '.join(STAGES)}.")
    examples = held_out_tasks(tasks, seed)
    attribute_judge = load_judge(judge)
    loaded = {key: load_model(path) for key, path in models.items()}
    measures, columns = [], {}
    if "vq" in stages:
        measures += diagnose_vq(vq if vq is not None else loaded["sft"].model.model.vqmodel, attribute_judge, examples)
    if "sft" in stages:
        measures += diagnose_sft(loaded["sft"], attribute_judge, examples, seed, settings, subject_source)
    differences = []
    if "conditions" in stages:
        if reward is None:
            raise InputError("The conditions stage needs the reward model folder (--reward) for CLIP-I and CLIP-T.")
        conditions, columns = diagnose_conditions(loaded, attribute_judge, reward, examples, seed, settings,
                                                  subject_source)
        measures += conditions
        named = {measure.name: measure for measure in conditions}
        differences = [difference(named[better], named[worse]) for better, worse in
                       ((CONDITIONS[2][0], CONDITIONS[1][0]), (CONDITIONS[3][0], CONDITIONS[2][0]))]
    summaries = [measure.summary() for measure in measures]
    report = {"tasks": tasks, "seed": seed, "settings": asdict(settings), "held_out_subjects": len(HELD_OUT_SUBJECTS),
              "stages": list(stages), "subject_source": subject_source, "measures": summaries, "differences": differences,
              "failed": failed_bars(summaries, differences)}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (out_dir / "report.md").write_text(report_markdown(report), encoding="utf-8")
        if columns:
            contact_sheet(examples[:_SHEET_ROWS], columns).save(out_dir / "contact_sheet.png")
    return report


def report_markdown(report: dict) -> str:
    """report.md: what was run, the diagnosis table, and the bars missed."""
    head = (f"Held-out subjects: {report['tasks']} tasks (seed {report['seed']}), stages {', '.join(report['stages'])}, "
            f"subject source {report['subject_source']}, sampling {report['settings']}. Percentages; [95 % bootstrap interval over tasks].\n\n")
    rows = [summary for summary in report["measures"] if "clip_i" in summary]
    scores = "".join(f"| {row['measure']} | {row['clip_i']:.3f} | {row['clip_t']:.3f} | "
                     + (f"{100 * row['reasoning_exact']:.1f} %" if "reasoning_exact" in row else "-") + " |\n"
                     for row in rows)
    if scores:
        scores = "\n| condition | CLIP-I | CLIP-T | reasoning exact |\n|---|---|---|---|\n" + scores
    failed = "".join(f"- {line}\n" for line in report["failed"]) or "- none\n"
    return head + markdown(report["measures"], report["differences"]) + scores + "\nBars missed:\n" + failed


def contact_sheet(examples: list[Example], columns: dict[str, list[Image.Image]], scale: int = 2) -> Image.Image:
    """References, target and each condition's image per task; the header names the columns."""
    size, header = 64 * scale, 14
    names = ["ref 1", "ref 2", "target", *(name.split(" ", 1)[0] if name.startswith("(") else
                                          "subject " + name.split(" ")[-1] for name in columns)]
    sheet = Image.new("RGB", (size * len(names), header + size * len(examples)), "white")
    draw = ImageDraw.Draw(sheet)
    for column, name in enumerate(names):
        draw.text((column * size + 4, 1), name, fill="black")
    for row, example in enumerate(examples):
        tiles = [*example.references()[:2], example.target(), *(images[row] for images in columns.values())]
        for column, tile in enumerate(tiles):
            sheet.paste(tile.resize((size, size), Image.NEAREST), (column * size, header + row * size))
    return sheet


def _command(args: argparse.Namespace) -> int:
    stages = tuple(stage.strip() for stage in args.stages.split(",") if stage.strip())
    models = {"sft": args.sft} if "conditions" not in stages else {"sft": args.sft, "grpo": args.grpo}
    report = evaluate_world(models, args.reward, args.judge, args.tasks, args.seed, args.out,
                            SamplingSettings(cfg_scale=args.cfg), stages, subject_source=args.subject)
    print(report_markdown(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.world.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft", type=Path, default=Path("runs/world/sft/final"),
                        help="model after SFT: its VQ, grounding, true reasoning, (a)-(c)")
    parser.add_argument("--grpo", type=Path, default=Path("runs/world/grpo/final"), help="model after GRPO: (d)")
    parser.add_argument("--reward", type=Path, default=Path("runs/world/reward"), help="CLIP-style reward folder")
    parser.add_argument("--judge", type=Path, default=Path("runs/world/judge"), help="judge folder")
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--subject", default="reference", choices=SUBJECT_SOURCES,
                        help="the chain's visual intermediate, as the models were trained")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    return report_user_errors(lambda: _command(args))


if __name__ == "__main__":
    raise SystemExit(main())
