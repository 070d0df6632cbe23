"""Shared fixtures: tiny checkpoints built once per session, offline, with the project's own builder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image


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
