"""`python -m mmr1 demo|ground|generate|score|make-tiny|make-tiny-reward`: the whole pipeline from a terminal."""

from __future__ import annotations

import argparse
from pathlib import Path

from .embedded import MODEL_NAME
from .errors import InputError, report_user_errors
from .loading import ATTENTION_IMPLEMENTATIONS, DTYPES
from .outputs import (RECORD_FILE, SUBJECT_FILE, check_output_file, check_output_folder, claim_output_folder,
                      image_file, reference_file, write_bytes, write_text)
from .quantization import QUANTIZATIONS
from .ranges import Range
from .sampling import SAMPLING_RANGES, SEEDS, SamplingSettings, check_seeds
from .xcot import SUBJECT_SETTINGS, SUBJECT_SOURCES

DEMO_CFG = 3.0  # what the embedded model was evaluated with (training/world/evaluate.py)
DEFAULTS = {"cfg": 5.0, "temperature": 1.0, "ground_temperature": 0.7, "ground_top_p": 0.95, "max_new_tokens": 256,
            "batch_size": 8}
# The text options (by dest): bytes of the command line that are not UTF-8 reach Python as lone surrogates, which
# no tokenizer, record or terminal takes.
TEXT_OPTIONS = ("prompt", "reasoning", "model", "ref", "mask", "reasoning_file", "out", "images", "reward", "device")
# Every numeric option (by its argparse dest) with the range of the setting it sets: the sampling options take
# the sampler's ranges, which training's config keys of the same settings share.
OPTION_RANGES = {
    "cfg": SAMPLING_RANGES["cfg_scale"],
    "temperature": SAMPLING_RANGES["temperature"],
    "top_k": SAMPLING_RANGES["top_k"],
    "top_p": SAMPLING_RANGES["top_p"],
    "ground_temperature": SAMPLING_RANGES["temperature"],
    "ground_top_p": SAMPLING_RANGES["top_p"],
    "seed": SEEDS,
    "num_images": Range(1),
    "batch_size": Range(1),
    "max_new_tokens": Range(1),
}


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=MODEL_NAME,
                        help=f"Janus-Pro checkpoint folder (either layout), LoRA adapter, or {MODEL_NAME} (embedded)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="auto: bf16 on GPUs that support it, fp32 on CPU")
    parser.add_argument("--attn", default="sdpa", choices=ATTENTION_IMPLEMENTATIONS,
                        help="attention implementation (flash_attention_2 falls back to sdpa where it is missing)")
    parser.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                        help="quantize the language model as it loads (bitsandbytes): int8 or nf4 fit Janus-Pro-7B "
                        "on an 8-12 GB GPU; the VQ, vision encoder and heads stay in full precision")
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode steps with torch.compile (CUDA graphs on CUDA): the first run "
                        "compiles for tens of seconds, later steps launch faster")


def _add_grounding_options(parser: argparse.ArgumentParser, required: bool, demo: bool = False) -> None:
    if not demo:
        parser.add_argument("--ref", action="append", default=[], required=required, metavar="IMAGE",
                            help="reference image of the subject (repeat for several)")
        parser.add_argument("--mask", action="append", default=[], metavar="IMAGE",
                            help="mask cropping the subject (white = subject): one for all references, or one per --ref")
    parser.add_argument("--prompt", required=not demo, help="what to generate, e.g. 'a photo of it on the beach'")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULTS["max_new_tokens"], help="reasoning length limit")
    parser.add_argument("--ground-temperature", type=float, default=DEFAULTS["ground_temperature"],
                        help="temperature of the reasoning text (0: greedy)")
    parser.add_argument("--ground-top-p", type=float, default=DEFAULTS["ground_top_p"], help="top-p of the reasoning text")
    parser.add_argument("--subject", default=None, choices=SUBJECT_SOURCES,
                        help="visual intermediate: the first reference as VQ tokens (reference), none, or the "
                        "subject drawn by the model after its reasoning (generate); written as subject.png "
                        "(default: what training/ taught the model, from its mmr1_training.json; else reference)")
    parser.add_argument("--seed", type=int, default=0, help="seed; image i of a batch uses seed + i")


