"""ComfyUI-MMR1: zero-shot personalized image generation with unified multimodal LLMs (Janus-Pro), as nodes.

ComfyUI loads this folder as a custom node pack and calls `comfy_entrypoint`. Outside ComfyUI (tests, the CLI,
training) there is nothing to register and `mmr1` is used directly.
"""

try:
    from comfy_api.latest import ComfyExtension  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    comfy_entrypoint = None
else:
    from .nodes import MMR1Extension

    async def comfy_entrypoint() -> MMR1Extension:
        return MMR1Extension()
