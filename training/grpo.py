"""GRPO for X-CoT personalization: groups of complete rollouts (reasoning text, then image tokens) per prompt,
group-relative advantages, a PPO-clipped ratio over the sampled tokens and a k3 KL to a frozen reference.

The policy is the distribution the sampler draws from (guided, tempered, truncated logits; `mmr1.sampling`), and
new, old and reference log-probs all come from the same teacher-forced forward (`sequence_logits`), so the ratio
is that of the policy that produced the samples. Each pass re-embeds the prompt (text embeddings, understanding
aligner) from its token ids and the references' frozen SigLIP features, so those weights train too. Old log-probs
are the first pass's own (`new.detach()`, as TRL does), so the ratio is exactly 1 there; the sampler's log-probs
are only compared with them (`*_logprob_gap`). The reference's log-probs are computed once per rollout, by the
reference alone (its own embeddings, aligner, decoder and heads), on the untruncated distributions. The loss's
algebra and its options (TRL's names) are in `training.grpo_loss`.

    python -m training.grpo --config training/configs/grpo.toml
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mmr1.errors import InputError
from mmr1.generation import generation_sequence
from mmr1.prompting import PromptSequence, batch_prefix, build_sequence, embed_sequence
from mmr1.ranges import Range
from mmr1.sampling import SAMPLING_RANGES, Modality, SamplingSettings, sample_tokens, sequence_logits, token_logprobs
from mmr1.xcot import Grounding, extract_subject, parse_reasoning, reasoning_stop_tokens

from .config import AT_LEAST_ONE, AT_LEAST_ZERO, POSITIVE, knob, recipe_main
from .data import Record, RecordOrder, read_records
from .engine import Run, RunConfig
from .memory import device_memory, engine_kind, estimate_step_memory
from .grpo_loss import (
    IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, MULTI_OBJECTIVE_AGGREGATIONS, SCALE_REWARDS, aggregate_rewards,
    group_advantages, masked_mean, segment_loss,
)
from .plots import sample_grid
from .policy import Policy, make_policy
from .rewards import build_rewards, parse_spec
from .timing import PhaseClock

SEGMENTS = ("image", "reasoning", "both", "alternate", "subject")
# Rollout temperatures: the sampler's range without greedy, since GRPO needs distinct samples in a group.
SAMPLED = Range(0.0, low_open=True, note="rollouts must be sampled")


@dataclass(frozen=True)
class GRPOConfig(RunConfig):
    data: Path = knob(None, "JSONL prompt records (references, prompt); see training/data.py")
    output_dir: Path = knob(Path("runs/grpo"), "checkpoints, metrics.jsonl, samples/ and curves.png go here")
    rewards: tuple[str, ...] = knob(("redness@1",), "rewards: 'redness@w', 'format@w' or 'kind=folder@w'")
    prompts_per_step: int = knob(1, "prompt groups per optimizer step and process (gradient accumulation steps)",
                                 within=AT_LEAST_ONE)
    num_generations: int = knob(8, "group size G: rollouts per prompt",
                                within=Range(2, note="advantages are relative to the group"))
    segments: str = knob("both", "optimised segments: image, reasoning, subject (the drawn subject image, "
                                 "subject_source = generate), both (every segment the chain has), or alternate "
                                 "(the reasoning, then the image side) every alternate_every steps", choices=SEGMENTS)
    alternate_every: int = knob(10, "steps per segment when segments = alternate (SepGRPO)", within=AT_LEAST_ONE)
    num_iterations: int = knob(1, "mu: optimisation passes over each batch of rollouts", within=AT_LEAST_ONE)
    loss_type: str = knob("grpo", f"how per-token terms are averaged, one of {LOSS_TYPES} (see training/grpo_loss.py)",
                          choices=LOSS_TYPES)
    scale_rewards: str = knob("group", f"advantage scaling, one of {SCALE_REWARDS}: the group's std, the step's std, "
                                       "or none (Dr. GRPO)", choices=SCALE_REWARDS)
    multi_objective_aggregation: str = knob("sum_then_normalize", "how several rewards make one: weighted sum, then "
                                            "normalised (sum_then_normalize), or each normalised within its group, "
                                            "then summed (normalize_then_sum, GDPO: for rewards in conflict, such as "
                                            "identity and prompt)", choices=MULTI_OBJECTIVE_AGGREGATIONS)
    epsilon: float = knob(0.2, "lower clip range of the ratio (and the upper one unless epsilon_high is set)",
                          within=POSITIVE)
    epsilon_high: float | None = knob(None, "upper clip range of the ratio (DAPO's clip-higher, e.g. 0.28); "
                                            "unset: epsilon", within=POSITIVE)
    importance_sampling_level: str = knob("token", "'token' (a ratio per token) or 'sequence' (GSPO: one per "
                                                   "sequence, from the mean token log-ratio)",
                                          choices=IMPORTANCE_SAMPLING_LEVELS)
    mask_truncated_completions: bool = knob(False, "leave rollouts whose reasoning hit max_reasoning_tokens out of "
                                                   "the loss (both segments)")
    beta: float = knob(0.01, "KL coefficient to the frozen reference policy (k3 estimator); 0 loads no reference",
                       within=AT_LEAST_ZERO)
    cfg_scale: float = knob(5.0, "classifier-free guidance of the image rollouts (>= 1)",
                            within=SAMPLING_RANGES["cfg_scale"])
    temperature: float = knob(1.0, "image token temperature (> 0: rollouts must be sampled)", within=SAMPLED)
    top_k: int = knob(0, "image top-k (0: off)", within=SAMPLING_RANGES["top_k"])
    top_p: float = knob(1.0, "image top-p in (0, 1] (1: off)", within=SAMPLING_RANGES["top_p"])
    reasoning_temperature: float = knob(1.0, "reasoning temperature (> 0)", within=SAMPLED)
    max_reasoning_tokens: int = knob(64, "reasoning length limit", within=AT_LEAST_ONE)

    def __post_init__(self) -> None:
        self.check_run_keys()
        if not self.rewards:
            raise ValueError("config key 'rewards' needs at least one reward")
        for spec in self.rewards:
            try:
                parse_spec(spec)
            except InputError as error:
                raise ValueError(f"config key 'rewards': {error}") from error
        if self.segments == "subject" and self.subject_source != "generate":
            raise ValueError("config key 'segments' = 'subject' optimises the drawn subject image: it needs "
                             "subject_source = 'generate'")

    @property
    def image_settings(self) -> SamplingSettings:
        return SamplingSettings(self.cfg_scale, self.temperature, self.top_k, self.top_p)

    @property
    def reasoning_settings(self) -> SamplingSettings:
        return SamplingSettings(cfg_scale=1.0, temperature=self.reasoning_temperature)

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def segments_at(self, step: int) -> tuple[str, ...]:
        image_side = ("subject", "image") if self.subject_source == "generate" else ("image",)
        if self.segments == "both":
            return ("reasoning", *image_side)
        if self.segments == "alternate":
            return (("reasoning",), image_side)[((step - 1) // self.alternate_every) % 2]
        return (self.segments,)


@dataclass
class Segment:
    """One segment's sampled tokens with what scoring them again needs: the prompt sequences of its rows (each
    pass embeds them anew) and the log-probs fixed once per rollout."""

    sequences: list[PromptSequence]  # the conditional prompt of each row
    tokens: torch.Tensor  # [G, N]
    mask: torch.Tensor  # [G, N] float, 1 on the tokens that count
    modality: str  # "image" or "text": which head and token embedding
    settings: SamplingSettings
    max_tokens: int  # the segment's token limit (dr_grpo's normaliser)
    sampler_logprobs: torch.Tensor  # [G, N] as the sampler reported them
    old_logprobs: torch.Tensor | None = None  # [G, N] the first pass's own (before any update of this batch)
    reference_logprobs: torch.Tensor | None = None  # [G, N] untruncated, under the reference (beta > 0)


@dataclass
class Group:
    segments: dict[str, Segment]
    reference_features: torch.Tensor | None  # the references' SigLIP features, computed once for every row
    rewards: torch.Tensor  # [G] weighted total; NaN where a reward failed
    components: dict[str, torch.Tensor]  # [G] per reward
    truncated: torch.Tensor  # [G] bool: the reasoning hit max_reasoning_tokens
    reasonings: list[str]
    images: torch.Tensor
    advantages: torch.Tensor | None = None  # [G], set once the step's rewards are known on every process


def _parsed(reasoning: str) -> tuple[str, str, bool]:
    """(subject, scene, format_ok) of a rollout's reasoning, in Grounding's field order."""
    parsed = parse_reasoning(reasoning)
    return parsed.subject, parsed.scene, parsed.format_ok


def modality(mm, name: str) -> Modality:
    return Modality.image(mm) if name == "image" else Modality.text(mm)


def segment_logits(mm, segment: Segment, features: torch.Tensor | None) -> torch.Tensor:
    """`sequence_logits` of a segment's tokens under `mm` (the policy or the reference), whose own embeddings and
    aligner embed the prompt; a sequence shared by several rows is embedded once."""
    embedded: dict[int, torch.Tensor] = {}

    def rows(unconditional: bool):
        for sequence in segment.sequences:
            key = id(sequence)
            if key not in embedded:
                embedded[key] = embed_sequence(mm, sequence, unconditional, reference_features=features)
            yield embedded[key]

    prefix = batch_prefix(mm, list(rows(False)))
    unconditional = None
    if segment.settings.guided:
        embedded.clear()
        unconditional = batch_prefix(mm, list(rows(True)))
    return sequence_logits(mm, prefix, segment.tokens, modality(mm, segment.modality), segment.settings.guided,
                           unconditional)


def rollout(mm, record: Record, config: GRPOConfig, reward_functions, seeds: tuple[int, int, int],
            clock: PhaseClock | None = None, synced: bool = False) -> Group:
    """G complete X-CoT rollouts for one record: reasoning text (seeded by seeds[0]), under subject_source
    'generate' the subject image conditioned on it (seeds[2]), then image tokens conditioned on both (seeds[1]);
    `clock` times the sampling ("rollout") and the scoring ("reward"); `synced` keeps the ranks of a distributed
    run stepping together until all have stopped."""
    g = config.num_generations
    clock = clock or PhaseClock(mm.device)
    references = record.load_references()
    with torch.no_grad(), clock("rollout"):
        features = mm.understanding_features(references) if references else None
        grounding_sequence = build_sequence(mm, record.prompt, references, stage="ground")
        text_prefix = batch_prefix(mm, [embed_sequence(mm, grounding_sequence, reference_features=features)])
        stops = reasoning_stop_tokens(mm)
        text = sample_tokens(  # the group's G rollouts share the grounding prefix: prefilled once
            mm, text_prefix, Modality.text(mm), config.max_reasoning_tokens, config.reasoning_settings, seeds[0],
            stop_tokens=stops, pad_token=mm.tokens.pad, return_logprobs=True, synced=synced, repeats=g,
        )
        steps = torch.arange(text.tokens.shape[1], device=text.tokens.device)
        text_mask = (steps.unsqueeze(0) < text.lengths.unsqueeze(1)).float()
        last = text.tokens.gather(1, (text.lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        truncated = ~torch.isin(last, torch.tensor(stops, device=last.device))
        reasonings = [
            mm.tokenizer.decode(row[: int(length)], skip_special_tokens=True).strip()
            for row, length in zip(text.tokens, text.lengths)
        ]
        settings = config.image_settings

        def image_rollouts(sequences: list[PromptSequence], seed: int):
            prefix = batch_prefix(mm, [embed_sequence(mm, s, reference_features=features) for s in sequences])
            unconditional = (batch_prefix(mm, [embed_sequence(mm, s, unconditional=True) for s in sequences])
                             if settings.guided else None)
            return sample_tokens(mm, prefix, Modality.image(mm), mm.num_image_tokens, settings, seed,
                                 unconditional=unconditional, return_logprobs=True)

        given = extract_subject(mm, references, config.subject_source)  # None unless 'reference'
        groundings = [Grounding(record.prompt, reasoning, *_parsed(reasoning), references, given)
                      for reasoning in reasonings]
        subject = None
        if config.subject_source == "generate" and references:
            subject_sequences = [generation_sequence(mm, record.prompt, grounding) for grounding in groundings]
            subject = image_rollouts(subject_sequences, seeds[2])
            groundings = [replace(grounding, subject_tokens=subject.tokens[row : row + 1])
                          for row, grounding in enumerate(groundings)]
        image_sequences = [generation_sequence(mm, record.prompt, grounding) for grounding in groundings]
        image = image_rollouts(image_sequences, seeds[1])
        images = mm.decode_image_tokens(image.tokens)
    components = {}
    total = torch.zeros(g)
    with clock("reward"):
        for name, function, weight in reward_functions:
            scores = function(images, references, [record.prompt] * g, reasonings).float().cpu()
            components[name] = scores
            total += weight * scores
    image_mask = torch.ones_like(image.logprobs)
    if config.mask_truncated_completions:
        kept = (~truncated).float().unsqueeze(1)
        text_mask, image_mask = text_mask * kept, image_mask * kept
    segments = {
        "reasoning": Segment([grounding_sequence] * g, text.tokens, text_mask, "text", config.reasoning_settings,
                             config.max_reasoning_tokens, text.logprobs),
        "image": Segment(image_sequences, image.tokens, image_mask, "image", settings, mm.num_image_tokens,
                         image.logprobs),
    }
    if subject is not None:
        segments["subject"] = Segment(subject_sequences, subject.tokens, image_mask, "image", settings,
                                      mm.num_image_tokens, subject.logprobs)
    return Group(segments, features, total, components, truncated.cpu(), reasonings, images)


@torch.no_grad()
def score_reference(policy: Policy, group: Group, names: tuple[str, ...]) -> None:
    """The reference's log-probs of the optimised segments, once per rollout, on the untruncated distributions."""
    with policy.reference() as reference:
        for name in names:
            segment = group.segments[name]
            logits = segment_logits(reference, segment, group.reference_features)
            segment.reference_logprobs = token_logprobs(logits, segment.tokens, segment.settings.untruncated)


