"""Weight quantization of the language model at load time (`load_model(quantization=...)`), so that Janus-Pro-7B
fits an 8-12 GB GPU: bitsandbytes through transformers' `BitsAndBytesConfig`, the backend ComfyUI users already
have, which runs on CUDA and (bitsandbytes >= 0.48) on the CPU too.

- `none`: the weights in the loading dtype;
- `int8`: LLM.int8() linear layers (about a quarter of fp32, half of bf16);
- `nf4`: 4-bit NormalFloat with double quantization, computing in the loading dtype (about an eighth of fp32).

Only the language model's linear layers are quantized: the VQ tokenizer (which draws every pixel), the SigLIP
encoder, the aligners and both output heads stay in full precision, where a few MB buy back image quality.
"""

from __future__ import annotations

import torch

from .errors import InputError
from .offline import hub_offline

QUANTIZATIONS = ("none", "int8", "nf4")  # node option order is a contract: append only
# JanusForConditionalGeneration modules kept in the loading dtype, by path from the model's root (transformers'
# quantizers match a path from the start, older ones anywhere in a module's name).
FULL_PRECISION_MODULES = ("model.vqmodel", "model.vision_model", "model.aligner", "model.generation_aligner",
                          "model.generation_embeddings", "model.generation_head", "lm_head")


def check_quantization(choice: str) -> None:
    if choice not in QUANTIZATIONS:
        raise InputError(f"Unknown quantization {choice!r}; choose one of {', '.join(QUANTIZATIONS)}.")


def quantization_config(choice: str, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for `choice` (None for 'none'); a clear error without bitsandbytes."""
    check_quantization(choice)
    if choice == "none":
        return None
    try:
        import_backend()
    except ImportError as error:
        raise InputError(f"quantization {choice} needs the bitsandbytes package: pip install bitsandbytes "
                         "(or load with quantization none).") from error
    from transformers import BitsAndBytesConfig

    skip = list(FULL_PRECISION_MODULES)
    if choice == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip)


def import_backend() -> None:
    """Import bitsandbytes with the Hugging Face Hub offline (mmr1 never downloads at runtime): on CPUs with
    AVX512-BF16 its import asks the Hub for a faster 4-bit kernel through the `kernels` package; offline, it keeps
    its own CPU kernels, and the warning it logs about that is kept quiet."""
    import logging

    quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with hub_offline():
            import bitsandbytes  # noqa: F401
    finally:
        quiet.setLevel(level)


def quantized_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The linear layers of a JanusForConditionalGeneration that quantization replaces (the language model's
    projections), whichever choice it was loaded with."""
    return [module for name, module in model.model.language_model.named_modules() if name.endswith("_proj")]


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes the module's weights take: parameters and buffers at their stored size, and bitsandbytes' scales
    (the int8 row scales, the nf4 block absmax and its double-quantization state), which are not parameters."""
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        total += tensor.numel() * tensor.element_size()
        scales = [getattr(tensor, "SCB", None)]
        state = getattr(tensor, "quant_state", None)
        while state is not None:  # nf4: the absmax, and with double quantization the state of the absmax
            scales += [state.absmax, getattr(state, "code", None)]
            state = getattr(state, "state2", None)
        total += sum(scale.numel() * scale.element_size() for scale in scales if isinstance(scale, torch.Tensor))
    return total
