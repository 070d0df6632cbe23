"""What a run shows besides its metrics: curves of logged values (matplotlib) and grids of sampled images."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from mmr1.images import tensor_to_pil


def plot_curves(metrics_path: Path, out: Path, keys: Sequence[str]) -> Path | None:
    """One panel per key of metrics.jsonl against the step, with a ±std band where `<key>_std` is logged.

    Keys that were never logged are left out, values logged as null are gaps; returns None when there is nothing
    to draw.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [json.loads(line) for line in Path(metrics_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    keys = [key for key in keys if any(key in line for line in lines)]
    if not keys:
        return None
    figure, axes = plt.subplots(len(keys), 1, figsize=(7, 2.4 * len(keys)), sharex=True, squeeze=False)
    for axis, key in zip(axes[:, 0], keys):
        points = [line for line in lines if key in line]
        steps = [line["step"] for line in points]
        values = [_number(line[key]) for line in points]
        axis.plot(steps, values, label=key)
        spread_key = key[: -len("_mean")] + "_std" if key.endswith("_mean") else key + "_std"
        if all(spread_key in line for line in points):
            spread = [_number(line[spread_key]) for line in points]
            axis.fill_between(steps, [v - s for v, s in zip(values, spread)], [v + s for v, s in zip(values, spread)],
                              alpha=0.25, label="± std in the group")
        axis.set_ylabel(key)
        axis.grid(alpha=0.3)
        axis.legend(loc="best", fontsize=8)
    axes[-1, 0].set_xlabel("step")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def _number(value: float | None) -> float:
    """A logged value as matplotlib draws it: null (no finite value that step) as NaN, a gap in the curve."""
    return math.nan if value is None else value


def sample_grid(images: torch.Tensor, captions: Sequence[str], columns: int = 4) -> Image.Image:
    """Images [N,H,W,3] in 0..1 tiled in rows of `columns`, each with a caption line under it."""
    pils = [tensor_to_pil(image) for image in images]
    width, height = pils[0].size
    caption_height = 14
    rows = math.ceil(len(pils) / columns)
    grid = Image.new("RGB", (columns * width, rows * (height + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    for index, (pil, caption) in enumerate(zip(pils, captions)):
        x, y = (index % columns) * width, (index // columns) * (height + caption_height)
        grid.paste(pil, (x, y))
        draw.text((x + 2, y + height + 1), caption[: max(4, width // 6)], fill="black")
    return grid
