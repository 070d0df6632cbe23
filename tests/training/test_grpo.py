"""GRPO on a tiny model: rollouts, configs, a short run, what the trainer gets right where users train (fp32
master weights under bf16, a reference scored by itself, on-policy ratios, re-embedded prefixes, seeds, metrics),
and that it learns. The loss's algebra is in test_grpo_loss.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from training.config import ConfigError, build_config
from training.data import Record, read_records, write_records
from training.grpo import GRPOConfig, Group, assign_advantages, rollout, rollout_seeds, train
from training.rewards import build_reward, build_rewards, redness


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grpo_data")
    Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8)).save(folder / "ref.png")
    write_records(folder / "prompts.jsonl", [Record(id="a", references=(folder / "ref.png",), prompt="a photo of it")])
    return folder / "prompts.jsonl"


@pytest.fixture(scope="module")
def learnable_model(tmp_path_factory):
    """256 image tokens over 16 codes, decoded by a VQ with 64 channels.

    Many tokens make a group's reward spread small next to what choosing redder codes can gain. The channels
    matter: the VQ decoder ends in GroupNorm(32), which on 32 channels normalises each channel over the image and
    so fixes the image's mean colour whatever the tokens are; with 64 channels (pairs) the colour is learnable.
    """
    from mmr1.tiny import TinySpec, make_tiny_checkpoint

    spec = TinySpec(vq_codebook_size=16, image_size=64, vq_base_channels=64, vq_channel_multiplier=(1, 1, 1))
    return make_tiny_checkpoint(tmp_path_factory.mktemp("grpo_model"), spec=spec)


def config(model, prompts, **values) -> GRPOConfig:
    base = {"model": str(model), "data": str(prompts), "num_generations": 8, "cfg_scale": 1.0,
            "max_reasoning_tokens": 8, "device": "cpu"}
    return build_config(GRPOConfig, {**base, **values})


def test_rollout_groups(learnable_model, prompts):
    from mmr1.loading import load_model

    mm = load_model(learnable_model, device="cpu")
    group = rollout(mm, read_records(prompts)[0], config(learnable_model, prompts, cfg_scale=3.0),
                    [("redness", redness, 1.0)], seeds=(3, 4))
    assert group.images.shape == (8, 64, 64, 3) and len(group.reasonings) == 8
    torch.testing.assert_close(group.rewards, redness(group.images, None, None, None))
    text = group.segments["reasoning"]
    assert torch.equal(text.mask.sum(1).long(), (text.mask > 0).sum(1))
    assert (text.sampler_logprobs * (1 - text.mask)).abs().sum() == 0  # nothing after the stop token
    image = group.segments["image"]
    assert image.tokens.shape == (8, 256) and len(image.sequences) == 8 and image.settings.cfg_scale == 3.0


def test_generate_source_rolls_out_the_subject_as_a_segment_the_image_attends_to(tiny_hf_dir, prompts, tmp_path):
    from mmr1.loading import load_model
    from mmr1.prompting import VQ_IMAGE

    mm = load_model(tiny_hf_dir, device="cpu")
    settings = config(tiny_hf_dir, prompts, num_generations=4, subject_source="generate", cfg_scale=2.0)
    assert settings.segments_at(1) == ("reasoning", "subject", "image")
    alternate = config(tiny_hf_dir, prompts, subject_source="generate", segments="alternate", alternate_every=1)
    assert [alternate.segments_at(step) for step in (1, 2)] == [("reasoning",), ("subject", "image")]
    group = rollout(mm, read_records(prompts)[0], settings, [("redness", redness, 1.0)], seeds=(3, 4, 5))
    subject, image = group.segments["subject"], group.segments["image"]
    assert subject.tokens.shape == image.tokens.shape == (4, mm.num_image_tokens)
    assert subject.settings.cfg_scale == 2.0 and torch.isfinite(subject.sampler_logprobs).all()
    for row in range(4):
        sequence = image.sequences[row]  # each row's final image attends to its own drawn subject
        torch.testing.assert_close(sequence.subject_tokens[0], subject.tokens[row])
        assert int((sequence.slot_kinds == VQ_IMAGE).sum()) == mm.num_image_tokens
        assert subject.sequences[row].subject_tokens is None  # the subject is drawn after the reasoning alone
    assert not torch.equal(subject.tokens[0], subject.tokens[1])  # row i draws from seed + i
    again = rollout(mm, read_records(prompts)[0], settings, [("redness", redness, 1.0)], seeds=(3, 4, 5))
    assert torch.equal(again.segments["subject"].tokens, subject.tokens)
    with pytest.raises(ConfigError, match="subject_source = 'generate'"):
        config(tiny_hf_dir, prompts, segments="subject")
    train(config(tiny_hf_dir, prompts, num_generations=2, subject_source="generate", segments="subject", steps=1,
                 output_dir=str(tmp_path / "run")))
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["segments"] == ["subject"] and "subject_kl" in line and "image_kl" not in line


def test_a_short_run_writes_metrics_and_a_loadable_checkpoint(learnable_model, prompts, tmp_path):
    from mmr1.loading import load_model

    final = train(config(learnable_model, prompts, output_dir=str(tmp_path / "run"), steps=2, segments="both",
                         learning_rate=1e-3, rewards=["redness@1", "format@0.1"]))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert {"reward_mean", "reward_std", "redness_mean", "format_std", "image_kl", "reasoning_clip_ratio",
            "image_clip_ratio_low", "image_clip_ratio_high", "image_logprob_gap", "reward_nan"} <= set(lines[0])
    phases = [f"seconds_{phase}" for phase in ("rollout", "reward", "logprobs", "backward", "optimizer")]
    for line in lines:  # where each step's time went, within the step's own wall time
        assert all(line[phase] >= 0 for phase in phases) and line["seconds_rollout"] > 0 < line["seconds_backward"]
        assert sum(line[phase] for phase in phases) <= line["step_seconds"] + 1e-3
        assert line["samples_per_s"] == pytest.approx(8 / line["step_seconds"], rel=0.01)
    assert load_model(final, device="cpu").num_image_tokens == 256
    assert json.loads((final / "mmr1_training.json").read_text())["recipe"] == "grpo"


def test_alternating_segments():
    settings = GRPOConfig(model="m", data="d", segments="alternate", alternate_every=2)
    assert [settings.segments_at(step) for step in range(1, 6)] == [
        ("reasoning",), ("reasoning",), ("image",), ("image",), ("reasoning",)]
    assert GRPOConfig(model="m", data="d").segments_at(1) == ("reasoning", "image")


@pytest.mark.parametrize("values, message", [
    ({"num_generations": 1}, "num_generations"), ({"segments": "text"}, "segments"), ({"rewards": []}, "rewards"),
    ({"dtype": "fp8"}, "dtype"), ({"subject_source": "dream"}, "subject_source"), ({"steps": 0}, "steps"),
])
def test_bad_configs_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(GRPOConfig, {"model": "m", "data": "d", **values})


def test_unknown_reward_is_an_error():
    from mmr1.errors import InputError

    with pytest.raises(InputError, match="blueness"):
        build_reward("blueness@1")
    assert build_reward("format@0.5")[2] == 0.5


def fresh_rewards(folder, prompts, groups: int = 4) -> torch.Tensor:
    """Rewards [groups, G] of new rollouts (seeds the training never used) from the checkpoint in `folder`."""
    from mmr1.loading import load_model

    mm = load_model(folder, device="cpu")
    record = read_records(prompts)[0]
    settings = config(folder, prompts)
    return torch.stack([rollout(mm, record, settings, [("redness", redness, 1.0)], seeds=(10_000 + k, 20_000 + k)).rewards
                        for k in range(groups)])


LEARNING_STEPS = 20
REQUIRED_GAIN = 3.0  # in group standard deviations of the initial policy


def test_grpo_raises_the_reward_of_fresh_samples_by_three_group_stds(learnable_model, prompts, tmp_path):
    """Redness reward, G = 8, 20 steps of lr 3e-3 on the image segment: the mean reward of fresh samples must
    rise by at least 3 of the initial policy's within-group standard deviations (measured: +5.5 after issue 14)."""
    before = fresh_rewards(learnable_model, prompts)
    group_std = float(before.std(dim=1).mean())
    final = train(config(learnable_model, prompts, output_dir=str(tmp_path / "run"), steps=LEARNING_STEPS,
                         segments="image", learning_rate=3e-3, beta=0.0, seed=1))
    after = fresh_rewards(final, prompts)
    gain = (float(after.mean()) - float(before.mean())) / group_std
    print(f"GRPO gain after {LEARNING_STEPS} steps: {gain:+.2f} group std "
          f"(mean {float(before.mean()):.4f} -> {float(after.mean()):.4f}, group std {group_std:.4f})")
    assert gain >= REQUIRED_GAIN
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == LEARNING_STEPS and lines[-1]["reward_mean"] > lines[0]["reward_mean"]