def rollout_seeds(config: GRPOConfig, step: int, group: int) -> tuple[int, int, int]:
    """(reasoning, image, subject) seeds of one group, hashed from the run's seed, the step and the group's index over all
    processes, so a resumed or re-sharded run samples the same rollouts and no two groups share a stream (row i
    of a group draws from seed + i, and the hashes are 62 bits apart on average)."""

    def digest(stage: str) -> int:
        key = f"{config.seed}/{step}/{group}/{stage}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 2

    return digest("reasoning"), digest("image"), digest("subject")


def assign_advantages(groups: list[Group], run: Run, config: GRPOConfig) -> torch.Tensor:
    """Advantages of this process's groups from the rewards of every process (scale_rewards 'batch' needs the
    step's std), aggregated as multi_objective_aggregation says; returns the gathered weighted sums [groups over
    all processes, G] for the logs."""
    components = run.gather(torch.stack([torch.stack(list(group.components.values())) for group in groups]))
    weights = torch.tensor([parse_spec(spec)[2] for spec in config.rewards])
    rewards = aggregate_rewards(components, weights, "sum_then_normalize")
    advantages = group_advantages(aggregate_rewards(components, weights, config.multi_objective_aggregation),
                                  config.scale_rewards)
    mine = advantages[run.process_index * len(groups):][: len(groups)]
    for group, row in zip(groups, mine):
        group.advantages = row
    return rewards