def _add_generation_options(parser: argparse.ArgumentParser, demo: bool) -> None:
    _add_model_options(parser)
    _add_grounding_options(parser, required=False, demo=demo)
    reasoning = parser.add_mutually_exclusive_group()
    reasoning.add_argument("--reasoning", help="use this (edited) reasoning instead of grounding's own")
    reasoning.add_argument("--reasoning-file", type=Path, help="read the reasoning from this file")
    reasoning.add_argument("--no-reasoning", action="store_true", help="condition on the references without reasoning")
    parser.add_argument("--num-images", type=int, default=4 if demo else 1)
    parser.add_argument("--cfg", type=float, default=DEMO_CFG if demo else DEFAULTS["cfg"],
                        help="classifier-free guidance scale (1: off)")
    parser.add_argument("--temperature", type=float, default=DEFAULTS["temperature"], help="image token temperature")
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: off")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder: new, or holding no files of an earlier run (see --overwrite)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                        help="images drawn at once (CFG doubles the rows): memory grows with it, not with "
                        "--num-images; the images are the same for any value")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace an earlier run in --out: its {RECORD_FILE}, images, {SUBJECT_FILE} and "
                        "reference copies are removed first; other files are left alone")


def build_parser() -> argparse.ArgumentParser:
    from .tiny import SHAPES

    parser = argparse.ArgumentParser(prog="python -m mmr1", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("make-tiny", help="write a tiny random Janus checkpoint for tests and trials")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--layout", default="hf", choices=("hf", "deepseek"),
                      help="hf: transformers layout (deepseek-community); deepseek: original (deepseek-ai)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--shape", default="tiny", choices=tuple(SHAPES),
                      help="tiny (default) or a real architecture's sizes with random weights, for benchmarks")
    tiny.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="dtype of the written weights")

    tiny_reward = commands.add_parser("make-tiny-reward", help="write a tiny random reward model (DINO, CLIP, ...)")
    tiny_reward.add_argument("out_dir", type=Path)
    tiny_reward.add_argument("--kind", required=True, help="dino, dinov2, clip_i, clip_t or pickscore")
    tiny_reward.add_argument("--seed", type=int, default=0)

    ground = commands.add_parser("ground", help="X-CoT grounding: the reasoning about the subject, as JSON")
    _add_model_options(ground)
    _add_grounding_options(ground, required=True)
    ground.add_argument("--out", type=Path, help="write the grounding JSON here (default: print it)")

    generate = commands.add_parser("generate", help="personalized generation: PNGs plus a JSON record")
    _add_generation_options(generate, demo=False)
    demo = commands.add_parser("demo", help="personalized generation with the embedded model and bundled references")
    _add_generation_options(demo, demo=True)

    score = commands.add_parser("score", help="reward scores of images (DINO, CLIP-I, CLIP-T, PickScore)")
    score.add_argument("--images", nargs="+", required=True, type=Path)
    score.add_argument("--ref", action="append", default=[], metavar="IMAGE", help="reference images (fidelity rewards)")
    score.add_argument("--prompt", help="prompt (text-alignment rewards)")
    score.add_argument("--reward", action="append", required=True, metavar="KIND=FOLDER[@WEIGHT]",
                       help="e.g. dino=/models/dino-vits16 or clip_t=/models/clip@0.5 (repeat)")
    score.add_argument("--device", default="cpu")
    score.add_argument("--out", type=Path, help="write the scores JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        _check_numbers(args)
        _check_text(args)
        return _COMMANDS[args.command](args)

    return report_user_errors(run)


def _check_numbers(args: argparse.Namespace) -> None:
    """Every numeric option of the command in its range, named as typed, before any model loads: argparse takes
    inf and nan as floats, which would draw flat images and write Infinity into the records."""
    for dest, allowed in OPTION_RANGES.items():
        if hasattr(args, dest):
            allowed.check(f"--{dest.replace('_', '-')}", getattr(args, dest))
    if hasattr(args, "num_images"):
        check_seeds("--seed", args.seed, args.num_images)


def _check_utf8(option: str, text: str) -> None:
    """Refuse text holding lone surrogates, naming the option: Python hands command-line bytes that are not UTF-8
    over as such (surrogateescape), and tokenizers, records and terminals raise on them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InputError(f"{option} is not valid UTF-8 text (character {error.start + 1} is "
                         f"{ascii(text[error.start])}, a byte that is not UTF-8); give it in UTF-8.") from error


def _check_text(args: argparse.Namespace) -> None:
    """Every text option (TEXT_OPTIONS) encodable as UTF-8, before any model loads."""
    for dest in TEXT_OPTIONS:
        values = getattr(args, dest, None)
        for value in values if isinstance(values, list) else [values]:
            if value is not None:
                _check_utf8(f"--{dest.replace('_', '-')}", str(value))


def _require_new_folder(folder: Path, command: str) -> None:
    """make-tiny and make-tiny-reward write random weights: a slip on a real model's folder would replace its
    weights, so they write only into a new or empty folder, checked before anything is built."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file; {command} writes a model folder.")
    if folder.is_dir() and any(folder.iterdir()):
        raise InputError(f"{folder} is not empty; {command} writes only into a new or empty folder, so that it never "
                         "replaces a model's weights with random ones.")