# -- what issue 14 found: each test fails on the trainer before it was fixed ---------------------------------------

TRAINABLE_PREFIXES = ("model.language_model.", "model.aligner.", "model.generation_aligner.", "model.generation_head.",
                      "model.generation_embeddings.", "lm_head.")
FROZEN_PREFIXES = ("model.vision_model.", "model.vqmodel.")


def test_bf16_training_keeps_fp32_master_weights_so_every_trainable_tensor_moves(learnable_model, prompts, tmp_path,
                                                                                  monkeypatch):
    """On a bf16 GPU `dtype = auto` loads bf16 weights, and AdamW at lr 1e-6 then loses most updates (below
    |w|/256). Emulated: 'auto' is forced to mean bf16; one step of bf16 autocast must move every trainable
    tensor (embeddings and aligners included: the prefix is re-embedded in the loss) and no frozen one."""
    from safetensors.torch import load_file

    import mmr1.loading

    resolve = mmr1.loading.resolve_dtype
    monkeypatch.setattr(mmr1.loading, "resolve_dtype",
                        lambda dtype, device: torch.bfloat16 if dtype == "auto" else resolve(dtype, device))
    final = train(config(learnable_model, prompts, output_dir=str(tmp_path / "run"), steps=1, dtype="bf16",
                         learning_rate=1e-6, segments="both", cfg_scale=3.0, beta=0.0, max_reasoning_tokens=6))
    before, after = load_file(learnable_model / "model.safetensors"), load_file(final / "model.safetensors")
    assert all(tensor.dtype == torch.float32 for tensor in after.values())
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    trainable = {name for name in before if name.startswith(TRAINABLE_PREFIXES)}
    assert trainable and moved == trainable, sorted(trainable ^ moved)[:10]


