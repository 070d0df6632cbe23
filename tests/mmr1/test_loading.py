"""Loading checkpoint folders: both layouts, LoRA adapters, dtypes, offline, and every user-facing error."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch
from safetensors.torch import save_file

from mmr1.errors import InputError, ModelFolderError
from mmr1.loading import load_model, read_state_dict
from tests.conftest import subject_image


def full_forward(mm):
    """Text logits with an image in the prompt, image-head logits and a VQ decode: every component in play."""
    torch.manual_seed(0)
    ids = torch.tensor([[mm.tokens.bos, *mm.tokenize("a red dog"), mm.tokens.begin_of_image]])
    ids = torch.cat([ids, torch.full((1, mm.understanding_tokens_per_image), mm.tokens.image_placeholder)], dim=1)
    pixels = mm.processor.image_processor([subject_image()], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        output = mm.model(input_ids=ids, pixel_values=pixels, output_hidden_states=True)
        image_logits = mm.image_logits(output.hidden_states[-1][:, -1])
        decoded = mm.decode_image_tokens(torch.arange(mm.num_image_tokens).unsqueeze(0) % 7)
    return output.logits, image_logits, decoded


def copy_folder(source, tmp_path, name="copy"):
    return shutil.copytree(source, tmp_path / name)


def test_hf_layout_loads(tiny_model, tiny_hf_dir):
    assert tiny_model.layout == "hf"
    assert tiny_model.source == tiny_hf_dir
    assert tiny_model.dtype == torch.float32 and tiny_model.device.type == "cpu"
    assert type(tiny_model.model).__name__ == "JanusForConditionalGeneration"
    assert type(tiny_model.processor).__name__ == "JanusProcessor"
    assert not tiny_model.model.training
    # Janus keeps lm_head and the input embeddings apart.
    assert tiny_model.model.lm_head.weight.data_ptr() != tiny_model.model.get_input_embeddings().weight.data_ptr()


def test_deepseek_and_hf_layouts_give_identical_logits(tiny_model, tiny_deepseek_dir):
    deepseek = load_model(tiny_deepseek_dir, dtype="fp32", device="cpu")
    assert deepseek.layout == "deepseek"
    assert deepseek.tokens == tiny_model.tokens
    ours, theirs = deepseek.model.state_dict(), tiny_model.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours)
    # The same weights; the kernels may still round the last bit differently (measured on an AMD EPYC: 1.2e-7
    # on the image logits), as the two layouts' tensors sit at other addresses.
    for ours, theirs in zip(full_forward(deepseek), full_forward(tiny_model)):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_deepseek_layout_from_safetensors_shards(tiny_model, tiny_deepseek_dir, tmp_path):
    folder = copy_folder(tiny_deepseek_dir, tmp_path)
    state_dict = torch.load(folder / "pytorch_model.bin", weights_only=True)
    (folder / "pytorch_model.bin").unlink()
    keys = sorted(state_dict)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_file({key: state_dict[key].contiguous() for key in shard_keys}, folder / name)
    weight_map = {key: name for name, shard_keys in shards.items() for key in shard_keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_model(folder, dtype="fp32", device="cpu")
    assert torch.equal(full_forward(loaded)[0], full_forward(tiny_model)[0])


@pytest.mark.parametrize("dtype, expected", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("auto", torch.float32)])
def test_dtypes(tiny_hf_dir, dtype, expected):
    assert load_model(tiny_hf_dir, dtype=dtype, device="cpu").dtype == expected


def test_eager_attention_matches_sdpa(tiny_model, tiny_hf_dir):
    eager = load_model(tiny_hf_dir, dtype="fp32", device="cpu", attn_implementation="eager")
    torch.testing.assert_close(full_forward(eager)[0], full_forward(tiny_model)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kwargs", [{"dtype": "fp64"}, {"attn_implementation": "flash"}])
def test_unknown_options(tiny_hf_dir, kwargs):
    with pytest.raises(InputError):
        load_model(tiny_hf_dir, device="cpu", **kwargs)


def test_loading_never_touches_the_network(tiny_hf_dir, tiny_deepseek_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access during model loading")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    load_model(tiny_hf_dir, device="cpu")
    load_model(tiny_deepseek_dir, device="cpu")


def test_lora_adapter_over_its_base(tiny_model, tiny_hf_dir, tmp_path):
    peft = pytest.importorskip("peft")
    base = load_model(tiny_hf_dir, dtype="fp32", device="cpu").model
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    adapted = peft.get_peft_model(base, config)
    adapter_dir = tmp_path / "adapter"
    adapted.save_pretrained(adapter_dir)
    settings = json.loads((adapter_dir / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = str(tiny_hf_dir)
    (adapter_dir / "adapter_config.json").write_text(json.dumps(settings))
    expected = adapted.merge_and_unload()

    loaded = load_model(adapter_dir, dtype="fp32", device="cpu")
    assert loaded.layout == "lora"
    reference = tiny_model.__class__(expected, tiny_model.processor, tiny_model.tokens, tiny_hf_dir, "hf")
    torch.testing.assert_close(full_forward(loaded)[0], full_forward(reference)[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full_forward(loaded)[0], full_forward(tiny_model)[0])

    settings["base_model_name_or_path"] = str(tmp_path / "gone")
    (adapter_dir / "adapter_config.json").write_text(json.dumps(settings))
    with pytest.raises(ModelFolderError, match="gone"):
        load_model(adapter_dir, device="cpu")


# --- errors a user can act on --------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(ModelFolderError, match=r"does not exist.*Expected a folder"):
        load_model(tmp_path / "nope", device="cpu")


def test_file_instead_of_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelFolderError, match="is a file"):
        load_model(tmp_path / "model.safetensors", device="cpu")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelFolderError, match="no config.json"):
        load_model(tmp_path, device="cpu")


def test_missing_files_are_listed(tiny_hf_dir, tmp_path):
    folder = copy_folder(tiny_hf_dir, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelFolderError) as error:
        load_model(folder, device="cpu")
    assert "model.safetensors" in str(error.value) and "tokenizer.json" in str(error.value)
    assert str(folder) in str(error.value)


def test_other_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelFolderError, match=r"'llama', not a Janus checkpoint"):
        load_model(tmp_path, device="cpu")


def test_shape_mismatch(tiny_hf_dir, tmp_path):
    folder = copy_folder(tiny_hf_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["intermediate_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match=str(folder)):
        load_model(folder, device="cpu")


def test_missing_weights_in_the_file(tiny_hf_dir, tmp_path):
    folder = copy_folder(tiny_hf_dir, tmp_path)
    state_dict = read_state_dict(folder)
    del state_dict["lm_head.weight"]
    save_file(state_dict, folder / "model.safetensors")
    with pytest.raises(ModelFolderError, match="lm_head.weight"):
        load_model(folder, device="cpu")


@pytest.mark.parametrize("layout", ["hf", "deepseek"])
def test_corrupt_weights(tiny_hf_dir, tiny_deepseek_dir, tmp_path, layout):
    folder = copy_folder(tiny_hf_dir if layout == "hf" else tiny_deepseek_dir, tmp_path)
    weights = folder / ("model.safetensors" if layout == "hf" else "pytorch_model.bin")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    with pytest.raises(ModelFolderError, match=str(folder)):
        load_model(folder, device="cpu")


def test_pickles_load_as_weights_only(tiny_deepseek_dir, tmp_path):
    """A .bin that holds anything but tensors is refused, never executed."""
    folder = copy_folder(tiny_deepseek_dir, tmp_path)
    torch.save({"weights": object.__new__(Exploit)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelFolderError, match="corrupt or not a weights file"):
        load_model(folder, device="cpu")
    assert not Exploit.ran


class Exploit:
    ran = False

    def __reduce__(self):
        return (Exploit.mark, ())

    @staticmethod
    def mark():
        Exploit.ran = True
