"""A procedural subject world: toy subjects made of attributes, drawn into small scenes that a prompt describes.

It stands in for photos of "your dog" where no weights or datasets can be had: every image has its true labels,
so a model trained here can be measured (judge.py reads the labels back from generated images).

- A **subject** is (shape, body colour, pattern, pattern colour): 6 x 8 x 4 x 7 = 1,344 combinations. A fixed
  tenth of them (`HELD_OUT`, by seed) is never used for training; evaluation uses only those.
- A **scene** is (background, position, size): what the prompt says. Subjects sit at centres on the VQ's token
  grid (multiples of 4 pixels), without jitter, so a subject of one size is the same tokens shifted by whole
  tokens wherever it stands, and a large one is drawn at the subject image's scale: a tiny generator learns
  one drawing per subject and size instead of one per sub-token offset.
- A subject's **references** show it in other scenes than the target.
- A subject's **subject image** (`render_subject`) shows it alone: centred, large, on a plain backdrop, the
  visual intermediate the model learns to draw after its reasoning (subject_source = "generate").

Everything is deterministic: `render(subject, scene)` draws the same pixels on every machine.

    python -m training.world.scenes dataset OUT_DIR --split train --records 4000 --references 2 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mmr1.errors import InputError, report_user_errors
from mmr1.xcot import format_reasoning

IMAGE_SIZE = 32  # 8 x 8 VQ tokens of 4 x 4 pixels: short sequences that train and sample fast on a CPU
_SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: smooth edges without blurring patterns away
_UNITS = 64  # the geometry below is in units of a 64-unit square, whatever IMAGE_SIZE renders it at

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "heart")
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (245, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 225),
    "purple": (145, 60, 195),
    "white": (248, 248, 248),
    "black": (25, 25, 25),
}
PATTERNS = ("stripes", "spots", "grid", "ring")  # "a red heart with blue stripes", "... with a blue grid"
_SINGULAR_PATTERNS = ("grid", "ring")
BACKGROUNDS = {
    "beach": "on the beach",
    "grass": "on the grass",
    "snow": "in the snow",
    "night": "at night",
    "wood": "on a wooden floor",
}
POSITIONS = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
SIZES = ("small", "large")

SUBJECT_ATTRIBUTES = ("shape", "colour", "pattern", "pattern_colour")
SCENE_ATTRIBUTES = ("background", "position", "size")
ATTRIBUTE_VALUES = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "pattern": PATTERNS,
    "pattern_colour": tuple(COLOURS),
    "background": tuple(BACKGROUNDS),
    "position": tuple(POSITIONS),
    "size": SIZES,
}
HELD_OUT_FRACTION = 0.1
HELD_OUT_SEED = 2025
_OUTLINE = (30, 30, 30)
_TOKEN = 8  # _UNITS per VQ token (4 pixels of 32)
_RADIUS = {"small": 14.5, "large": 23.0}  # in _UNITS; a small one at the left or right still fits
_CENTRE_X = {"small": {"left": 2 * _TOKEN, "middle": 4 * _TOKEN, "right": 6 * _TOKEN},
             "large": {"left": 3 * _TOKEN, "middle": 4 * _TOKEN, "right": 5 * _TOKEN}}
_CENTRE_Y = 4 * _TOKEN
_OUTLINE_WIDTH = 2.5  # in _UNITS: one pixel of the 32-pixel image


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def parse_description(text: str) -> dict[str, str | None]:
    """The subject attributes a description names (the inverse of `Subject.description`, tolerant of a wrong
    article or extra words): each attribute's value, or None where the text names none or several.

    Grounding is scored with it, attribute by attribute: 'a blue triangle with a red grid' names shape, colour,
    pattern and pattern colour even when one of them is wrong."""
    words = text.lower().replace(",", " ").split()
    head, _, tail = " ".join(words).partition(" with ")
    found = {}
    for name, part in (("shape", head), ("colour", head), ("pattern", tail), ("pattern_colour", tail)):
        named = [value for value in ATTRIBUTE_VALUES[name] if value in part.split()]
        found[name] = named[0] if len(named) == 1 else None
    return found


def _check_values(item, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(item, name) not in ATTRIBUTE_VALUES[name]:
            raise InputError(f"Unknown {name} {getattr(item, name)!r}; choose one of {ATTRIBUTE_VALUES[name]}.")


@dataclass(frozen=True, order=True)
class Subject:
    shape: str
    colour: str
    pattern: str
    pattern_colour: str

    def __post_init__(self) -> None:
        _check_values(self, SUBJECT_ATTRIBUTES)
        if self.colour == self.pattern_colour:
            raise InputError("A subject's pattern colour must differ from its body colour.")

    def description(self) -> str:
        """'a red heart with blue stripes', 'an orange cross with a white grid': the words the reasoning and the
        reward model's captions use."""
        pattern = f"{self.pattern_colour} {self.pattern}"
        if self.pattern in _SINGULAR_PATTERNS:
            pattern = f"{_article(self.pattern_colour)} {pattern}"
        return f"{_article(self.colour)} {self.colour} {self.shape} with {pattern}"

    def slug(self) -> str:
        return "-".join(getattr(self, name) for name in SUBJECT_ATTRIBUTES)


