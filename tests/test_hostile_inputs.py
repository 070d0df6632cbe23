"""Issue 16's hostile inputs that behaved well, kept as one matrix per front door (loaders and CLI, image modes,
node model names), on tiny checkpoints built offline.

- Planted pickles: a `.bin` (model, shard, LoRA, reward) whose unpickling would create a marker file. Loading is
  refused (the CLI: exit 2, one `error:` line) and the marker never appears. tests/mmr1/test_loading.py and
  test_rewards.py check the messages through an in-process flag; here a file on disk is the witness, through
  the public entry points end to end.
- Remote code: config.json, tokenizer_config.json and the processor files name a planted module in `auto_map`
  (with `trust_remote_code: true`). The module would create a marker when imported. Loading works and never
  imports it.
- No network: every case of the loader matrix runs with socket connect, create_connection and getaddrinfo
  recorded and refused, and with HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE unset. Each case asserts that nothing
  tried to connect. test_loading.py::test_loading_never_touches_the_network covers load_model alone; here it
  also covers the CLI, LoRA adapters and every reward kind.
- Odd image modes read from files (open_image, the one reader of the CLI, trainer and nodes) convert to the
  expected RGB pixels and masks. tests/mmr1/test_images.py checks `to_rgb` on in-memory images, mode by mode;
  here each mode goes through a file on disk first.
- Node model names: nodes/paths.py is imported with a stub `folder_paths` (no ComfyUI). Names that would leave
  the models folder ('../x', absolute paths, '/etc', symlinks out of it, '..' segments) are refused.
  tests/nodes/test_server.py::test_only_listed_model_names_reach_the_filesystem covers three such names through
  a live ComfyUI server (skipped without one); this is the pure function and adds the symlink cases.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mmr1
import mmr1.embedded
import mmr1.errors
import mmr1.rewards.dreamsim
from mmr1.errors import ModelFolderError
from mmr1.images import BACKGROUND_GREY, crop_to_mask, mask_to_array, open_image, to_rgb
from mmr1.loading import load_model
from mmr1.rewards import REWARD_KINDS, load_reward_model, make_tiny_reward_checkpoint
from tests.conftest import subject_image
from tests.mmr1.test_cli import run

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST = ["--max-new-tokens", "8", "--device", "cpu", "--dtype", "fp32"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the planted payloads -------------------------------------------------------------------------------------


class Planted:
    """Unpickling this object runs `exec`, which creates the marker file (the classic pickle exploit)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def plant_pickle(path: Path, marker: Path) -> None:
    torch.save({"weight": torch.zeros(2), "payload": Planted(marker)}, path)
    assert not marker.exists()


REMOTE_MODULE = "planted_remote_code"
AUTO_MAP = {
    name: f"{REMOTE_MODULE}.Planted{name}"
    for name in ("AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText",
                 "AutoProcessor", "AutoImageProcessor", "AutoFeatureExtractor")
}
AUTO_MAP["AutoTokenizer"] = [f"{REMOTE_MODULE}.PlantedTokenizer", f"{REMOTE_MODULE}.PlantedTokenizer"]


def plant_remote_code(folder: Path, marker: Path) -> None:
    """The planted module beside auto_map entries in every JSON settings file of the folder."""
    (folder / f"{REMOTE_MODULE}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        + "".join(f"class {entry.split('.')[1]}:\n    pass\n" for entry in {*list(AUTO_MAP.values())[:-1],
                                                                            AUTO_MAP["AutoTokenizer"][0]})
    )
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if path.is_file():
            settings = json.loads(path.read_text())
            settings.update(auto_map=AUTO_MAP, trust_remote_code=True)
            path.write_text(json.dumps(settings))


# --- tiny checkpoints -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rewards_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile_rewards")
    clip = make_tiny_reward_checkpoint(root / "clip", "clip_i", seed=0)
    return {"dino": make_tiny_reward_checkpoint(root / "dino", "dino", seed=0),
            "dinov2": make_tiny_reward_checkpoint(root / "dinov2", "dinov2", seed=0),
            "clip_i": clip, "clip_t": clip, "pickscore": clip,
            "dreamsim": make_tiny_reward_checkpoint(root / "dreamsim", "dreamsim", seed=0)}


