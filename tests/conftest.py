"""Shared fixtures: tiny checkpoints built once per session, offline, with the project's own builder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmr1.tokens import JANUS_SPECIAL_TOKENS

ORIENTATION_TAG = 0x0112  # EXIF Orientation
# Every Janus control token's string, as a user could type it into a prompt or a reasoning.
CONTROL_TOKEN_TEXT = " ".join(JANUS_SPECIAL_TOKENS)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    from mmr1.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_hf"), layout="hf", seed=0)


@pytest.fixture(scope="session")
def tiny_deepseek_dir(tmp_path_factory):
    from mmr1.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_deepseek"), layout="deepseek", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_hf_dir):
    from mmr1.loading import load_model

    return load_model(tiny_hf_dir, dtype="fp32", device="cpu")


def subject_image(size=(48, 40), colour=(210, 40, 40), background=(30, 120, 200)) -> Image.Image:
    """A coloured square on a plain background: a stand-in subject photo."""
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    array[:] = background
    array[size[1] // 4 : 3 * size[1] // 4, size[0] // 4 : 3 * size[0] // 4] = colour
    return Image.fromarray(array)


def save_rotated_photo(path: Path, image: Image.Image) -> Image.Image:
    """Store `image` as a camera held upright does: pixels turned a quarter left, EXIF orientation 6 (display
    them turned 90 degrees clockwise). Returns the stored pixels turned so by hand, the photo as displayed
    (`image` itself, up to JPEG's loss)."""
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6
    image.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)
    with Image.open(path) as stored:
        assert stored.getexif()[ORIENTATION_TAG] == 6 and stored.size == (image.height, image.width)
        return stored.convert("RGB").transpose(Image.Transpose.ROTATE_270)


def marked_photo() -> Image.Image:
    """A subject photo (48x40) with a mark in one corner, so that a turned or mirrored read cannot pass for it."""
    image = subject_image()
    image.paste((250, 250, 0), (0, 0, 8, 6))
    return image


def control_token_counts(mm, ids: torch.Tensor) -> dict[str, int]:
    """How often each Janus control token occurs in `ids` (tokens absent from `ids` count 0)."""
    found = ids.tolist()
    return {token: found.count(mm.tokenizer.convert_tokens_to_ids(token)) for token in JANUS_SPECIAL_TOKENS}


@pytest.fixture()
def reference_image() -> Image.Image:
    return subject_image()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, whose spin-waits dominate on a busy 2-core runner
    (a module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