@dataclass(frozen=True)
class Scene:
    background: str
    position: str
    size: str

    def __post_init__(self) -> None:
        _check_values(self, SCENE_ATTRIBUTES)

    def phrase(self) -> str:
        """'on the beach, small, on the left'."""
        return f"{BACKGROUNDS[self.background]}, {self.size}, {POSITIONS[self.position]}"

    def prompt(self) -> str:
        """The user's request: the scene only; the subject comes from the references."""
        return f"a photo of it {self.phrase()}"


def attribute_values(subject: Subject, scene: Scene) -> dict[str, str]:
    """Every attribute of a rendered scene by name: the true labels."""
    return {**asdict(subject), **asdict(scene)}


def all_subjects() -> list[Subject]:
    return [
        Subject(shape, colour, pattern, pattern_colour)
        for shape in SHAPES
        for colour in COLOURS
        for pattern in PATTERNS
        for pattern_colour in COLOURS
        if pattern_colour != colour
    ]


def all_scenes() -> list[Scene]:
    return [Scene(background, position, size) for background in BACKGROUNDS for position in POSITIONS for size in SIZES]


def _split() -> tuple[list[Subject], list[Subject]]:
    subjects = all_subjects()
    held_out = set(random.Random(HELD_OUT_SEED).sample(subjects, round(HELD_OUT_FRACTION * len(subjects))))
    return [s for s in subjects if s not in held_out], [s for s in subjects if s in held_out]


TRAIN_SUBJECTS, HELD_OUT_SUBJECTS = _split()
SPLITS = {"train": TRAIN_SUBJECTS, "heldout": HELD_OUT_SUBJECTS}


