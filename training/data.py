"""Training data: one JSONL format for SFT and GRPO, its loader and checker, and the order a run visits records in.

Format: UTF-8 text, one JSON object per line (blank lines are skipped), for example

    {"references": ["subj/00.jpg", "subj/01.jpg"], "masks": ["subj/00_mask.png", null], "prompt": "a dog on the beach",
     "target": "subj/03.jpg", "subject_image": "subj/alone.png", "reasoning": "<think>..</think><subject>..</subject><scene>..</scene>",
     "subject": "dog", "id": "dog-0007"}

Keys:
- `references` (required): one or more image paths of the subject.
- `prompt` (required): the non-empty user prompt.
- `masks`: one entry per reference, each a mask image path (white = subject; the reference is cropped to it
  as `mmr1.xcot.prepare_references` does at inference) or null for "use the whole photo".
- `target`: the image to learn to generate (SFT needs it; GRPO prompts leave it out).
- `subject_image`: the subject alone, the visual intermediate SFT teaches the model to draw after its reasoning
  (`subject_source = "generate"` needs it).
- `reasoning`: the tagged X-CoT text (`mmr1.xcot.format_reasoning`) that SFT's text loss teaches.
- `subject`: the subject's class word ("dog"), for rewards and logs.
- `id`: a unique name for logs and resuming; defaults to "line-<n>" (n counts file lines from 1).

Relative paths resolve against the JSONL file's folder, so a dataset moves with its images. Unknown keys are
an error rather than ignored, so a typo ("refrences") cannot silently drop data. Every image file must exist and
decode (each opened once, fully, through mmr1.images.open_image) when the file is read: a training run should
fail at start, naming the line and file, not when a corrupt image's record is first drawn hours in.

Paths outside the JSONL file's folder (absolute, "../", a symlink pointing out) are what `write_records` writes
for images kept elsewhere (DreamBench's photos, the embedded demo), so training reads them; `check` reports them
as errors unless --allow-outside, so a dataset from elsewhere is vetted before it makes a run read other files.

CLI (DreamBench's folder becomes records with `python -m training.dreambench records`; photo folders and pair
datasets with `folders` and `pairs`, see training/importers.py):
    python -m training.data check FILE.jsonl [--require target,reasoning] [--allow-outside]
    python -m training.data folders ROOT --out FILE.jsonl [--prompt "a photo of {subject}"] [--skip-bad]
    python -m training.data pairs PAIRS.parquet --out FILE.jsonl [--skip-bad]
    python -m training.data caption FILE.jsonl --model FOLDER --out CAPTIONED.jsonl (see training/caption.py)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mmr1.errors import InputError, report_user_errors
from mmr1.images import open_image, to_rgb
from mmr1.xcot import prepare_references

KEYS = ("references", "masks", "prompt", "target", "subject_image", "reasoning", "subject", "id")  # the files' order
REQUIRABLE = ("masks", "target", "subject_image", "reasoning", "subject")
_LISTED = 20  # longest list of lines or files an error message spells out
_BAR_FROM = 64  # images from which reading a dataset draws a progress bar
_DECODERS = min(8, os.cpu_count() or 1)  # PIL decodes outside the GIL, so threads overlap the files


def absolute_path(path: str | Path) -> Path:
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
    subject_image: Path | None = None

    def __post_init__(self) -> None:
        # Coerced here so records built in code compare and hash like records read from files.
        object.__setattr__(self, "references", tuple(Path(path) for path in self.references))
        if self.masks is not None:
            object.__setattr__(self, "masks", tuple(None if mask is None else Path(mask) for mask in self.masks))
        for key in ("target", "subject_image"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, Path(getattr(self, key)))
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
        return [*self.references, *masks, *(path for path in (self.target, self.subject_image) if path is not None)]

    def load_references(self) -> list[Image.Image]:
        """The references as RGB, each cropped to its mask as at inference (a null mask keeps the whole photo)."""
        images = [open_image(path, f"record {self.id} reference") for path in self.references]
        masks = None if self.masks is None else [
            Image.new("L", image.size, 255) if mask is None else open_image(mask, f"record {self.id} mask")
            for image, mask in zip(images, self.masks)
        ]
        try:
            return prepare_references(images, masks)
        except InputError as error:
            raise InputError(f"Record {self.id}: {error}") from error

    def load_target(self) -> Image.Image | None:
        """The target as RGB, or None for prompt-only (GRPO) records."""
        return None if self.target is None else to_rgb(open_image(self.target, f"record {self.id} target"))

    def load_subject_image(self) -> Image.Image | None:
        """The subject alone as RGB (the intermediate SFT teaches under subject_source 'generate'), or None."""
        if self.subject_image is None:
            return None
        return to_rgb(open_image(self.subject_image, f"record {self.id} subject image"))

    def to_json(self, base: Path) -> dict:
        """The JSONL object: paths inside `base` relative to it (the dataset can move), others absolute."""
        base = absolute_path(base)

        def relative(path: Path) -> str:
            path = absolute_path(path)
            return path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)

        values = {
            "references": [relative(path) for path in self.references],
            "masks": None if self.masks is None else [None if mask is None else relative(mask) for mask in self.masks],
            "prompt": self.prompt,
            "target": None if self.target is None else relative(self.target),
            "subject_image": None if self.subject_image is None else relative(self.subject_image),
            "reasoning": self.reasoning,
            "subject": self.subject,
            "id": self.id,
        }
        return {key: value for key, value in values.items() if value is not None}


def listed(items: Sequence[str], separator: str = ", ") -> str:
    shown, tail = separator.join(items[:_LISTED]), " " if separator == ", " else separator
    return shown if len(items) <= _LISTED else f"{shown}{tail}and {len(items) - _LISTED} more"


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
        return tuple(None if item is None else absolute_path(folder / item) for item in items)

    target, subject_image = text("target"), text("subject_image")
    return Record(
        id=text("id") or f"line-{line}",
        references=paths("references", nullable=False),
        prompt=values["prompt"],
        masks=None if values.get("masks") is None else paths("masks", nullable=True),
        target=None if target is None else absolute_path(folder / target),
        reasoning=text("reasoning"),
        subject=text("subject"),
        subject_image=None if subject_image is None else absolute_path(folder / subject_image),
    )


def _refuse_outside(path: Path, lines: Sequence[int], records: Sequence[Record]) -> None:
    """Image paths that leave the JSONL file's folder once resolved (absolute, "../", symlinks followed), as one
    error: a dataset from elsewhere must not make a run read, train on and show in its samples other files."""
    root = Path(os.path.realpath(path.parent))
    outside = []
    for line, record in zip(lines, records):
        for file in record.files():
            resolved = Path(os.path.realpath(file))  # realpath, unlike resolve, never raises on a symlink loop
            if not resolved.is_relative_to(root):
                outside.append(f"line {line}: {file}" + ("" if resolved == file else f" (-> {resolved})"))
    if outside:
        raise InputError(
            f"{path}: {len(outside)} image paths lie outside the dataset's folder {root}: {listed(outside)}. Keep "
            "the images under the folder of the JSONL file, or pass --allow-outside for a dataset you trust."
        )


def probe_image(file: Path) -> tuple[tuple[int, int] | None, str | None]:
    """Decode one image as training will (open_image: whole, turned, bounded), giving its size or what is wrong."""
    try:
        return open_image(file).size, None
    except InputError as error:
        return None, str(error)


def _check_images(path: Path, lines: Sequence[int], records: Sequence[Record]) -> None:
    """Decode every image once (in threads, a progress bar for large sets) and compare each mask's size with its
    reference's, reporting every bad file by line at once."""
    from tqdm.auto import tqdm

    used_on: dict[Path, list[int]] = {}
    for line, record in zip(lines, records):
        for file in record.files():
            used_on.setdefault(file, []).append(line)
    files = list(used_on)
    with ThreadPoolExecutor(_DECODERS) as pool:
        probes = tqdm(pool.map(probe_image, files), total=len(files), desc=f"decoding {path.name}", unit="image",
                      disable=True if len(files) < _BAR_FROM else None, leave=False)
        results = dict(zip(files, probes))

    def where(file: Path) -> str:
        first, others = used_on[file][0], len(used_on[file]) - 1
        return f"line {first}" + (f" (and {others} more lines)" if others else "")

    problems = [f"{where(file)}: {error}" for file, (_, error) in results.items() if error is not None]
    for line, record in zip(lines, records):
        for index, (reference, mask) in enumerate(zip(record.references, record.masks or ()), start=1):
            image_size, mask_size = results[reference][0], None if mask is None else results[mask][0]
            if image_size is not None and mask_size is not None and mask_size != image_size:
                problems.append(f"line {line}: mask {index} {mask} is {mask_size[0]}x{mask_size[1]} but its reference "
                                f"{reference} is {image_size[0]}x{image_size[1]}; a mask must have its image's size")
    if problems:
        shown = problems[0] if len(problems) == 1 else "\n  " + listed(problems, separator="\n  ")
        raise InputError(f"{path}: {len(problems)} image{'s' * (len(problems) > 1)} cannot be used: {shown}")


