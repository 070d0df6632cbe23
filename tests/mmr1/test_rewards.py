"""Tests for mmr1.rewards on tiny random checkpoints built offline (no download, no network)."""

import importlib.util
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image

from mmr1.errors import InputError, ModelFolderError
from mmr1.rewards.models import feature_tensor
from tests.mmr1.test_loading import Exploit
from mmr1.rewards import (
    REWARD_KINDS,
    RewardBreakdown,
    WeightedReward,
    load_reward_model,
    make_tiny_reward_checkpoint,
    parse_reward_spec,
)


REFERENCE_KINDS = ("dino", "dinov2", "clip_i", "dreamsim")
PROMPT_KINDS = ("clip_t", "pickscore")
# dreamsim needs the dreamsim package (and torchvision): installed in CI's main run, not in the transformers-4.52
# venv of tests/mmr1, where its tests skip
HAS_DREAMSIM = importlib.util.find_spec("dreamsim") is not None
TRANSFORMERS_KINDS = tuple(kind for kind in REWARD_KINDS if kind != "dreamsim")
HF_MODEL_CLASS = {"dino": "ViTModel", "dinov2": "Dinov2Model"}


def _random_image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rewards")
    clip = make_tiny_reward_checkpoint(root / "clip", "clip_i", seed=0)
    return {
        "dino": make_tiny_reward_checkpoint(root / "dino", "dino", seed=0),
        "dinov2": make_tiny_reward_checkpoint(root / "dinov2", "dinov2", seed=0),
        "clip_i": clip,
        "clip_t": clip,
        "pickscore": clip,
        **({"dreamsim": make_tiny_reward_checkpoint(root / "dreamsim", "dreamsim", seed=0)} if HAS_DREAMSIM else {}),
    }


def _refuse_connection(*args, **kwargs):
    raise AssertionError("a reward loader tried to open a network connection")


