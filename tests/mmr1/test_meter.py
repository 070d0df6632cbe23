"""The run meter the generate node shows: seconds per image and the peak memory, on the CPU and (emulated) CUDA."""

from __future__ import annotations

import time

import torch

from mmr1.meter import RunMeter, metered


def test_the_cpu_reports_time_and_the_process_peak():
    with metered(torch.device("cpu")) as meter:
        block = torch.ones(4 * 2**20, dtype=torch.uint8)  # 4 MiB touched inside the block
        time.sleep(0.05)
    assert meter.seconds >= 0.05 and meter.peak_bytes >= block.numel()
    assert meter.memory == "process memory (peak RSS so far)"


def test_cuda_reports_the_peak_of_the_block_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: calls.append(("peak", device)) or 3 * 2**30)
    device = torch.device("cuda", 0)
    with metered(device) as meter:
        assert calls == [("reset", device)]  # reset before the block runs
    assert calls[-1] == ("peak", device)
    assert (meter.peak_bytes, meter.memory) == (3 * 2**30, "GPU memory")


def test_describe_says_seconds_per_image_and_the_peak():
    meter = RunMeter(seconds=9.64, peak_bytes=int(1.52 * 2**30), memory="GPU memory")
    assert meter.describe(4) == "2.41 s/image (4 images in 9.6 s), peak 1.52 GiB of GPU memory"
    assert meter.describe(1).startswith("9.64 s/image (1 image in 9.6 s)")