def read_records(path: str | Path, require: Sequence[str] = (), allow_outside: bool = True) -> list[Record]:
    """Every record of a JSONL file, checked: each `require`d key present, every named image on disk and decoding
    (each opened once, here, rather than when its record is drawn), and with allow_outside=False (what `check`
    does by default) every image inside the file's folder."""
    path = absolute_path(path)
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
            raise InputError(f"{path}: {len(lacking)} records lack {key!r} (lines {listed(lacking)}).")
    if not allow_outside:
        _refuse_outside(path, lines, records)
    missing = [
        f"line {line}: {file}" for line, record in zip(lines, records) for file in record.files() if not file.is_file()
    ]
    if missing:
        raise InputError(f"{path}: {len(missing)} files are missing: {listed(missing)}.")
    _check_images(path, lines, records)
    return records


def write_records(path: str | Path, records: Iterable[Record]) -> None:
    """Write a JSONL file atomically (temp file + os.replace), so an interrupted run never leaves half a dataset."""
    path = absolute_path(path)
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


def build_parser() -> argparse.ArgumentParser:
    from mmr1.loading import DTYPES

    from .importers import DEFAULT_PROMPT, SUBJECTS200K_PADDING  # importers builds on this module

    parser = argparse.ArgumentParser(prog="python -m training.data", description="Check or make training JSONL.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate a JSONL file and summarise it")
    check.add_argument("file", type=Path)
    check.add_argument("--require", default="", help=f"comma-separated keys every record needs: {','.join(REQUIRABLE)}")
    check.add_argument("--allow-outside", action="store_true",
                       help="accept image paths outside the file's folder (absolute, ../, symlinks out)")
    folders = commands.add_parser("folders", help="records from one folder of photos per subject (optional "
                                  "<stem>_mask.png masks and prompts.txt); see training/importers.py")
    folders.add_argument("root", type=Path)
    folders.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    folders.add_argument("--prompt", default=DEFAULT_PROMPT,
                         help="prompt of folders without prompts.txt; {subject} is the folder's name")
    folders.add_argument("--references", type=int, default=3, help="other photos of the subject per record")
    pairs = commands.add_parser("pairs", help="records from a Subjects200K / UNO-style pair dataset (JSONL or "
                                "parquet); see training/importers.py")
    pairs.add_argument("source", type=Path)
    pairs.add_argument("--out", type=Path, required=True, help="the JSONL file to write (images as bytes go to "
                       "<out>_images/)")
    pairs.add_argument("--padding", type=int, default=SUBJECTS200K_PADDING,
                       help="border around each view of a side-by-side (Subjects200K) image")
    caption = commands.add_parser("caption", help="write the model's own X-CoT reasoning into records that lack "
                                  "it (cold-start SFT data from photos alone); see training/caption.py")
    caption.add_argument("source", type=Path)
    caption.add_argument("--model", required=True, help="a Janus / MMR1 checkpoint folder (or mmr1-world)")
    caption.add_argument("--out", type=Path, required=True, help="the JSONL to write; run again to resume")
    caption.add_argument("--batch-size", type=int, default=8, help="records grounded together")
    caption.add_argument("--max-new-tokens", type=int, default=256, help="reasoning length limit")
    caption.add_argument("--temperature", type=float, default=0.7, help="reasoning temperature (0: greedy)")
    caption.add_argument("--seed", type=int, default=0, help="record i is seeded seed + i")
    caption.add_argument("--device", default=None, help="cuda, cpu, ...; default: CUDA when available")
    caption.add_argument("--dtype", default="auto", choices=DTYPES, help="weights' dtype (auto: bf16 on GPUs)")
    caption.add_argument("--overwrite", action="store_true", help="replace reasonings the records already have")
    for command in (folders, pairs):
        command.add_argument("--skip-bad", action="store_true",
                             help="leave out records with a bad image or an empty text instead of stopping")
    return parser


