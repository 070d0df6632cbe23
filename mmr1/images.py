"""Image and mask conversions shared by the CLI, the nodes and the trainer.

Conventions: a PIL image is the exchange format inside mmr1; tensors follow ComfyUI (IMAGE [B,H,W,3] float32
0..1, MASK [B,H,W] or [H,W] float 0..1). Every conversion of user input validates and says what is wrong.
"""

from __future__ import annotations

import struct
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from .errors import InputError

BACKGROUND_GREY = (127, 127, 127)  # Janus' letterbox colour
# Largest image a file may declare (width x height): a 108 MP phone photo passes; a decompression bomb (a small
# file declaring, say, 30000x30000 = 900 MP, 2.7 GB once decoded) is refused from its header, before any pixel is
# allocated. Our own number, not PIL's Image.MAX_IMAGE_PIXELS, a global other node packs often set to None.
MAX_IMAGE_PIXELS = 12_000 * 12_000
# Longest side an image is kept at: Janus sees 384 px and the reward models 224, so a larger one only costs memory
# (a 100 MP photo is 300 MB as RGB). JPEGs decode at 1/2..1/8 scale straight from the file (Image.draft).
MAX_IMAGE_SIDE = 2048
_TURNED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_OPENING = threading.Lock()  # warnings.catch_warnings is process-wide: one thread at a time changes its filters
# What PIL raises on a corrupt file, besides OSError: parsers use SyntaxError, struct and Value errors, EOFError.
_CORRUPT = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)
# Full scale of high-bit-depth modes; mode "I" (also used for 16-bit PNGs) is judged by its values.
_PEAKS = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "F": 1.0}


def bounded_size(width: int, height: int, side: int = MAX_IMAGE_SIDE) -> tuple[int, int]:
    """(width, height) scaled to fit `side`, aspect kept, unchanged when it fits. A function of the size alone (and
    symmetric), so a photo and its mask of the same size, turned or not, come back the same size."""
    scale = side / max(width, height, 1)
    return (width, height) if scale >= 1 else (max(round(width * scale), 1), max(round(height * scale), 1))


def _refuse_huge(image: Image.Image, path: str | Path, what: str) -> None:
    """A clear error for a declared size over MAX_IMAGE_PIXELS, read from the header before decoding."""
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(
            f"Cannot read {what} {path}: it declares {width}x{height} pixels ({width * height / 1e6:.0f} MP), over "
            f"the limit of {MAX_IMAGE_PIXELS / 1e6:.0f} MP (mmr1.images.MAX_IMAGE_PIXELS): a decompression bomb or "
            "an image far larger than any use here; downscale it first."
        )


def _open(path: str | Path) -> Image.Image:
    """Image.open without PIL's DecompressionBombWarning (its threshold, 89 MP, is below ours and `_refuse_huge`
    decides with a clearer message); PIL's DecompressionBombError (over 179 MP) still stops a bomb there."""
    with _OPENING, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def open_image(path: str | Path, what: str = "image") -> Image.Image:
    """The image of a file as it is displayed: turned by its EXIF orientation (as ComfyUI's Load Image does, so the
    CLI, the trainer and the nodes see the same pixels and a mask drawn on the displayed photo fits), in its own mode
    (callers convert with `to_rgb` or `mask_to_array`). The one reader of image files, hence where the size limits
    live: a declared size over MAX_IMAGE_PIXELS is refused, and the longest side is brought down to MAX_IMAGE_SIDE
    (JPEGs decoded at reduced scale), so memory stays bounded whatever the file."""
    try:
        with _open(path) as image:
            _refuse_huge(image, path, what)
            size = bounded_size(*image.size)
            turned = image.getexif().get(ExifTags.Base.Orientation) in _TURNED
            image.draft(image.mode, size)  # JPEG only (a no-op elsewhere): decode at the smallest scale >= size
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            size = size[::-1] if turned else size
            if image.size == size:
                return image.copy()
            return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    except InputError:
        raise
    except _CORRUPT as error:
        raise InputError(f"Cannot read {what} {path}: {error}") from error


_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I", "F")


