"""DreamBench (DreamBooth, Ruiz et al. 2023): its folder as GRPO prompt records, and its evaluation of an mmr1
model (DINO, CLIP-I and CLIP-T per subject).

    python -m training.dreambench records ROOT OUT.jsonl [--references N] [--unique-token sks] [--subjects a,b]
    python -m training.dreambench evaluate ROOT --model DIR [--dino DIR] [--clip DIR] [--out DIR] [--mode xcot]
        [--protocol dreambooth|uno]

A DreamBench folder holds `<subject>/*.jpg` and `prompts_and_classes.txt` (the subject table and the object and
live-subject prompt lists). `records` writes one prompt record (training/data.py's format, no target) per subject
and prompt of its list; the evaluation draws from the same records, so training and evaluation agree on prompts.

Protocol: for every subject of a DreamBench folder and each of its prompts (object or live-subject list, written
with the class noun and no unique token), the model sees `references` photos of the subject and draws
`images_per_prompt` images (the paper: 4 per prompt, 25 prompts, 30 subjects). Each generated image is scored

- DINO: mean cosine similarity of its ViT-S/16 CLS embedding to those of ALL real photos of the subject;
- CLIP-I: the same with CLIP image embeddings;
- CLIP-T: cosine similarity of its CLIP image embedding to the CLIP text embedding of the prompt;
- copy-paste: 1 when it is closer (DINO, else CLIP-I) to one real photo than the two most similar real photos are
  to each other, else 0; its mean is the share of images that paste a reference rather than re-render the subject.

`protocol` "dreambooth" draws 4 images per prompt; "uno" (UNO's protocol, which later papers compare with) draws
6 and requires the CLIP folder to be a ViT-B/32, with DINO ViT-S/16 for DINO.

The scores come from `mmr1.rewards` (the same code GRPO is rewarded with), so evaluation and training agree on what a
metric means. A subject's score is the mean over its images; the overall score the mean over all images, as in the
paper. Everything random derives from `seed`, the subject's row in the DreamBench table and the prompt's index, so a
run on a subset of subjects draws exactly the images the full run draws for them.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from mmr1.errors import InputError, report_user_errors
from mmr1.generation import generate
from mmr1.images import open_image, to_rgb
from mmr1.metadata import save_png
from mmr1.rewards import ImageSimilarityReward, RewardModel
from mmr1.sampling import SamplingSettings
from mmr1.xcot import Grounding, check_subject_source, extract_subject, ground_batch

from .data import Record, absolute_path, split_names, write_records

# DreamBench's "live subject" prompts (outfits, hats) suit animals; its table has no other column saying which.
LIVE_CLASSES = frozenset({"cat", "dog"})
DREAMBENCH_PROMPTS_FILE = "prompts_and_classes.txt"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")


def _dreambench_tables(prompts_file: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """(subject -> class word, object prompt templates, live prompt templates) from prompts_and_classes.txt."""
    try:
        text = prompts_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"Cannot read the DreamBench prompt list {prompts_file}: {error}") from error
    header = re.search(r"^\s*subject_name\s*,\s*class\s*$", text, flags=re.MULTILINE)
    object_heading = re.search(r"^\s*Object Prompts\s*$", text, flags=re.MULTILINE)
    live_heading = re.search(r"^\s*Live Subject Prompts\s*$", text, flags=re.MULTILINE)
    for found, name in ((header, "the 'subject_name,class' table"), (object_heading, "the 'Object Prompts' section"),
                        (live_heading, "the 'Live Subject Prompts' section")):
        if found is None:
            raise InputError(f"{prompts_file} lacks {name}; is it DreamBench's prompts_and_classes.txt?")

    classes = {}
    for row in text[header.end():].strip().splitlines():
        match = re.fullmatch(r"\s*([\w\-]+)\s*,\s*([^,]+?)\s*", row)
        if match is None:
            break
        classes[match.group(1)] = match.group(2)
    template = re.compile(r"""(['"])(.*?)\1\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)""")
    object_prompts = [match.group(2) for match in template.finditer(text, object_heading.end(), live_heading.start())]
    live_prompts = [match.group(2) for match in template.finditer(text, live_heading.end())]
    for found, name in ((classes, "subject_name,class rows"), (object_prompts, "object prompts"),
                        (live_prompts, "live subject prompts")):
        if not found:
            raise InputError(f"{prompts_file} lists no {name}.")
    return classes, object_prompts, live_prompts


def dreambench_photos(root: str | Path, subject: str) -> list[Path]:
    """The subject's photos in name order: the references drawn from, and the real images metrics compare with."""
    return sorted(path for path in (absolute_path(root) / subject).glob("*") if path.suffix.lower() in PHOTO_SUFFIXES)


def dreambench_records(
    root: str | Path,
    references_per_record: int = 3,
    unique_token: str = "",
    seed: int = 0,
    subjects: Sequence[str] | None = None,
) -> list[Record]:
    """GRPO prompt records (no target) for every DreamBench subject x its prompt list.

    Live subjects (class cat or dog) get the live prompts, others the object prompts. Each record's references are
    drawn by (seed, subject, prompt index) alone, so a subset run picks the same photos as the full one.
    """
    root = absolute_path(root)
    if references_per_record < 1:
        raise InputError(f"references per record must be at least 1, got {references_per_record}.")
    classes, object_prompts, live_prompts = _dreambench_tables(root / DREAMBENCH_PROMPTS_FILE)
    if subjects is not None:
        unknown = [name for name in subjects if name not in classes]
        if unknown:
            raise InputError(f"Unknown DreamBench subjects {', '.join(unknown)}; known: {', '.join(classes)}.")
    chosen = [name for name in classes if subjects is None or name in subjects]

    photos = {name: dreambench_photos(root, name) for name in chosen}
    too_few = [f"{name} ({len(found)})" for name, found in photos.items() if len(found) < references_per_record]
    if too_few:
        raise InputError(
            f"{references_per_record} references per record, but these subjects of {root} have fewer photos: "
            f"{', '.join(too_few)}."
        )
    records = []
    for name in chosen:
        class_word = classes[name]
        templates = live_prompts if class_word in LIVE_CLASSES else object_prompts
        for index, template in enumerate(templates):
            rng = random.Random(f"{seed}:{name}:{index}")
            records.append(
                Record(
                    id=f"{name}-{index:02d}",
                    references=tuple(rng.sample(photos[name], references_per_record)),
                    prompt=" ".join(template.format(unique_token.strip(), class_word).split()),
                    subject=class_word,
                )
            )
    return records


# Reward kind -> column name; the order of the table's columns.
METRICS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "copy_paste": "copy-paste"}
COPY_PASTE = "copy_paste"  # measured with DINO (else CLIP-I) whenever one of them is
# xcot: ground (reasoning + subject tokens), then generate; references: the same conditioning without reasoning;
# prompt: plain text-to-image, the baseline that shows what the references add.
MODES = ("xcot", "references", "prompt")
PROMPTS_PER_SUBJECT = 25
IMAGES_PER_PROMPT = 4
# dreambooth: 4 images per prompt, any CLIP (the DreamBooth paper); uno: 6 images per prompt, CLIP ViT-B/32 for
# CLIP-I and CLIP-T (the protocol of UNO and the papers comparing with it), DINO ViT-S/16 for both.
PROTOCOLS = {"dreambooth": {"images_per_prompt": IMAGES_PER_PROMPT, "clip_patch_size": None},
             "uno": {"images_per_prompt": 6, "clip_patch_size": 32}}


@dataclass(frozen=True)
class ImageScore:
    """One generated image: where it came from and its metrics."""

    subject: str
    prompt_index: int
    prompt: str
    image_index: int
    seed: int
    scores: dict[str, float]  # reward kind -> value
    reasoning: str | None = None
    path: Path | None = None


@dataclass(frozen=True)
class SubjectScores:
    """Means over one subject's images."""

    subject: str
    class_word: str
    images: int
    scores: dict[str, float]


@dataclass
class DreamBenchResult:
    """Per-subject and overall means, every image's scores, and the settings that reproduce the run."""

    subjects: list[SubjectScores]
    mean: dict[str, float]  # over all images, as the DreamBooth paper reports
    images: list[ImageScore]
    settings: dict = field(default_factory=dict)

    @property
    def metrics(self) -> list[str]:
        """The reward kinds measured, in table order."""
        return [kind for kind in METRICS if kind in self.mean]

    def markdown(self, digits: int = 3) -> str:
        """A markdown table: one row per subject and a mean row; a metric not measured shows as '-'."""

        def cells(scores: Mapping[str, float]) -> list[str]:
            return [f"{scores[kind]:.{digits}f}" if kind in scores else "-" for kind in METRICS]

        lines = [
            "| subject | " + " | ".join(METRICS.values()) + " | images |",
            "|---|" + "---:|" * (len(METRICS) + 1),
        ]
        for row in self.subjects:
            lines.append(f"| {row.subject} | " + " | ".join(cells(row.scores)) + f" | {row.images} |")
        lines.append("| **mean** | " + " | ".join(cells(self.mean)) + f" | {len(self.images)} |")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        """JSON-ready (paths as strings), for a results file beside the table."""
        return {
            "settings": self.settings,
            "mean": self.mean,
            "subjects": [asdict(row) for row in self.subjects],
            "images": [
                {**asdict(image), "path": None if image.path is None else str(image.path)} for image in self.images
            ],
        }


def image_seed(seed: int, subject_index: int, prompt_index: int) -> int:
    """The seed of a prompt's first image (image n uses it + n, as `generate` does), from the run seed, the
    subject's row in the DreamBench table and the prompt's index alone: subsets reproduce the full run."""
    return random.Random(f"dreambench:{seed}:{subject_index}:{prompt_index}").randrange(2**31)


def _check_root(root: Path) -> Path:
    if not root.exists():
        raise InputError(f"The DreamBench folder {root} does not exist.")
    if not root.is_dir():
        raise InputError(f"{root} is a file, not a DreamBench folder (<subject>/*.jpg and {DREAMBENCH_PROMPTS_FILE}).")
    prompts_file = root / DREAMBENCH_PROMPTS_FILE
    if not prompts_file.is_file():
        raise InputError(
            f"The DreamBench folder {root} has no {DREAMBENCH_PROMPTS_FILE} (the subject and prompt lists)."
        )
    return prompts_file


def _check_rewards(rewards: Mapping[str, RewardModel]) -> None:
    if not rewards:
        raise InputError(f"DreamBench needs at least one metric model; give any of {', '.join(METRICS)}.")
    for kind, reward in rewards.items():
        if kind not in METRICS:
            raise InputError(f"Unknown DreamBench metric {kind!r}; expected {', '.join(METRICS)}.")
        expected = "needs_prompt" if kind == "clip_t" else "needs_references"
        if not getattr(reward, expected, False):
            raise InputError(
                f"The {kind} metric needs a reward model loaded as kind {kind!r}, "
                f"got {getattr(reward, 'name', reward)!r}."
            )


def _check_protocol(protocol: str, rewards: Mapping[str, RewardModel]) -> None:
    """The protocol exists and the CLIP folder is the one it names (UNO: ViT-B/32)."""
    if protocol not in PROTOCOLS:
        raise InputError(f"Unknown DreamBench protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}.")
    patch = PROTOCOLS[protocol]["clip_patch_size"]
    for kind in ("clip_i", "clip_t"):
        if patch is not None and kind in rewards:
            found = rewards[kind].model.config.vision_config.patch_size
            if found != patch:
                raise InputError(f"The {protocol} protocol measures {METRICS[kind]} with CLIP ViT-B/{patch}; the "
                                 f"CLIP folder given has {found}-pixel patches (ViT-?/{found}).")


def copy_paste_flags(similarity: ImageSimilarityReward, images: Sequence[Image.Image], real: Sequence[Image.Image],
                     batch_size: int = 16) -> list[float] | None:
    """1.0 for each image more similar to one real photo of the subject than the two most similar real photos are
    to each other, else 0.0 (their mean is the copy-paste share: an identity reward pushes towards pasting the
    reference, and a score above real-photo similarity is that, not fidelity); None with fewer than 2 photos."""
    if len(real) < 2:
        return None
    matrix = similarity.similarities([*images, *real], list(real), batch_size)  # generated rows, then real rows
    among_real = matrix[len(images):].masked_fill(torch.eye(len(real), dtype=torch.bool), -2.0)
    closest = matrix[: len(images)].amax(dim=1)
    return (closest > float(among_real.max())).float().tolist()


def _check_output_folder(folder: Path) -> None:
    existing = next((parent for parent in (folder, *folder.parents) if parent.exists()), None)
    if existing is not None and not existing.is_dir():
        raise InputError(f"Cannot write DreamBench images to {folder}: {existing} is a file, not a folder.")


def _open_photos(paths: Sequence[Path]) -> list[Image.Image]:
    return [to_rgb(open_image(path, "the DreamBench photo"), str(path)) for path in paths]


def mode_chains(
    mm,
    prompts: Sequence[str],
    references: Sequence[Sequence[Image.Image]],
    mode: str,
    seed: int,
    max_new_tokens: int,
    ground_temperature: float,
    ground_top_p: float,
    subject_source: str,
) -> tuple[list[Grounding | None], list[str | None]]:
    """(groundings, reasoning overrides) that condition each prompt's images under a mode ("prompt",
    "references" or "xcot"); prompt i's grounding is seeded seed + i. DreamBench's evaluation and the world's
    draw their conditions from here, so both compare the same conditions."""
    if mode == "prompt":
        return [None] * len(prompts), [None] * len(prompts)
    references = [list(refs) for refs in references]
    if mode == "xcot":
        groundings = ground_batch(mm, references, list(prompts), max_new_tokens, ground_temperature, ground_top_p,
                                  seed, subject_source)
        return groundings, [None] * len(prompts)
    # "references": the grounding's conditioning (reference images, subject tokens) without sampling any reasoning.
    return ([Grounding(prompt, "", "", "", False, refs, extract_subject(mm, refs, subject_source))
             for prompt, refs in zip(prompts, references)], [""] * len(prompts))


def generate_in_mode(
    mm,
    prompt: str,
    references: Sequence[Image.Image],
    mode: str,
    seed: int,
    images_per_prompt: int,
    settings: SamplingSettings,
    max_new_tokens: int,
    ground_temperature: float,
    ground_top_p: float,
    subject_source: str,
):
    """The images of one prompt under a conditioning mode (`mode_chains`)."""
    (grounding,), (reasoning,) = mode_chains(mm, [prompt], [references], mode, seed, max_new_tokens,
                                             ground_temperature, ground_top_p, subject_source)
    return generate(mm, prompt, grounding, reasoning, images_per_prompt, settings, seed)


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def evaluate_dreambench(
    mm,
    root: str | Path,
    rewards: Mapping[str, RewardModel],
    subjects: Sequence[str] | None = None,
    prompts_per_subject: int | None = None,
    images_per_prompt: int | None = None,
    references: int = 3,
    seed: int = 0,
    settings: SamplingSettings = SamplingSettings(),
    mode: str = "xcot",
    max_new_tokens: int = 256,
    ground_temperature: float = 0.7,
    ground_top_p: float = 0.95,
    subject_source: str = "reference",
    out_dir: str | Path | None = None,
    progress: bool = True,
    batch_size: int = 16,
    protocol: str = "dreambooth",
) -> DreamBenchResult:
    """Run the DreamBench protocol with `mm` and score it with `rewards` ({"dino", "clip_i", "clip_t"}: models from
    `mmr1.rewards.load_reward_model` of those kinds; any subset).

    `subjects` picks rows of the table (default all), `prompts_per_subject` the first prompts of each list (default
    all 25), `protocol` one of PROTOCOLS (its images per prompt unless `images_per_prompt` says otherwise). Beside
    the rewards' scores, the copy-paste share (`copy_paste_flags`) with DINO, else CLIP-I. `mode` is "xcot", "references" or "prompt" (see MODES). With `out_dir`, images are written as
    `<subject>/<prompt index>_<n>.png`, each PNG carrying its prompt, seed and reasoning. Inputs are checked before
    any image is drawn, so a typo fails at once rather than after an hour of sampling.
    """
    root = Path(root).expanduser().absolute()
    prompts_file = _check_root(root)
    _check_rewards(rewards)
    _check_protocol(protocol, rewards)
    if images_per_prompt is None:
        images_per_prompt = PROTOCOLS[protocol]["images_per_prompt"]
    if mode not in MODES:
        raise InputError(f"Unknown DreamBench mode {mode!r}; choose one of {', '.join(MODES)}.")
    for name, value in (("images_per_prompt", images_per_prompt), ("references", references),
                        ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}.")
    if prompts_per_subject is not None and (
        isinstance(prompts_per_subject, bool) or not isinstance(prompts_per_subject, int) or prompts_per_subject < 1
    ):
        raise InputError(f"prompts_per_subject must be a positive integer or None (all), got {prompts_per_subject!r}.")
    check_subject_source(subject_source)

    classes, _, _ = _dreambench_tables(prompts_file)
    table = list(classes)
    if subjects is not None:
        subjects = list(subjects)
        if not subjects:
            raise InputError(f"The subject subset is empty; name subjects of {prompts_file}, or give None for all.")
        unknown = [name for name in subjects if name not in classes]
        if unknown:
            raise InputError(
                f"Unknown DreamBench subjects {', '.join(unknown)} (not in {prompts_file}); known: {', '.join(table)}."
            )
    chosen = [name for name in table if subjects is None or name in subjects]
    records = dreambench_records(root, references, seed=seed, subjects=chosen)
    per_subject = {
        name: [record for record in records if record.id.rsplit("-", 1)[0] == name][:prompts_per_subject]
        for name in chosen
    }
    out = None if out_dir is None else Path(out_dir).expanduser()
    if out is not None:
        _check_output_folder(out)

    similarity = rewards.get("dino") or rewards.get("clip_i")  # what the copy-paste share is measured with
    run_settings = {
        "root": str(root),
        "mode": mode,
        "protocol": protocol,
        "subjects": chosen,
        "prompts_per_subject": prompts_per_subject,
        "images_per_prompt": images_per_prompt,
        "references": references,
        "seed": seed,
        "sampling": settings.to_dict(),
        "grounding": {"max_new_tokens": max_new_tokens, "temperature": ground_temperature, "top_p": ground_top_p,
                      "subject_source": subject_source},
        "metrics": [kind for kind in METRICS if kind in rewards or (kind == COPY_PASTE and similarity is not None)],
        "model": str(getattr(mm, "source", "")),
    }
    rows: list[SubjectScores] = []
    scored: list[ImageScore] = []
    total = sum(len(subject_records) for subject_records in per_subject.values())
    with tqdm(total=total, desc="dreambench", unit="prompt", disable=not progress) as bar:
        for name, subject_records in per_subject.items():
            bar.set_postfix_str(name)
            subject_index = table.index(name)
            real = _open_photos(dreambench_photos(root, name))  # every photo, not just the ones the model saw
            images: list[Image.Image] = []
            drawn: list[ImageScore] = []
            for prompt_index, record in enumerate(subject_records):
                first_seed = image_seed(seed, subject_index, prompt_index)
                result = generate_in_mode(
                    mm, record.prompt, [] if mode == "prompt" else record.load_references(), mode, first_seed, images_per_prompt, settings, max_new_tokens, ground_temperature,
                    ground_top_p, subject_source,
                )
                for n, (image, image_seed_n) in enumerate(zip(result.pil_images(), result.seeds)):
                    path = None
                    if out is not None:
                        path = out / name / f"{prompt_index:02d}_{n}.png"
                        path.parent.mkdir(parents=True, exist_ok=True)
                        save_png(image, path, {
                            "subject": name, "prompt": record.prompt, "prompt_index": prompt_index, "image_index": n,
                            "seed": image_seed_n, "mode": mode, "reasoning": result.reasoning,
                            "references": [str(reference) for reference in record.references],
                            "sampling": settings.to_dict(),
                        })
                    images.append(image)
                    drawn.append(
                        ImageScore(name, prompt_index, record.prompt, n, image_seed_n, {}, result.reasoning, path)
                    )
                bar.update(1)
            prompts = [image.prompt for image in drawn]
            values = {
                kind: reward.score(images, references=real, prompts=prompts, batch_size=batch_size).tolist()
                for kind, reward in ((kind, rewards[kind]) for kind in METRICS if kind in rewards)
            }
            flags = None if similarity is None else copy_paste_flags(similarity, images, real, batch_size)
            if flags is not None:
                values[COPY_PASTE] = flags
            drawn = [replace(image, scores={kind: values[kind][i] for kind in values}) for i, image in enumerate(drawn)]
            scored += drawn
            rows.append(SubjectScores(name, classes[name], len(drawn), {kind: _mean(values[kind]) for kind in values}))
    mean = {kind: _mean([image.scores[kind] for image in scored]) for kind in METRICS
            if all(kind in image.scores for image in scored)}
    return DreamBenchResult(subjects=rows, mean=mean, images=scored, settings=run_settings)


def _records_command(args: argparse.Namespace) -> int:
    records = dreambench_records(args.root, args.references, args.unique_token, args.seed, split_names(args.subjects))
    write_records(args.out, records)
    subjects = {record.id.rsplit("-", 1)[0] for record in records}
    print(f"wrote {len(records)} records ({len(subjects)} subjects) to {args.out}")
    return 0


def _evaluate_command(args: argparse.Namespace) -> int:
    from mmr1.loading import load_model
    from mmr1.rewards import load_reward_model

    settings = SamplingSettings(cfg_scale=args.cfg)  # checked before any model loads
    rewards = {}
    if args.dino:
        rewards["dino"] = load_reward_model("dino", args.dino)
    if args.clip:
        rewards.update({kind: load_reward_model(kind, args.clip) for kind in ("clip_i", "clip_t")})
    if not rewards:
        raise InputError("Give --dino and/or --clip reward folders: DreamBench scores need them.")
    result = evaluate_dreambench(
        load_model(args.model), args.root, rewards, subjects=split_names(args.subjects),
        prompts_per_subject=args.prompts, images_per_prompt=args.images_per_prompt, references=args.references,
        seed=args.seed, settings=settings, mode=args.mode, out_dir=args.out, protocol=args.protocol)
    table = result.markdown()
    if args.out is not None:
        (args.out / "dreambench.md").write_text(table, encoding="utf-8")
        (args.out / "dreambench.json").write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n",
                                                  encoding="utf-8")
    print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.dreambench", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    records = commands.add_parser("records", help="GRPO prompt records from a DreamBench folder")
    bench = commands.add_parser("evaluate", help="the DreamBooth protocol: DINO, CLIP-I, CLIP-T")
    for command in (records, bench):  # the options both share
        command.add_argument("root", type=Path, help=f"folder with <subject>/*.jpg and {DREAMBENCH_PROMPTS_FILE}")
        command.add_argument("--references", type=int, default=3, help="reference photos per prompt (default 3)")
        command.add_argument("--subjects", default=None, help="comma-separated subset, e.g. dog,backpack (default: all)")
        command.add_argument("--seed", type=int, default=0, help="seed of the reference choice (evaluate: and of sampling)")
    records.add_argument("out", type=Path, help="JSONL file to write (paths relative to its folder when inside it)")
    records.add_argument("--unique-token", default="", help="rare token before the class word, e.g. sks")
    records.set_defaults(run=_records_command)
    bench.add_argument("--model", type=Path, required=True)
    bench.add_argument("--dino", type=Path, help="DINO ViT-S/16 folder (vit)")
    bench.add_argument("--clip", type=Path, help="CLIP folder, for CLIP-I and CLIP-T")
    bench.add_argument("--prompts", type=int, default=None, help="prompts per subject (default: all 25)")
    bench.add_argument("--protocol", default="dreambooth", choices=list(PROTOCOLS),
                       help="dreambooth: 4 images per prompt; uno: 6 per prompt, CLIP ViT-B/32 (--clip)")
    bench.add_argument("--images-per-prompt", type=int, default=None, help="default: the protocol's")
    bench.add_argument("--mode", default="xcot", choices=MODES)
    bench.add_argument("--cfg", type=float, default=5.0)
    bench.add_argument("--out", type=Path, default=None)
    bench.set_defaults(run=_evaluate_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return report_user_errors(lambda: args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
