"""The X-CoT nodes: Subject Grounding X-CoT (stages 1-2) and Personalized Generate (stage 3)."""

from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..mmr1.sampling import SEEDS
from ..mmr1.xcot import SUBJECT_SOURCES
from .runtime import TokenProgress, show_text, use_models
from .types import CATEGORY, MMR1Model, MMR1Subject

SEED_MAX = SEEDS.high  # the sampler's largest seed: a larger one would wrap onto another's pixels


class SubjectGroundingXCoT(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MMR1SubjectGrounding",
            display_name="Subject Grounding X-CoT",
            category=CATEGORY,
            description=(
                "The model reads the reference photos and writes what defines the subject and a plan for the "
                "scene (visible, editable reasoning), then produces the subject as an image (drawn by the model, "
                "or the reference crop), the visual intermediate that generation attends to."
            ),
            inputs=[
                MMR1Model.Input("mmr1_model"),
                io.Image.Input("reference_images", tooltip="One or more photos of the subject (an IMAGE batch)."),
                io.Mask.Input(
                    "masks", optional=True, tooltip="Optional: one mask for all references or one per image; "
                    "each reference is cropped to its mask's box."
                ),
                io.String.Input("prompt", multiline=True, default="a photo of it on the beach",
                                tooltip="What the new image should show."),
                io.Int.Input("max_new_tokens", default=256, min=1, max=4096, tooltip="Reasoning length limit."),
                io.Float.Input("temperature", default=0.7, min=0.0, max=2.0, step=0.05,
                               tooltip="Reasoning temperature; 0 is greedy."),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True),
                io.Combo.Input("subject_tokens", options=list(SUBJECT_SOURCES), default="reference",
                               tooltip="reference: the first (cropped) reference as VQ tokens, the visual "
                               "intermediate generation attends to; none: text reasoning only; generate: the "
                               "model draws the subject alone after its reasoning (MM-R1's X-CoT)."),
            ],
            outputs=[
                MMR1Subject.Output(display_name="subject"),
                io.String.Output(display_name="reasoning"),
                io.String.Output(display_name="rewritten_prompt"),
                io.Image.Output(display_name="subject_image", tooltip="The visual intermediate: the drawn subject "
                                "(generate), the reference crop (reference), black for none. Feed an edit of it "
                                "to Personalized Generate's subject_image to swap it."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, mmr1_model, reference_images: torch.Tensor, prompt: str, max_new_tokens: int,
                temperature: float, seed: int, subject_tokens: str, masks: torch.Tensor | None = None) -> io.NodeOutput:
        from ..mmr1.xcot import ground

        node_id = cls.hidden.unique_id
        with use_models(mmr1_model) as (mm,):
            grounding = ground(
                mm, reference_images, prompt, masks=masks, max_new_tokens=max_new_tokens, temperature=temperature,
                seed=seed, subject_source=subject_tokens, progress=TokenProgress(node_id),
                stream=lambda texts: show_text(node_id, texts[0]),
            )
            subject_image = grounding.subject_image
            if subject_image is None:
                subject_image = torch.zeros(1, mm.image_size, mm.image_size, 3)
        shown = ui.PreviewText(grounding.reasoning).as_dict()
        if grounding.subject_image is not None:  # the drawn subject (generate) or the reference crop
            shown.update(ui.PreviewImage(grounding.subject_image, cls=cls).as_dict())
        return io.NodeOutput(grounding, grounding.reasoning, grounding.rewritten_prompt, subject_image, ui=shown)


class PersonalizedGenerate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MMR1PersonalizedGenerate",
            display_name="Personalized Generate",
            category=CATEGORY,
            description=(
                "Draws images token by token, conditioned on the subject (references, reasoning, subject tokens) "
                "and the prompt, with classifier-free guidance. Without a subject: plain text-to-image."
            ),
            inputs=[
                MMR1Model.Input("mmr1_model"),
                MMR1Subject.Input("subject", optional=True, tooltip="From Subject Grounding X-CoT."),
                io.String.Input("reasoning", optional=True, force_input=True, multiline=True,
                                tooltip="Optional: reasoning to use instead of the subject's own (an edit)."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="What to draw; empty uses the subject's prompt."),
                io.Float.Input("cfg", default=5.0, min=1.0, max=20.0, step=0.1,
                               tooltip="Classifier-free guidance scale; 1 turns guidance off."),
                io.Float.Input("temperature", default=1.0, min=0.0, max=2.0, step=0.05, tooltip="0 is greedy."),
                io.Int.Input("top_k", default=0, min=0, max=65536, tooltip="0 keeps every token."),
                io.Float.Input("top_p", default=1.0, min=0.01, max=1.0, step=0.01, tooltip="1 keeps every token."),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True,
                             tooltip="Image i of the batch uses seed + i."),
                io.Int.Input("batch_size", default=1, min=1, max=64),
                io.Image.Input("subject_image", optional=True,
                               tooltip="Optional: a subject image to attend to instead of the subject's own "
                               "intermediate (its first image is VQ-encoded); needs a connected subject."),
            ],
            outputs=[io.Image.Output(display_name="images")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, mmr1_model, prompt: str, cfg: float, temperature: float, top_k: int, top_p: float, seed: int,
                batch_size: int, subject=None, reasoning: str | None = None,
                subject_image: torch.Tensor | None = None) -> io.NodeOutput:
        from ..mmr1.errors import InputError
        from ..mmr1.generation import generate
        from ..mmr1.meter import metered
        from ..mmr1.sampling import SamplingSettings

        prompt = prompt if prompt.strip() or subject is None else subject.prompt
        if not prompt.strip():
            raise InputError("The prompt is empty; describe the image to generate (or connect a subject).")
        if subject_image is not None and subject is None:
            raise InputError("subject_image replaces a subject's visual intermediate; connect the subject too.")
        settings = SamplingSettings(cfg_scale=cfg, temperature=temperature, top_k=top_k, top_p=top_p)
        with use_models(mmr1_model) as (mm,):
            if subject_image is not None:
                subject = subject.with_subject_image(mm, subject_image)
            progress = TokenProgress(
                cls.hidden.unique_id, preview=lambda tokens: _preview(mm, tokens), preview_every=mm.image_grid
            )
            with metered(mm.device) as meter:
                result = generate(mm, prompt, subject, reasoning, batch_size, settings, seed, progress=progress)
        return io.NodeOutput(result.images, ui=ui.PreviewText(meter.describe(batch_size)))


def _preview(mm, tokens: torch.Tensor):
    """The first image decoded from the tokens sampled so far (the rest of the grid left at code 0)."""
    from ..mmr1.images import tensor_to_pil

    return tensor_to_pil(mm.decode_image_tokens(tokens[:1])[0])
