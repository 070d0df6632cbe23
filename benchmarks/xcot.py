"""The cost of each X-CoT stage of one personalized generation: grounding text, subject tokens, image tokens,
and the VQ decode of the images, for two contenders run alternately in one process on one model:

- `per row`: what mmr1 did before the shared prefix: every image's row prefills the whole prefix (references,
  reasoning, subject tokens) itself, and the image prefix encodes the references again after grounding did;
- `shared prefix`: the references are encoded once (grounding's features are reused) and the prefix is
  prefilled once for the conditional and once for the unconditional row, its KV cache broadcast to every image.

Both draw the same tokens (row i seeded 0 + i); the benchmark checks it.

    python -m benchmarks.xcot                                    # the shipped mmr1-world on its demo task
    python -m benchmarks.xcot --shape janus-pro-1b --images 4 --tokens 16 --reasoning-tokens 16

With random weights the reasoning is noise; it still costs what reasoning of that length costs.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from benchmarks.common import add_model_options, describe, machine, model_under_test, table
from training.timing import PhaseClock

CONTENDERS = {"per row": False, "shared prefix": True}  # name: shares the prefix


def xcot_once(mm, references, prompt: str, images: int, tokens: int, reasoning_tokens: int, cfg: float,
              shared: bool) -> tuple[dict[str, float], torch.Tensor, int, int]:
    """One X-CoT run timed by stage: (seconds by stage, image tokens, prefix length, reasoning tokens kept)."""
    from mmr1.generation import generation_sequence
    from mmr1.prompting import batch_prefix, embed_sequence
    from mmr1.sampling import Modality, SamplingSettings, sample_tokens
    from mmr1.xcot import extract_subject, ground

    clock = PhaseClock(mm.device)
    mm.features_kept.clear()  # each run encodes its references at least once
    with clock("1. grounding text"):
        grounding = ground(mm, references, prompt, max_new_tokens=reasoning_tokens, subject_source="none")
    with clock("2. subject tokens (VQ encode)"):
        grounding = replace(grounding, subject_tokens=extract_subject(mm, grounding.references))
    sequence = generation_sequence(mm, prompt, grounding)
    if not shared:
        mm.features_kept.clear()  # before: the image prefix encoded the references again
    rows = 1 if shared else images
    with clock("3a. image prefix (embed references, subject)"):
        conditional = batch_prefix(mm, [embed_sequence(mm, sequence)] * rows)
        unconditional = batch_prefix(mm, [embed_sequence(mm, sequence, unconditional=True)] * rows)
    with clock("3b. image tokens"):
        sampled = sample_tokens(mm, conditional, Modality.image(mm), tokens, SamplingSettings(cfg_scale=cfg), seed=0,
                                unconditional=unconditional, repeats=images if shared else 1)
    if tokens == mm.num_image_tokens:
        with clock("3c. VQ decode"):
            mm.decode_image_tokens(sampled.tokens)
    return clock.seconds, sampled.tokens, len(sequence), len(mm.tokenize(grounding.reasoning))


def main(argv: list[str] | None = None) -> int:
    from mmr1.embedded import MODEL_NAME, demo_task
    from mmr1.images import open_image, to_rgb
    from mmr1.xcot import ground

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.set_defaults(model=MODEL_NAME)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=0, help="image tokens per image (0: the model's)")
    parser.add_argument("--reasoning-tokens", type=int, default=96, help="the grounding's max_new_tokens")
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=1, help="runs of each contender (alternating); the fastest counts")
    args = parser.parse_args(argv)
    if args.shape != "tiny":
        args.model = None  # --shape asks for random weights

    mm = model_under_test(args)
    paths, prompt = demo_task()
    references = [to_rgb(open_image(path, "reference image")) for path in paths]
    tokens = args.tokens or mm.num_image_tokens
    best: dict[str, dict[str, float]] = {}
    drawn: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        ground(mm, references, prompt, max_new_tokens=4, subject_source="none")  # warm-up
        for _ in range(args.rounds):
            for name, shared in CONTENDERS.items():
                seconds, drawn[name], prefix, kept = xcot_once(
                    mm, references, prompt, args.images, tokens, args.reasoning_tokens, args.cfg, shared)
                if name not in best or sum(seconds.values()) < sum(best[name].values()):
                    best[name] = seconds
    first, second = CONTENDERS
    same = torch.equal(drawn[first], drawn[second])
    totals = {name: sum(seconds.values()) for name, seconds in best.items()}
    rows = [[stage, *(f"{best[name][stage]:.3f}" for name in CONTENDERS),
             f"{best[first][stage] / max(best[second][stage], 1e-9):.2f}x"] for stage in best[first]]
    rows.append(["end to end", *(f"{totals[name]:.3f}" for name in CONTENDERS), f"{totals[first] / totals[second]:.2f}x"])
    print(f"machine: {machine()}")
    print(f"model: {describe(mm)}")
    print(f"task: {len(references)} reference(s), prefix of {prefix} tokens, {args.images} x {tokens} image tokens, "
          f"up to {args.reasoning_tokens} reasoning tokens ({kept} kept), cfg {args.cfg}; fastest of {args.rounds} "
          f"round(s)")
    print(table(["stage", *(f"{name} (s)" for name in CONTENDERS), "speed-up"], rows))
    print(f"same image tokens from both: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
