"""GRPO on a tiny model: the loss's algebra, rollouts, configs and a short run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from training.config import ConfigError, build_config
from training.data import Record, read_records, write_records
from training.grpo import GRPOConfig, rollout, segment_loss, train
from training.rewards import build_reward, redness

def test_segment_loss_algebra():
    old = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    advantages = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2)
    loss, stats = segment_loss(old.clone(), old, None, mask, advantages, 0.2, 0.0)
    assert loss.item() == pytest.approx(0.0) and stats["clip_fraction"] == 0.0  # ratio 1: -mean(A) = 0
    new = old + torch.tensor([[0.5, 0.5], [0.0, 0.0]])  # ratio e^0.5 for row 0, clipped at 1.2
    loss, stats = segment_loss(new, old, None, mask, advantages, 0.2, 0.0)
    assert loss.item() == pytest.approx((-1.2 + 1.0) / 2) and stats["clip_fraction"] == 0.5
    reference = old - 0.1  # k3 = e^(ref-new) - (ref-new) - 1 per token
    loss, stats = segment_loss(old.clone(), old, reference, mask, advantages, 0.2, 0.5)
    k3 = np.exp(-0.1) + 0.1 - 1
    assert stats["kl"] == pytest.approx(k3, rel=1e-5) and loss.item() == pytest.approx(0.5 * k3, rel=1e-5)
    half = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # masked tokens do not count
    loss, _ = segment_loss(new, old, None, half, advantages, 0.2, 0.0)
    assert loss.item() == pytest.approx((-1.2 + 1.0) / 2)


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
                    [("redness", redness, 1.0)], seed=3)
    assert group.images.shape == (8, 64, 64, 3) and len(group.reasonings) == 8
    rewards = group.rewards
    torch.testing.assert_close(group.advantages, (rewards - rewards.mean()) / (rewards.std() + 1e-4))
    text = group.segments["reasoning"]
    assert torch.equal(text.mask.sum(1).long(), (text.mask > 0).sum(1))
    assert (text.old_logprobs * (1 - text.mask)).abs().sum() == 0  # nothing after the stop token


def test_a_short_run_writes_metrics_and_a_loadable_checkpoint(learnable_model, prompts, tmp_path):
    from mmr1.loading import load_model

    final = train(config(learnable_model, prompts, output_dir=str(tmp_path / "run"), steps=2, segments="both",
                         learning_rate=1e-3, rewards=["redness@1", "format@0.1"]))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert {"reward_mean", "reward_std", "redness_mean", "format_std", "image_kl", "reasoning_clip_fraction"} <= set(lines[0])
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
    return torch.stack([rollout(mm, record, settings, [("redness", redness, 1.0)], seed=10_000 + 97 * k).rewards
                        for k in range(groups)])


LEARNING_STEPS = 20
REQUIRED_GAIN = 3.0  # in group standard deviations of the initial policy


def test_grpo_raises_the_reward_of_fresh_samples_by_three_group_stds(learnable_model, prompts, tmp_path):
    """Redness reward, G = 8, 20 steps of lr 3e-3 on the image segment: the mean reward of fresh samples must
    rise by at least 3 of the initial policy's within-group standard deviations (measured: about +6.7)."""
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
