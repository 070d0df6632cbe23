"""Training records from the photos users have, written in the JSONL format of training/data.py.

- **Folders** (`python -m training.data folders ROOT --out FILE`): one folder per subject with its photos (jpg,
  jpeg, png, webp), each optionally with a mask `<stem>_mask.png` (white = subject), the folder optionally with
  `prompts.txt` (one prompt per line):

      ROOT/my_dog/00.jpg  01.jpg  01_mask.png  02.jpg  prompts.txt

  Each photo becomes a target once, with up to `references` of the subject's other photos as its references
  (cropped to their masks where they have one) and the folder's next prompt, else `prompt` with {subject} (the
  folder's name, _ and - read as spaces). A subject with a single photo gives one record without a target, which
  GRPO can use.
- **Pairs** (`python -m training.data pairs FILE --out FILE`): Subjects200K / UNO-1M style datasets, two views of
  one subject with a description of each, as JSONL or parquet. Each pair gives two records, each view the target
  of the other, described by its own description. Columns: `image_a`, `image_b` (paths relative to FILE's folder,
  or image bytes, as Hugging Face parquet stores them: {"bytes": ...}), `description_a`, `description_b` and
  optionally `subject`; or Subjects200K's own columns: `image` (both views side by side, each with a border of
  `padding` pixels) and `description` ({"item", "description_0", "description_1"}).

Every image is decoded before anything is written. A bad one (missing, unreadable, a mask of another size), an
empty description or prompt is reported by file and line (or row), and stops the conversion unless `skip_bad`,
which leaves those records out and says how many. Images that come as bytes are written under `<out>_images/`; that
folder and the JSONL are each replaced whole (written aside, then renamed), so a failed run leaves neither half
written.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from mmr1.errors import InputError
from mmr1.images import open_image

from .data import Record, absolute_path, listed, probe_image, write_records

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MASK_SUFFIX = "_mask.png"
PROMPTS_FILE = "prompts.txt"
DEFAULT_PROMPT = "a photo of {subject}"
SUBJECTS200K_PADDING = 8  # pixels around each view of a Subjects200K composite


@dataclass
class Conversion:
    """The records made and what was wrong (each problem names its file and line or row)."""

    records: list[Record] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: int = 0  # records left out for those problems

    def check(self, skip_bad: bool, source: Path) -> None:
        """Stop, naming every problem, unless skip_bad; stop when nothing usable is left."""
        shown = "\n  " + listed(self.problems, separator="\n  ") if self.problems else ""
        if self.problems and not skip_bad:
            raise InputError(f"{source}: {len(self.problems)} problems, nothing written (pass --skip-bad to leave "
                             f"those records out):{shown}")
        if not self.records:
            raise InputError(f"{source}: no usable records{':' + shown if shown else '.'}")

    def write(self, out: Path) -> str:
        """Write the records; the summary line."""
        write_records(out, self.records)
        summary = f"{out}: {len(self.records)} records"
        if self.problems:
            summary += f"; {self.skipped} left out for {len(self.problems)} problems:\n  " + listed(
                self.problems, separator="\n  ")
        return summary


def subject_name(folder: Path) -> str:
    """'my_dog' -> 'my dog': the {subject} of a folder's prompts."""
    return " ".join(folder.name.replace("_", " ").replace("-", " ").split())


def _checked(photo: Path, mask: Path | None) -> str | None:
    """What is wrong with a photo and its mask, or None."""
    size, error = probe_image(photo)
    if error:
        return error
    if mask is not None:
        mask_size, error = probe_image(mask)
        if error:
            return error
        if mask_size != size:
            return f"mask {mask.name} is {mask_size[0]}x{mask_size[1]} but its photo is {size[0]}x{size[1]}"
    return None


def convert_folders(root: str | Path, out: str | Path, prompt: str = DEFAULT_PROMPT, references: int = 3,
                    skip_bad: bool = False) -> str:
    """Records from ROOT/<subject>/<photos> (see the module's docstring); returns the summary line."""
    root, out = absolute_path(root), absolute_path(out)
    if references < 1:
        raise InputError(f"references must be at least 1, got {references}.")
    if "{subject}" not in prompt:
        raise InputError(f"The prompt template {prompt!r} needs {{subject}} where the subject's name goes.")
    if not root.is_dir():
        raise InputError(f"{root} is not a folder; give a folder with one folder of photos per subject.")
    folders = sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
    if not folders:
        raise InputError(f"{root} has no subject folders; put each subject's photos in a folder of its own.")
    result = Conversion()
    for folder in folders:
        photos = sorted(path for path in folder.iterdir()
                        if path.suffix.lower() in PHOTO_SUFFIXES and not path.name.endswith(MASK_SUFFIX))
        if not photos:
            result.problems.append(f"{folder}: no photos ({', '.join(PHOTO_SUFFIXES)})")
            continue
        prompts = [prompt.format(subject=subject_name(folder))]
        prompts_file = folder / PROMPTS_FILE
        if prompts_file.is_file():
            lines = prompts_file.read_text(encoding="utf-8", errors="replace").splitlines()
            prompts = [line.strip() for line in lines if line.strip()]
            if not prompts:
                result.problems.append(f"{prompts_file}: no prompts (one per line)")
                result.skipped += len(photos)
                continue
        good = []
        for photo in photos:
            mask = photo.with_name(photo.stem + MASK_SUFFIX)
            error = _checked(photo, mask if mask.is_file() else None)
            if error:
                result.problems.append(f"{photo}: {error}")
                result.skipped += 1
            else:
                good.append((photo, mask if mask.is_file() else None))
        for index, (photo, _) in enumerate(good):
            others = [good[(index + step) % len(good)] for step in range(1, min(references, len(good) - 1) + 1)]
            chosen = others or [good[index]]  # a single photo: its own reference, no target
            masks = tuple(mask for _, mask in chosen)
            result.records.append(Record(
                id=f"{folder.name}-{index:04d}",
                references=tuple(path for path, _ in chosen),
                masks=masks if any(mask is not None for mask in masks) else None,
                prompt=prompts[index % len(prompts)],
                target=photo if others else None,
                subject=subject_name(folder),
            ))
    result.check(skip_bad, root)
    return result.write(out)