@pytest.fixture(scope="module")
def rewards(folders):
    """Every kind loaded once, with sockets refused: loading must not reach for the Hub, offline mode or not."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", _refuse_connection)
        loaded = {kind: load_reward_model(kind, folders[kind]) for kind in folders}
    return Loaded(loaded)


class Loaded(dict):
    """The loaded rewards; a kind whose package is missing here skips the test that asks for it."""

    def __missing__(self, kind: str):
        pytest.skip(f"the {kind} reward's package is not installed in this environment")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [_random_image(seed, size=(40 + 8 * seed, 36 + 4 * seed)) for seed in range(5)]


@pytest.fixture(scope="module")
def references() -> list[Image.Image]:
    return [_random_image(100), _random_image(101, size=(64, 32))]


PROMPTS = ["a photo of a dog", "a red backpack on the beach", "a cat", "a toy in the snow", "a shiny vase"]


def _score(reward, images, references, batch_size=16):
    return reward.score(images, references=references, prompts=PROMPTS[: len(images)], batch_size=batch_size)


# --- loading and scoring -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", REWARD_KINDS)
def test_each_kind_scores_one_float32_per_image(rewards, images, references, kind):
    reward = rewards[kind]
    scores = _score(reward, images, references)
    assert reward.name == kind
    assert reward.needs_references == (kind in REFERENCE_KINDS)
    assert reward.needs_prompt == (kind in PROMPT_KINDS)
    assert scores.shape == (len(images),)
    assert scores.dtype == torch.float32
    assert scores.device.type == "cpu"
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("kind", TRANSFORMERS_KINDS)  # dreamsim's own preprocessing is torchvision's
def test_image_processor_does_not_need_torchvision(rewards, kind):
    backends = [cls.__name__ for cls in type(rewards[kind].image_processor).__mro__]
    assert "TorchvisionBackend" not in backends


@pytest.mark.parametrize("kind", REFERENCE_KINDS)
def test_image_identical_to_single_reference_scores_one(rewards, images, kind):
    scores = rewards[kind].score(images[:2], references=[images[0]])
    assert scores[0].item() == pytest.approx(1.0, abs=1e-4)
    assert scores[1].item() < 1.0 - 1e-4


@pytest.mark.parametrize("kind", REFERENCE_KINDS)
def test_subject_fidelity_matches_dreambench_definition(rewards, folders, images, references, kind):
    reward = rewards[kind]
    if kind == "dreamsim":  # DreamSim's own definition: 1 - its distance, from its own loader and forward
        dreamsim = pytest.importorskip("dreamsim")
        model, preprocess = dreamsim.dreamsim(pretrained=True, device="cpu", cache_dir=str(folders[kind]),
                                              dreamsim_type="clip_vitb32")
        with torch.no_grad():
            expected = torch.stack([torch.stack([1 - model(preprocess(image), preprocess(reference))[0]
                                                 for reference in references]).mean() for image in images])
        torch.testing.assert_close(reward.score(images, references=references), expected, atol=1e-5, rtol=1e-5)
        return
    with torch.no_grad():
        if kind == "clip_i":
            model = transformers.CLIPModel.from_pretrained(folders[kind]).eval()

            def embed(batch):
                pixel_values = reward.image_processor(images=batch, return_tensors="pt")["pixel_values"]
                return feature_tensor(model.get_image_features(pixel_values=pixel_values))

        else:
            model = getattr(transformers, HF_MODEL_CLASS[kind]).from_pretrained(folders[kind]).eval()

            def embed(batch):
                pixel_values = reward.image_processor(images=batch, return_tensors="pt")["pixel_values"]
                return model(pixel_values=pixel_values).last_hidden_state[:, 0]

        generated, real = embed(images), embed(references)
        expected = torch.stack(
            [torch.stack([F.cosine_similarity(g, r, dim=0) for r in real]).mean() for g in generated]
        )
    torch.testing.assert_close(reward.score(images, references=references), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_text_alignment_matches_reference_definition(rewards, folders, images, kind):
    reward = rewards[kind]
    model = transformers.CLIPModel.from_pretrained(folders[kind]).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folders[kind])
    with torch.no_grad():
        pixel_values = reward.image_processor(images=images, return_tensors="pt")["pixel_values"]
        image_embeddings = F.normalize(feature_tensor(model.get_image_features(pixel_values=pixel_values)), dim=-1)
        expected = []
        for prompt, image_embedding in zip(PROMPTS, image_embeddings):
            tokens = tokenizer([prompt], return_tensors="pt")
            text_embedding = F.normalize(feature_tensor(model.get_text_features(**tokens)), dim=-1)[0]
            cosine = text_embedding @ image_embedding
            expected.append(model.logit_scale.exp() * cosine if kind == "pickscore" else cosine)
    torch.testing.assert_close(reward.score(images, prompts=PROMPTS), torch.stack(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", REWARD_KINDS)
def test_scores_do_not_depend_on_batch_size(rewards, images, references, kind):
    full = _score(rewards[kind], images, references, batch_size=16)
    for batch_size in (1, 3):
        torch.testing.assert_close(_score(rewards[kind], images, references, batch_size), full, atol=1e-5, rtol=0)


def test_references_are_encoded_once(rewards, images, references, monkeypatch):
    reward = rewards["dino"]
    encoded = []
    original = reward.image_features

    def counting(model, pixel_values):
        encoded.append(pixel_values.shape[0])
        return original(model, pixel_values)

    monkeypatch.setattr(reward, "image_features", counting)
    reward.score(images, references=references, batch_size=2)
    assert sum(encoded) == len(images) + len(references)
    assert max(encoded) <= 2


@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_one_prompt_for_all_images_equals_that_prompt_per_image(rewards, images, kind):
    reward = rewards[kind]
    shared = reward.score(images, prompts="a photo of a dog")
    per_image = reward.score(images, prompts=["a photo of a dog"] * len(images))
    torch.testing.assert_close(shared, per_image, atol=1e-6, rtol=0)
    mixed = reward.score(images, prompts=PROMPTS)
    alone = torch.cat([reward.score([image], prompts=prompt) for image, prompt in zip(images, PROMPTS)])
    torch.testing.assert_close(mixed, alone, atol=1e-5, rtol=0)
    assert not torch.allclose(mixed, shared)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK"])
def test_non_rgb_images_are_converted(rewards, images, mode):
    reward = rewards["clip_i"]
    converted = [image.convert(mode) for image in images[:2]]
    expected = reward.score([image.convert("RGB") for image in converted], references=[images[0]])
    torch.testing.assert_close(reward.score(converted, references=[images[0]]), expected, atol=1e-6, rtol=0)


def test_sixteen_bit_images_are_rescaled_not_clipped(rewards, images):
    reward = rewards["dinov2"]
    grey = np.random.default_rng(7).integers(0, 256, size=(40, 40), dtype=np.uint8)
    eight_bit = Image.fromarray(grey)
    sixteen_bit = Image.fromarray(grey.astype(np.uint16) * 257)
    assert sixteen_bit.mode == "I;16"
    torch.testing.assert_close(
        reward.score([sixteen_bit], references=[images[0]]),
        reward.score([eight_bit], references=[images[0]]),
        atol=1e-6,
        rtol=0,
    )


def test_import_does_not_load_image_utils_or_torchvision():
    check = "import sys, mmr1.rewards; assert not {'torchvision', 'transformers.image_utils'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", check], check=True, cwd=Path(__file__).resolve().parents[2])


def test_tiny_checkpoint_is_deterministic_in_seed(tmp_path):
    first = make_tiny_reward_checkpoint(tmp_path / "a", "dino", seed=3)
    second = make_tiny_reward_checkpoint(tmp_path / "b", "dino", seed=3)
    other = make_tiny_reward_checkpoint(tmp_path / "c", "dino", seed=4)
    weights = [(folder / "model.safetensors").read_bytes() for folder in (first, second, other)]
    assert weights[0] == weights[1] != weights[2]


# --- weighted combination ----------------------------------------------------------------------------------------


def test_weighted_reward_total_is_weighted_sum_of_components(rewards, images, references):
    combined = WeightedReward([(rewards["dino"], 0.7), (rewards["clip_t"], 2.0), (rewards["pickscore"], -0.1)])
    assert combined.needs_references and combined.needs_prompt
    breakdown = combined.score(images, references=references, prompts="a photo of a dog", batch_size=2)
    assert isinstance(breakdown, RewardBreakdown)
    assert set(breakdown.components) == {"dino", "clip_t", "pickscore"}
    torch.testing.assert_close(
        breakdown.components["dino"], rewards["dino"].score(images, references=references), atol=1e-5, rtol=0
    )
    expected = (
        0.7 * breakdown.components["dino"]
        + 2.0 * breakdown.components["clip_t"]
        - 0.1 * breakdown.components["pickscore"]
    )
    torch.testing.assert_close(breakdown.total, expected)
    assert breakdown.total.shape == (len(images),) and breakdown.total.dtype == torch.float32


@pytest.mark.parametrize(
    "components, message",
    [
        ([], "at least one"),
        ([("dino", 1.0), ("dino", 2.0)], "repeated: dino"),
        ([("dino", float("nan"))], "finite number"),
        ([("dino", "1")], "finite number"),
    ],
)
def test_weighted_reward_rejects_bad_components(rewards, components, message):
    with pytest.raises(InputError, match=message):
        WeightedReward([(rewards[kind], weight) for kind, weight in components])


# --- specs -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("clip_t=/models/clip@0.5", ("clip_t", Path("/models/clip"), 0.5)),
        ("dino=/models/dino", ("dino", Path("/models/dino"), 1.0)),
        (" pickscore = /models/pick score @ -2 ", ("pickscore", Path("/models/pick score"), -2.0)),
        ("dinov2=/models/user@host/dinov2@1e-1", ("dinov2", Path("/models/user@host/dinov2"), 0.1)),
    ],
)
def test_parse_reward_spec(spec, expected):
    assert parse_reward_spec(spec) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("clip_t", "kind=folder"),
        ("clipt=/models/clip", "unknown kind 'clipt'.*dino, dinov2, clip_i, clip_t, pickscore"),
        ("clip_t=", "no folder"),
        ("clip_t=@0.5", "no folder"),
        ("clip_t=/models/clip@", "finite number"),
        ("clip_t=/models/clip@half", "finite number"),
        ("clip_t=/models/clip@inf", "finite number"),
    ],
)
def test_parse_reward_spec_rejects_bad_specs(spec, message):
    with pytest.raises(InputError, match=message):
        parse_reward_spec(spec)


# --- errors ------------------------------------------------------------------------------------------------------


def _broken_copy(source: Path, target: Path, *remove: str) -> Path:
    shutil.copytree(source, target)
    for name in remove:
        (target / name).unlink()
    return target


def test_unknown_kind_lists_reward_kinds(folders):
    with pytest.raises(InputError, match="'clip'.*dino, dinov2, clip_i, clip_t, pickscore, dreamsim"):
        load_reward_model("clip", folders["clip_i"])
    with pytest.raises(InputError, match="dino, dinov2"):
        make_tiny_reward_checkpoint(folders["clip_i"], "clip")


def test_missing_folder(tmp_path):
    folder = tmp_path / "nowhere"
    with pytest.raises(ModelFolderError, match=f"{re.escape(str(folder))}.*does not exist"):
        load_reward_model("dino", folder)


def test_missing_config(folders, tmp_path):
    folder = _broken_copy(folders["dino"], tmp_path / "dino", "config.json")
    with pytest.raises(ModelFolderError, match=f"{re.escape(str(folder))} has no config.json"):
        load_reward_model("dino", folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match=f"{re.escape(str(folder / 'config.json'))} is not readable JSON"):
        load_reward_model("dino", folder)
    for content, kind in (("[1, 2]", "list"), ("3", "number")):  # read as the Janus loader reads its configs
        (folder / "config.json").write_text(content)
        with pytest.raises(ModelFolderError, match=f"config.json holds a JSON {kind}, not an object"):
            load_reward_model("dino", folder)


@pytest.mark.parametrize(
    "kind, folder_kind, found, expected",
    [("dino", "dinov2", "dinov2", "vit"), ("clip_t", "dino", "vit", "clip"), ("dinov2", "clip_i", "clip", "dinov2")],
)
def test_other_architecture_names_found_and_expected_model_type(folders, kind, folder_kind, found, expected):
    folder = folders[folder_kind]
    message = f"{re.escape(str(folder))}.*type '{found}'.*{kind} reward expects.*'{expected}'"
    with pytest.raises(ModelFolderError, match=message):
        load_reward_model(kind, folder)


@pytest.mark.parametrize(
    "kind, remove, listed",
    [
        ("dino", ["preprocessor_config.json"], "preprocessor_config.json"),
        ("clip_t", ["tokenizer.json"], "tokenizer"),
        ("pickscore", ["tokenizer.json", "preprocessor_config.json"], "preprocessor_config.json, tokenizer"),
        ("dinov2", ["model.safetensors"], "model weights"),
    ],
)
def test_missing_files_are_listed(folders, tmp_path, kind, remove, listed):
    folder = _broken_copy(folders[kind], tmp_path / kind, *remove)
    message = f"{re.escape(str(folder))} is incomplete for {kind}; missing: {listed}"
    with pytest.raises(ModelFolderError, match=message):
        load_reward_model(kind, folder)


def test_pickscore_missing_processor_points_to_laion_processor(folders, tmp_path):
    folder = _broken_copy(folders["pickscore"], tmp_path / "pickscore", "preprocessor_config.json")
    with pytest.raises(ModelFolderError, match="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        load_reward_model("pickscore", folder)


def test_folder_that_is_a_file(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(ModelFolderError, match=f"{re.escape(str(file))} is a file"):
        load_reward_model("dinov2", file)


def test_corrupt_weights_or_preprocessor(folders, tmp_path):
    folder = _broken_copy(folders["dino"], tmp_path / "weights")
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelFolderError, match=f"Cannot load the dino reward model from {re.escape(str(folder))}"):
        load_reward_model("dino", folder)
    folder = _broken_copy(folders["clip_i"], tmp_path / "preprocessor")
    (folder / "preprocessor_config.json").write_text('{"size": "large"}')
    with pytest.raises(ModelFolderError, match=f"Cannot load the clip_i reward model from {re.escape(str(folder))}"):
        load_reward_model("clip_i", folder)


@pytest.mark.parametrize("kind", ["dino", "dinov2", "clip_t"])
def test_weights_missing_a_tensor_are_refused_not_random(folders, tmp_path, kind):
    """transformers would fill the tensor with random values, and the scores would be noise. The error names the
    one tensor missing (by the model's name for it, which transformers 5 renames from the file's)."""
    from safetensors.torch import load_file, save_file

    folder = _broken_copy(folders[kind], tmp_path / kind)
    weights = load_file(folder / "model.safetensors")
    removed = sorted(weights)[len(weights) // 2]
    del weights[removed]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    leaf = removed.rsplit(".", 1)[1]
    message = f"{re.escape(str(folder))} do not match its config.json \\(missing keys: [^,;]+\\.{leaf}\\)\\.$"
    with pytest.raises(ModelFolderError, match=message):
        load_reward_model(kind, folder)


def test_clip_i_loads_without_tokenizer(folders, tmp_path, images):
    folder = _broken_copy(folders["clip_i"], tmp_path / "clip_i", "tokenizer.json", "tokenizer_config.json")
    assert load_reward_model("clip_i", folder).score(images[:1], references=images[:1]).shape == (1,)


def test_empty_images_list(rewards, references):
    with pytest.raises(InputError, match="dino reward got no images"):
        rewards["dino"].score([], references=references)


@pytest.mark.parametrize("kind", REFERENCE_KINDS)
@pytest.mark.parametrize("missing", [None, []])
def test_reward_needing_references_without_references(rewards, images, kind, missing):
    with pytest.raises(InputError, match=f"{kind} reward compares with reference images"):
        rewards[kind].score(images, references=missing)


@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_reward_needing_prompt_without_prompt(rewards, images, kind):
    with pytest.raises(InputError, match=f"{kind} reward compares with the prompt"):
        rewards[kind].score(images)
    with pytest.raises(InputError, match=f"one per image \\({len(images)}\\), got 2"):
        rewards[kind].score(images, prompts=PROMPTS[:2])


def test_bad_image_and_batch_size(rewards, images, references):
    with pytest.raises(InputError, match=r"images\[1\] is a ndarray"):
        rewards["dino"].score([images[0], np.zeros((8, 8, 3))], references=references)
    with pytest.raises(InputError, match="batch_size"):
        rewards["dino"].score(images, references=references, batch_size=0)


# --- issue 16: pickles, devices, processor sizes and non-finite weights --------------------------------------


def test_pickle_holding_more_than_tensors_is_refused_with_a_way_out(folders, tmp_path):
    """transformers' UnpicklingError escaped as is, relaying torch's advice to retry with weights_only=False."""
    folder = _broken_copy(folders["dino"], tmp_path / "dino", "model.safetensors")
    torch.save({"weights": object.__new__(Exploit)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelFolderError) as error:
        load_reward_model("dino", folder)
    message = str(error.value)
    assert str(folder / "pytorch_model.bin") in message and "Convert the weights to safetensors" in message
    assert "weights_only" not in message and "\n" not in message and not Exploit.ran


def test_plain_pickle_still_loads(folders, tmp_path, images):
    from safetensors.torch import load_file

    folder = _broken_copy(folders["dino"], tmp_path / "dino")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert load_reward_model("dino", folder).score(images[:1], references=images[:1]).shape == (1,)


@pytest.mark.parametrize(
    "device, message",
    [("meta", "Device meta holds shapes but no weights"), ("cuda", "this torch sees no CUDA GPU"),
     ("bogus", "Unknown device 'bogus'")],
)
def test_unusable_device_is_refused_before_loading(folders, monkeypatch, device, message):
    """The Janus loader's device check: `score --device cuda` without CUDA was torch's RuntimeError after loading."""
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr(transformers.ViTModel, "from_pretrained", _refuse_connection)
    with pytest.raises(InputError, match=message):
        load_reward_model("dino", folders["dino"], device=device)


def _resize_processor(folder: Path, **sizes) -> None:
    import json

    config = json.loads((folder / "preprocessor_config.json").read_text())
    config.update(sizes)
    (folder / "preprocessor_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "kind, sizes",
    [("dino", {"size": {"height": 64, "width": 64}}), ("clip_i", {"crop_size": {"height": 64, "width": 64}})],
)
def test_preprocessor_for_another_image_size_is_refused(folders, tmp_path, kind, sizes):
    """It failed at the first score as transformers' ValueError 'Input image size (64*64) doesn't match model'."""
    folder = _broken_copy(folders[kind], tmp_path / kind)
    _resize_processor(folder, **sizes)
    message = f"{re.escape(str(folder / 'preprocessor_config.json'))} gives the model 64x64 images, but .* takes 32x32"
    with pytest.raises(ModelFolderError, match=message):
        load_reward_model(kind, folder)


def test_dinov2_preprocessor_may_crop_another_size(folders, tmp_path, images):
    """DINOv2 interpolates its position embeddings (real checkpoints: image_size 518, 224-pixel crops)."""
    folder = _broken_copy(folders["dinov2"], tmp_path / "dinov2")
    _resize_processor(folder, crop_size={"height": 64, "width": 64}, size={"shortest_edge": 64})
    assert load_reward_model("dinov2", folder).score(images[:1], references=images[:1]).shape == (1,)


@pytest.mark.parametrize("kind, value", [("dino", float("nan")), ("clip_t", float("inf"))])
def test_non_finite_weights_are_refused_naming_the_tensor(folders, tmp_path, kind, value):
    """They loaded and scored NaN (or inf), which GRPO's advantages then spread over the whole group."""
    from safetensors.torch import load_file, save_file

    folder = _broken_copy(folders[kind], tmp_path / kind)
    weights = load_file(folder / "model.safetensors")
    name = sorted(weights)[len(weights) // 3]
    weights[name].view(-1)[0] = value
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    leaf = name.rsplit(".", 1)[1]  # the model's name for it: transformers 5 renames the file's
    with pytest.raises(ModelFolderError, match=f"{re.escape(str(folder))} hold NaN or infinite values, in [^,]+\\.{leaf}\\.$"):
        load_reward_model(kind, folder)


# --- DreamSim (mmr1/rewards/dreamsim.py) -------------------------------------------------------------------------


def _dreamsim_layout(folder: Path, kind: str = "clip_vitb32") -> Path:
    """Empty files in the layout of one DreamSim type (enough for the folder checks)."""
    from mmr1.rewards.dreamsim import DREAMSIM_TYPES

    for name in DREAMSIM_TYPES[kind]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).touch()
    return folder


