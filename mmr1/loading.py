"""Load a Janus-Pro checkpoint folder onto transformers' Janus classes, from local files only.

Three kinds of folder load through `load_model`:
- transformers layout (`model_type: janus`, deepseek-community/Janus-Pro-*): `from_pretrained`;
- original DeepSeek layout (`model_type: multi_modality`, deepseek-ai/Janus-Pro-*): config and weights are
  converted in memory by `mmr1.deepseek_layout`;
- a LoRA adapter written by training/ (`adapter_config.json` naming its base folder): the base is loaded as
  above, then the adapter is merged with peft.
Nothing here touches the network, trusts remote code or unpickles arbitrary objects: safetensors, or `.bin`
only through `torch.load(weights_only=True)`; a `.bin` holding anything but tensors is refused. Weights holding
NaN or inf are refused too, naming the tensor.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from pickle import UnpicklingError

import torch

from .embedded import resolve as resolve_embedded
from .errors import InputError, ModelFolderError
from .model import MMR1Model
from .quantization import quantization_config
from .tokens import PAD, PROCESSOR_EXTRA_SPECIAL_TOKENS, SpecialTokens, janus_tokenizer_class, mark_control_tokens

DTYPES = ("auto", "bf16", "fp16", "fp32")
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")  # node option order: append only
LAYOUT_HELP = (
    "Expected a folder with config.json (model_type 'janus' as deepseek-community/Janus-Pro-1B, or "
    "'multi_modality' as deepseek-ai/Janus-Pro-1B), the weights (*.safetensors, or pytorch_model*.bin), "
    "tokenizer.json with tokenizer_config.json, and the processor files (preprocessor_config.json or "
    "processor_config.json); or a LoRA adapter folder (adapter_config.json, adapter_model.safetensors)."
)
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
# What torch.load(weights_only=True) says when a pickle holds more than tensors; its advice to retry with
# weights_only=False (which would run whatever code the pickle holds) is never passed on.
_WEIGHTS_ONLY_REFUSAL = "Weights only load failed"
# Floating dtypes aminmax reads (others, such as float8, take the slower isfinite path).
_MINMAX_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on GPUs that support it (fp16 on older ones) and fp32 on the CPU, where half is slow."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    if dtype != "auto":
        return _TORCH_DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The requested device, checked to exist here; None picks CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise InputError(f"Unknown device {device!r}; use cpu, cuda, cuda:1, mps, ...") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"Device {device} was asked for, but this torch sees no CUDA GPU.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"Device {device} was asked for, but there are {torch.cuda.device_count()} CUDA GPUs.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("Device mps was asked for, but MPS is not available.")
    if device.type == "meta":
        raise InputError("Device meta holds shapes but no weights, so nothing could run; use cpu, cuda, cuda:1, mps, ...")
    return device


def load_model(
    folder: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    attn_implementation: str = "sdpa",
    compile_decoding: bool = False,
    quantization: str = "none",
) -> MMR1Model:
    """Load the model, processor and special-token ids of a checkpoint folder in any supported layout
    (or of the embedded model, by its name `mmr1-world`).

    `compile_decoding` runs the samplers' decode steps through torch.compile (CUDA graphs on CUDA): the first
    generation of each batch size and length compiles (tens of seconds), later ones run faster.
    `quantization` (mmr1.quantization: none, int8, nf4) quantizes the language model's linear layers as they load.
    `attn_implementation` flash_attention_2 falls back to sdpa, saying so, where flash-attn or CUDA is missing.
    """
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    attn_implementation = usable_attention(attn_implementation, device)
    quantized = quantization_config(quantization, torch_dtype)
    path = _check_folder(resolve_embedded(folder))
    if (path / "adapter_config.json").is_file():
        if quantized is not None:
            raise InputError(f"{path} is a LoRA adapter, merged into its base as it loads; quantization "
                             f"{quantization} applies to full checkpoints: load it with quantization none, or "
                             "quantize a checkpoint that training exported with the adapter merged.")
        mm = _load_lora(path, torch_dtype, device, attn_implementation)
    elif quantized is not None:  # bitsandbytes places the layers as it quantizes them: no .to() afterwards
        mm = _load_full(path, torch_dtype, attn_implementation, quantization_config=quantized, device_map={"": device})
    else:
        mm = _load_full(path, torch_dtype, attn_implementation, device=device)
    mm.compile_decoding = compile_decoding
    return mm


def usable_attention(attn_implementation: str, device: torch.device) -> str:
    """The attention implementation to load with: flash_attention_2 only where flash-attn and CUDA are there
    (else sdpa, with a warning that says why); an unknown name is an error."""
    if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise InputError(
            f"Unknown attention implementation {attn_implementation!r}; choose one of "
            f"{', '.join(ATTENTION_IMPLEMENTATIONS)}."
        )
    if attn_implementation != "flash_attention_2":
        return attn_implementation
    import importlib.util

    missing = [why for why, absent in (("the flash-attn package is not installed (pip install flash-attn)",
                                        importlib.util.find_spec("flash_attn") is None),
                                       (f"it runs on CUDA GPUs and this model loads on {device.type}",
                                        device.type != "cuda")) if absent]
    if missing:
        warnings.warn(f"flash_attention_2 is not available: {'; '.join(missing)}. Using sdpa (PyTorch's fused "
                      "attention) instead.", stacklevel=3)
        return "sdpa"
    return attn_implementation


def _load_full(path: Path, dtype: torch.dtype, attn_implementation: str, device: torch.device | None = None,
               **placement) -> MMR1Model:
    """A full checkpoint (either layout) moved to `device`, or placed as `placement` (quantization) says."""
    layout = detect_layout(path)
    _require_files(path)
    processor = load_processor(path)
    tokens = SpecialTokens.from_tokenizer(processor.tokenizer, str(path))
    config = _janus_config(path, layout, tokens)
    check_processor_fits(path, processor, config)
    model = _load_janus(path, layout, config, dtype, attn_implementation, **placement)
    model = (model if device is None else model.to(device)).eval()
    check_finite(path, _named_tensors(model), dtype)  # on the device, which reads them fastest
    return MMR1Model(model, processor, tokens, path, layout)


TRAINING_RECORD = "mmr1_training.json"  # what training/ writes beside every checkpoint it exports


def trained_subject_source(folder: str | os.PathLike) -> str | None:
    """The visual intermediate (`subject_source`) training/ taught the checkpoint in `folder`, from its training
    record: a model trained to draw its subject should draw it unless told otherwise. None for other checkpoints."""
    from .xcot import SUBJECT_SOURCES

    path = Path(folder) / TRAINING_RECORD
    if not path.is_file():
        return None
    config = read_json(path).get("config")
    source = config.get("subject_source") if isinstance(config, dict) else None
    return source if source in SUBJECT_SOURCES else None


def _check_folder(folder: str | os.PathLike) -> Path:
    path = Path(folder).expanduser()
    if not path.exists():
        raise ModelFolderError(f"Model folder {path} does not exist. {LAYOUT_HELP}")
    if not path.is_dir():
        raise ModelFolderError(f"{path} is a file, not a model folder. {LAYOUT_HELP}")
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise ModelFolderError(f"{path} has no config.json. {LAYOUT_HELP}")
    return path


def read_json(path: Path) -> dict:
    """A JSON object: every config file mmr1 reads is one, and a list or number would fail later as `.get`."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFolderError(f"{path} is not readable JSON ({error}).") from error
    if not isinstance(content, dict):
        raise ModelFolderError(f"{path} holds a JSON {_json_kind(content)}, not an object of settings.")
    return content


