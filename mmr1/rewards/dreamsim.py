"""DreamSim (Fu et al., 2023), the subject-fidelity reward MM-R1 trains with, read from a local folder.

The `dreamsim` package's own classes build and load the model (its ViT extractors, its LoRA adapters through peft),
so the scores are DreamSim's: the reward of an image is 1 - DreamSim distance to each reference (the cosine of
DreamSim's normalised embeddings), averaged over the references, like CLIP-I and DINO.

Nothing is downloaded: `dreamsim.dreamsim()` fetches a zip from GitHub when a file it needs is absent, and its DINO
backbones come through torch.hub, so the folder is checked against the files of its type first, and a missing file
is named with the layout. The folder is the `cache_dir` that `dreamsim.dreamsim(cache_dir=...)` fills on a first
online run (the release zips unpacked; for DINO-based types also torch.hub's copy of facebookresearch/dino and
its checkpoint, which dreamsim keeps in the same folder).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch

from ..errors import InputError, ModelFolderError
from ..offline import hub_offline

_DINO_HUB = ("facebookresearch_dino_main/hubconf.py", "checkpoints/dino_vitbase16_pretrain.pth")
# dreamsim_type: the files it reads, in the order dreamsim's release zips and torch.hub lay them out; a type is
# chosen by its adapter folder (the first file), in this order of preference (the ensemble is DreamSim's best).
DREAMSIM_TYPES: dict[str, tuple[str, ...]] = {
    "ensemble": ("ensemble_lora/adapter_config.json", "dino_vitb16_pretrain.pth", "clip_vitb16_pretrain.pth.tar",
                 "open_clip_vitb16_pretrain.pth.tar", *_DINO_HUB),
    "dino_vitb16": ("dino_vitb16_single_lora/adapter_config.json", "dino_vitb16_pretrain.pth", *_DINO_HUB),
    "open_clip_vitb32": ("open_clip_vitb32_single_lora/adapter_config.json", "open_clip_vitb32_pretrain.pth.tar"),
    "clip_vitb32": ("clip_vitb32_single_lora/adapter_config.json", "clip_vitb32_pretrain.pth.tar"),
}
_INSTALL_HINT = 'the dreamsim reward needs the dreamsim package: pip install "mmr1-personalization[dreamsim]"'


def holds_dreamsim(folder: Path) -> bool:
    """Whether `folder` holds a DreamSim model (the adapter folder of one of its types), for folder listings."""
    return any((folder / files[0]).is_file() for files in DREAMSIM_TYPES.values())


def dreamsim_type(folder: Path) -> str:
    """The DreamSim type whose adapter folder `folder` holds; every file that type reads must be there."""
    if not folder.is_dir():
        raise ModelFolderError(f"DreamSim folder {folder} does not exist or is not a folder.")
    for name, files in DREAMSIM_TYPES.items():
        if (folder / files[0]).parent.is_dir():
            missing = [file for file in files if not (folder / file).is_file()]
            if missing:
                raise ModelFolderError(
                    f"DreamSim folder {folder} ({name}) is incomplete; missing: {', '.join(missing)}.")
            return name
    layouts = "; ".join(f"{name}: {', '.join(files)}" for name, files in DREAMSIM_TYPES.items())
    raise ModelFolderError(
        f"DreamSim folder {folder} holds none of DreamSim's models. Expected the files of one type (the cache_dir "
        f"that dreamsim.dreamsim(cache_dir=...) fills on a first online run, or its release zips unpacked): {layouts}."
    )


@contextlib.contextmanager
def _no_downloads() -> Iterator[None]:
    """dreamsim downloads a missing file from GitHub, torch.hub fetches repositories and peft's import may ask the
    Hub for kernels: after the folder check none may happen, and one that tries fails here instead."""
    def refuse(url, *args, **kwargs):
        raise ModelFolderError(f"DreamSim tried to download {url}; the folder should already hold it.")

    saved_hub_dir = torch.hub.get_dir()
    try:
        with hub_offline(), mock.patch("torch.hub.download_url_to_file", refuse):
            yield
    finally:
        torch.hub.set_dir(saved_hub_dir)  # dreamsim points torch.hub at its folder for its DINO backbones


class _Preprocess:
    """dreamsim's preprocessing (224x224 bicubic, 0..1) behind the image-processor call the rewards share."""

    def __init__(self, preprocess) -> None:
        self.preprocess = preprocess

    def __call__(self, images, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.cat([self.preprocess(image) for image in images])}


def _embed(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """DreamSim's embedding [batch, dim]; its distance is 1 - the cosine of two of them."""
    for extractor in model.extractor_list:
        # each extractor keeps its projection outside the module's tensors and moves it to a device name of its
        # own at every call: make both follow the pixels (a host moves the model; a bf16 reward)
        extractor.device = pixel_values.device
        if getattr(extractor, "proj", None) is not None:
            extractor.proj = extractor.proj.to(pixel_values.device, pixel_values.dtype)
    return model.embed(pixel_values).reshape(pixel_values.shape[0], -1)


def load_dreamsim(folder: Path, device: torch.device, dtype: torch.dtype):
    """The `dreamsim` reward (an ImageSimilarityReward) from a local DreamSim folder."""
    from ..loading import check_finite
    from .models import ImageSimilarityReward

    kind = dreamsim_type(folder)
    with _no_downloads(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        # it prints "Using cached ...", and peft warns of the second adapter wrapper its loader makes by design
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        try:
            import dreamsim
        except ImportError as error:
            raise InputError(f"{_INSTALL_HINT} ({error}).") from error
        try:
            model, preprocess = dreamsim.dreamsim(pretrained=True, device=str(device), cache_dir=str(folder),
                                                  dreamsim_type=kind)
        except (OSError, RuntimeError, KeyError, ValueError) as error:
            raise ModelFolderError(f"Cannot load the DreamSim model ({kind}) from {folder}: {error}") from error
    reward = ImageSimilarityReward("dreamsim", model, _Preprocess(preprocess), _embed, device, dtype)
    check_finite(folder, [*reward.model.named_parameters(), *reward.model.named_buffers()], dtype)
    return reward