def test_dreamsim_folder_names_what_is_missing(tmp_path):
    with pytest.raises(ModelFolderError, match="none of DreamSim's models.*clip_vitb32: clip_vitb32_single_lora"):
        load_reward_model("dreamsim", tmp_path)
    (_dreamsim_layout(tmp_path) / "clip_vitb32_pretrain.pth.tar").unlink()
    with pytest.raises(ModelFolderError, match=r"\(clip_vitb32\) is incomplete; missing: clip_vitb32_pretrain.pth.tar"):
        load_reward_model("dreamsim", tmp_path)
    _dreamsim_layout(tmp_path / "ensemble", "ensemble")
    (tmp_path / "ensemble" / "checkpoints" / "dino_vitbase16_pretrain.pth").unlink()
    with pytest.raises(ModelFolderError, match="ensemble.*missing: checkpoints/dino_vitbase16_pretrain.pth"):
        load_reward_model("dreamsim", tmp_path / "ensemble")


def test_dreamsim_without_its_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "dreamsim", None)
    with pytest.raises(InputError, match=r'pip install "mmr1-personalization\[dreamsim\]"'):
        load_reward_model("dreamsim", _dreamsim_layout(tmp_path))


def test_dreamsim_download_attempts_are_refused_and_hub_dir_restored(tmp_path):
    from mmr1.rewards.dreamsim import _no_downloads

    before = torch.hub.get_dir()
    with pytest.raises(ModelFolderError, match="tried to download https://example.org/x.zip"):
        with _no_downloads():
            torch.hub.set_dir(str(tmp_path))
            torch.hub.download_url_to_file("https://example.org/x.zip", str(tmp_path / "x.zip"))
    assert torch.hub.get_dir() == before


def test_dreamsim_in_bf16_follows_fp32(rewards, folders, images, references):
    full = rewards["dreamsim"].score(images, references=references)  # skips without the dreamsim package
    bf16 = load_reward_model("dreamsim", folders["dreamsim"], dtype=torch.bfloat16)
    torch.testing.assert_close(bf16.score(images, references=references), full, atol=0.03, rtol=0)


def test_dreamsim_is_a_reward_spec_kind(folders):
    assert parse_reward_spec(f"dreamsim={folders['clip_i']}@0.5") == ("dreamsim", folders["clip_i"], 0.5)