def _make_tiny(args: argparse.Namespace) -> int:
    import torch

    from .loading import resolve_dtype
    from .tiny import SHAPES, make_tiny_checkpoint

    _require_new_folder(args.out_dir, "make-tiny")
    path = make_tiny_checkpoint(args.out_dir, layout=args.layout, seed=args.seed, spec=SHAPES[args.shape],
                                dtype=resolve_dtype(args.dtype, torch.device("cpu")))
    print(f"wrote a random {args.shape}-shaped {args.layout}-layout Janus checkpoint ({args.dtype}) to {path}")
    return 0


class _TokenBar:
    """A tqdm bar fed by the samplers' (done, total) progress callback."""

    def __init__(self, description: str):
        self.description, self.bar = description, None

    def __call__(self, done: int, total: int, tokens=None) -> None:
        from tqdm.auto import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.description, unit="tok", leave=False)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _make_tiny_reward(args: argparse.Namespace) -> int:
    from .rewards import make_tiny_reward_checkpoint

    _require_new_folder(args.out_dir, "make-tiny-reward")
    path = make_tiny_reward_checkpoint(args.out_dir, args.kind, seed=args.seed)
    print(f"wrote a tiny {args.kind} reward model to {path}")
    return 0


def _load(args: argparse.Namespace):
    from .loading import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device, attn_implementation=args.attn,
                      compile_decoding=args.compile, quantization=args.quantization)


def _read_text(path: Path, option: str) -> str:
    """The UTF-8 text of `path`, given as `option`; bytes that are not UTF-8 are refused with where they are."""
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as error:
        raise InputError(f"Cannot read {option} {path}: {error.strerror or error}.") from error
    except UnicodeDecodeError as error:
        raise InputError(f"{option} {path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                         f"{error.start}); save it as UTF-8.") from error


def _open_images(paths: list[Path], what: str) -> list:
    from .images import open_image

    return [open_image(path, what) for path in paths]


def _open_references(args: argparse.Namespace) -> tuple[list, list | None]:
    """(references, masks or None) of --ref and --mask, read before a model loads: a bad file fails in seconds."""
    return _open_images(args.ref, "reference image"), _open_images(args.mask, "mask") or None


def _ground(args: argparse.Namespace, mm, images: tuple[list, list | None],
            subject_settings: SamplingSettings = SUBJECT_SETTINGS):
    from .loading import trained_subject_source
    from .xcot import ground

    references, masks = images
    bar = _TokenBar("grounding")
    try:
        return ground(
            mm,
            references,
            args.prompt,
            masks=masks,
            max_new_tokens=args.max_new_tokens,
            temperature=args.ground_temperature,
            top_p=args.ground_top_p,
            seed=args.seed,
            subject_source=args.subject or trained_subject_source(mm.source) or "reference",
            progress=bar,
            subject_settings=subject_settings,
        )
    finally:
        bar.close()


def grounding_record(grounding) -> dict:
    return {
        "prompt": grounding.prompt,
        "reasoning": grounding.reasoning,
        "subject": grounding.subject,
        "scene": grounding.scene,
        "format_ok": grounding.format_ok,
        "rewritten_prompt": grounding.rewritten_prompt,
        "settings": grounding.settings,
    }


def _ground_command(args: argparse.Namespace) -> int:
    from .metadata import dumps

    if args.out:
        check_output_file(args.out)
    images = _open_references(args)
    record = grounding_record(_ground(args, _load(args), images))
    if args.out:
        _write_file(args.out, dumps(record) + "\n")
        print(f"wrote {args.out}")
    else:
        print(dumps(record))
    return 0