def perturbed_policy(folder):
    """A policy with a reference, whose heads and embeddings (not its decoder layers) were then changed."""
    from mmr1.loading import load_model
    from training.policy import make_policy

    mm = load_model(folder, device="cpu", dtype="fp32")
    policy = make_policy(mm, folder, None, with_reference=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in (mm.model.model.generation_head, mm.model.lm_head, mm.model.model.generation_embeddings,
                       mm.model.model.language_model.embed_tokens, mm.model.model.generation_aligner,
                       mm.model.model.aligner):
            for parameter in module.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return policy


def test_the_reference_is_scored_by_the_reference_alone(learnable_model, prompts):
    """Perturbing only the policy's heads and embeddings once gave a logged KL of 0: the reference borrowed
    them. Its log-probs must equal those of the untouched checkpoint, and the KL must see the change."""
    from mmr1.loading import load_model
    from training.grpo import policy_loss, score_reference, segment_logits
    from mmr1.sampling import token_logprobs

    policy = perturbed_policy(learnable_model)
    settings = config(learnable_model, prompts, cfg_scale=3.0, top_k=4, beta=0.1)
    group = rollout(policy.mm, read_records(prompts)[0], settings, [("redness", redness, 1.0)], seeds=(1, 2))
    score_reference(policy, group, ("reasoning", "image"))
    truth = load_model(learnable_model, device="cpu", dtype="fp32")
    for name in ("reasoning", "image"):
        segment = group.segments[name]
        with torch.no_grad():
            expected = token_logprobs(segment_logits(truth, segment, truth.understanding_features(
                read_records(prompts)[0].load_references())), segment.tokens, segment.settings.untruncated)
            torch.testing.assert_close(segment.reference_logprobs, expected, atol=1e-5, rtol=1e-5)
    # top_k = 4 with beta > 0: some sampled tokens lie outside the reference's top 4 (-inf there, an inf KL);
    # the KL is taken on the untruncated distributions, so the loss stays finite
    image = group.segments["image"]
    with torch.no_grad():
        truncated = token_logprobs(segment_logits(truth, image, group.reference_features), image.tokens, image.settings)
    assert torch.isinf(truncated).any() and torch.isfinite(image.reference_logprobs).all()
    group.advantages = torch.zeros(8)
    loss, stats = policy_loss(policy, group, ("reasoning", "image"), settings)
    assert stats["image_kl"] > 0.1 and stats["reasoning_kl"] > 0.1 and torch.isfinite(loss)


def test_the_reference_leaves_the_frozen_towers_out_and_holds_bf16_when_training_in_bf16(learnable_model):
    from mmr1.loading import load_model
    from training.policy import make_policy

    mm = load_model(learnable_model, device="cpu", dtype="fp32")
    policy = make_policy(mm, learnable_model, None, with_reference=True, reference_dtype=torch.bfloat16)
    reference = policy.reference_model
    assert isinstance(reference.model.vision_model, torch.nn.Identity)
    assert isinstance(reference.model.vqmodel, torch.nn.Identity)
    trainable = sum(p.numel() for p in mm.model.parameters() if p.requires_grad)
    assert sum(p.numel() for p in reference.parameters()) == trainable  # a copy of what trains, nothing more
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in reference.parameters())
    assert next(mm.model.parameters()).dtype == torch.float32
    assert reference.lm_head.weight.data_ptr() != mm.model.lm_head.weight.data_ptr()


