"""Where a training step's time goes: seconds per named phase, synchronised with the GPU at phase edges.

The GRPO trainer logs them every step (rollout, reward, log-probs, backward, optimizer), so a slow run shows
its bottleneck in metrics.jsonl; benchmarks/grpo_step.py reads them back. A few syncs per step cost nothing
next to a step.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class PhaseClock:
    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, phase: str):
        """Add the block's wall time to `phase` (blocks of one phase accumulate)."""
        self._sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started

    def reset(self) -> dict[str, float]:
        """The seconds so far, then start again from zero."""
        seconds, self.seconds = self.seconds, {}
        return seconds