# -------------------------------------------------------------------------------------------------------- pairs


def read_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, row) of a JSONL or parquet file: 'line 3' or 'row 3'."""
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError as error:
            raise InputError("Reading parquet needs pyarrow: pip install 'comfyui-mmr1[train]'.") from error
        try:
            table = parquet.read_table(path)
        except Exception as error:  # pyarrow raises its own ArrowInvalid, OSError, ...
            raise InputError(f"Cannot read the parquet file {path}: {error}") from error
        for index, row in enumerate(table.to_pylist(), start=1):
            yield f"row {index}", row
        return
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"Cannot read {path}: {error}") from error
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as error:
                yield f"line {number}", {"__error__": f"not valid JSON ({error.msg} at column {error.colno})"}


def _image(value, base: Path) -> Path | Image.Image:
    """A checked path, or the decoded image of bytes ({"bytes": ...} as Hugging Face stores images)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return open_image(io.BytesIO(value), "embedded image")
    if isinstance(value, str) and value.strip():
        path = absolute_path(base / value)
        _, error = probe_image(path)
        if error:
            raise InputError(error)
        return path
    raise InputError("an image is neither a path nor image bytes")


def split_side_by_side(image: Image.Image, padding: int) -> tuple[Image.Image, Image.Image]:
    """The two views of a Subjects200K composite: its halves, each without its border of `padding` pixels."""
    half = image.width // 2
    if half <= 2 * padding or image.height <= 2 * padding:
        raise InputError(f"a side-by-side image of {image.width}x{image.height} is too small for a {padding}-pixel border")
    return (image.crop((padding, padding, half - padding, image.height - padding)),
            image.crop((half + padding, padding, 2 * half - padding, image.height - padding)))


def _pair(row: dict, base: Path, padding: int) -> tuple[list, list[str], str | None]:
    """([view a, view b] each a path or image, [description a, description b], subject) of one row."""
    if "__error__" in row:
        raise InputError(row["__error__"])
    if "image" in row and "description" in row:  # Subjects200K
        described = row["description"]
        if isinstance(described, str):
            described = json.loads(described)
        composite = _image(row["image"], base)
        if isinstance(composite, Path):
            composite = open_image(composite, "side-by-side image")
        views = list(split_side_by_side(composite.convert("RGB"), padding))
        texts = [described.get("description_0"), described.get("description_1")]
        subject = described.get("item")
    else:
        missing = [key for key in ("image_a", "image_b", "description_a", "description_b") if key not in row]
        if missing:
            raise InputError(f"missing {', '.join(missing)} (or Subjects200K's image and description)")
        views = [_image(row["image_a"], base), _image(row["image_b"], base)]
        texts = [row["description_a"], row["description_b"]]
        subject = row.get("subject")
    if not all(isinstance(text, str) and text.strip() for text in texts):
        raise InputError("a description is empty")
    return views, [text.strip() for text in texts], subject if isinstance(subject, str) and subject.strip() else None


def convert_pairs(source: str | Path, out: str | Path, skip_bad: bool = False,
                  padding: int = SUBJECTS200K_PADDING) -> str:
    """Records from a pair dataset (see the module's docstring); returns the summary line."""
    source, out = absolute_path(source), absolute_path(out)
    images = out.with_name(out.stem + "_images")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{images.name}-", dir=out.parent))  # renamed into place at the end
    result = Conversion()
    try:
        for number, (where, row) in enumerate(read_rows(source), start=1):
            try:
                views, texts, subject = _pair(row, source.parent, padding)
            except (InputError, AttributeError, TypeError, ValueError) as error:
                result.problems.append(f"{source} {where}: {error}")
                result.skipped += 2
                continue
            paths = []
            for side, view in zip("ab", views):
                if isinstance(view, Image.Image):
                    name = f"{number:07d}_{side}.png"
                    view.convert("RGB").save(staging / name)
                    view = images / name  # where it will be once the folder is in place
                paths.append(view)
            for side, (target, reference), text in zip("ab", (paths, paths[::-1]), texts):
                result.records.append(Record(id=f"pair-{number:07d}-{side}", references=(reference,), prompt=text,
                                             target=target, subject=subject))
        result.check(skip_bad, source)
        if any(staging.iterdir()):
            if images.exists():
                shutil.rmtree(images)
            os.replace(staging, images)
        return result.write(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