@pytest.fixture(scope="module")
def lora_dir(tiny_hf_dir, tmp_path_factory) -> Path:
    peft = pytest.importorskip("peft")
    base = load_model(tiny_hf_dir, dtype="fp32", device="cpu").model
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    folder = tmp_path_factory.mktemp("hostile_lora") / "adapter"
    peft.get_peft_model(base, config).save_pretrained(folder)
    point_adapter_at(folder, tiny_hf_dir)
    return folder


def point_adapter_at(adapter: Path, base: Path) -> None:
    settings = json.loads((adapter / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(settings))


@pytest.fixture()
def connections(monkeypatch) -> list:
    """Every attempt to reach the network, recorded (a library that swallows the error cannot hide it) and
    refused; the offline switches are off, so that offline mode cannot be what keeps it local."""
    attempts: list = []

    def refuse(name):
        def refused(*args, **kwargs):
            attempts.append((name, args[1:] if name == "connect" else args))
            raise OSError(f"test_hostile_inputs: {name} refused")
        return refused

    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read once, at import
    return attempts


# --- the cases ------------------------------------------------------------------------------------------------


def assert_refused(result, *fragments) -> None:
    """Exit 2 and exactly one `error:` line, naming what was refused, never relaying torch's unsafe advice."""
    code, _, err = result
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "weights_only" not in err
    for fragment in fragments:
        assert str(fragment) in err, (fragment, err)


def assert_generated(result, out: Path) -> None:
    code, _, err = result
    assert code == 0, err
    assert (out / "mmr1_generation.json").is_file() and sorted(out.glob("mmr1_seed*.png"))


class Case:
    def __init__(self, tmp_path, capsys, request):
        self.tmp, self.capsys, self.request = tmp_path, capsys, request
        self.marker = tmp_path / "MARKER_payload_ran"

    def fixture(self, name):
        return self.request.getfixturevalue(name)

    def copy(self, source: Path, name: str) -> Path:
        return Path(shutil.copytree(source, self.tmp / name))

    def generate(self, model: Path, *extra) -> tuple[tuple[int, str, str], Path]:
        out = self.tmp / "out"
        return run(["generate", "--model", model, "--prompt", "a photo of it", "--out", out, *FAST, *extra],
                   self.capsys), out

    def assert_generation_refused(self, model: Path, *fragments) -> None:
        """`generate` on `model` is refused (see assert_refused) before it writes anything."""
        result, out = self.generate(model)
        assert_refused(result, *fragments)
        assert not out.exists()


def pickle_model_hf_load(case: Case) -> None:
    folder = case.copy(case.fixture("tiny_hf_dir"), "hf")
    (folder / "model.safetensors").unlink()
    plant_pickle(folder / "pytorch_model.bin", case.marker)
    with pytest.raises(ModelFolderError, match="holds objects other than tensors"):
        load_model(folder, dtype="fp32", device="cpu")


def pickle_model_hf_cli(case: Case) -> None:
    folder = case.copy(case.fixture("tiny_hf_dir"), "hf")
    (folder / "model.safetensors").unlink()
    plant_pickle(folder / "pytorch_model.bin", case.marker)
    case.assert_generation_refused(folder, folder / "pytorch_model.bin", "Convert the weights to safetensors")


def pickle_model_deepseek_cli(case: Case) -> None:
    folder = case.copy(case.fixture("tiny_deepseek_dir"), "deepseek")
    plant_pickle(folder / "pytorch_model.bin", case.marker)
    case.assert_generation_refused(folder, folder / "pytorch_model.bin", "holds objects other than tensors")


def pickle_model_shard_cli(case: Case) -> None:
    """A sharded .bin checkpoint with the payload in its second shard (the first one is plain tensors)."""
    from mmr1.loading import read_state_dict

    folder = case.copy(case.fixture("tiny_hf_dir"), "sharded")
    state_dict = read_state_dict(folder)
    (folder / "model.safetensors").unlink()
    keys = sorted(state_dict)
    torch.save({key: state_dict[key] for key in keys[::2]}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({**{key: state_dict[key] for key in keys[1::2]}, "payload": Planted(case.marker)},
               folder / "pytorch_model-00002-of-00002.bin")
    weight_map = {key: f"pytorch_model-0000{1 + index % 2}-of-00002.bin" for index, key in enumerate(keys)}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    case.assert_generation_refused(folder, "pytorch_model-00002-of-00002.bin", "holds objects other than tensors")


def pickle_lora_cli(case: Case) -> None:
    folder = case.copy(case.fixture("lora_dir"), "adapter")
    (folder / "adapter_model.safetensors").unlink()
    plant_pickle(folder / "adapter_model.bin", case.marker)
    case.assert_generation_refused(folder, folder / "adapter_model.bin", "adapter_model.safetensors")


def pickle_reward_dino_cli(case: Case) -> None:
    folder = case.copy(case.fixture("rewards_dirs")["dino"], "dino")
    (folder / "model.safetensors").unlink()
    plant_pickle(folder / "pytorch_model.bin", case.marker)
    image = case.tmp / "image.png"
    subject_image().save(image)
    scores = case.tmp / "scores.json"
    result = run(["score", "--images", image, "--ref", image, "--reward", f"dino={folder}", "--out", scores],
                 case.capsys)
    assert_refused(result, folder / "pytorch_model.bin", "Convert the weights to safetensors")
    assert not scores.exists()


def pickle_reward_load(case: Case) -> None:
    """The other reward architectures: CLIP (clip_i, clip_t, pickscore share it) and DINOv2."""
    for kind in ("clip_t", "pickscore", "dinov2"):
        folder = case.copy(case.fixture("rewards_dirs")[kind], kind)
        (folder / "model.safetensors").unlink()
        plant_pickle(folder / "pytorch_model.bin", case.marker)
        with pytest.raises(ModelFolderError, match="holds objects other than tensors"):
            load_reward_model(kind, folder)


def remote_code_model_cli(case: Case) -> None:
    folder = case.copy(case.fixture("tiny_hf_dir"), "hf")
    plant_remote_code(folder, case.marker)
    result, out = case.generate(folder, "--num-images", "1")
    assert_generated(result, out)


def remote_code_deepseek_load(case: Case) -> None:
    folder = case.copy(case.fixture("tiny_deepseek_dir"), "deepseek")
    plant_remote_code(folder, case.marker)
    assert load_model(folder, dtype="fp32", device="cpu").layout == "deepseek"


def remote_code_lora_base_load(case: Case) -> None:
    """An adapter whose base folder carries the planted auto_map (and the adapter folder a copy of the module)."""
    base = case.copy(case.fixture("tiny_hf_dir"), "base")
    plant_remote_code(base, case.marker)
    adapter = case.copy(case.fixture("lora_dir"), "adapter")
    point_adapter_at(adapter, base)
    plant_remote_code(adapter, case.marker)  # adapter_config.json is not in its list: the module only
    shutil.copy(base / f"{REMOTE_MODULE}.py", adapter)
    assert load_model(adapter, dtype="fp32", device="cpu").layout == "lora"


def remote_code_reward_load(case: Case) -> None:
    image = subject_image()
    for kind in ("dino", "dinov2", "clip_t"):
        folder = case.copy(case.fixture("rewards_dirs")[kind], kind)
        plant_remote_code(folder, case.marker)
        reward = load_reward_model(kind, folder)
        scored = reward.score([image], references=[image]) if kind != "clip_t" else reward.score([image], prompts="a")
        assert scored.shape == (1,) and torch.isfinite(scored).all()


def offline_cli_generate(case: Case) -> None:
    ref = case.tmp / "ref.png"
    subject_image().save(ref)
    result, out = case.generate(case.fixture("tiny_hf_dir"), "--ref", ref)
    assert_generated(result, out)


def offline_lora_load(case: Case) -> None:
    assert load_model(case.fixture("lora_dir"), dtype="fp32", device="cpu").layout == "lora"


def offline_every_reward_kind(case: Case) -> None:
    folders = case.fixture("rewards_dirs")
    for kind in REWARD_KINDS:
        assert load_reward_model(kind, folders[kind]) is not None


LOADER_CASES = {case.__name__: case for case in (
    pickle_model_hf_load, pickle_model_hf_cli, pickle_model_deepseek_cli, pickle_model_shard_cli, pickle_lora_cli,
    pickle_reward_dino_cli, pickle_reward_load, remote_code_model_cli, remote_code_deepseek_load,
    remote_code_lora_base_load, remote_code_reward_load, offline_cli_generate, offline_lora_load,
    offline_every_reward_kind,
)}


@pytest.mark.parametrize("case_id", list(LOADER_CASES))
def test_hostile_folder_is_refused_or_loaded_inertly_and_offline(case_id, tmp_path, capsys, request, connections):
    case = Case(tmp_path, capsys, request)
    sys_path = list(sys.path)
    LOADER_CASES[case_id](case)
    assert not case.marker.exists(), f"{case_id}: the planted code ran"
    assert REMOTE_MODULE not in sys.modules and not any(REMOTE_MODULE in name for name in sys.modules)
    assert sys.path == sys_path
    assert connections == [], f"{case_id}: network access {connections}"


# --- odd image modes, read from files -------------------------------------------------------------------------


GREY = BACKGROUND_GREY


def _palette_png(path: Path) -> tuple[Image.Image, np.ndarray]:
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 255, 0, 9, 9, 9] + [0] * (256 * 3 - 9))
    image.putdata([0, 1, 2])
    image.save(path, transparency=2)
    return image, np.array([[(255, 0, 0), (0, 255, 0), GREY]])