def _write_file(path: Path, text: str) -> None:
    """A file output (ground --out, score --out), written whole, in folders created as needed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"Cannot create the folder {path.parent}: {error.strerror or error}.") from error
    write_text(path, text)


def _generation_record(args: argparse.Namespace, mm, grounding, settings: SamplingSettings, reasoning: str | None,
                       seeds: list[int], subject: bool) -> dict:
    """What determines the images (not --batch-size, which leaves them as they are): the JSON beside them."""
    record = {
        "model": str(mm.source),
        "prompt": args.prompt,
        "references": [str(path) for path in args.ref],
        "masks": [str(path) for path in args.mask],
        "grounding": None if grounding is None else grounding_record(grounding),
        "reasoning": reasoning,
        "sampling": settings.to_dict(),
        "seed": args.seed,
        "images": [{"file": image_file(seed), "seed": seed} for seed in seeds],
        "dtype": str(mm.dtype).replace("torch.", ""),
        "device": mm.device.type,
    }
    if subject:
        record["subject_image"] = SUBJECT_FILE
    return record


def _listed(paths: list[Path], most: int = 8) -> str:
    """Paths for a message: all of a few, the first and last of many."""
    if len(paths) <= most:
        return ", ".join(str(path) for path in paths)
    return f"{paths[0]} ... {paths[-1]} ({len(paths)} images)"


def _generate_command(args: argparse.Namespace) -> int:
    from .generation import generate_batches
    from .images import tensor_to_pil
    from .metadata import dumps, save_png

    settings = SamplingSettings(cfg_scale=args.cfg, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.mask and not args.ref:
        raise InputError("--mask crops reference images; give the references with --ref.")
    reasoning = "" if args.no_reasoning else args.reasoning
    if args.reasoning_file:
        reasoning = _read_text(args.reasoning_file, "--reasoning-file")
    earlier = check_output_folder(args.out, args.overwrite)
    images = _open_references(args)
    mm = _load(args)
    grounding = _ground(args, mm, images, settings) if args.ref else None
    seeds = [args.seed + index for index in range(args.num_images)]
    record = None
    bar = _TokenBar("image tokens")
    try:
        for _, result in generate_batches(mm, args.prompt, grounding, reasoning, args.num_images, args.batch_size,
                                          settings, args.seed, progress=bar):
            if record is None:  # the first batch: the folder is claimed only once there is something to write
                record = _generation_record(args, mm, grounding, settings, result.reasoning, seeds,
                                            result.subject_image is not None)
                claim_output_folder(args.out, earlier)
                if result.subject_image is not None:
                    save_png(tensor_to_pil(result.subject_image[0]), args.out / SUBJECT_FILE, record)
            for image, seed in zip(result.pil_images(), result.seeds):
                save_png(image, args.out / image_file(seed), {**record, "image_seed": seed})
    finally:
        bar.close()
    write_text(args.out / RECORD_FILE, dumps(record) + "\n")  # last: a record lists only images that are there
    written = [args.out / image_file(seed) for seed in seeds]
    subject = [args.out / SUBJECT_FILE] if "subject_image" in record else []
    print(f"wrote {', '.join(filter(None, [_listed(written), _listed(subject)]))} and {args.out / RECORD_FILE}")
    if result.reasoning:
        print(f"reasoning: {result.reasoning}")
    return 0


def _demo_command(args: argparse.Namespace) -> int:
    """`generate` on the bundled references of a subject the embedded model never saw in training."""
    from .embedded import demo_task

    references, default_prompt = demo_task()
    args.ref, args.mask, args.prompt = references, [], args.prompt or default_prompt
    status = _generate_command(args)
    copies = [args.out / reference_file(index) for index in range(len(references))]
    for path, copy in zip(references, copies):
        write_bytes(copy, Path(path).read_bytes())
    print(f"prompt: {args.prompt}\nreferences: " + ", ".join(str(copy) for copy in copies))
    return status


def _score_command(args: argparse.Namespace) -> int:
    from .metadata import dumps
    from .rewards import WeightedReward, load_reward_model, parse_reward_spec

    if args.out:
        check_output_file(args.out)
    images = _open_images(args.images, "image")  # before any reward model loads: a bad file fails in seconds
    references = _open_images(args.ref, "reference image") or None
    components = []
    for spec in args.reward:
        kind, folder, weight = parse_reward_spec(spec)
        components.append((load_reward_model(kind, folder, device=args.device), weight))
    breakdown = WeightedReward(components).score(images, references=references, prompts=args.prompt)
    names = list(breakdown.components)
    print("\t".join(["image", *names, "total"]))
    rows = []
    for index, path in enumerate(args.images):
        values = {name: float(breakdown.components[name][index]) for name in names}
        rows.append({"image": str(path), **values, "total": float(breakdown.total[index])})
        print("\t".join([path.name, *(f"{values[name]:.4f}" for name in names), f"{float(breakdown.total[index]):.4f}"]))
    if args.out:
        _write_file(args.out, dumps({"prompt": args.prompt, "rewards": args.reward, "scores": rows}) + "\n")
    return 0


_COMMANDS = {
    "make-tiny": _make_tiny,
    "make-tiny-reward": _make_tiny_reward,
    "ground": _ground_command,
    "generate": _generate_command,
    "demo": _demo_command,
    "score": _score_command,
}
