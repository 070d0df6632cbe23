"""The small supervised loop shared by the world's component trainers (VQ, judge, reward model, encoder)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..engine import learning_rate_factor


def fit(
    parameters: Iterable[torch.nn.Parameter],
    step_loss: Callable[[int], torch.Tensor],
    steps: int,
    learning_rate: float,
    description: str,
    weight_decay: float = 0.01,
    warmup_fraction: float = 0.05,
) -> list[float]:
    """AdamW with linear warmup and cosine decay to a tenth; `step_loss(step)` builds its own batch.

    Returns the loss of every step (for the pipeline's record and the tests)."""
    from tqdm.auto import tqdm

    parameters = [parameter for parameter in parameters if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    warmup = max(1, int(warmup_fraction * steps))

    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, warmup, steps, "cosine", floor=0.1))
    losses = []
    with tqdm(range(steps), desc=description, unit="step") as bar:
        for step in bar:
            loss = step_loss(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses


def batch_indices(count: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """A reproducible random batch of indices for `step`."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, count, (batch_size,), generator=generator)


def to_pixels(images) -> torch.Tensor:
    """uint8 [N, H, W, 3] (numpy or torch) -> float [N, 3, H, W] in -1..1, the Janus VQ's range."""
    images = torch.as_tensor(images)
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