def _la_png(path: Path):
    Image.frombytes("LA", (2, 1), bytes([200, 255, 10, 0])).save(path)
    return None, np.array([[(200, 200, 200), GREY]])


def _rgba_png(path: Path):
    Image.frombytes("RGBA", (3, 1), bytes([255, 0, 0, 255, 0, 0, 255, 0, 0, 255, 0, 128])).save(path)
    half = np.round(np.array([0, 255, 0]) * 128 / 255 + np.array(GREY) * (1 - 128 / 255))
    return None, np.array([[(255, 0, 0), GREY, half]])


def _sixteen_bit_png(path: Path):
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(path)
    return None, np.repeat(np.array([[0, 128, 255]])[..., None], 3, axis=2)


def _cmyk_tiff(path: Path):
    Image.frombytes("CMYK", (3, 1), bytes([0, 0, 0, 0, 0, 255, 255, 0, 0, 0, 0, 255])).save(path)
    return None, np.array([[(255, 255, 255), (255, 0, 0), (0, 0, 0)]])


def _bilevel_png(path: Path):
    Image.frombytes("1", (8, 1), bytes([0b10100000])).save(path)
    row = [255, 0, 255, 0, 0, 0, 0, 0]
    return None, np.repeat(np.array([row])[..., None], 3, axis=2)


