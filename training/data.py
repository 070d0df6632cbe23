"""Training data: one JSONL format for SFT and GRPO, its loader, and a DreamBench converter.

Format: UTF-8 text, one JSON object per line (blank lines are skipped), for example

    {"references": ["subj/00.jpg", "subj/01.jpg"], "masks": ["subj/00_mask.png", null], "prompt": "a dog on the beach",
     "target": "subj/03.jpg", "reasoning": "<think>..</think><subject>..</subject><scene>..</scene>",
     "subject": "dog", "id": "dog-0007"}

Keys:
- `references` (required): one or more image paths of the subject.
- `prompt` (required): the non-empty user prompt.
- `masks`: one entry per reference, each a mask image path (white = subject; the reference is cropped to it
  as `mmr1.xcot.prepare_references` does at inference) or null for "use the whole photo".
- `target`: the image to learn to generate (SFT needs it; GRPO prompts leave it out).
- `reasoning`: the tagged X-CoT text (`mmr1.xcot.format_reasoning`) that SFT's text loss teaches.
- `subject`: the subject's class word ("dog"), for rewards and logs.
- `id`: a unique name for logs and resuming; defaults to "line-<n>" (n counts file lines from 1).

Relative paths resolve against the JSONL file's folder, so a dataset moves with its images. Unknown keys are
an error rather than ignored, so a typo ("refrences") cannot silently drop data. Every image file must exist
when the file is read: a training run should fail at start, not hours in.

CLI:
    python -m training.data dreambench ROOT OUT.jsonl [--references N] [--unique-token sks] [--subjects a,b] [--seed S]
    python -m training.data check FILE.jsonl [--require target,reasoning]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mmr1.errors import InputError, report_user_errors
from mmr1.images import to_rgb
from mmr1.xcot import prepare_references

KEYS = ("references", "masks", "prompt", "target", "reasoning", "subject", "id")  # also the order files use
REQUIRABLE = ("masks", "target", "reasoning", "subject")
# DreamBench's "live subject" prompts (outfits, hats) suit animals; its table has no other column saying which.
LIVE_CLASSES = frozenset({"cat", "dog"})
DREAMBENCH_PROMPTS_FILE = "prompts_and_classes.txt"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
_LISTED = 20  # longest list of lines or files an error message spells out


def _absolute(path: str | Path) -> Path:
    """Absolute and normalised ("a/../b" -> "b") without following symlinks, so links inside a dataset stay inside."""
    return Path(os.path.abspath(path))


@dataclass(frozen=True)
class Record:
    """One training example; paths are absolute after `read_records`."""

    id: str
    references: tuple[Path, ...]
    prompt: str
    masks: tuple[Path | None, ...] | None = None
    target: Path | None = None
    reasoning: str | None = None
    subject: str | None = None

    def __post_init__(self) -> None:
        # Coerced here so records built in code compare and hash like records read from files.
        object.__setattr__(self, "references", tuple(Path(path) for path in self.references))
        if self.masks is not None:
            object.__setattr__(self, "masks", tuple(None if mask is None else Path(mask) for mask in self.masks))
        if self.target is not None:
            object.__setattr__(self, "target", Path(self.target))
        if not self.id:
            raise InputError("The record id is empty.")
        if not self.references:
            raise InputError(f"Record {self.id}: 'references' is empty; give at least one image of the subject.")
        if not self.prompt.strip():
            raise InputError(f"Record {self.id}: 'prompt' is empty.")
        if self.masks is not None and len(self.masks) != len(self.references):
            raise InputError(
                f"Record {self.id}: {len(self.masks)} masks for {len(self.references)} references; "
                "give one entry per reference (null for none)."
            )

    def files(self) -> list[Path]:
        """Every image path the record names."""
        masks = [mask for mask in self.masks or () if mask is not None]
        return [*self.references, *masks, *([self.target] if self.target is not None else [])]

    def load_references(self) -> list[Image.Image]:
        """The references as RGB, each cropped to its mask as at inference (a null mask keeps the whole photo)."""
        images = [_open_image(path, f"record {self.id} reference") for path in self.references]
        masks = None if self.masks is None else [
            Image.new("L", image.size, 255) if mask is None else _open_image(mask, f"record {self.id} mask")
            for image, mask in zip(images, self.masks)
        ]
        try:
            return prepare_references(images, masks)
        except InputError as error:
            raise InputError(f"Record {self.id}: {error}") from error

    def load_target(self) -> Image.Image | None:
        """The target as RGB, or None for prompt-only (GRPO) records."""
        return None if self.target is None else to_rgb(_open_image(self.target, f"record {self.id} target"))

    def to_json(self, base: Path) -> dict:
        """The JSONL object: paths inside `base` relative to it (the dataset can move), others absolute."""
        base = _absolute(base)

        def relative(path: Path) -> str:
            path = _absolute(path)
            return path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)

        values = {
            "references": [relative(path) for path in self.references],
            "masks": None if self.masks is None else [None if mask is None else relative(mask) for mask in self.masks],
            "prompt": self.prompt,
            "target": None if self.target is None else relative(self.target),
            "reasoning": self.reasoning,
            "subject": self.subject,
            "id": self.id,
        }
        return {key: value for key, value in values.items() if value is not None}


def _open_image(path: Path, what: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, UnidentifiedImageError) as error:
        raise InputError(f"Cannot read {what} {path}: {error}") from error


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown if len(items) <= _LISTED else f"{shown} and {len(items) - _LISTED} more"


def _parse_line(values: object, line: int, folder: Path) -> Record:
    """One decoded line as a Record; type errors name the key, since hand-edited JSON is often slightly off."""
    if not isinstance(values, dict):
        raise InputError(f"expected a JSON object, got {type(values).__name__}.")
    unknown = [key for key in values if key not in KEYS]
    if unknown:
        raise InputError(f"unknown key {unknown[0]!r} (known keys: {', '.join(KEYS)}).")
    for key in ("references", "prompt"):
        if key not in values:
            raise InputError(f"missing required key {key!r}.")
    if not isinstance(values["prompt"], str):
        raise InputError("'prompt' must be a string.")

    def text(key: str) -> str | None:
        value = values.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise InputError(f"{key!r} must be a non-empty string or null.")
        return value

    def paths(key: str, nullable: bool) -> tuple[Path | None, ...]:
        items = values[key]
        if not isinstance(items, list) or not all(
            (isinstance(item, str) and item.strip()) or (nullable and item is None) for item in items
        ):
            raise InputError(f"{key!r} must be a list of {'paths or nulls' if nullable else 'paths'}.")
        return tuple(None if item is None else _absolute(folder / item) for item in items)

    target = text("target")
    return Record(
        id=text("id") or f"line-{line}",
        references=paths("references", nullable=False),
        prompt=values["prompt"],
        masks=None if values.get("masks") is None else paths("masks", nullable=True),
        target=None if target is None else _absolute(folder / target),
        reasoning=text("reasoning"),
        subject=text("subject"),
    )


def read_records(path: str | Path, require: Sequence[str] = ()) -> list[Record]:
    """Every record of a JSONL file, checked: each `require`d key present and every named image on disk."""
    path = _absolute(path)
    unknown = [key for key in require if key not in REQUIRABLE]
    if unknown:
        raise InputError(f"Cannot require {unknown[0]!r}; choose from {', '.join(REQUIRABLE)}.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"Cannot read the dataset {path}: {error}") from error

    lines: list[int] = []
    records: list[Record] = []
    for line, content in enumerate(text.splitlines(), start=1):
        if not content.strip():
            continue
        try:
            try:
                values = json.loads(content)
            except json.JSONDecodeError as error:
                raise InputError(f"not valid JSON ({error.msg} at column {error.colno}).") from error
            records.append(_parse_line(values, line, path.parent))
        except InputError as error:
            raise InputError(f"{path} line {line}: {error}") from error
        lines.append(line)
    if not records:
        raise InputError(f"{path} has no records.")

    first_line: dict[str, int] = {}
    for line, record in zip(lines, records):
        if record.id in first_line:
            raise InputError(f"{path} line {line}: id {record.id!r} is already used on line {first_line[record.id]}.")
        first_line[record.id] = line
    for key in require:
        lacking = [str(line) for line, record in zip(lines, records) if getattr(record, key) is None]
        if lacking:
            raise InputError(f"{path}: {len(lacking)} records lack {key!r} (lines {_listed(lacking)}).")
    missing = [
        f"line {line}: {file}" for line, record in zip(lines, records) for file in record.files() if not file.is_file()
    ]
    if missing:
        raise InputError(f"{path}: {len(missing)} files are missing: {_listed(missing)}.")
    return records


def write_records(path: str | Path, records: Iterable[Record]) -> None:
    """Write a JSONL file atomically (temp file + os.replace), so an interrupted run never leaves half a dataset."""
    path = _absolute(path)
    text = "".join(json.dumps(record.to_json(path.parent), ensure_ascii=False) + "\n" for record in records)
    temporary: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, suffix=".tmp", delete=False) as file:
            temporary = Path(file.name)
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        raise InputError(f"Cannot write the dataset {path}: {error}") from error


class RecordOrder:
    """Which records a run visits: a fresh seeded permutation per epoch. Its position is resumable state, and
    every process draws the same indices, then takes its own share."""

    def __init__(self, count: int, seed: int):
        self.count, self.seed, self.epoch, self.position = count, seed, 0, 0

    def _permutation(self) -> list[int]:
        return random.Random(self.seed * 1_000_003 + self.epoch).sample(range(self.count), self.count)

    def take(self, number: int) -> list[int]:
        indices = []
        while len(indices) < number:
            if self.position == self.count:
                self.epoch, self.position = self.epoch + 1, 0
            permutation = self._permutation()
            share = min(number - len(indices), self.count - self.position)
            indices += permutation[self.position : self.position + share]
            self.position += share
        return indices

    def state_dict(self) -> dict:
        return {"count": self.count, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if (state["count"], state["seed"]) != (self.count, self.seed):
            raise InputError(f"The checkpoint's data order is over {state['count']} records with seed "
                             f"{state['seed']}; this run has {self.count} with seed {self.seed}.")
        self.epoch, self.position = state["epoch"], state["position"]


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
    return sorted(path for path in (_absolute(root) / subject).glob("*") if path.suffix.lower() in PHOTO_SUFFIXES)


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
    root = _absolute(root)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.data", description="Build and check training JSONL.")
    commands = parser.add_subparsers(dest="command", required=True)
    dreambench = commands.add_parser("dreambench", help="GRPO prompt records from a DreamBench folder")
    dreambench.add_argument("root", type=Path, help="folder with <subject>/*.jpg and prompts_and_classes.txt")
    dreambench.add_argument("out", type=Path, help="JSONL file to write (paths relative to its folder when inside it)")
    dreambench.add_argument("--references", type=int, default=3, help="reference photos per record (default 3)")
    dreambench.add_argument("--unique-token", default="", help="rare token before the class word, e.g. sks")
    dreambench.add_argument("--subjects", default=None, help="comma-separated subset, e.g. dog,backpack")
    dreambench.add_argument("--seed", type=int, default=0, help="seed of the reference choice (default 0)")
    check = commands.add_parser("check", help="validate a JSONL file and summarise it")
    check.add_argument("file", type=Path)
    check.add_argument("--require", default="", help=f"comma-separated keys every record needs: {','.join(REQUIRABLE)}")
    return parser


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [name.strip() for name in text.split(",") if name.strip()]


def _dreambench_command(args: argparse.Namespace) -> int:
    records = dreambench_records(args.root, args.references, args.unique_token, args.seed, _names(args.subjects))
    write_records(args.out, records)
    subjects = {record.id.rsplit("-", 1)[0] for record in records}
    print(f"wrote {len(records)} records ({len(subjects)} subjects) to {args.out}")
    return 0


def _check_command(args: argparse.Namespace) -> int:
    records = read_records(args.file, _names(args.require))
    counts = {key: sum(getattr(record, key) is not None for record in records) for key in REQUIRABLE}
    per_record = [len(record.references) for record in records]
    print(
        f"{args.file}: {len(records)} records, {min(per_record)}-{max(per_record)} references each; "
        + ", ".join(f"{count} with {key}" for key, count in counts.items())
    )
    return 0


_COMMANDS = {"dreambench": _dreambench_command, "check": _check_command}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return report_user_errors(lambda: _COMMANDS[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
