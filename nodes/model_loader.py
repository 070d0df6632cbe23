"""Load MMR1 Model: a Janus-Pro folder (either layout, or a training/ checkpoint) under ComfyUI model management."""

from __future__ import annotations

from comfy_api.latest import io

from ..mmr1.errors import InputError
from ..mmr1.loading import ATTENTION_IMPLEMENTATIONS, DTYPES
from ..mmr1.quantization import QUANTIZATIONS
from . import paths
from .runtime import OFFLOAD_POLICIES, manage
from .types import CATEGORY, MMR1Model


class LoadMMR1Model(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MMR1LoadModel",
            display_name="Load MMR1 Model",
            category=CATEGORY,
            description=(
                "Loads a Janus-Pro checkpoint folder from models/mmr1: the transformers layout "
                "(deepseek-community/Janus-Pro-*), the original DeepSeek layout (deepseek-ai/Janus-Pro-*), or a "
                "checkpoint or LoRA adapter written by MMR1 training. Nothing is downloaded."
            ),
            inputs=[
                io.Combo.Input(
                    "model",
                    options=paths.list_model_folders(paths.MODELS),
                    tooltip="A folder under models/mmr1 holding config.json (or adapter_config.json).",
                ),
                io.Combo.Input(
                    "dtype",
                    options=list(DTYPES),
                    default="auto",
                    tooltip="auto: bf16 on GPUs that support it, fp16 on older ones, fp32 on the CPU.",
                ),
                io.Combo.Input(
                    "attention",
                    options=list(ATTENTION_IMPLEMENTATIONS),
                    default="sdpa",
                    tooltip="sdpa: PyTorch's fused attention; eager: the plain reference implementation.",
                ),
                io.Combo.Input(
                    "offload",
                    options=list(OFFLOAD_POLICIES),
                    default=OFFLOAD_POLICIES[0],
                    tooltip="keep loaded: stay on the GPU between runs (ComfyUI still evicts it when memory is "
                    "needed); offload after run: move to the CPU after each node that uses it.",
                ),
                io.Boolean.Input(
                    "compile",
                    default=False,
                    optional=True,
                    tooltip="Compile the token-by-token decode steps with torch.compile, replayed as CUDA graphs on "
                    "GPUs. The first run of each batch size compiles for tens of seconds; later runs are faster.",
                ),
                io.Combo.Input(
                    "quantization",
                    options=list(QUANTIZATIONS),
                    default="none",
                    optional=True,
                    tooltip="Quantize the language model as it loads (bitsandbytes): int8 or nf4 fit Janus-Pro-7B "
                    "on an 8-12 GB GPU; the VQ, vision encoder and heads stay in full precision. A quantized model "
                    "stays on the GPU (offload after run is not available for it).",
                ),
            ],
            outputs=[MMR1Model.Output(display_name="mmr1_model")],
        )

    @classmethod
    def execute(cls, model: str, dtype: str, attention: str, offload: str, compile: bool = False,
                quantization: str = "none") -> io.NodeOutput:
        import comfy.model_management as model_management

        from ..mmr1.decoding import compiled_states, release_compiled_state
        from ..mmr1.loading import load_model, resolve_dtype

        folder = paths.resolve_model_folder(paths.MODELS, model)
        torch_dtype = resolve_dtype(dtype, model_management.get_torch_device())
        if quantization != "none" and offload != OFFLOAD_POLICIES[0]:
            raise InputError(f"A {quantization} model cannot move between devices (bitsandbytes places its layers "
                             f"as it quantizes them): choose offload '{OFFLOAD_POLICIES[0]}', or quantization none.")
        mm = load_model(
            folder,
            dtype=torch_dtype,
            # quantized layers are placed once, on the GPU; the others wait on the offload device
            device=model_management.get_torch_device() if quantization != "none" else
            model_management.unet_offload_device(),
            attn_implementation=attention,
            compile_decoding=compile,
            quantization=quantization,
        )
        language_model = mm.language_model
        handle = manage(
            model, mm, mm.model, offload,
            # Compiled decoding keeps a KV cache between runs (CUDA graphs replay at its address): not past an unload.
            on_unload=lambda: release_compiled_state(language_model),
            live_details=lambda: {"compiled_decode_buffers": bool(compiled_states(language_model))},
            kind="janus", layout=mm.layout, dtype=str(torch_dtype), compile=compile, quantization=quantization,
        )
        return io.NodeOutput(handle)