def _float_tiff(path: Path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0, -1.0]], dtype=np.float32), "F").save(path)
    return None, np.repeat(np.array([[0, 128, 255, 255, 0]])[..., None], 3, axis=2)


IMAGE_CASES = {
    "P_palette_transparency.png": _palette_png, "LA.png": _la_png, "RGBA.png": _rgba_png, "I16.png": _sixteen_bit_png,
    "CMYK.tif": _cmyk_tiff, "bilevel_1.png": _bilevel_png, "F_float.tif": _float_tiff,
}


@pytest.mark.parametrize("file_name", list(IMAGE_CASES))
def test_odd_image_mode_file_converts_to_the_expected_rgb(tmp_path, file_name):
    path = tmp_path / file_name
    _, expected = IMAGE_CASES[file_name](path)
    rgb = to_rgb(open_image(path, "reference image"))
    assert rgb.mode == "RGB"
    np.testing.assert_allclose(np.asarray(rgb, dtype=np.int32), expected.astype(np.int32), atol=1)


def _mask_file(path: Path, mode: str) -> np.ndarray:
    """A 4x4 mask selecting its 2x2 centre: white there, near black (not black) around it. Returns the
    expected [H,W] 0..1 mask."""
    expected = np.full((4, 4), 0.02, dtype=np.float32)
    expected[1:3, 1:3] = 1.0
    if mode == "I;16":
        Image.fromarray(np.round(expected * 65535).astype(np.uint16)).save(path)
    elif mode == "F":
        Image.fromarray(expected, "F").save(path)
    elif mode == "1":
        expected = (expected > 0.5).astype(np.float32)
        Image.fromarray((expected * 255).astype(np.uint8)).convert("1").save(path)
    elif mode == "LA":
        Image.merge("LA", [Image.fromarray(np.round(expected * 255).astype(np.uint8)), Image.new("L", (4, 4), 255)]).save(path)
    else:
        Image.fromarray(np.round(expected * 255).astype(np.uint8)).convert(mode).save(path)
    return expected


