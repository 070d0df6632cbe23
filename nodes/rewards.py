"""Reward nodes: Load MMR1 Reward (a DINO / DINOv2 / CLIP / PickScore / DreamSim folder) and Reward Score
(best-of-N)."""

from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..mmr1.rewards import REWARD_KINDS
from . import paths
from .runtime import manage, use_models
from .types import CATEGORY, MMR1Reward


class LoadMMR1Reward(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MMR1LoadReward",
            display_name="Load MMR1 Reward",
            category=CATEGORY,
            description=(
                "Loads a reward model from models/mmr1_rewards: subject fidelity (DINO ViT, DINOv2, CLIP-I, "
                "DreamSim: cosine to the references) or text alignment (CLIP-T, PickScore: agreement with the prompt)."
            ),
            inputs=[
                io.Combo.Input("model", options=paths.list_model_folders(paths.REWARDS),
                               tooltip="A transformers folder (or a DreamSim folder) under models/mmr1_rewards."),
                io.Combo.Input("metric", options=list(REWARD_KINDS), default="dino",
                               tooltip="dino/dinov2/clip_i/dreamsim compare with references; clip_t/pickscore with the prompt."),
                io.Float.Input("weight", default=1.0, min=-100.0, max=100.0, step=0.05,
                               tooltip="Weight of this reward in Reward Score's total."),
            ],
            outputs=[MMR1Reward.Output(display_name="reward")],
        )

    @classmethod
    def execute(cls, model: str, metric: str, weight: float) -> io.NodeOutput:
        import comfy.model_management as model_management

        from ..mmr1.rewards import load_reward_model

        folder = paths.resolve_model_folder(paths.REWARDS, model)
        reward = load_reward_model(metric, folder, device=model_management.unet_offload_device())
        return io.NodeOutput(manage(model, (reward, weight), reward.model, "keep loaded", kind="reward", metric=metric))


class RewardScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MMR1RewardScore",
            display_name="Reward Score",
            category=CATEGORY,
            description="Scores each image with the weighted rewards and sorts them best first (best-of-N selection).",
            inputs=[
                io.Image.Input("images"),
                MMR1Reward.Input("reward"),
                io.String.Input("prompt", multiline=True, default="", tooltip="For the text-alignment rewards."),
                io.Int.Input("top_k", default=1, min=1, max=4096, tooltip="How many of the best images to output."),
                io.Image.Input("references", optional=True, tooltip="For the subject-fidelity rewards."),
                MMR1Reward.Input("reward_2", optional=True),
                MMR1Reward.Input("reward_3", optional=True),
            ],
            outputs=[
                io.Float.Output(display_name="scores", is_output_list=True, tooltip="Total score per input image."),
                io.String.Output(display_name="table"),
                io.Image.Output(display_name="sorted_images", tooltip="All images, best first."),
                io.Image.Output(display_name="top_images", tooltip="The top_k best images."),
            ],
        )

    @classmethod
    def execute(cls, images: torch.Tensor, reward, prompt: str, top_k: int, references: torch.Tensor | None = None,
                reward_2=None, reward_3=None) -> io.NodeOutput:
        from ..mmr1.images import image_batch_to_pils
        from ..mmr1.rewards import WeightedReward

        pils = image_batch_to_pils(images, "images")
        reference_pils = None if references is None else image_batch_to_pils(references, "references")
        handles = [handle for handle in (reward, reward_2, reward_3) if handle is not None]
        with use_models(*handles) as components:
            weighted = WeightedReward(components)
            breakdown = weighted.score(pils, references=reference_pils, prompts=prompt or None)
        order = torch.argsort(breakdown.total, descending=True, stable=True)
        table = _table(breakdown, {model.name: weight for model, weight in components}, order)
        images = images if images.ndim == 4 else images.unsqueeze(0)
        sorted_images = images[order]
        return io.NodeOutput(
            [float(value) for value in breakdown.total], table, sorted_images, sorted_images[:top_k],
            ui=ui.PreviewText(table),
        )


def _table(breakdown, weights: dict[str, float], order: torch.Tensor) -> str:
    """A fixed-width ranking: one row per image, best first, each component and the weighted total."""
    names = list(breakdown.components)
    header = ["rank", "image", *(f"{name} (x{weights[name]:g})" for name in names), "total"]
    rows = [header]
    for rank, index in enumerate(order.tolist(), start=1):
        rows.append([str(rank), str(index), *(f"{float(breakdown.components[name][index]):.4f}" for name in names),
                     f"{float(breakdown.total[index]):.4f}"])
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
