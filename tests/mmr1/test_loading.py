"""Loading checkpoint folders: both layouts, LoRA adapters, dtypes, offline, and every user-facing error."""

from __future__ import annotations

import json
import re
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
    with pytest.raises(ModelFolderError, match="holds objects other than tensors"):
        load_model(folder, device="cpu")
    assert not Exploit.ran


class Exploit:
    ran = False

    def __reduce__(self):
        return (Exploit.mark, ())

    @staticmethod
    def mark():
        Exploit.ran = True


# --- issue 16: what a folder may hold, refused before (or right after) the weights load -----------------------


def assert_pickle_refused(error, file):
    """One line naming the file and the way out, without torch's advice to unpickle with weights_only=False."""
    message = str(error.value)
    assert str(file) in message and "Convert the weights to safetensors" in message
    assert "weights_only" not in message and "\n" not in message and "\x1b" not in message


@pytest.mark.parametrize("layout", ["hf", "deepseek"])
def test_pickle_holding_more_than_tensors_is_refused_with_a_way_out(tiny_hf_dir, tiny_deepseek_dir, tmp_path, layout):
    """hf layout: transformers' UnpicklingError escaped as is; DeepSeek layout: its first line was relayed."""
    folder = copy_folder(tiny_hf_dir if layout == "hf" else tiny_deepseek_dir, tmp_path)
    (folder / "model.safetensors").unlink(missing_ok=True)
    torch.save({"weights": object.__new__(Exploit)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelFolderError) as error:
        load_model(folder, device="cpu")
    assert_pickle_refused(error, folder / "pytorch_model.bin")
    assert not Exploit.ran


def test_hf_layout_from_a_plain_pickle_still_loads(tiny_model, tiny_hf_dir, tmp_path):
    """A .bin of tensors only is what torch's weights-only loader reads: kept, as the DeepSeek layout needs it."""
    folder = copy_folder(tiny_hf_dir, tmp_path)
    torch.save(read_state_dict(folder), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    loaded = load_model(folder, dtype="fp32", device="cpu")
    assert torch.equal(full_forward(loaded)[0], full_forward(tiny_model)[0])


@pytest.mark.parametrize("content, kind", [([1, 2], "list"), (3, "number"), ("janus", "string")])
def test_config_that_is_not_an_object(tiny_hf_dir, tmp_path, content, kind):
    """A list or a number failed as AttributeError ('list' object has no attribute 'get')."""
    folder = copy_folder(tiny_hf_dir, tmp_path)
    (folder / "config.json").write_text(json.dumps(content))
    with pytest.raises(ModelFolderError, match=f"{re.escape(str(folder / 'config.json'))} holds a JSON {kind}, not"):
        load_model(folder, device="cpu")


def refuse_weights(monkeypatch):
    """Make any weight load fail the test: the checks below must run before."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the folder was checked")

    monkeypatch.setattr(transformers.JanusForConditionalGeneration, "from_pretrained", refuse)
    monkeypatch.setattr("mmr1.loading.read_state_dict", refuse)


def edit_json(path, edit):
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


@pytest.mark.parametrize(
    "layout, file, edit, message",
    [
        ("hf", None, lambda c: c.get("image_processor", c).update(size={"height": 64, "width": 64}),
         "resizes images to 64x64, but config.json's vision model takes 32x32"),
        ("hf", "processor_config.json", lambda c: c.update(num_image_tokens=16),
         "num_image_tokens 16, but config.json's vision model gives 64"),
        ("deepseek", "preprocessor_config.json", lambda c: c.update(image_size=64),
         "resizes images to 64x64, but config.json's vision model takes 32x32"),
    ],
    ids=["hf-size", "hf-tokens", "deepseek-size"],
)
def test_processor_for_another_image_size_is_refused_before_the_weights(
    tiny_hf_dir, tiny_deepseek_dir, tmp_path, monkeypatch, layout, file, edit, message
):
    """The size mismatch failed deep in SigLIP at the first reference image (a shape RuntimeError)."""
    folder = copy_folder(tiny_hf_dir if layout == "hf" else tiny_deepseek_dir, tmp_path)
    if file is None:  # the image processor's settings: a file of their own in transformers 4.x, nested in 5
        file = "preprocessor_config.json" if (folder / "preprocessor_config.json").is_file() else "processor_config.json"
    edit_json(folder / file, edit)
    refuse_weights(monkeypatch)
    with pytest.raises(ModelFolderError, match=f"{re.escape(str(folder / file))} .*{re.escape(message)}"):
        load_model(folder, device="cpu")


def test_meta_device_is_refused(tiny_hf_dir, monkeypatch):
    """It loaded a model of empty tensors that failed at the first generation."""
    refuse_weights(monkeypatch)
    with pytest.raises(InputError, match="Device meta holds shapes but no weights"):
        load_model(tiny_hf_dir, device="meta")


def poison(folder, value, name=None):
    """Write `value` into one tensor of the folder's safetensors (the middle one unless named); returns its name."""
    state_dict = read_state_dict(folder)
    name = name or sorted(state_dict)[len(state_dict) // 2]
    state_dict[name].view(-1)[0] = value
    save_file(state_dict, folder / "model.safetensors")
    return name


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tiny_hf_dir, tmp_path, value):
    """They loaded silently and sampled noise."""
    folder = copy_folder(tiny_hf_dir, tmp_path)
    name = poison(folder, value)
    with pytest.raises(ModelFolderError, match=f"{re.escape(str(folder))} hold NaN or infinite values, in {name}\\.$"):
        load_model(folder, dtype="fp32", device="cpu")


def test_non_finite_weights_in_the_deepseek_layout(tiny_deepseek_dir, tmp_path):
    folder = copy_folder(tiny_deepseek_dir, tmp_path)
    state_dict = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state_dict["gen_head.output_mlp_projector.weight"][0, 0] = float("nan")
    torch.save(state_dict, folder / "pytorch_model.bin")
    with pytest.raises(ModelFolderError, match="hold NaN or infinite values, in model.generation_head.proj_out.weight"):
        load_model(folder, dtype="fp32", device="cpu")


def test_weights_beyond_fp16s_range_are_refused_in_fp16(tiny_hf_dir, tmp_path):
    """Finite in the file, inf once cast: refused with the dtype to use instead; fp32 still loads them."""
    folder = copy_folder(tiny_hf_dir, tmp_path)
    name = poison(folder, 1e6, "lm_head.weight")
    with pytest.raises(ModelFolderError, match=f"in {name} \\(fp16 turns values beyond 65504 into inf"):
        load_model(folder, dtype="fp16", device="cpu")
    assert load_model(folder, dtype="fp32", device="cpu").model.lm_head.weight.max() == 1e6


def test_finiteness_check_covers_every_floating_dtype():
    """aminmax, not isfinite().all() (see nonfinite_tensors): the same answers in each dtype; ints are skipped."""
    from mmr1.loading import nonfinite_tensors

    tensors, expected = {}, []
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for value in (float("nan"), float("inf"), -float("inf"), None):
            name = f"{dtype}:{value}"
            tensors[name] = torch.zeros(1000, dtype=dtype)
            if value is not None:
                tensors[name][417] = value
                expected.append(name)
    tensors["ints"], tensors["empty"] = torch.arange(5), torch.empty(0)
    assert nonfinite_tensors(tensors.items()) == expected


# --- LoRA adapter folders ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_dir(tiny_hf_dir, tmp_path_factory):
    peft = pytest.importorskip("peft")
    base = load_model(tiny_hf_dir, dtype="fp32", device="cpu").model
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    adapter_dir = tmp_path_factory.mktemp("lora") / "adapter"
    peft.get_peft_model(base, config).save_pretrained(adapter_dir)
    edit_json(adapter_dir / "adapter_config.json", lambda c: c.update(base_model_name_or_path=str(tiny_hf_dir)))
    return adapter_dir


def refuse_base(monkeypatch):
    """The adapter's own files are checked before its base, the slow part, loads."""
    def refuse(*args, **kwargs):
        raise AssertionError("the base was loaded before the adapter's files were checked")

    monkeypatch.setattr("mmr1.loading.detect_layout", refuse)


def test_lora_pickle_holding_more_than_tensors(lora_dir, tmp_path, monkeypatch):
    folder = copy_folder(lora_dir, tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    torch.save({"weights": object.__new__(Exploit)}, folder / "adapter_model.bin")
    refuse_base(monkeypatch)
    with pytest.raises(ModelFolderError) as error:
        load_model(folder, device="cpu")
    assert_pickle_refused(error, folder / "adapter_model.bin")
    assert "adapter_model.safetensors" in str(error.value) and not Exploit.ran


def test_truncated_lora_weights(lora_dir, tmp_path, monkeypatch):
    """safetensors' SafetensorError escaped as is, after the base had loaded."""
    folder = copy_folder(lora_dir, tmp_path)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    refuse_base(monkeypatch)
    with pytest.raises(ModelFolderError, match=f"{re.escape(str(weights))} is corrupt or truncated"):
        load_model(folder, device="cpu")


def test_missing_lora_weights(lora_dir, tmp_path, monkeypatch):
    """peft took the folder for a Hub repo id: 'Repo id must be a string, not PosixPath'."""
    folder = copy_folder(lora_dir, tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    refuse_base(monkeypatch)
    with pytest.raises(ModelFolderError, match=f"{re.escape(str(folder))} has no weights: expected "
                                               "adapter_model.safetensors"):
        load_model(folder, device="cpu")


def test_non_finite_lora_weights_are_refused_naming_the_tensor(lora_dir, tmp_path):
    from safetensors.torch import load_file

    folder = copy_folder(lora_dir, tmp_path)
    weights = load_file(folder / "adapter_model.safetensors")
    name = sorted(weights)[1]
    weights[name][0, 0] = float("nan")
    save_file(weights, folder / "adapter_model.safetensors")
    with pytest.raises(ModelFolderError, match=f"LoRA weights in {re.escape(str(folder))} hold NaN or infinite "
                                               f"values, in {re.escape(name)}\\.$"):
        load_model(folder, dtype="fp32", device="cpu")


def test_lora_adapter_config_that_is_not_an_object(lora_dir, tmp_path):
    folder = copy_folder(lora_dir, tmp_path)
    (folder / "adapter_config.json").write_text("[]")
    with pytest.raises(ModelFolderError, match="adapter_config.json holds a JSON list"):
        load_model(folder, device="cpu")


def test_cli_prints_one_error_line_for_refused_folders(tiny_hf_dir, tmp_path, capsys):
    """What the CLI shows: the loaders' messages as one `error:` line, exit status 2 (no traceback)."""
    from mmr1.cli import main

    folder = copy_folder(tiny_hf_dir, tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save({"weights": object.__new__(Exploit)}, folder / "pytorch_model.bin")
    out = ["--prompt", "a dog", "--out", str(tmp_path / "out")]
    cases = [["generate", "--model", str(folder), "--device", "cpu", *out],
             ["generate", "--model", str(tiny_hf_dir), "--device", "meta", *out]]
    if not torch.cuda.is_available():
        cases.append(["score", "--images", str(tmp_path / "any.png"), "--reward", f"dino={tmp_path}", "--device", "cuda"])
    for argv in cases:
        assert main(argv) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and error.count("\n") == 1 and "weights_only" not in error