def test_on_policy_first_pass_has_ratio_one_in_bf16(learnable_model, prompts, tmp_path):
    """Old log-probs were the sampler's, so under bf16 at cfg 5 some image tokens started outside the clip range.
    With new.detach() as old the first pass clips nothing; the sampler's gap is logged."""
    train(config(learnable_model, prompts, output_dir=str(tmp_path / "run"), steps=1, dtype="bf16", cfg_scale=5.0,
                 epsilon=0.01, beta=0.0, max_reasoning_tokens=6))
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["image_clip_ratio"] == 0.0 and line["reasoning_clip_ratio"] == 0.0
    assert 0.0 <= line["image_logprob_gap"] < 1.0 and 0.0 <= line["reasoning_logprob_gap"] < 1.0


def test_the_prefix_is_re_embedded_so_aligner_and_prompt_embeddings_get_gradients(learnable_model, prompts):
    from mmr1.loading import load_model
    from training.grpo import policy_loss
    from training.policy import make_policy

    mm = load_model(learnable_model, device="cpu", dtype="fp32")
    policy = make_policy(mm, learnable_model, None, with_reference=False)
    settings = config(learnable_model, prompts, cfg_scale=3.0, beta=0.0)
    group = rollout(mm, read_records(prompts)[0], settings, [("redness", redness, 1.0)], seeds=(5, 6))
    group.advantages = torch.linspace(-1, 1, 8)
    group.segments["image"].old_logprobs = group.segments["image"].sampler_logprobs - 0.05  # a ratio != 1
    loss, _ = policy_loss(policy, group, ("image",), settings)
    loss.backward()
    for module in (mm.model.model.aligner, mm.model.model.language_model.embed_tokens):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_reference_log_probs_once_per_rollout_and_none_without_beta(learnable_model, prompts, tmp_path, monkeypatch):
    import training.grpo
    import training.policy

    calls = []
    score = training.grpo.score_reference
    monkeypatch.setattr(training.grpo, "score_reference", lambda *args: calls.append(1) or score(*args))
    train(config(learnable_model, prompts, output_dir=str(tmp_path / "kl"), steps=2, num_iterations=2,
                 prompts_per_step=2, beta=0.05, max_reasoning_tokens=4))
    assert len(calls) == 2 * 2  # steps x groups, not x num_iterations
    monkeypatch.setattr(training.policy, "frozen_reference", lambda *args: pytest.fail("beta = 0 built a reference"))
    train(config(learnable_model, prompts, output_dir=str(tmp_path / "no_kl"), steps=1, beta=0.0,
                 max_reasoning_tokens=4))