def split_names(text: str | None) -> list[str] | None:
    """Comma-separated names from the command line as a list (None stays None)."""
    return None if text is None else [name.strip() for name in text.split(",") if name.strip()]


def _check_command(args: argparse.Namespace) -> int:
    records = read_records(args.file, split_names(args.require), allow_outside=args.allow_outside)
    counts = {key: sum(getattr(record, key) is not None for record in records) for key in REQUIRABLE}
    per_record = [len(record.references) for record in records]
    images = len({file for record in records for file in record.files()})
    print(
        f"{args.file}: {len(records)} records, {min(per_record)}-{max(per_record)} references each; "
        + ", ".join(f"{count} with {key}" for key, count in counts.items())
        + f"; all {images} images decode"
    )
    return 0


def _folders_command(args: argparse.Namespace) -> int:
    from .importers import convert_folders

    print(convert_folders(args.root, args.out, args.prompt, args.references, args.skip_bad))
    return 0


def _pairs_command(args: argparse.Namespace) -> int:
    from .importers import convert_pairs

    print(convert_pairs(args.source, args.out, args.skip_bad, args.padding))
    return 0


def _caption_command(args: argparse.Namespace) -> int:
    from .caption import caption_records

    print(caption_records(args.source, args.out, args.model, args.batch_size, args.max_new_tokens, args.temperature,
                          args.seed, args.device, args.dtype, args.overwrite))
    return 0


_COMMANDS = {"check": _check_command, "folders": _folders_command, "pairs": _pairs_command,
             "caption": _caption_command}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return report_user_errors(lambda: _COMMANDS[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