def _json_kind(content: object) -> str:
    if isinstance(content, list):
        return "list"
    if isinstance(content, bool):
        return "boolean"
    if isinstance(content, (int, float)):
        return "number"
    return "string" if isinstance(content, str) else "null"


def detect_layout(folder: Path) -> str:
    """'hf' or 'deepseek' from config.json's model_type; anything else is another architecture."""
    from .deepseek_layout import is_deepseek_config

    config = read_json(folder / "config.json")
    model_type = config.get("model_type")
    if model_type == "janus":
        return "hf"
    if is_deepseek_config(config):
        return "deepseek"
    raise ModelFolderError(
        f"{folder} holds a model of type {model_type!r}, not a Janus checkpoint "
        f"(model_type 'janus' or 'multi_modality'). {LAYOUT_HELP}"
    )


def _require_files(folder: Path) -> None:
    missing = []
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        missing.append(" or ".join(_WEIGHT_FILES))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (folder / name).is_file():
            missing.append(name)
    if not any((folder / name).is_file() for name in _PROCESSOR_FILES):
        missing.append(" or ".join(_PROCESSOR_FILES))
    if missing:
        raise ModelFolderError(f"{folder} is missing: {'; '.join(missing)}. {LAYOUT_HELP}")


def _janus_config(folder: Path, layout: str, tokens: SpecialTokens):
    """The JanusConfig of either layout, read before any weight so that the processor can be checked against it."""
    from transformers import JanusConfig

    from .deepseek_layout import janus_config_from_deepseek

    try:
        if layout == "hf":
            return JanusConfig.from_pretrained(folder, local_files_only=True)
        return janus_config_from_deepseek(
            read_json(folder / "config.json"),
            pad_token_id=tokens.pad,
            bos_token_id=tokens.bos,
            eos_token_id=tokens.eos,
            image_token_id=tokens.image_placeholder,
        )
    except ModelFolderError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, OSError) as error:
        raise ModelFolderError(f"{folder / 'config.json'} is not a Janus config ({_first_line(error)}).") from error


