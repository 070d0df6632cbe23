"""How long a run took and how much memory it peaked at: what a user with an 8-24 GB GPU wants to see per run."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class RunMeter:
    seconds: float = 0.0
    peak_bytes: int = 0
    memory: str = ""  # what peak_bytes counts: the device's allocations, or the process's resident set

    def describe(self, images: int) -> str:
        """'2.41 s/image (4 images in 9.6 s), peak 1.52 GiB of GPU memory'."""
        return (f"{self.seconds / max(images, 1):.2f} s/image ({images} image{'s' * (images != 1)} in "
                f"{self.seconds:.1f} s), peak {self.peak_bytes / 2**30:.2f} GiB of {self.memory}")


@contextmanager
def metered(device: torch.device) -> Iterator[RunMeter]:
    """Time the block and take its peak memory: on CUDA the peak of torch's allocations during the block; on the
    CPU the process's peak resident set so far (the OS keeps no per-block peak), said so in `memory`."""
    meter = RunMeter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    yield meter
    meter.seconds = time.perf_counter() - started
    if device.type == "cuda":
        meter.peak_bytes, meter.memory = torch.cuda.max_memory_allocated(device), "GPU memory"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        meter.peak_bytes = peak if sys.platform == "darwin" else peak * 1024
        meter.memory = "process memory (peak RSS so far)"