def subjects_of(split: str) -> list[Subject]:
    if split not in SPLITS:
        raise InputError(f"Unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
    return SPLITS[split]


# --- drawing -----------------------------------------------------------------------------------------------------

def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Inside-test of a shape of radius r centred at the origin (y grows downwards)."""
    if shape == "circle":
        return x**2 + y**2 <= r**2
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= 0.82 * r
    if shape == "triangle":  # apex up
        return (y <= 0.8 * r) & (np.abs(x) <= (y + r) / 1.8)
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= 1.05 * r
    if shape == "cross":
        arm = 0.38 * r
        return ((np.abs(x) <= arm) & (np.abs(y) <= r)) | ((np.abs(y) <= arm) & (np.abs(x) <= r))
    if shape == "heart":
        u, v = x / (0.95 * r), -(y + 0.1 * r) / (0.95 * r)
        return (u**2 + v**2 - 1) ** 3 - u**2 * v**3 <= 0
    raise InputError(f"Unknown shape {shape!r}")


def _pattern_mask(pattern: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Where the pattern colour goes, in subject coordinates. Periods scale with the subject (two to three per
    body, each at least 3 pixels of a pattern line or spot at 32 pixels) and every pattern covers well under half
    of the body, so "body colour" stays the majority colour (the VQ and judge can tell)."""
    period = r / 1.1
    if pattern == "stripes":
        return np.mod(y + r, period) < 0.4 * period
    if pattern == "spots":  # denser, so that several spots show (one spot alone would read as a ring's centre)
        period = r / 1.5
        gx = np.mod(x + period / 2, period) - period / 2
        gy = np.mod(y + period / 2, period) - period / 2
        return gx**2 + gy**2 <= (0.3 * period) ** 2
    if pattern == "grid":
        return (np.mod(x + r, period) < 0.25 * period) | (np.mod(y + r, period) < 0.25 * period)
    if pattern == "ring":
        return np.abs(np.sqrt(x**2 + y**2) - 0.5 * r) <= 0.17 * r
    raise InputError(f"Unknown pattern {pattern!r}")


def _background(kind: str, size: int) -> np.ndarray:
    """[size, size, 3] float background (its sizes in _UNITS). Each kind is told by its colours and one regular
    structure (the beach's horizon, the wood's boards), without random specks: noise no prompt names would take
    the VQ's codes and the generator's loss away from the subject."""
    image = np.empty((size, size, 3), np.float32)
    scale = size / _UNITS
    rows = np.arange(size)
    if kind == "beach":
        horizon = int(18 * scale)
        image[:] = (226, 203, 152)
        image[:horizon] = (60, 125, 195)
        image[horizon : horizon + int(2 * scale)] = (240, 240, 235)  # surf
    elif kind == "grass":
        image[:] = (82, 142, 62)
    elif kind == "snow":
        image[:] = (232, 236, 243)
    elif kind == "night":
        image[:] = (26, 34, 84)
    elif kind == "wood":
        image[:] = (152, 106, 62)
        image[np.mod(rows // int(2 * scale), 6) == 0] = (112, 74, 42)  # board edges
    else:
        raise InputError(f"Unknown background {kind!r}")
    return image


def render(subject: Subject, scene: Scene) -> Image.Image:
    """The subject in the scene: an IMAGE_SIZE x IMAGE_SIZE RGB image."""
    size = IMAGE_SIZE * _SUPERSAMPLE
    unit = size / _UNITS
    image = _background(scene.background, size)
    _draw_subject(image, subject, _CENTRE_X[scene.size][scene.position] * unit, _CENTRE_Y * unit,
                  _RADIUS[scene.size] * unit)
    return _downsample(image)


SUBJECT_BACKDROP = (128, 128, 128)  # no world colour, background or outline is this grey
_SUBJECT_RADIUS = _RADIUS["large"]  # a large subject in a scene is the subject image's drawing, shifted


def render_subject(subject: Subject) -> Image.Image:
    """The subject alone, centred, large, on the plain grey backdrop: one canonical image per subject."""
    size = IMAGE_SIZE * _SUPERSAMPLE
    image = np.empty((size, size, 3), np.float32)
    image[:] = SUBJECT_BACKDROP
    _draw_subject(image, subject, size / 2, size / 2, _SUBJECT_RADIUS * size / _UNITS)
    return _downsample(image)


def _draw_subject(image: np.ndarray, subject: Subject, centre_x: float, centre_y: float, radius: float) -> None:
    """Outline, body and pattern of the subject painted into a supersampled float image, in place."""
    size = image.shape[0]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    x, y = xs - centre_x, ys - centre_y
    body = _shape_mask(subject.shape, x, y, radius)
    inner = _shape_mask(subject.shape, x, y, radius - _OUTLINE_WIDTH * size / _UNITS)
    pattern = _pattern_mask(subject.pattern, x, y, radius)
    image[body] = _OUTLINE
    image[inner] = COLOURS[subject.colour]
    image[inner & pattern] = COLOURS[subject.pattern_colour]


def _downsample(image: np.ndarray) -> Image.Image:
    small = image.reshape(IMAGE_SIZE, _SUPERSAMPLE, IMAGE_SIZE, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return Image.fromarray(np.clip(small + 0.5, 0, 255).astype(np.uint8))


# --- examples and datasets -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    """One personalization task: references of a subject, a target scene, and the X-CoT text that links them."""

    subject: Subject
    target_scene: Scene
    reference_scenes: tuple[Scene, ...]

    @property
    def prompt(self) -> str:
        return self.target_scene.prompt()

    def reasoning(self) -> str:
        description = self.subject.description()
        return format_reasoning(
            think=f"the references show {description}",
            subject=description,
            scene=f"{description} {self.target_scene.phrase()}",
        )

    def caption(self) -> str:
        """The full description of the target image (the reward model's training text)."""
        return f"{self.subject.description()} {self.target_scene.phrase()}"

    def labels(self) -> dict[str, str]:
        return attribute_values(self.subject, self.target_scene)

    def target(self) -> Image.Image:
        return render(self.subject, self.target_scene)

    def references(self) -> list[Image.Image]:
        return [render(self.subject, scene) for scene in self.reference_scenes]

    def subject_image(self) -> Image.Image:
        return render_subject(self.subject)


def sample_example(subjects: list[Subject], seed: int, references: int = 2) -> Example:
    """A random subject with a target scene and `references` other scenes (different backgrounds)."""
    rng = random.Random(seed)
    subject = rng.choice(subjects)
    target = rng.choice(all_scenes())
    others = [scene for scene in all_scenes() if scene.background != target.background]
    return Example(subject, target, tuple(rng.sample(others, references)))


ATTRIBUTES = SUBJECT_ATTRIBUTES + SCENE_ATTRIBUTES


@dataclass(frozen=True)
class LabelledScenes:
    """Rendered scenes with their true attributes: training data of the VQ, the judge and the reward model."""

    images: np.ndarray  # [N, 64, 64, 3] uint8
    subjects: list[Subject]
    scenes: list[Scene]

    def truths(self) -> list[dict[str, str]]:
        """Each image's attribute values by name (what the judge is scored against)."""
        return [attribute_values(subject, scene) for subject, scene in zip(self.subjects, self.scenes)]

    def labels(self) -> np.ndarray:
        """[N, len(ATTRIBUTES)] int64 indices into ATTRIBUTE_VALUES, in ATTRIBUTES order."""
        return np.array([[ATTRIBUTE_VALUES[name].index(row[name]) for name in ATTRIBUTES] for row in self.truths()],
                        np.int64)


def subject_renders(subjects: list[Subject]) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, 64, 64, 3], label indices [N, len(SUBJECT_ATTRIBUTES)]) of each subject alone."""
    images = np.stack([np.asarray(render_subject(subject)) for subject in subjects])
    labels = np.array([[ATTRIBUTE_VALUES[name].index(getattr(subject, name)) for name in SUBJECT_ATTRIBUTES]
                       for subject in subjects], np.int64)
    return images, labels


def labelled_scenes(count: int, seed: int, split: str = "train") -> LabelledScenes:
    """`count` random scenes of the split's subjects, deterministic by seed."""
    rng = random.Random(seed)
    subjects = subjects_of(split)
    pairs = [(rng.choice(subjects), rng.choice(all_scenes())) for _ in range(count)]
    images = np.stack([np.asarray(render(subject, scene)) for subject, scene in pairs])
    return LabelledScenes(images, [subject for subject, _ in pairs], [scene for _, scene in pairs])


def write_dataset(out_dir: Path, split: str, records: int, references: int, seed: int, with_target: bool = True) -> Path:
    """Images plus `records.jsonl` in training/data.py's format (reasoning included); returns the JSONL path."""
    subjects = subjects_of(split)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(exist_ok=True)
    lines = []
    for index in range(records):
        example = sample_example(subjects, seed=seed * 1_000_003 + index, references=references)
        name = f"{split}-{index:05d}"
        reference_paths = []
        for number, image in enumerate(example.references()):
            reference_paths.append(f"images/{name}-ref{number}.png")
            image.save(out_dir / reference_paths[-1])
        record = {"references": reference_paths, "prompt": example.prompt}
        if with_target:
            record["target"] = f"images/{name}-target.png"
            example.target().save(out_dir / record["target"])
            record["subject_image"] = f"images/subject-{example.subject.slug()}.png"  # one per subject
            if not (out_dir / record["subject_image"]).is_file():
                example.subject_image().save(out_dir / record["subject_image"])
        record.update({"reasoning": example.reasoning(), "subject": example.subject.slug(), "id": name})
        lines.append(json.dumps(record))
    path = out_dir / "records.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def vocabulary() -> list[str]:
    """Every word a world prompt or reasoning uses: a tokenizer trained on these keeps them whole."""
    words = [*SHAPES, *COLOURS, *PATTERNS, *SIZES, "a", "an", "with", "photo", "of", "it", "the", "references", "show"]
    words += [word for phrase in (*BACKGROUNDS.values(), *POSITIONS.values()) for word in phrase.split()]
    return sorted(set(words))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.world.scenes", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    dataset = commands.add_parser("dataset", help="write images and records.jsonl for SFT (with targets) or GRPO")
    dataset.add_argument("out_dir", type=Path)
    dataset.add_argument("--split", default="train", choices=tuple(SPLITS))
    dataset.add_argument("--records", type=int, default=1000)
    dataset.add_argument("--references", type=int, default=2)
    dataset.add_argument("--seed", type=int, default=0)
    dataset.add_argument("--no-target", action="store_true", help="prompt-only records (GRPO)")
    args = parser.parse_args(argv)

    def run() -> int:
        print(write_dataset(args.out_dir, args.split, args.records, args.references, args.seed, not args.no_target))
        return 0

    return report_user_errors(run)


if __name__ == "__main__":
    raise SystemExit(main())