def check_processor_fits(folder: Path, processor, config) -> None:
    """Refuse processor files made for another resolution than the vision model: SigLIP's position embeddings
    cover one image size (another fails deep in the forward as a shape error), and the prompt reserves
    `num_image_tokens` placeholders for each reference image. transformers 4.52's JanusProcessor neither saves
    nor reads num_image_tokens (it is always 576), so only a recorded count is checked and the processor is then
    set to the model's count."""
    vision = config.vision_config
    size = processor.image_processor.size
    source = next((name for name in _PROCESSOR_FILES if (folder / name).is_file()), _PROCESSOR_FILES[0])
    if (size["height"], size["width"]) != (vision.image_size, vision.image_size):
        raise ModelFolderError(
            f"{folder / source} resizes images to {size['height']}x{size['width']}, but config.json's vision model "
            f"takes {vision.image_size}x{vision.image_size}; the processor files belong to another model."
        )
    recorded = _processor_config(folder).get("num_image_tokens", vision.num_image_tokens)
    if recorded != vision.num_image_tokens:
        raise ModelFolderError(
            f"{folder / 'processor_config.json'} has num_image_tokens {recorded}, but config.json's "
            f"vision model gives {vision.num_image_tokens} per image; the processor files belong to another model."
        )
    processor.num_image_tokens = vision.num_image_tokens


def _load_janus(folder: Path, layout: str, config, dtype: torch.dtype, attn_implementation: str, **placement):
    from safetensors import SafetensorError
    from transformers import JanusForConditionalGeneration

    kwargs = {"config": config, "attn_implementation": attn_implementation, _dtype_kwarg(): dtype, **placement}
    try:
        if layout == "hf":
            model, info = JanusForConditionalGeneration.from_pretrained(
                folder, local_files_only=True, output_loading_info=True, **kwargs
            )
        else:
            from .deepseek_layout import convert_deepseek_state_dict

            state_dict = convert_deepseek_state_dict(read_state_dict(folder))
            model, info = JanusForConditionalGeneration.from_pretrained(
                None, state_dict=state_dict, output_loading_info=True, **kwargs
            )
    except ModelFolderError:
        raise
    except (UnpicklingError, SafetensorError, RuntimeError, ValueError, OSError, KeyError, EOFError) as error:
        refused = refused_pickle(error)
        if refused is not None:
            raise pickle_error(sorted(folder.glob("pytorch_model*.bin")), refused, "model.safetensors") from error
        raise ModelFolderError(f"Could not load the weights in {folder}: {_first_line(error)}") from error
    check_load_report(folder, info)
    return model