@pytest.mark.parametrize("file_name, mode", [
    ("mask_L.png", "L"), ("mask_1.png", "1"), ("mask_LA.png", "LA"), ("mask_RGB.png", "RGB"),
    ("mask_I16.png", "I;16"), ("mask_F.tif", "F"),  # scaled over their full range (convert('L') clipped them)
])
def test_odd_mode_mask_file_selects_its_subject(tmp_path, file_name, mode):
    path = tmp_path / file_name
    expected = _mask_file(path, mode)
    mask = mask_to_array(open_image(path, "mask"))
    np.testing.assert_allclose(mask, expected, atol=1 / 255 + 1e-6)
    cropped = crop_to_mask(Image.new("RGB", (4, 4)), mask, margin=0.0)
    assert cropped.size == (2, 2)


# --- node model names cannot leave their folders --------------------------------------------------------------


@pytest.fixture()
def node_paths(tmp_path, monkeypatch):
    """nodes/paths.py imported without ComfyUI: a stub folder_paths with one root, and the pack's package
    structure made of the already-imported mmr1 (nodes/__init__.py, which needs comfy_api, is skipped)."""
    root = tmp_path / "models" / "mmr1"
    stub = types.ModuleType("folder_paths")
    stub.models_dir = str(tmp_path / "models")
    stub.get_folder_paths = lambda kind: [str(root)] if kind == "mmr1" else []
    stub.add_model_folder_path = lambda name, path: None
    pack, nodes = types.ModuleType("_hostile_pack"), types.ModuleType("_hostile_pack.nodes")
    pack.__path__, nodes.__path__ = [str(REPO_ROOT)], [str(REPO_ROOT / "nodes")]
    for name, module in {"folder_paths": stub, "_hostile_pack": pack, "_hostile_pack.nodes": nodes,
                         "_hostile_pack.mmr1": mmr1, "_hostile_pack.mmr1.embedded": mmr1.embedded,
                         "_hostile_pack.mmr1.errors": mmr1.errors, "_hostile_pack.mmr1.rewards": mmr1.rewards,
                         "_hostile_pack.mmr1.rewards.dreamsim": mmr1.rewards.dreamsim}.items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("_hostile_pack.nodes.paths", REPO_ROOT / "nodes" / "paths.py")
    paths = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, paths)
    spec.loader.exec_module(paths)

    def model(folder: Path) -> Path:
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        return folder

    model(root / "org" / "inside")
    outside = model(tmp_path / "outside")  # a model folder beside the root, not under it
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "config.json").mkdir()  # a folder named config.json: not a file either
    (root / "link_out").symlink_to(tmp_path / "secret", target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    return paths, root, outside


NAME_CASES = {
    "dotdot_sibling": "../../outside",
    "dotdot_one": "../outside",
    "absolute_model": "{outside}",
    "absolute_etc": "/etc",
    "dotdot_alias_of_listed": "org/inside/../inside",
    "dot_alias_of_listed": "./org/inside",
    "trailing_slash": "org/inside/",
    "symlink_out_to_non_model": "link_out",
    "through_symlink_then_dotdot": "link_out/../../outside",
    "through_loop_then_dotdot": "loop/../../outside",
    "home": "~/outside",
    "empty": "",
    "nul_byte": "org/inside\x00",
    "backslashes": "..\\..\\outside",
}


@pytest.mark.parametrize("case_id", list(NAME_CASES))
def test_node_model_names_cannot_leave_their_folder(node_paths, case_id):
    paths, root, outside = node_paths
    listed = paths.list_model_folders(paths.MODELS)  # terminates despite the loop symlink (depth-bounded)
    assert "org/inside" in listed and paths.resolve_model_folder(paths.MODELS, "org/inside") == root / "org" / "inside"
    assert not any(name.startswith(("/", "..")) or "/../" in name or name == "link_out" for name in listed), listed
    name = NAME_CASES[case_id].format(outside=outside)
    with pytest.raises(mmr1.errors.ModelFolderError, match="is not in models/mmr1 any more"):
        paths.resolve_model_folder(paths.MODELS, name)