def _unit_values(image: Image.Image) -> np.ndarray:
    """A 16/32-bit or float image's values over its full scale (converting to 8 bits would clip them instead)."""
    values = np.asarray(image, dtype=np.float64)
    return values / (_PEAKS.get(image.mode) or (65535.0 if values.max(initial=0) > 255 else 255.0))


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """Any PIL mode as 8-bit RGB: alpha composited on grey, 16/32-bit and float scaled, palettes expanded."""
    if image.width == 0 or image.height == 0:
        raise InputError(f"{name} is empty ({image.width}x{image.height} pixels).")
    if image.mode in _HIGH_DEPTH_MODES:
        unit = _unit_values(image)
        return Image.fromarray(np.clip(unit * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("P", "La", "RGBa"):
        image = image.convert("LA" if image.mode == "La" else "RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, BACKGROUND_GREY + (255,))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def tensor_to_pil(image: torch.Tensor, name: str = "image") -> Image.Image:
    """[H,W,C] float 0..1 (C = 1, 3 or 4) as RGB."""
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"{name} must be [H,W,C] with C of 1, 3 or 4, got shape {list(image.shape)}.")
    array = (image.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[array.shape[-1]]
    return to_rgb(Image.fromarray(array[..., 0] if mode == "L" else array, mode), name)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image as [H,W,3] float32 0..1."""
    return torch.from_numpy(np.asarray(to_rgb(image), dtype=np.float32) / 255.0)


def image_batch_to_pils(images: torch.Tensor, name: str = "images") -> list[Image.Image]:
    """A ComfyUI IMAGE batch [B,H,W,C] (or one [H,W,C] image) as a list of RGB images."""
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[0] == 0:
        raise InputError(f"{name} must be an IMAGE batch [B,H,W,C] with B >= 1, got shape {list(images.shape)}.")
    return [tensor_to_pil(image, f"{name}[{index}]") for index, image in enumerate(images)]


def mask_to_array(mask: torch.Tensor | Image.Image | np.ndarray, name: str = "mask") -> np.ndarray:
    """A mask as a float [H,W] array in 0..1."""
    if isinstance(mask, Image.Image) and mask.mode in _HIGH_DEPTH_MODES:
        array = _unit_values(mask).astype(np.float32)
    elif isinstance(mask, Image.Image):
        array = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    else:
        array = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask)
        array = array.astype(np.float32) / (255.0 if array.dtype == np.uint8 else 1.0)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise InputError(f"{name} must be [H,W] (or [1,H,W]), got shape {list(array.shape)}.")
    return np.clip(array, 0.0, 1.0)


def crop_to_mask(image: Image.Image, mask: np.ndarray, margin: float = 0.08, name: str = "mask") -> Image.Image:
    """The bounding box of the mask (> 0.5) with a relative margin, so the subject fills the reference."""
    if mask.shape != (image.height, image.width):
        raise InputError(
            f"{name} is {mask.shape[1]}x{mask.shape[0]} but its image is {image.width}x{image.height}; "
            "a mask must have the size of its image."
        )
    rows, cols = np.nonzero(mask > 0.5)
    if rows.size == 0:
        raise InputError(f"{name} selects nothing (no value above 0.5).")
    pad_y, pad_x = int(margin * image.height), int(margin * image.width)
    box = (
        max(int(cols.min()) - pad_x, 0),
        max(int(rows.min()) - pad_y, 0),
        min(int(cols.max()) + 1 + pad_x, image.width),
        min(int(rows.max()) + 1 + pad_y, image.height),
    )
    return image.crop(box)


def letterbox(image: Image.Image, size: int) -> torch.Tensor:
    """[3,size,size] float 0..1: the longest side scaled to `size`, centred on grey, as Janus preprocesses."""
    image = to_rgb(image)
    scale = size / max(image.width, image.height)
    resized = image.resize(
        (max(round(image.width * scale), 1), max(round(image.height * scale), 1)), Image.Resampling.BICUBIC
    )
    canvas = Image.new("RGB", (size, size), BACKGROUND_GREY)
    canvas.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
    return pil_to_tensor(canvas).permute(2, 0, 1)