def tokens_per_group(groups: list[Group], run: Run, names: tuple[str, ...]) -> dict[str, float]:
    """dapo's normaliser per segment: the step's masked tokens over all processes, per group."""
    sums = torch.tensor([[sum(float(group.segments[name].mask.sum()) for group in groups) for name in names]])
    totals = run.gather(sums).sum(dim=0) / (len(groups) * run.num_processes)
    return {name: max(float(total), 1.0) for name, total in zip(names, totals)}


def policy_loss(policy, group: Group, names: tuple[str, ...], config: GRPOConfig,
                normalisers: dict[str, float] | None = None, clock: PhaseClock | None = None
                ) -> tuple[torch.Tensor, dict]:
    """The GRPO loss of one group over the optimised segments (the engine's forward); `clock` times the
    teacher-forced log-prob passes ("logprobs")."""
    loss, stats = 0.0, {}
    clock = clock or PhaseClock(policy.mm.device)
    for name in names:
        segment = group.segments[name]
        with clock("logprobs"):
            logits = segment_logits(policy.mm, segment, group.reference_features)
            new = token_logprobs(logits, segment.tokens, segment.settings)
            kl_new = None
            if config.beta > 0:
                untruncated = segment.settings.untruncated
                kl_new = new if untruncated == segment.settings else token_logprobs(logits, segment.tokens, untruncated)
        if segment.old_logprobs is None:
            segment.old_logprobs = new.detach()
        part, part_stats = segment_loss(
            new, segment.old_logprobs, segment.mask, group.advantages.to(new.device), config.epsilon,
            config.clip_high, config.loss_type, config.importance_sampling_level, config.beta, kl_new,
            segment.reference_logprobs, segment.max_tokens, (normalisers or {}).get(name),
        )
        part_stats["logprob_gap"] = masked_mean((segment.old_logprobs - segment.sampler_logprobs).abs(), segment.mask)
        loss = loss + part
        stats.update({f"{name}_{key}": value for key, value in part_stats.items()})
    return loss, stats


