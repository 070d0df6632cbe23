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
    """256 image tokens over 16 codes: the image's redness averages over many tokens, so a group's spread is
    small next to what choosing redder codes can gain, and the 16-way choice is learnt in few steps."""
    from mmr1.tiny import TinySpec, make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("grpo_model"), spec=TinySpec(vq_codebook_size=16, image_size=64))


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
    assert load_model(final, device="cpu").num_image_tokens == 256
    assert json.loads((final / "mmr1_training.json").read_text())["recipe"] == "grpo"


def test_shipped_config_lists_every_knob_and_parses():
    from pathlib import Path

    from training.config import tomllib

    text = (Path(__file__).resolve().parents[2] / "training" / "configs" / "grpo.toml").read_text()
    assert all(f"{name} =" in text for name in GRPOConfig.__dataclass_fields__)
    assert build_config(GRPOConfig, tomllib.loads(text)).num_generations == 8


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
