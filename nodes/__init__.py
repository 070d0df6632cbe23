"""ComfyUI nodes of the pack: thin wrappers over `mmr1`, registered through the V3 API (`comfy_api.latest`).

Only ComfyUI's own modules are imported here; mmr1's model code (transformers) is imported when a node runs,
so that ComfyUI starts fast.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import paths
from .model_loader import LoadMMR1Model
from .rewards import LoadMMR1Reward, RewardScore
from .runtime import live_handles
from .xcot import PersonalizedGenerate, SubjectGroundingXCoT

NODES: list[type[io.ComfyNode]] = [
    LoadMMR1Model,
    SubjectGroundingXCoT,
    PersonalizedGenerate,
    LoadMMR1Reward,
    RewardScore,
]


class MMR1Extension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # Registered here rather than in on_load, which ComfyUI 0.3.75 does not call.
        paths.register_model_folders()
        _add_status_route()
        return NODES


_ROUTES_ADDED = False


def _add_status_route() -> None:
    """GET /mmr1/models: the MMR1 models alive in this server and whether ComfyUI holds them on its load device."""
    global _ROUTES_ADDED
    if _ROUTES_ADDED:
        return
    _ROUTES_ADDED = True
    from aiohttp import web
    from server import PromptServer

    @PromptServer.instance.routes.get("/mmr1/models")
    async def mmr1_models(request):
        return web.json_response({"models": live_handles()})
