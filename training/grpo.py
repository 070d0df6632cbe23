"""GRPO for X-CoT personalization: groups of complete rollouts (reasoning text, then image tokens) per prompt,
group-normalised advantages, a PPO-clipped ratio over the sampled tokens and a k3 KL to a frozen reference.

The policy is the distribution the sampler draws from (guided, tempered, truncated logits; `mmr1.sampling`), and
old, new and reference log-probs all come from the same teacher-forced forward (`sequence_logprobs`), so the
ratio and the KL are those of the policy that produced the samples. Each segment's loss is a per-sequence mean
over its own tokens, so the image's tokens do not drown the reasoning's.

    python -m training.grpo --config training/configs/grpo.toml
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mmr1.generation import generation_sequence
from mmr1.prompting import batch_prefix, build_sequence, embed_sequence
from mmr1.sampling import Modality, SamplingSettings, sample_tokens, sequence_logprobs
from mmr1.xcot import Grounding, extract_subject, parse_reasoning, reasoning_stop_tokens

from .config import knob, recipe_main
from .data import Record, RecordOrder, read_records
from .engine import Run, RunConfig
from .plots import sample_grid
from .policy import make_policy
from .rewards import build_reward
from .timing import PhaseClock

SEGMENTS = ("image", "reasoning", "both", "alternate")


@dataclass(frozen=True)
class GRPOConfig(RunConfig):
    data: Path = knob(None, "JSONL prompt records (references, prompt); see training/data.py")
    output_dir: Path = knob(Path("runs/grpo"), "checkpoints, metrics.jsonl, samples/ and curves.png go here")
    rewards: tuple[str, ...] = knob(("redness@1",), "rewards: 'redness@w', 'format@w' or 'kind=folder@w'")
    prompts_per_step: int = knob(1, "prompt groups per optimizer step and process, each backpropagated on its own")
    num_generations: int = knob(8, "group size G: rollouts per prompt")
    segments: str = knob("both", "optimised segments: image, reasoning, both, or alternate every alternate_every steps")
    alternate_every: int = knob(10, "steps per segment when segments = alternate (SepGRPO)")
    num_iterations: int = knob(1, "mu: optimisation passes over each batch of rollouts")
    epsilon: float = knob(0.2, "PPO clip range of the ratio")
    beta: float = knob(0.01, "KL coefficient to the frozen reference policy (k3 estimator); 0 disables it")
    cfg_scale: float = knob(5.0, "classifier-free guidance of the image rollouts")
    temperature: float = knob(1.0, "image token temperature")
    top_k: int = knob(0, "image top-k (0: off)")
    top_p: float = knob(1.0, "image top-p (1: off)")
    reasoning_temperature: float = knob(1.0, "reasoning temperature")
    max_reasoning_tokens: int = knob(64, "reasoning length limit")

    def __post_init__(self) -> None:
        self.check_run_keys(
            at_least_one=("prompts_per_step", "num_iterations", "alternate_every", "max_reasoning_tokens")
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


def rollout(mm, record: Record, config: GRPOConfig, reward_functions, seed: int,
            clock: PhaseClock | None = None) -> Group:
    """G complete X-CoT rollouts for one record: reasoning text, then image tokens conditioned on it; `clock`
    times the sampling ("rollout") and the scoring ("reward")."""
    g = config.num_generations
    clock = clock or PhaseClock(mm.device)
    references = record.load_references()
    with torch.no_grad(), clock("rollout"):
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
    with clock("reward"):
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


def rollout_seed(config: GRPOConfig, step: int, group: int) -> int:
    """Seed of one group's rollouts: fixed by the run's seed, the step and the group's index over all processes,
    so a resumed or re-sharded run samples the same rollouts."""
    return config.seed * 1_000_003 + step * 1_009 + group * 101


def policy_loss(policy, group: Group, names: tuple[str, ...], config: GRPOConfig,
                clock: PhaseClock | None = None) -> tuple[torch.Tensor, dict]:
    """The GRPO loss of one group over the optimised segments (the engine's forward); `clock` times the
    teacher-forced log-prob passes ("logprobs")."""
    loss, stats = 0.0, {}
    clock = clock or PhaseClock(policy.mm.device)
    for name in names:
        segment = group.segments[name]
        scored = (segment.prefix, segment.tokens, segment.modality, segment.settings, segment.unconditional)
        with clock("logprobs"):
            new = sequence_logprobs(policy.mm, *scored)
            reference = None
            if config.beta > 0:
                with policy.reference() as frozen:
                    reference = sequence_logprobs(frozen, *scored)
        part, part_stats = segment_loss(new, segment.old_logprobs, reference, segment.mask,
                                        group.advantages.to(new.device), config.epsilon, config.beta)
        loss = loss + part
        stats.update({f"{name}_{key}": value for key, value in part_stats.items()})
    return loss, stats


def train(config: GRPOConfig) -> Path:
    """Run GRPO (resuming from output_dir when it holds a checkpoint); returns the final checkpoint folder."""
    from tqdm.auto import tqdm

    from mmr1.loading import load_model

    records = read_records(config.data)
    run = Run("grpo", config)
    reward_functions = [build_reward(spec, device=str(run.device)) for spec in config.rewards]
    mm = load_model(config.model, device=run.device)
    policy = make_policy(mm, config.model, config.lora, with_reference=config.beta > 0)
    clock = PhaseClock(run.device)
    objective = run.prepare(policy, lambda group, names: policy_loss(policy, group, names, config, clock))
    order = RecordOrder(len(records), config.seed)
    start = run.resume(order)
    share = config.prompts_per_step
    with tqdm(total=config.steps, initial=start, desc="grpo", unit="step", disable=not run.is_main) as bar:
        for step in range(start + 1, config.steps + 1):
            step_started = time.perf_counter()
            indices = order.take(share * run.num_processes)
            mine = range(run.process_index * share, (run.process_index + 1) * share)
            mm.model.eval()
            with run.generation_weights(), run.accelerator.autocast():
                groups = [rollout(mm, records[indices[i]], config, reward_functions, rollout_seed(config, step, i), clock)
                          for i in mine]
            rollout_seconds = clock.seconds["rollout"]
            sampled = sum(int(g.segments["reasoning"].mask.sum()) + g.segments["image"].tokens.numel() for g in groups)
            mm.model.train()
            names = config.segments_at(step)
            stats: dict[str, float] = {}
            for _ in range(config.num_iterations):
                losses = []
                for index, group in enumerate(groups):
                    with run.micro_step(last=index == len(groups) - 1):
                        loss, stats = objective(group, names)
                        with clock("backward"):
                            run.backward(loss / len(groups))
                    losses.append(float(loss.detach()))
                with clock("optimizer"):
                    grad_norm = run.optimizer_step()
            phases, step_seconds = clock.reset(), time.perf_counter() - step_started
            rewards = run.gather(torch.stack([group.rewards for group in groups]))
            components = {name: run.gather(torch.stack([group.components[name] for group in groups]))
                          for name in groups[0].components}
            totals = run.gather(torch.tensor([[sum(losses) / len(losses), sampled, rollout_seconds]]))
            bar.update(1)
            bar.set_postfix(reward=f"{rewards.mean():.3f}")
            if run.log_due(step):
                line = {"step": step, "loss": float(totals[:, 0].mean()), "reward_mean": float(rewards.mean()),
                        "reward_std": float(rewards.std(dim=1).mean()), "segments": list(names),
                        "lr": run.learning_rate, "grad_norm": grad_norm,
                        "rollout_tokens_per_s": round(float(totals[:, 1].sum() / totals[:, 2].max()), 1),
                        "step_seconds": round(step_seconds, 3),
                        "samples_per_s": round(len(groups) * config.num_generations * run.num_processes / step_seconds, 3),
                        **{f"seconds_{phase}": round(seconds, 3) for phase, seconds in phases.items()}, **stats}
                for name, values in components.items():
                    line[f"{name}_mean"], line[f"{name}_std"] = float(values.mean()), float(values.std(dim=1).mean())
                run.log(line)
            if run.samples_due(step):
                captions = [f"{float(value):.3f}" for value in groups[0].rewards]
                run.save_samples(step, sample_grid(groups[0].images, captions))
            run.end_of_step(step, order)
    return run.finish(["reward_mean", *(f"{name}_mean" for name, _, _ in reward_functions), "image_kl", "reasoning_kl"])


def main(argv: list[str] | None = None) -> int:
    return recipe_main(GRPOConfig, "GRPO for X-CoT personalization.", train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
