"""What every benchmark shares: the machine it ran on, synchronised timing, peak memory, the model under test.

Benchmarks run their contenders in one process, on one model instance, with the same settings, and print
absolute figures and ratios; nothing here is cached between runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch


def machine() -> str:
    """One line naming the hardware and software a figure was measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import transformers

    parts = [f"{cpu}, {torch.get_num_threads()} torch threads of {os.cpu_count()} cores"]
    if torch.cuda.is_available():
        parts.append(f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    parts.append(f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}")
    return "; ".join(parts)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device: torch.device, repeats: int = 1) -> float:
    """Seconds of the fastest of `repeats` synchronised wall-clock runs (the least disturbed by other work)."""
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        function()
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best


def memory_bandwidth(device: torch.device, size: int = 2**30) -> float:
    """Bytes/s of the best of 3 reductions over `size` bytes: what a decode step that streams its weights can
    reach on this machine (measured, not the data sheet's figure)."""
    data = torch.ones(size // 4, dtype=torch.float32, device=device)
    return size / timed(data.sum, device, repeats=3)


def gib(count: float) -> str:
    return f"{count / 2**30:.2f} GiB"


def table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table, so output pastes into the README as is."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                        help="auto: bf16 on GPUs that support it, fp32 on the CPU")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def apply_threads(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    from mmr1.tiny import SHAPES

    parser.add_argument("--shape", default="tiny", choices=tuple(SHAPES),
                        help="random weights of these sizes, built in memory (default: tiny)")
    parser.add_argument("--model", default=None, help="a model folder instead of random weights")
    add_device_options(parser)


def model_under_test(args: argparse.Namespace):
    """The MMR1Model a benchmark measures: a folder through `load_model`, or random weights of `args.shape`."""
    from mmr1.loading import load_model, resolve_device, resolve_dtype
    from mmr1.model import MMR1Model
    from mmr1.tiny import SHAPES, build_random_model
    from mmr1.tokens import SpecialTokens

    apply_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.model:
        return load_model(args.model, dtype=dtype, device=device)
    model, processor = build_random_model(SHAPES[args.shape], device=device, dtype=dtype)
    tokens = SpecialTokens.from_tokenizer(processor.tokenizer)
    return MMR1Model(model, processor, tokens, Path(f"random-{args.shape}"), "hf")


def describe(mm) -> str:
    text = mm.model.config.text_config
    parameters = sum(parameter.numel() for parameter in mm.language_model.parameters())
    return (f"{mm.source.name}: language model {parameters / 1e6:.0f}M parameters ({text.num_hidden_layers} layers, "
            f"hidden {text.hidden_size}), {mm.dtype}, on {mm.device}")