def test_metrics_are_means_over_the_steps_groups(learnable_model, prompts, tmp_path, monkeypatch):
    """The logged loss statistics were the last group's; they are the mean over groups (and processes)."""
    import training.grpo

    seen = []
    loss_of = training.grpo.policy_loss

    def recording(*args, **kwargs):
        loss, stats = loss_of(*args, **kwargs)
        seen.append(stats)
        return loss, stats

    monkeypatch.setattr(training.grpo, "policy_loss", recording)
    train(config(learnable_model, prompts, output_dir=str(tmp_path / "run"), steps=1, prompts_per_step=3,
                 segments="image", beta=0.05, cfg_scale=2.0, max_reasoning_tokens=4, learning_rate=1e-2))
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert len(seen) == 3 and len({stats["image_logprob_gap"] for stats in seen}) > 1
    for key in ("image_kl", "image_clip_ratio", "image_logprob_gap"):
        assert line[key] == pytest.approx(sum(stats[key] for stats in seen) / 3)


def test_nan_rewards_are_masked_and_counted(learnable_model, prompts, tmp_path, monkeypatch):
    import training.rewards

    def sometimes_nan(images, references, prompts, reasonings):
        scores = redness(images, references, prompts, reasonings)
        scores[0] = float("nan")
        return scores

    monkeypatch.setitem(training.rewards.PROGRAMMATIC, "sometimes_nan", sometimes_nan)
    final = train(config(learnable_model, prompts, output_dir=str(tmp_path / "run"), steps=1, rewards=["sometimes_nan@1"],
                         segments="image", beta=0.0, max_reasoning_tokens=4))
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["reward_nan"] == 1 and math.isfinite(line["reward_mean"]) and math.isfinite(line["loss"])
    from safetensors.torch import load_file

    assert all(torch.isfinite(tensor).all() for tensor in load_file(final / "model.safetensors").values())


def test_truncated_reasoning_is_masked_when_asked(learnable_model, prompts):
    from mmr1.loading import load_model

    mm = load_model(learnable_model, device="cpu")
    settings = config(learnable_model, prompts, max_reasoning_tokens=1, mask_truncated_completions=True)
    group = rollout(mm, read_records(prompts)[0], settings, [("redness", redness, 1.0)], seeds=(7, 8))
    truncated = group.truncated
    assert truncated.any()  # one token leaves almost every row short of its stop token
    for segment in group.segments.values():
        assert torch.equal(segment.mask.sum(1) == 0, truncated | (segment.mask.sum(1) == 0))
        assert (segment.mask[truncated] == 0).all()


