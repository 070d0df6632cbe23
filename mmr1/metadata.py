"""Generation records: the JSON written beside the images and the same text inside each PNG.

Records hold only what determines the output (no timestamps, no timings), so the same command writes
byte-identical files.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, PngImagePlugin

from .outputs import write_bytes

PNG_TEXT_KEY = "mmr1"


def dumps(record: dict) -> str:
    """Strict JSON: a NaN or infinity (written as bare NaN/Infinity by default, which strict parsers reject)
    raises instead; the CLI checks its settings before generating, so a record never holds one."""
    return json.dumps(record, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)


def png_bytes(image: Image.Image, record: dict) -> bytes:
    """`image` as PNG with `record` as an iTXt chunk under PNG_TEXT_KEY."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt(PNG_TEXT_KEY, dumps(record))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: Image.Image, path: Path, record: dict) -> None:
    """Write `image` as PNG with `record` (see `png_bytes`), whole or not at all: encoded in memory, then written
    under a temporary name and renamed into place (outputs.write_bytes), so a full disk leaves no partial PNG
    and a link at `path` is replaced, not written through."""
    write_bytes(path, png_bytes(image, record))


def read_png_record(path: Path) -> dict:
    """The record a PNG written by `save_png` carries."""
    with Image.open(path) as image:
        return json.loads(image.text[PNG_TEXT_KEY])
