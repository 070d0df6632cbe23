"""What ties mmr1 objects into ComfyUI's runtime: model management, progress bars with previews and text, interrupts.

A loaded model lives in an `MMR1Handle` whose `ModelPatcher` ComfyUI's model management moves between the load
and offload devices; "Unload models" and POST /free unload it like any core model, and once ComfyUI's cache
drops the loader's output the weights are garbage collected (nothing here keeps a strong reference).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import comfy.model_management as model_management
import comfy.model_patcher
import comfy.utils
import torch
from comfy.patcher_extension import CallbacksMP

OFFLOAD_POLICIES = ("keep loaded", "offload after run")

# Weak registry of the handles alive in this process, for the /mmr1/models status route.
_LIVE_HANDLES: "weakref.WeakSet[MMR1Handle]" = weakref.WeakSet()


class ModuleContainer(torch.nn.Module):
    """Holds a transformers model for ModelPatcher, which sets `.device` on the module it manages (a read-only
    property on transformers models)."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        super().__init__()
        self.module = module
        self.device = device


@dataclass(eq=False)
class MMR1Handle:
    """A model (Janus or reward) under ComfyUI's model management."""

    name: str
    payload: object  # MMR1Model or RewardModel; its torch module is `container.module`
    container: ModuleContainer
    patcher: comfy.model_patcher.ModelPatcher
    offload_policy: str = OFFLOAD_POLICIES[0]
    details: dict = field(default_factory=dict)
    live_details: Callable[[], dict] | None = None  # status entries that change while the model lives

    def __post_init__(self) -> None:
        _LIVE_HANDLES.add(self)

    def status(self) -> dict:
        loaded = any(loaded.model is self.patcher for loaded in model_management.current_loaded_models)
        live = self.live_details() if self.live_details else {}
        return {"name": self.name, "device": str(self.container.device), "loaded": loaded, **self.details, **live}


def manage(
    name: str,
    payload: object,
    module: torch.nn.Module,
    offload_policy: str,
    on_unload: Callable[[], None] | None = None,
    live_details: Callable[[], dict] | None = None,
    **details,
) -> MMR1Handle:
    """Wrap a freshly loaded model (on the offload device) for ComfyUI's model management; `on_unload` runs
    whenever ComfyUI unloads it (/free, memory pressure, the offload policy)."""
    load_device = model_management.get_torch_device()
    offload_device = model_management.unet_offload_device()
    container = ModuleContainer(module, offload_device)
    patcher = comfy.model_patcher.ModelPatcher(container, load_device=load_device, offload_device=offload_device)
    if on_unload is not None:
        patcher.add_callback(CallbacksMP.ON_DETACH, lambda patcher, unpatch_all: on_unload())
    return MMR1Handle(name, payload, container, patcher, offload_policy, details, live_details)


def live_handles() -> list[dict]:
    return [handle.status() for handle in list(_LIVE_HANDLES)]


class use_models:
    """Context manager: load the handles' weights onto the load device for a run (yielding their payloads),
    and offload those whose policy asks for it afterwards."""

    def __init__(self, *handles: MMR1Handle):
        self.handles = handles

    def __enter__(self) -> list:
        model_management.load_models_gpu([handle.patcher for handle in self.handles], force_full_load=True)
        return [handle.payload for handle in self.handles]

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            if handle.offload_policy == "offload after run":
                unload(handle)


def unload(handle: MMR1Handle) -> None:
    """Move one model back to its offload device and out of ComfyUI's loaded list."""
    loaded_models = model_management.current_loaded_models
    for index in reversed(range(len(loaded_models))):
        if loaded_models[index].model is handle.patcher:
            loaded_models[index].model_unload()
            loaded_models.pop(index)
    model_management.soft_empty_cache()


def show_text(node_id: str | None, text: str) -> None:
    """Text on the node while it runs (ComfyUI's progress text), such as the reasoning as it is written."""
    from server import PromptServer

    server = PromptServer.instance
    if node_id is not None and server is not None:
        server.send_progress_text(text, node_id, server.client_id)  # to the client whose prompt runs, as progress


class TokenProgress:
    """mmr1's per-token progress callback as a ComfyUI progress bar, with a decoded preview now and then.

    ComfyUI's progress hook raises InterruptProcessingException when the user cancels, so reporting every
    token makes generation interruptible between two tokens.
    """

    def __init__(self, node_id: str | None, preview=None, preview_every: int = 0):
        self.node_id = node_id
        self.bar = None
        self.preview = preview  # tokens [B, N] -> PIL image, or None
        self.preview_every = preview_every

    def __call__(self, done: int, total: int, tokens: torch.Tensor) -> None:
        if self.bar is None or self.bar.total != total:
            self.bar = comfy.utils.ProgressBar(total, node_id=self.node_id)
        image = None
        if self.preview is not None and self.preview_every and (done % self.preview_every == 0 or done == total):
            image = ("JPEG", self.preview(tokens), 512)
        self.bar.update_absolute(done, total, image)
