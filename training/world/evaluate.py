"""Measure personalization on the procedural world's held-out subjects, read back by the judge.

    # (a) prompt alone, (b) references without reasoning, (c) X-CoT, (d) X-CoT after GRPO
    python -m training.world.evaluate --sft runs/world/sft/final --grpo runs/world/grpo/final \\
        --reward runs/world/reward --judge runs/world/judge --tasks 60 --out runs/world/eval

It draws `tasks` held-out tasks (a subject never trained on, two references in other scenes, a target scene in
the prompt), each condition generated as DreamBench's evaluation does (training.dreambench.generate_in_mode).
The judge (judge.py, never a reward) reads each generated image back: subject attribute accuracy is the mean over
shape, colour, pattern and pattern colour; prompt attribute accuracy the mean over background, position and size.
The reward model's CLIP-I (to the references) and CLIP-T (to the prompt) are reported beside. It writes
`report.md`, `report.json` and `contact_sheet.png`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from mmr1.errors import report_user_errors
from mmr1.sampling import SamplingSettings
from mmr1.xcot import parse_reasoning

from .scenes import HELD_OUT_SUBJECTS, SUBJECT_ATTRIBUTES, Example, sample_example

CONDITIONS = (  # (name, model key, mode)
    ("(a) prompt alone", "sft", "prompt"),
    ("(b) references, no reasoning", "sft", "references"),
    ("(c) X-CoT", "sft", "xcot"),
    ("(d) X-CoT after GRPO", "grpo", "xcot"),
)
_SHEET_ROWS = 8


def held_out_tasks(count: int, seed: int) -> list[Example]:
    """`count` tasks on held-out subjects, the same for every model evaluated with this seed."""
    return [sample_example(HELD_OUT_SUBJECTS, seed=10_000_019 * (seed + 1) + index) for index in range(count)]


def reasoning_names_subject(reasoning: str | None, example: Example) -> bool:
    """Whether the reasoning's <subject> names exactly the task's subject (the grounding got every attribute)."""
    return reasoning is not None and parse_reasoning(reasoning).subject.strip() == example.subject.description()


def evaluate_world(
    models: dict[str, Path],
    reward: Path,
    judge: Path,
    tasks: int = 60,
    seed: int = 0,
    out_dir: Path | None = None,
    settings: SamplingSettings = SamplingSettings(cfg_scale=3.0),
) -> dict:
    """Judge accuracies and reward scores of the four conditions on held-out tasks; writes the report files."""
    from tqdm.auto import tqdm

    from mmr1.loading import load_model
    from mmr1.rewards import load_reward_model

    from ..dreambench import generate_in_mode
    from .judge import attribute_accuracy, load_judge

    examples = held_out_tasks(tasks, seed)
    attribute_judge = load_judge(judge)
    clip_i, clip_t = (load_reward_model(kind, reward) for kind in ("clip_i", "clip_t"))
    loaded = {key: load_model(path) for key, path in models.items()}
    rows, sheet_columns = [], {}
    for name, model_key, mode in CONDITIONS:
        mm = loaded[model_key]
        images, reasonings = [], []
        for index, example in enumerate(tqdm(examples, desc=name, unit="task")):
            result = generate_in_mode(mm, example.prompt, example.references(), mode, seed + index, 1, settings,
                                      max_new_tokens=96, ground_temperature=0.7, ground_top_p=0.95,
                                      subject_source="reference")
            images.append(result.images[0])
            reasonings.append(result.reasoning)
        images = torch.stack(images)
        truths = [example.labels() for example in examples]
        accuracy = attribute_accuracy(attribute_judge, images, truths)
        pils = [Image.fromarray((image.numpy() * 255 + 0.5).astype("uint8")) for image in images]
        scores_i = [float(clip_i.score([pil], example.references())[0]) for pil, example in zip(pils, examples)]
        scores_t = clip_t.score(pils, None, [example.prompt for example in examples])
        rows.append({
            "condition": name, "model": str(models[model_key]), "mode": mode, **accuracy,
            "clip_i": sum(scores_i) / len(scores_i), "clip_t": float(scores_t.mean()),
            "reasoning_exact": (sum(reasoning_names_subject(r, e) for r, e in zip(reasonings, examples)) / len(examples)
                                if mode == "xcot" else None),
        })
        sheet_columns[name] = pils[:_SHEET_ROWS]
    report = {"tasks": tasks, "seed": seed, "settings": asdict(settings), "held_out_subjects": len(HELD_OUT_SUBJECTS),
              "rows": rows}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (out_dir / "report.md").write_text(markdown(report), encoding="utf-8")
        contact_sheet(examples[:_SHEET_ROWS], sheet_columns).save(out_dir / "contact_sheet.png")
    return report


def markdown(report: dict) -> str:
    """The table of one world evaluation (percentages; CLIP scores as cosines)."""
    header = ("| condition | subject attr. | prompt attr. | " + " | ".join(SUBJECT_ATTRIBUTES).replace("_", " ")
              + " | background | position | size | CLIP-I | CLIP-T | reasoning exact |")
    lines = [f"Held-out subjects: {report['tasks']} tasks (seed {report['seed']}), "
             f"sampling {report['settings']}.", "", header, "|" + "---|" * (header.count("|") - 1)]
    for row in report["rows"]:
        cells = [row["condition"], *(f"{100 * row[key]:.1f} %" for key in (
            "subject", "prompt", *SUBJECT_ATTRIBUTES, "background", "position", "size"))]
        cells += [f"{row['clip_i']:.3f}", f"{row['clip_t']:.3f}",
                  "-" if row["reasoning_exact"] is None else f"{100 * row['reasoning_exact']:.1f} %"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def contact_sheet(examples: list[Example], columns: dict[str, list[Image.Image]], scale: int = 2) -> Image.Image:
    """References, target and each condition's image per task; the header names the columns."""
    size, header = 64 * scale, 14
    names = ["ref 1", "ref 2", "target", *(name.split(" ", 1)[0] for name in columns)]
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
    report = evaluate_world({"sft": args.sft, "grpo": args.grpo}, args.reward, args.judge, args.tasks, args.seed,
                            args.out, SamplingSettings(cfg_scale=args.cfg))
    print(markdown(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.world.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft", type=Path, default=Path("runs/world/sft/final"), help="model after SFT: (a)-(c)")
    parser.add_argument("--grpo", type=Path, default=Path("runs/world/grpo/final"), help="model after GRPO: (d)")
    parser.add_argument("--reward", type=Path, default=Path("runs/world/reward"), help="CLIP-style reward folder")
    parser.add_argument("--judge", type=Path, default=Path("runs/world/judge"), help="judge folder")
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    return report_user_errors(lambda: _command(args))


if __name__ == "__main__":
    raise SystemExit(main())
