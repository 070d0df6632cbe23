"""Image-token sampling: mmr1's sampler against transformers' `generate(generation_mode="image")` and a naive
loop without KV cache, side by side in one process on one model, text-only prompt, same CFG and image count.

    python -m benchmarks.sampler                                   # tiny config, 576 tokens per image
    python -m benchmarks.sampler --shape janus-pro-1b --tokens 64  # Janus-Pro-1B shapes, random weights
    python -m benchmarks.sampler --shape janus-pro-7b --images 16 --device cuda --compile

Every contender samples the same number of image tokens for the same prompt (CFG rows included in its batch);
tokens/s counts image tokens of all images, and the ratios are against transformers' generate.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from benchmarks.common import add_model_options, describe, machine, memory_bandwidth, model_under_test, table, timed

PROMPT = "a photo of a red backpack on the beach"


def transformers_generate(mm, input_ids: torch.Tensor, images: int, tokens: int, cfg: float, temperature: float):
    """transformers' own image generation loop (static cache, CFG logits processor), for `tokens` image tokens."""
    from transformers import GenerationConfig

    vision_config = mm.model.model.vision_model.config
    saved = vision_config.num_image_tokens
    vision_config.num_image_tokens = tokens  # generate() reads the image length from here
    generation_config = GenerationConfig(
        do_sample=temperature > 0, temperature=temperature or None, guidance_scale=cfg,
        num_return_sequences=images, pad_token_id=mm.tokens.pad, bos_token_id=mm.tokens.bos,
        generation_kwargs={"boi_token_id": mm.tokens.begin_of_image},
    )
    try:
        return mm.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_mode="image",
                                 generation_config=generation_config)
    finally:
        vision_config.num_image_tokens = saved


def bytes_per_run(mm, rows: int, prefix: int, tokens: int) -> int:
    """Memory a run must read at least: every weight a decode step uses, once per token (text embeddings are
    lookups, the LM head is unused), plus the filled KV cache at each step."""
    used = [mm.language_model, mm.model.model.generation_head, mm.model.model.generation_aligner]
    lookups = sum(parameter.numel() for parameter in mm.language_model.get_input_embeddings().parameters())
    weights = (sum(parameter.numel() for module in used for parameter in module.parameters()) - lookups)
    config = mm.model.config.text_config
    kv_width = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    cache_reads = 2 * config.num_hidden_layers * rows * kv_width * sum(prefix + step for step in range(tokens))
    return (weights * tokens + cache_reads) * mm.dtype.itemsize


def main(argv: list[str] | None = None) -> int:
    from mmr1.prompting import batch_prefix, build_sequence, embed_sequence
    from mmr1.sampling import Modality, SamplingSettings, sample_tokens

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--images", type=int, default=1, help="images per run (each adds a conditional and an "
                        "unconditional row)")
    parser.add_argument("--tokens", type=int, default=0, help="image tokens per image (0: the model's, 576 for Janus-Pro)")
    parser.add_argument("--naive-tokens", type=int, default=0,
                        help="tokens for the no-cache floor, whose cost grows quadratically (0: same as --tokens)")
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2, help="runs per contender; the fastest counts")
    parser.add_argument("--compile", action="store_true",
                        help="add mmr1's compiled decoding (torch.compile; CUDA graphs on CUDA) as a contender")
    args = parser.parse_args(argv)

    mm = model_under_test(args)
    tokens = args.tokens or mm.num_image_tokens
    naive_tokens = args.naive_tokens or tokens
    settings = SamplingSettings(cfg_scale=args.cfg, temperature=args.temperature)
    sequence = build_sequence(mm, PROMPT)
    conditional = batch_prefix(mm, [embed_sequence(mm, sequence)] * args.images)
    unconditional = batch_prefix(mm, [embed_sequence(mm, sequence, unconditional=True)] * args.images)
    input_ids = sequence.input_ids.unsqueeze(0).to(mm.device)

    def ours(count: int, model=mm, **options):
        return lambda: sample_tokens(model, conditional, Modality.image(model), count, settings, seed=0,
                                     unconditional=unconditional, **options)

    compiled = ours(tokens, model=dataclasses.replace(mm, compile_decoding=True)) if args.compile else None
    contenders = [
        ("mmr1 sampler", tokens, ours(tokens)),
        ("mmr1 sampler, with log-probs", tokens, ours(tokens, return_logprobs=True)),
        *([("mmr1 sampler, compiled", tokens, compiled)] if compiled else []),
        ("transformers generate", tokens,
         lambda: transformers_generate(mm, input_ids, args.images, tokens, args.cfg, args.temperature)),
        ("naive loop, no KV cache", naive_tokens, ours(naive_tokens, use_cache=False)),
    ]
    print(f"machine: {machine()}")
    print(f"model: {describe(mm)}")
    print(f"settings: {args.images} image(s) x {tokens} tokens, prompt of {len(sequence)} tokens, cfg {args.cfg}, "
          f"temperature {args.temperature}, fastest of {args.repeats}")
    with torch.inference_mode():
        ours(4)()  # warm-up: allocator, kernels, lazy inits
        transformers_generate(mm, input_ids, args.images, 4, args.cfg, args.temperature)
        if compiled:  # the first run at these shapes compiles: reported, not timed
            started = time.perf_counter()
            compiled()
            print(f"compiled decoding: the first run (compiling) took {time.perf_counter() - started:.1f} s")
        results = [(name, count, timed(run, mm.device, args.repeats)) for name, count, run in contenders]
    bandwidth = memory_bandwidth(mm.device)
    needed = bytes_per_run(mm, 2 * args.images, len(sequence), tokens)
    results.append(("memory-bandwidth bound", tokens, needed / bandwidth))
    print(f"bound: {needed / 1e9:.2f} GB to read per run at {bandwidth / 1e9:.1f} GB/s (measured: a reduction over "
          f"1 GiB on {mm.device})")
    reference = next(count / seconds for name, count, seconds in results if name == "transformers generate")
    rows = []
    for name, count, seconds in results:
        rate = args.images * count / seconds
        rows.append([name, count, f"{seconds:.2f}", f"{rate:.1f}", f"{seconds / args.images:.3f}",
                     f"{rate / (args.images * reference):.2f}x"])
    print(table(["contender", "tokens/image", "seconds", "image tokens/s", "s/image", "tokens/s vs transformers"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
