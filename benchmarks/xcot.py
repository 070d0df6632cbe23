"""The cost of each X-CoT stage of one personalized generation: grounding text, subject tokens, image tokens,
and the VQ decode of the images.

    python -m benchmarks.xcot                                    # the shipped mmr1-world on its demo task
    python -m benchmarks.xcot --shape janus-pro-1b --images 1 --tokens 32 --reasoning-tokens 32

With random weights the reasoning is noise; it still costs what reasoning of that length costs.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from benchmarks.common import add_model_options, describe, machine, model_under_test, table
from training.timing import PhaseClock


def main(argv: list[str] | None = None) -> int:
    from mmr1.embedded import MODEL_NAME, demo_task
    from mmr1.generation import generation_sequence
    from mmr1.images import open_image, to_rgb
    from mmr1.prompting import batch_prefix, embed_sequence
    from mmr1.sampling import Modality, SamplingSettings, sample_tokens
    from mmr1.xcot import extract_subject, ground

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.set_defaults(model=MODEL_NAME)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=0, help="image tokens per image (0: the model's)")
    parser.add_argument("--reasoning-tokens", type=int, default=96, help="the grounding's max_new_tokens")
    parser.add_argument("--cfg", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.shape != "tiny":
        args.model = None  # --shape asks for random weights

    mm = model_under_test(args)
    paths, prompt = demo_task()
    references = [to_rgb(open_image(path, "reference image")) for path in paths]
    tokens = args.tokens or mm.num_image_tokens
    settings = SamplingSettings(cfg_scale=args.cfg)
    clock = PhaseClock(mm.device)
    with torch.inference_mode():
        ground(mm, references, prompt, max_new_tokens=4, subject_source="none")  # warm-up
        with clock("1. grounding text"):
            grounding = ground(mm, references, prompt, max_new_tokens=args.reasoning_tokens, subject_source="none")
        with clock("2. subject tokens (VQ encode)"):
            subject = extract_subject(mm, grounding.references)
        grounding = replace(grounding, subject_tokens=subject)
        sequence = generation_sequence(mm, prompt, grounding)
        with clock("3a. image prefix (embed references, subject)"):
            conditional = batch_prefix(mm, [embed_sequence(mm, sequence)] * args.images)
            unconditional = batch_prefix(mm, [embed_sequence(mm, sequence, unconditional=True)] * args.images)
        with clock("3b. image tokens"):
            sampled = sample_tokens(mm, conditional, Modality.image(mm), tokens, settings, seed=0,
                                    unconditional=unconditional)
        if tokens == mm.num_image_tokens:
            with clock("3c. VQ decode"):
                mm.decode_image_tokens(sampled.tokens)
    kept = len(mm.tokenize(grounding.reasoning))
    total = sum(clock.seconds.values())
    counts = {"1. grounding text": f"up to {args.reasoning_tokens} text tokens, {kept} kept as reasoning",
              "3b. image tokens": f"{args.images} x {tokens} image tokens"}
    rows = [[stage, f"{seconds:.3f}", f"{100 * seconds / total:.0f} %", counts.get(stage, "")]
            for stage, seconds in clock.seconds.items()]
    print(f"machine: {machine()}")
    print(f"model: {describe(mm)}")
    print(f"task: {len(references)} reference(s), prefix of {len(sequence)} tokens, cfg {args.cfg}")
    print(table(["stage", "seconds", "share", "work"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