def refused_pickle(error: BaseException) -> UnpicklingError | None:
    """The UnpicklingError behind `error` (transformers and peft raise torch's as is, or wrap it), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UnpicklingError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def pickle_error(files: Sequence[Path], error: UnpicklingError, safetensors_name: str) -> ModelFolderError:
    """The message for a `.bin` that the weights-only unpickler refused, or that is no pickle at all; torch's own
    text (its advice to retry with weights_only=False, which would run the pickle's code) is never relayed."""
    names = ", ".join(str(file) for file in files) or "the .bin weights"
    if _WEIGHTS_ONLY_REFUSAL not in str(error):
        return ModelFolderError(f"{names} is corrupt or not a weights file (not a readable pickle).")
    return ModelFolderError(
        f"{names} holds objects other than tensors, so it is not loaded: .bin pickles are read only as plain "
        f"tensors, since unpickling anything else can run code. Convert the weights to safetensors "
        f"({safetensors_name}) from a copy you trust."
    )


def check_finite(folder: Path, tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None,
                 what: str = "The weights") -> None:
    """Refuse weights holding NaN or inf (a checkpoint saved after training diverged, or values beyond fp16's
    range): they load without a word and then sample noise."""
    bad = nonfinite_tensors(tensors)
    if bad:
        hint = " (fp16 turns values beyond 65504 into inf: load it in bf16 or fp32)" if dtype == torch.float16 else ""
        raise ModelFolderError(f"{what} in {folder} hold NaN or infinite values, in {_preview(bad)}{hint}.")


def nonfinite_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating tensors holding NaN or inf. aminmax reads each tensor once with no temporary and
    propagates NaN (isfinite(t).all() first writes a bool copy: ~25x slower on a CPU core); the flags stay on the
    device until one host sync at the end."""
    names, flags = [], []
    for name, tensor in tensors:
        if not tensor.is_floating_point() or tensor.numel() == 0 or tensor.device.type == "meta":
            continue
        if tensor.dtype in _MINMAX_DTYPES:
            low, high = torch.aminmax(tensor.detach())
            flags.append(torch.isfinite(low) & torch.isfinite(high))
        else:
            flags.append(torch.isfinite(tensor.detach()).all())
        names.append(name)
    if not flags:
        return []
    finite = torch.stack([flag.to(flags[0].device) for flag in flags]).tolist()
    return [name for name, ok in zip(names, finite) if not ok]


def _named_tensors(model: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """Parameters and buffers, a tied weight once."""
    yield from model.named_parameters()
    yield from model.named_buffers()


def check_load_report(folder: Path, info: dict) -> None:
    """Refuse weights that do not fit the architecture, from the report of `from_pretrained(output_loading_info=True)`:
    transformers fills missing tensors with random values and drops unexpected ones with a log line only, so a folder
    with a tensor missing would load as noise."""
    problems = {name: sorted(info.get(name) or []) for name in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        details = "; ".join(f"{name.replace('_', ' ')}: {_preview(keys)}" for name, keys in problems.items() if keys)
        raise ModelFolderError(f"The weights in {folder} do not match its config.json ({details}).")


def _dtype_kwarg() -> str:
    """transformers 5 calls it `dtype`; 4.x (from 4.52, the first with Janus) `torch_dtype`."""
    import transformers

    return "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's weight files (single or sharded), safetensors first, pickles only as weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (folder / index_name).is_file():
            weight_map = read_json(folder / index_name).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelFolderError(f"{folder / index_name} has no weight_map object naming the shards.")
            files = [folder / name for name in sorted(set(weight_map.values()))]
        elif (folder / single_name).is_file():
            files = [folder / single_name]
        else:
            continue
        state_dict: dict[str, torch.Tensor] = {}
        for file in files:
            if not file.is_file():
                raise ModelFolderError(f"{folder} lists the weight shard {file.name}, which is missing.")
            try:
                if file.suffix == ".safetensors":
                    state_dict.update(load_file(str(file)))
                else:
                    state_dict.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
            except UnpicklingError as error:
                raise pickle_error([file], error, "model.safetensors") from error
            except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as error:
                raise ModelFolderError(f"{file} is corrupt or not a weights file ({_first_line(error)}).") from error
        return state_dict
    raise ModelFolderError(f"{folder} has no weights ({' or '.join(_WEIGHT_FILES)}). {LAYOUT_HELP}")


def load_tokenizer(folder: Path):
    """tokenizer.json as is, with the names JanusProcessor needs; pad is set where the config leaves it null, and
    the control tokens are flagged special (so user text can never produce them)."""
    try:
        tokenizer = janus_tokenizer_class().from_pretrained(
            folder, local_files_only=True, extra_special_tokens=dict(PROCESSOR_EXTRA_SPECIAL_TOKENS)
        )
    except (OSError, ValueError, TypeError) as error:
        raise ModelFolderError(f"Could not load the tokenizer in {folder}: {_first_line(error)}") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD
    mark_control_tokens(tokenizer)
    return tokenizer


def load_processor(folder: Path):
    """JanusProcessor from either layout's processor files, on the image backend that needs no torchvision."""
    import transformers

    tokenizer = load_tokenizer(folder)
    image_config = _image_processor_config(folder)
    image_size = image_config.get("image_size") or image_config.get("size", {}).get("height", 384)
    image_processor_class = getattr(transformers, "JanusImageProcessorPil", None) or transformers.JanusImageProcessor
    image_processor = image_processor_class(
        size={"height": image_size, "width": image_size},
        image_mean=image_config.get("image_mean", [0.5, 0.5, 0.5]),
        image_std=image_config.get("image_std", [0.5, 0.5, 0.5]),
        min_size=image_config.get("min_size", 14),
    )
    num_image_tokens = _processor_config(folder).get("num_image_tokens", 576)
    return transformers.JanusProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=num_image_tokens
    )


