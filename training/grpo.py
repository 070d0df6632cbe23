"""GRPO for X-CoT personalization: groups of complete rollouts (reasoning text, then image tokens) per prompt,
group-normalised advantages, a PPO-clipped ratio over the sampled tokens and a k3 KL to a frozen reference.

The policy is the distribution the sampler draws from (guided, tempered, truncated logits; `mmr1.sampling`), and
old, new and reference log-probs all come from the same teacher-forced forward (`sequence_logprobs`), so the
ratio and the KL are those of the policy that produced the samples. Each segment's loss is a per-sequence mean
over its own tokens, so the image's tokens do not drown the reasoning's.

    python -m training.grpo --config training/configs/grpo.toml
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mmr1.generation import generation_sequence
from mmr1.prompting import batch_prefix, build_sequence, embed_sequence
from mmr1.sampling import Modality, SamplingSettings, sample_tokens, sequence_logprobs
from mmr1.xcot import Grounding, extract_subject, parse_reasoning, reasoning_stop_tokens

from .checkpoints import save_recipe_checkpoint
from .config import check_recipe_keys, config_to_dict, knob, recipe_main
from .data import Record, read_records
from .rewards import build_reward
from .sft import trainable_parameters

SEGMENTS = ("image", "reasoning", "both", "alternate")


@dataclass(frozen=True)
class GRPOConfig:
    model: Path = knob(None, "Janus checkpoint folder to start from (any layout mmr1 loads)")
    data: Path = knob(None, "JSONL prompt records (references, prompt); see training/data.py")
    output_dir: Path = knob(Path("runs/grpo"), "where checkpoints and metrics.jsonl are written")
    rewards: tuple[str, ...] = knob(("redness@1",), "rewards: 'redness@w', 'format@w' or 'kind=folder@w'")
    steps: int = knob(100, "optimizer steps (one prompt group each, times prompts_per_step)")
    prompts_per_step: int = knob(1, "prompt records per step")
    num_generations: int = knob(8, "group size G: rollouts per prompt")
    segments: str = knob("both", "optimised segments: image, reasoning, both, or alternate every alternate_every steps")
    alternate_every: int = knob(10, "steps per segment when segments = alternate (SepGRPO)")
    num_iterations: int = knob(1, "mu: optimisation passes over each batch of rollouts")
    epsilon: float = knob(0.2, "PPO clip range of the ratio")
    beta: float = knob(0.01, "KL coefficient to the frozen reference policy (k3 estimator); 0 disables it")
    learning_rate: float = knob(1e-5, "AdamW learning rate")
    max_grad_norm: float = knob(1.0, "gradient clipping norm (0 disables)")
    cfg_scale: float = knob(5.0, "classifier-free guidance of the image rollouts")
    temperature: float = knob(1.0, "image token temperature")
    top_k: int = knob(0, "image top-k (0: off)")
    top_p: float = knob(1.0, "image top-p (1: off)")
    reasoning_temperature: float = knob(1.0, "reasoning temperature")
    max_reasoning_tokens: int = knob(64, "reasoning length limit")
    subject_source: str = knob("reference", "visual intermediate in the chain: 'reference' or 'none'")
    dtype: str = knob("fp32", "training dtype: fp32 or bf16")
    device: str | None = knob(None, "cpu, cuda, ... (default: cuda when available)")
    seed: int = knob(0, "seed of prompt order and rollouts")
    log_every: int = knob(1, "steps between metrics lines")
    save_every: int = knob(0, "steps between checkpoints (0: only the final one)")

    def __post_init__(self) -> None:
        check_recipe_keys(
            self, at_least_one=("prompts_per_step", "num_iterations", "alternate_every", "max_reasoning_tokens")
        )
        if self.num_generations < 2:
            raise ValueError("config key 'num_generations' must be at least 2 (advantages are relative to the group)")
        if self.segments not in SEGMENTS:
            raise ValueError(f"config key 'segments' must be one of {SEGMENTS}")
        if self.beta < 0 or self.epsilon <= 0:
            raise ValueError("config keys 'beta' must be >= 0 and 'epsilon' > 0")
        if not self.rewards:
            raise ValueError("config key 'rewards' needs at least one reward")

    @property
    def image_settings(self) -> SamplingSettings:
        return SamplingSettings(self.cfg_scale, self.temperature, self.top_k, self.top_p)

    @property
    def reasoning_settings(self) -> SamplingSettings:
        return SamplingSettings(cfg_scale=1.0, temperature=self.reasoning_temperature)

    def segments_at(self, step: int) -> tuple[str, ...]:
        if self.segments == "both":
            return ("reasoning", "image")
        if self.segments == "alternate":
            return (("reasoning", "image")[((step - 1) // self.alternate_every) % 2],)
        return (self.segments,)


@dataclass
class Segment:
    """Sampled tokens of one segment with what is needed to score them again."""

    prefix: object  # BatchedPrefix
    unconditional: object | None
    tokens: torch.Tensor  # [G, N]
    mask: torch.Tensor  # [G, N] float, 1 on sampled tokens
    old_logprobs: torch.Tensor  # [G, N]
    modality: Modality
    settings: SamplingSettings


@dataclass
class Group:
    segments: dict[str, Segment]
    rewards: torch.Tensor  # [G] weighted total
    components: dict[str, torch.Tensor]
    advantages: torch.Tensor  # [G]
    reasonings: list[str]
    images: torch.Tensor


def rollout(mm, record: Record, config: GRPOConfig, reward_functions, seed: int) -> Group:
    """G complete X-CoT rollouts for one record: reasoning text, then image tokens conditioned on it."""
    g = config.num_generations
    references = record.load_references()
    with torch.no_grad():
        grounding_sequence = build_sequence(mm, record.prompt, references, stage="ground")
        text_prefix = batch_prefix(mm, [embed_sequence(mm, grounding_sequence)] * g)
        text = sample_tokens(
            mm, text_prefix, Modality.text(mm), config.max_reasoning_tokens, config.reasoning_settings, seed,
            stop_tokens=reasoning_stop_tokens(mm), pad_token=mm.tokens.pad, return_logprobs=True,
        )
        steps = torch.arange(text.tokens.shape[1], device=text.tokens.device)
        text_mask = (steps.unsqueeze(0) < text.lengths.unsqueeze(1)).float()
        reasonings = [
            mm.tokenizer.decode(row[: int(length)], skip_special_tokens=True).strip()
            for row, length in zip(text.tokens, text.lengths)
        ]
        subject_tokens = extract_subject(mm, references, config.subject_source)
        conditional, unconditional = [], []
        for reasoning in reasonings:
            parsed = parse_reasoning(reasoning)
            grounding = Grounding(record.prompt, reasoning, parsed.subject, parsed.scene, parsed.format_ok,
                                  references, subject_tokens)
            sequence = generation_sequence(mm, record.prompt, grounding)
            conditional.append(embed_sequence(mm, sequence))
            unconditional.append(embed_sequence(mm, sequence, unconditional=True))
        settings = config.image_settings
        image_prefix = batch_prefix(mm, conditional)
        image_unconditional = batch_prefix(mm, unconditional) if settings.guided else None
        image = sample_tokens(
            mm, image_prefix, Modality.image(mm), mm.num_image_tokens, settings, seed + 1_000_003,
            unconditional=image_unconditional, return_logprobs=True,
        )
        images = mm.decode_image_tokens(image.tokens)
    components = {}
    total = torch.zeros(g)
    for name, function, weight in reward_functions:
        scores = function(images, references, [record.prompt] * g, reasonings).float().cpu()
        components[name] = scores
        total += weight * scores
    advantages = (total - total.mean()) / (total.std() + 1e-4)
    segments = {
        "reasoning": Segment(text_prefix, None, text.tokens, text_mask, text.logprobs, Modality.text(mm),
                             config.reasoning_settings),
        "image": Segment(image_prefix, image_unconditional, image.tokens, torch.ones_like(image.logprobs),
                         image.logprobs, Modality.image(mm), settings),
    }
    return Group(segments, total, components, advantages, reasonings, images)


def segment_loss(new: torch.Tensor, old: torch.Tensor, reference: torch.Tensor | None, mask: torch.Tensor,
                 advantages: torch.Tensor, epsilon: float, beta: float) -> tuple[torch.Tensor, dict]:
    """PPO-clipped GRPO loss with the k3 KL, averaged per sequence over its tokens, then over the group."""
    ratio = torch.exp(new - old)
    unclipped = ratio * advantages.unsqueeze(1)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantages.unsqueeze(1)
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(new)
    if reference is not None:
        kl = torch.exp(reference - new) - (reference - new) - 1
        per_token = per_token + beta * kl
    tokens = mask.sum(dim=1).clamp(min=1)
    loss = ((per_token * mask).sum(dim=1) / tokens).mean()
    with torch.no_grad():
        stats = {
            "kl": float(((kl * mask).sum(dim=1) / tokens).mean()),
            "clip_fraction": float((((ratio - 1).abs() > epsilon).float() * mask).sum() / mask.sum().clamp(min=1)),
        }
    return loss, stats


def train(config: GRPOConfig) -> Path:
    from tqdm.auto import tqdm

    from mmr1.loading import load_model

    records = read_records(config.data)
    reward_functions = [build_reward(spec) for spec in config.rewards]
    torch.manual_seed(config.seed)
    mm = load_model(config.model, dtype=config.dtype, device=config.device)
    reference = None
    if config.beta > 0:
        reference = copy.copy(mm)
        reference.model = copy.deepcopy(mm.model).eval().requires_grad_(False)
    parameters = trainable_parameters(mm)
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=0.0)
    rng = random.Random(config.seed)
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with (output / "metrics.jsonl").open("w", encoding="utf-8") as metrics, \
            tqdm(total=config.steps, desc="grpo", unit="step") as bar:
        for step in range(1, config.steps + 1):
            mm.model.eval()
            groups = [rollout(mm, rng.choice(records), config, reward_functions, config.seed * 1_000_003 + step * 101 + i)
                      for i in range(config.prompts_per_step)]
            mm.model.train()
            stats: dict[str, float] = {}
            for _ in range(config.num_iterations):
                loss = 0.0
                for group in groups:
                    for name in config.segments_at(step):
                        segment = group.segments[name]
                        new = sequence_logprobs(mm, segment.prefix, segment.tokens, segment.modality,
                                                segment.settings, segment.unconditional)
                        ref = None
                        if reference is not None:
                            with torch.no_grad():
                                ref = sequence_logprobs(reference, segment.prefix, segment.tokens, segment.modality,
                                                        segment.settings, segment.unconditional)
                        part, part_stats = segment_loss(new, segment.old_logprobs, ref, segment.mask,
                                                        group.advantages.to(new.device), config.epsilon, config.beta)
                        loss = loss + part / len(groups)
                        stats.update({f"{name}_{key}": value for key, value in part_stats.items()})
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
                optimizer.step()
            bar.update(1)
            rewards = torch.cat([group.rewards for group in groups])
            bar.set_postfix(reward=f"{rewards.mean():.3f}")
            if step % config.log_every == 0 or step == config.steps:
                line = {"step": step, "loss": float(loss.detach()), "reward_mean": float(rewards.mean()),
                        "reward_std": float(rewards.std()), "segments": list(config.segments_at(step)),
                        "seconds": round(time.perf_counter() - started, 3), **stats}
                for name in groups[0].components:
                    values = torch.cat([group.components[name] for group in groups])
                    line[f"{name}_mean"], line[f"{name}_std"] = float(values.mean()), float(values.std())
                metrics.write(json.dumps(line) + "\n")
                metrics.flush()
            if config.save_every and step % config.save_every == 0 and step != config.steps:
                save_recipe_checkpoint(mm, output / f"step-{step:06d}", "grpo", config_to_dict(config), step)
    return save_recipe_checkpoint(mm, output / "final", "grpo", config_to_dict(config), config.steps)


def main(argv: list[str] | None = None) -> int:
    return recipe_main(GRPOConfig, "GRPO for X-CoT personalization.", train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
