"""The shipped config files and the config machinery shared by the recipes."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest

from training.config import TEMPLATES, build_config, template, tomllib


@pytest.mark.parametrize("name", ["grpo.toml", "sft.toml"])
def test_shipped_configs_are_current_and_parse(name):
    """The files in training/configs are what `python -m training.config` writes: every knob, documented."""
    text = (Path(__file__).resolve().parents[2] / "training" / "configs" / name).read_text()
    assert text == template(name), "run python -m training.config to refresh training/configs"
    module, cls, _, _ = TEMPLATES[name]
    config_class = getattr(importlib.import_module(module), cls)
    assert all(f"\n# {field.metadata['help']}\n" in text for field in dataclasses.fields(config_class))
    assert build_config(config_class, tomllib.loads(text)).steps >= 1


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_accelerate_configs_are_valid_for_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(Path(__file__).resolve().parents[2] / "training/configs/accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == {"ddp": "MULTI_GPU", "fsdp": "FSDP"}.get(name, "DEEPSPEED")
    assert config.mixed_precision == "no"  # the recipe's dtype knob decides