def _processor_config(folder: Path) -> dict:
    path = folder / "processor_config.json"
    return read_json(path) if path.is_file() else {}


def _image_processor_config(folder: Path) -> dict:
    """preprocessor_config.json (DeepSeek and transformers 4.x) or the nested block of transformers 5."""
    path = folder / "preprocessor_config.json"
    if path.is_file():
        return read_json(path)
    return _processor_config(folder).get("image_processor", {})


def _load_lora(folder: Path, dtype: torch.dtype, device: torch.device, attn_implementation: str) -> MMR1Model:
    """A LoRA adapter over its base folder (absolute, or relative to the adapter), merged for inference."""
    try:
        from peft import PeftModel, get_peft_model_state_dict
    except ImportError as error:
        raise ModelFolderError(
            f"{folder} is a LoRA adapter; loading it needs the peft package (pip install peft)."
        ) from error
    _check_adapter_weights(folder)  # before the base, which takes far longer to load
    base_name = read_json(folder / "adapter_config.json").get("base_model_name_or_path")
    if not base_name:
        raise ModelFolderError(f"{folder}/adapter_config.json does not name its base model folder.")
    base_path = Path(base_name).expanduser()
    if not base_path.is_absolute():
        base_path = (folder / base_path).resolve()
    if (base_path / "adapter_config.json").is_file():
        raise ModelFolderError(f"The base of the LoRA adapter {folder} is itself an adapter ({base_path}).")
    try:
        base = load_model(base_path, dtype, "cpu", attn_implementation)
    except ModelFolderError as error:
        raise ModelFolderError(f"The LoRA adapter {folder} names the base folder {base_path}: {error}") from error
    from safetensors import SafetensorError

    try:
        adapted = PeftModel.from_pretrained(base.model, folder, is_trainable=False)
    except (UnpicklingError, SafetensorError, RuntimeError, ValueError, OSError, KeyError) as error:
        refused = refused_pickle(error)
        if refused is not None:
            raise pickle_error([folder / "adapter_model.bin"], refused, "adapter_model.safetensors") from error
        raise ModelFolderError(f"Could not apply the LoRA adapter in {folder}: {_first_line(error)}") from error
    check_finite(folder, get_peft_model_state_dict(adapted).items(), dtype, what="The LoRA weights")
    merged = adapted.merge_and_unload()
    return MMR1Model(merged.to(device).eval(), base.processor, base.tokens, folder, "lora")


def _check_adapter_weights(folder: Path) -> None:
    """The adapter's weights file is there and readable: peft otherwise takes the folder for a Hub repo id
    ("Repo id must be a string"), and a cut file would fail only after the base has loaded."""
    from safetensors import SafetensorError, safe_open

    safetensors_file, pickle_file = (folder / name for name in _ADAPTER_WEIGHT_FILES)
    if safetensors_file.is_file():
        try:
            with safe_open(str(safetensors_file), framework="pt"):
                pass  # the header is checked against the file's length: a cut file fails here
        except (SafetensorError, OSError) as error:
            raise ModelFolderError(
                f"{safetensors_file} is corrupt or truncated ({_first_line(error)}); copy the adapter again."
            ) from error
    elif pickle_file.is_file():
        try:
            torch.load(pickle_file, map_location="cpu", weights_only=True)  # small; peft reads it again
        except UnpicklingError as error:
            raise pickle_error([pickle_file], error, safetensors_file.name) from error
        except (RuntimeError, OSError, EOFError, ValueError) as error:
            raise ModelFolderError(f"{pickle_file} is corrupt or not a weights file ({_first_line(error)}).") from error
    else:
        raise ModelFolderError(
            f"The LoRA adapter folder {folder} has no weights: expected {safetensors_file.name} (or "
            f"{pickle_file.name}) next to adapter_config.json."
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _preview(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