def nan_group_mean(values: torch.Tensor) -> tuple[float, float]:
    """(mean, mean within-group std) of [groups, G] values, leaving NaNs out."""
    valid = ~torch.isnan(values)
    mean = float(values[valid].mean()) if valid.any() else float("nan")
    stds = [row[keep].std() for row, keep in zip(values, valid) if int(keep.sum()) > 1]
    return mean, float(torch.stack(stds).mean()) if stds else float("nan")


def train(config: GRPOConfig) -> Path:
    """Run GRPO (resuming from output_dir when it holds a checkpoint); returns the final checkpoint folder."""
    from tqdm.auto import tqdm

    from mmr1.loading import load_model

    records = read_records(config.data)
    run = Run("grpo", config, accumulation_steps=config.prompts_per_step)
    reward_functions = build_rewards(config.rewards, device=str(run.device))
    mm = load_model(config.model, dtype="fp32", device=run.device)  # fp32 master weights; bf16 is autocast
    if run.is_main:  # before make_policy, which adds LoRA adapters to the model it counts
        estimate = estimate_step_memory(mm, config, engine=engine_kind(run.accelerator), processes=run.num_processes,
                                        references=max(len(record.references) for record in records))
        print(estimate.report(device_memory(run.device)))
    policy = make_policy(mm, config.model, config.lora, with_reference=config.beta > 0,
                         reference_dtype=torch.bfloat16 if config.dtype == "bf16" else None)
    clock = PhaseClock(run.device)
    normalisers: dict[str, float] = {}
    objective = run.prepare(policy, lambda group, names: policy_loss(policy, group, names, config, normalisers, clock))
    if policy.reference_model is not None:
        policy.reference_model = run.prepare_reference(policy.reference_model)
    order = RecordOrder(len(records), config.seed)
    start = run.resume(order)
    share = config.prompts_per_step
    with tqdm(total=config.steps, initial=start, desc="grpo", unit="step", disable=not run.is_main) as bar:
        for step in range(start + 1, config.steps + 1):
            step_started = time.perf_counter()
            indices = order.take(share * run.num_processes)
            mine = range(run.process_index * share, (run.process_index + 1) * share)
            names = config.segments_at(step)
            mm.model.eval()
            with run.generation_weights(), run.accelerator.autocast():
                groups = [rollout(mm, records[indices[i]], config, reward_functions, rollout_seeds(config, step, i),
                                  clock, synced=run.num_processes > 1) for i in mine]
                if config.beta > 0:
                    with clock("logprobs"):
                        for group in groups:
                            score_reference(policy, group, names)
            rollout_seconds = clock.seconds["rollout"]
            sampled = sum(int(g.segments["reasoning"].mask.sum()) + g.segments["image"].tokens.numel()
                          + (g.segments["subject"].tokens.numel() if "subject" in g.segments else 0) for g in groups)
            rewards = assign_advantages(groups, run, config)
            normalisers.clear()
            if config.loss_type == "dapo":
                normalisers.update(tokens_per_group(groups, run, names))
            mm.model.train()
            losses, stats = [], defaultdict(list)
            for _ in range(config.num_iterations):
                for index, group in enumerate(groups):
                    with run.micro_step(last=index == len(groups) - 1):
                        loss, group_stats = objective(group, names)
                        with clock("backward"):
                            run.backward(loss / len(groups))
                    losses.append(float(loss.detach()))
                    for key, value in group_stats.items():
                        stats[key].append(value)
                run.check_loss(step, sum(losses) / len(losses))
                with clock("optimizer"):
                    grad_norm = run.optimizer_step()
            phases, step_seconds = clock.reset(), time.perf_counter() - step_started
            components = {name: run.gather(torch.stack([group.components[name] for group in groups]))
                          for name in groups[0].components}
            local = [sum(losses) / len(losses), sampled, rollout_seconds,
                     float(sum(int(group.truncated.sum()) for group in groups)),
                     *(sum(values) / len(values) for values in stats.values())]
            totals = run.gather(torch.tensor([local], dtype=torch.float64))
            reward_mean, reward_std = nan_group_mean(rewards)
            bar.update(1)
            bar.set_postfix(reward=f"{reward_mean:.3f}")
            if run.log_due(step):
                line = {"step": step, "loss": float(totals[:, 0].mean()), "reward_mean": reward_mean,
                        "reward_std": reward_std, "reward_nan": int(torch.isnan(rewards).sum()),
                        "reasoning_truncated": float(totals[:, 3].sum()) / rewards.numel(),
                        "segments": list(names), "lr": run.learning_rate, "grad_norm": grad_norm,
                        "rollout_tokens_per_s": round(float(totals[:, 1].sum() / totals[:, 2].max()), 1),
                        "step_seconds": round(step_seconds, 3),
                        "samples_per_s": round(rewards.numel() / step_seconds, 3),
                        **{f"seconds_{phase}": round(seconds, 3) for phase, seconds in phases.items()},
                        **{key: float(totals[:, 4 + k].mean()) for k, key in enumerate(stats)}}
                for name, values in components.items():
                    line[f"{name}_mean"], line[f"{name}_std"] = nan_group_mean(values)
                run.log(line)
            if run.samples_due(step):
                captions = [f"{float(value):.3f}" for value in groups[0].rewards]
                run.save_samples(step, sample_grid(groups[0].images, captions))
            run.end_of_step(step, order)
    return run.finish(["reward_mean", *(f"{name}_mean" for name, _, _ in reward_functions), "image_kl", "subject_kl",
                       "reasoning_kl"])


def main(argv: list[str] | None = None) -> int:
    return recipe_main(GRPOConfig, "GRPO for X-CoT personalization.", train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
