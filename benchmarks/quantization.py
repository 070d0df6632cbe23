"""Weights' memory of each `quantization` choice (none, int8, nf4), loaded through `load_model` from a random
checkpoint of a real shape written to a temporary folder (bf16 on disk, as Janus-Pro ships), and the load time.

    python -m benchmarks.quantization --shape janus-pro-1b --project janus-pro-7b

`--project` adds rows for a shape too large to write and load here (the 7B needs about 15 GB of memory and as
much disk per load): its parameters counted on the meta device, times the bytes per parameter measured above for
the quantized linear layers and for everything kept in the loading dtype. Those rows are labelled projected.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import apply_threads, gib, machine, table


def linear_and_rest(model: torch.nn.Module, measure) -> tuple[float, float]:
    """(the language model's linear layers, everything else) of `model` by `measure(module)`, in bytes."""
    from mmr1.quantization import quantized_layers

    linear = sum(measure(module) for module in quantized_layers(model))
    return linear, measure(model) - linear


def main(argv: list[str] | None = None) -> int:
    from mmr1.loading import load_model
    from mmr1.quantization import QUANTIZATIONS, weight_bytes
    from mmr1.tiny import SHAPES, build_random_model, make_tiny_checkpoint

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=tuple(SHAPES), help="the shape written and loaded")
    parser.add_argument("--project", default=None, choices=tuple(SHAPES), help="a shape projected, not loaded")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="on disk and loading")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]

    def numel(module: torch.nn.Module) -> int:
        return sum(tensor.numel() for tensor in [*module.parameters(), *module.buffers()])

    rows, per_parameter, counts = [], {}, None
    with tempfile.TemporaryDirectory(prefix="mmr1-quant-bench-") as work:
        folder = make_tiny_checkpoint(Path(work) / args.shape, spec=SHAPES[args.shape], dtype=dtype)
        for choice in QUANTIZATIONS:  # "none" first: its parameter counts are the shape's
            started = time.perf_counter()
            mm = load_model(folder, dtype=args.dtype, device="cpu", quantization=choice)
            seconds = time.perf_counter() - started
            counts = counts or linear_and_rest(mm.model, numel)
            linear, rest = linear_and_rest(mm.model, weight_bytes)
            per_parameter[choice] = (linear / counts[0], rest / counts[1])
            rows.append([args.shape, choice, "measured", linear + rest, linear, f"{seconds:.1f} s"])
            del mm
    if args.project:
        meta, _ = build_random_model(SHAPES[args.project], device="meta", dtype=dtype)
        projected = linear_and_rest(meta, numel)
        for choice in QUANTIZATIONS:
            linear, rest = (count * bytes_each for count, bytes_each in zip(projected, per_parameter[choice]))
            rows.append([args.project, choice, f"projected from {args.shape}", linear + rest, linear, "-"])
    unquantized = {row[0]: row[3] for row in rows if row[1] == "none"}
    rows = [[shape, choice, how, gib(total), gib(linear), f"{total / unquantized[shape]:.2f}x", load]
            for shape, choice, how, total, linear, load in rows]
    print(f"machine: {machine()}")
    print(f"weights in {args.dtype}; the language model's linear layers quantized, the VQ, vision encoder, "
          "aligners, embeddings and heads kept in the loading dtype")
    print(table(["shape", "quantization", "how", "weights", "of which quantized layers", "vs none", "load"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