def test_the_references_features_are_computed_once_per_group(learnable_model, prompts, monkeypatch):
    from mmr1.loading import load_model

    mm = load_model(learnable_model, device="cpu")
    calls = []
    features = mm.understanding_features
    monkeypatch.setattr(mm, "understanding_features", lambda images: calls.append(len(images)) or features(images))
    rollout(mm, read_records(prompts)[0], config(learnable_model, prompts, cfg_scale=3.0), [("redness", redness, 1.0)],
            seeds=(1, 2))
    assert calls == [1]  # one reference, once, for the grounding row and the G image rows


def test_rollout_seeds_never_repeat_over_many_groups_and_steps():
    """The old linear seeds reused 16,632 row streams in 199 steps of 16 groups (8 GPUs x 2 prompts)."""
    settings = GRPOConfig(model="m", data="d", seed=0, num_generations=8)
    streams = set()
    for step in range(1, 201):
        for group in range(16):
            for seed in rollout_seeds(settings, step, group):
                streams.update(seed + row for row in range(settings.num_generations))
    assert len(streams) == 200 * 16 * 3 * 8  # reasoning, image and subject streams
    assert rollout_seeds(settings, 3, 1) == rollout_seeds(settings, 3, 1) != rollout_seeds(settings, 3, 2)


@pytest.mark.parametrize("key, value", [
    ("temperature", 0.0), ("reasoning_temperature", 0.0), ("temperature", float("inf")), ("cfg_scale", 0.5),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("epsilon_high", -0.1), ("loss_type", "ppo"),
    ("scale_rewards", "rank"), ("importance_sampling_level", "chunk"), ("beta", float("nan")),
    ("multi_objective_aggregation", "max"),
])
def test_sampling_and_loss_knobs_are_checked_when_the_config_is_read(key, value):
    with pytest.raises(ConfigError, match=key):
        build_config(GRPOConfig, {"model": "m", "data": "d", key: value})


class OneProcess:
    """The engine's Run as one process sees it: gathering returns this process's own tensor."""

    process_index, num_processes = 0, 1

    @staticmethod
    def gather(tensor):
        return tensor


@pytest.mark.parametrize("aggregation, favoured", [("sum_then_normalize", 1), ("normalize_then_sum", 0)])
def test_the_aggregation_decides_which_rollout_the_advantages_favour(aggregation, favoured):
    # redness prefers rollout 1 by a wide margin, format prefers rollout 0 by a narrow one, weighted twice
    components = {"redness": torch.tensor([0.0, 10.0]), "format": torch.tensor([0.1, 0.0])}
    group = Group(segments={}, reference_features=None, rewards=components["redness"] + 2 * components["format"],
                  components=components, truncated=torch.zeros(2, dtype=torch.bool), reasonings=["", ""], images=None)
    settings = build_config(GRPOConfig, {"model": "m", "data": "d", "rewards": ["redness@1", "format@2"],
                                         "multi_objective_aggregation": aggregation})
    logged = assign_advantages([group], OneProcess(), settings)
    torch.testing.assert_close(logged, torch.tensor([[0.2, 10.0]]))  # the logs keep the weighted sum either way
    assert int(group.advantages.argmax()) == favoured


def test_two_rewards_of_one_kind_keep_separate_metrics():
    assert [name for name, _, _ in build_rewards(["format@1", "redness@1", "format@0.5"])] == [
        "format", "redness", "format_2"]


@pytest.mark.parametrize("options", [
    {"loss_type": "dapo", "epsilon_high": 0.28}, {"loss_type": "dr_grpo", "scale_rewards": "none"},
    {"loss_type": "bnpo", "scale_rewards": "batch", "importance_sampling_level": "sequence", "num_iterations": 2},
    {"multi_objective_aggregation": "normalize_then_sum", "rewards": ["redness@1", "format@0.5"]},
])
def test_trl_options_train(learnable_model, prompts, tmp_path, options):
    train(config(learnable_model, prompts, output_dir=str(tmp_path / "run"), steps=1, prompts_per_step=2,
                 max_reasoning_tokens=4, beta=0.02, **options))
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(line["loss"]) and line["image_kl"] >= 0
