"""The world's config files in configs/: the pipeline's stages and the SFT and GRPO hyper-parameters of the
embedded model, each written from its template (every knob with its help; the tests check the files are current).

    python -m training.world.recipes        # rewrites training/world/configs/*.toml
"""

from __future__ import annotations

from pathlib import Path

from ..config import template_text, write_templates

CONFIGS = Path(__file__).resolve().parent / "configs"
_RUN = "runs/world"  # the pipeline's default output_dir; it sets model, data and output_dir itself
TEMPLATES = {  # file under CONFIGS: (module that runs it, its config class, title, example values)
    "pipeline.toml": ("training.world.pipeline", "PipelineConfig", "The embedded world model, every stage", {}),
    "sft.toml": ("training.sft", "SFTConfig", "X-CoT SFT of the embedded world model", {
        "model": f"{_RUN}/base", "data": f"{_RUN}/data/sft/records.jsonl", "output_dir": f"{_RUN}/sft",
        "steps": 7000, "learning_rate": 1e-3, "warmup_steps": 100, "lr_scheduler_type": "cosine",
        "weight_decay": 0.01, "batch_size": 16, "log_every": 50, "save_every": 250, "keep_checkpoints": 1,
        "unconditional_prob": 0.1, "reasoning_drop_prob": 0.1, "reference_drop_prob": 0.5,
        "subject_source": "generate", "gradient_checkpointing": False,
    }),
    "grpo.toml": ("training.grpo", "GRPOConfig", "GRPO of the embedded world model with its reward model", {
        "model": f"{_RUN}/sft/final", "data": f"{_RUN}/data/grpo/records.jsonl", "output_dir": f"{_RUN}/grpo",
        "rewards": ("clip_i={reward}@1", "clip_t={reward}@0.5", "format@0.1"),
        "steps": 200, "learning_rate": 1.5e-5, "prompts_per_step": 2, "num_generations": 8, "beta": 0.04,
        "cfg_scale": 3.0, "max_reasoning_tokens": 72, "save_every": 25, "keep_checkpoints": 1, "log_every": 1,
        "subject_source": "generate", "gradient_checkpointing": False,
    }),
}


def template(name: str) -> str:
    """The text of training/world/configs/<name>."""
    return template_text(TEMPLATES, name, "training/world/configs", "training.world.recipes")


if __name__ == "__main__":
    write_templates(CONFIGS, TEMPLATES, template)
