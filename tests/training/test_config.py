"""The shipped config files and the config machinery shared by the recipes."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest

from training.config import build_config, tomllib

# (module holding TEMPLATES, CONFIGS and template(), file): the kit's recipes and the world's
SHIPPED_CONFIGS = [("training.config", "grpo.toml"), ("training.config", "sft.toml"),
                   ("training.world.recipes", "grpo.toml"), ("training.world.recipes", "sft.toml"),
                   ("training.world.recipes", "pipeline.toml")]


@pytest.mark.parametrize("templates, name", SHIPPED_CONFIGS)
def test_shipped_configs_are_current_and_parse(templates, name):
    """The files in training/configs and training/world/configs are what `python -m training.config` and
    `python -m training.world.recipes` write: every knob, documented."""
    templates = importlib.import_module(templates)
    text = (templates.CONFIGS / name).read_text()
    assert text == templates.template(name), f"run python -m {templates.__name__} to refresh {templates.CONFIGS}"
    module, cls, _, _ = templates.TEMPLATES[name]
    config_class = getattr(importlib.import_module(module), cls)
    assert all(f"\n# {field.metadata['help']}\n" in text for field in dataclasses.fields(config_class))
    config = build_config(config_class, tomllib.loads(text))
    assert getattr(config, "steps", getattr(config, "vq_steps", 0)) >= 1  # the pipeline counts steps per stage


def test_every_shipped_config_is_tested():
    from training.config import CONFIGS
    from training.world.recipes import CONFIGS as WORLD_CONFIGS

    shipped = {(module, path.name) for module, folder in (("training.config", CONFIGS),
                                                         ("training.world.recipes", WORLD_CONFIGS))
               for path in folder.glob("*.toml")}
    assert shipped == set(SHIPPED_CONFIGS)


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_accelerate_configs_are_valid_for_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(Path(__file__).resolve().parents[2] / "training/configs/accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == {"ddp": "MULTI_GPU", "fsdp": "FSDP"}.get(name, "DEEPSPEED")
    assert config.mixed_precision == "no"  # the recipe's dtype knob decides
