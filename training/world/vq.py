"""Train Janus's VQ tokenizer (transformers' JanusVQVAE, unchanged) on rendered scenes.

The quantizer works as the original Janus/LlamaGen one: latents and codes are L2-normalised and the nearest code
is the one of highest cosine, with a straight-through gradient and a commitment loss. Codes no batch used for a
while are restarted on random latents. At the end the codebook is stored normalised, so transformers' own
`encode` (which skips the normalisation) picks the same codes as `mmr1.model.encode_image_tokens`.

Early steps see half-size crops aligned to the token grid (the network is convolutional; a crop costs a quarter),
the last `full_steps` whole images, so the attention and norms also settle at the real size. The images are
the world's scenes, its subjects alone (what the model draws as the visual intermediate) and flat colour fields
(`training_images`): without them a flat colour is outside the VQ's data and decodes as some background.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mmr1.tiny import TinySpec, build_vq_config

from .fit import batch_indices, fit, to_pixels

_RESTART_EVERY = 50
FLAT_FIELDS = 800  # half in the world's colours, half random


def flat_fields(colours, size: int) -> np.ndarray:
    """uint8 [len(colours), size, size, 3]: each RGB colour as a flat image."""
    colours = np.asarray(colours, np.uint8)
    return np.ascontiguousarray(np.broadcast_to(colours[:, None, None, :], (len(colours), size, size, 3)))


def training_images(scenes: np.ndarray, subjects_alone: np.ndarray, seed: int) -> np.ndarray:
    """uint8 [N, S, S, 3]: the scenes, the subjects alone and flat colour fields, the VQ's training images."""
    from .scenes import COLOURS

    rng = np.random.default_rng(seed)
    world = np.asarray(list(COLOURS.values()), np.uint8)
    colours = np.concatenate([world[np.arange(FLAT_FIELDS // 2) % len(world)],
                              rng.integers(0, 256, (FLAT_FIELDS - FLAT_FIELDS // 2, 3), dtype=np.uint8)])
    return np.concatenate([scenes, subjects_alone, flat_fields(colours, scenes.shape[1])])


def quantize(vq, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(straight-through codes [N,C,h,w], code indices [N*h*w], commitment loss) of quant_conv outputs."""
    flat = F.normalize(latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]), dim=-1)
    codebook = F.normalize(vq.quantize.embedding.weight, dim=-1)
    indices = (flat @ codebook.T).argmax(dim=-1)
    codes = codebook[indices]
    loss = F.mse_loss(codes, flat.detach()) + 0.25 * F.mse_loss(flat, codes.detach())
    straight = flat + (codes - flat).detach()
    batch, channels, height, width = latents.shape
    return straight.view(batch, height, width, channels).permute(0, 3, 1, 2), indices, loss


def reconstruct(vq, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(reconstruction, code indices, commitment loss) of pixels in -1..1."""
    codes, indices, loss = quantize(vq, vq.quant_conv(vq.encoder(pixels)))
    return vq.decoder(vq.post_quant_conv(codes)), indices, loss


def train_vq(
    spec: TinySpec,
    images,
    steps: int,
    full_steps: int,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    seed: int = 0,
) -> tuple[torch.nn.Module, list[float]]:
    """A JanusVQVAE of `spec`'s sizes trained on uint8 images [N, S, S, 3]; returns (model, losses)."""
    from transformers.models.janus.modeling_janus import JanusVQVAE

    torch.manual_seed(seed)
    vq = JanusVQVAE(build_vq_config(spec)).train()
    pixels = to_pixels(images)
    crop = spec.image_size // 2
    grid = 2 ** (len(spec.vq_channel_multiplier) - 1)
    usage = torch.zeros(spec.vq_codebook_size)

    def step_loss(step: int) -> torch.Tensor:
        batch = pixels[batch_indices(len(pixels), batch_size, step, seed)]
        if step < steps - full_steps:
            generator = torch.Generator().manual_seed(seed + step)
            top, left = (torch.randint(0, (spec.image_size - crop) // grid + 1, (2,), generator=generator) * grid).tolist()
            batch = batch[:, :, top : top + crop, left : left + crop]
        if step and step % _RESTART_EVERY == 0:  # before this step's forward: the graph must see final codes
            _restart_unused(vq, usage, batch, generator_seed=seed + step)
            usage.zero_()
        decoded, indices, commitment = reconstruct(vq, batch)
        usage.index_add_(0, indices, torch.ones(len(indices)))
        return F.mse_loss(decoded, batch) + 0.5 * F.l1_loss(decoded, batch) + commitment

    losses = fit(vq.parameters(), step_loss, steps, learning_rate, "vq")
    with torch.no_grad():
        vq.quantize.embedding.weight.copy_(F.normalize(vq.quantize.embedding.weight, dim=-1))
    return vq.eval(), losses


def polish_decoder(vq, images, steps: int, batch_size: int = 16, learning_rate: float = 5e-4, seed: int = 0) -> list[float]:
    """Fine-tune only `post_quant_conv` and the decoder, every batch holding each world colour as a flat field.

    The encoder and codebook stay frozen, so every image keeps its tokens (and the generator its data): only what the
    codes decode to moves, until a flat colour (a subject's body, a backdrop) comes back within a few levels instead
    of the average its shared codes were pulled to. Returns the loss of every step."""
    from .scenes import COLOURS

    for parameter in vq.parameters():
        parameter.requires_grad_(False)
    trained = [*vq.post_quant_conv.parameters(), *vq.decoder.parameters()]
    for parameter in trained:
        parameter.requires_grad_(True)
    pixels = to_pixels(images)
    flat = to_pixels(flat_fields(list(COLOURS.values()), pixels.shape[-1]))

    def step_loss(step: int) -> torch.Tensor:
        batch = torch.cat([pixels[batch_indices(len(pixels), batch_size, step, seed + 1)], flat])
        with torch.no_grad():
            codes = quantize(vq, vq.quant_conv(vq.encoder(batch)))[0]
        decoded = vq.decoder(vq.post_quant_conv(codes))
        return F.mse_loss(decoded, batch) + 0.5 * F.l1_loss(decoded, batch)

    losses = fit(trained, step_loss, steps, learning_rate, "vq decoder")
    for parameter in vq.parameters():
        parameter.requires_grad_(True)
    return losses


@torch.no_grad()
def _restart_unused(vq, usage: torch.Tensor, batch: torch.Tensor, generator_seed: int) -> None:
    """Move codes no latent chose since the last restart onto latents of the batch, drawn in proportion to their
    squared distance from the nearest code (k-means++ seeding): new codes go where the book fits worst (a
    subject's fine pattern), not onto the flat backgrounds most latents show, whose near-twin codes would only
    make the generator's next token harder to predict."""
    unused = (usage == 0).nonzero().flatten()
    if len(unused) == 0:
        return
    latents = vq.quant_conv(vq.encoder(batch))
    flat = F.normalize(latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]), dim=-1)
    codebook = F.normalize(vq.quantize.embedding.weight, dim=-1)
    distance = (2 - 2 * (flat @ codebook.T).amax(dim=-1)).clamp(min=0)  # squared, between unit vectors
    generator = torch.Generator().manual_seed(generator_seed)
    picks = torch.multinomial(distance + 1e-12, len(unused), replacement=True, generator=generator)
    noise = 0.01 * torch.randn(len(unused), flat.shape[1], generator=generator)
    vq.quantize.embedding.weight[unused] = flat[picks] + noise


@torch.no_grad()
def reconstructed_images(vq, images, batch_size: int = 64) -> torch.Tensor:
    """Encode-decode of uint8 images [N, S, S, 3], as float images [N, S, S, 3] in 0..1 (what generation sees)."""
    pixels = to_pixels(images)
    decoded = [reconstruct(vq, pixels[start : start + batch_size])[0] for start in range(0, len(pixels), batch_size)]
    return ((torch.cat(decoded).clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)


def reconstruction_error(vq, images) -> float:
    """Mean absolute pixel error (0..1 scale) of encode-decode on uint8 images: how much detail the codes keep."""
    return float((reconstructed_images(vq, images) - torch.as_tensor(images).float() / 255).abs().mean())
