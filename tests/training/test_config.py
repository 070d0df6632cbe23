"""The shipped config files and the config machinery shared by the recipes."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest
import torch

from training.config import ConfigError, build_config, tomllib

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


# -- every knob checked when the config is read, named by its key, before any model loads ----------------------


def float_knobs(cls) -> list[str]:
    import typing

    return [name for name, hint in typing.get_type_hints(cls).items() if float in (hint, *typing.get_args(hint))]


RECIPES = {"sft": "training.sft", "grpo": "training.grpo"}


@pytest.mark.parametrize("recipe, name", [(recipe, name) for recipe in RECIPES for name in float_knobs(
    getattr(importlib.import_module(RECIPES[recipe]), f"{recipe.upper()}Config"))])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_no_float_knob_takes_nan_or_infinity(recipe, name, value):
    """learning_rate = inf, text_weight = nan or lora_alpha = nan trained and exported NaN weights."""
    cls = getattr(importlib.import_module(RECIPES[recipe]), f"{recipe.upper()}Config")
    with pytest.raises(ConfigError, match=f"config key '{name}' must be a finite number"):
        build_config(cls, {"model": "m", "data": "d", name: value})


def error_line(main, argv: list[str], capsys) -> str:
    """`main(argv)` (a recipe's command line) exits 2 with exactly one `error:` line, which it returns."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("recipe, key, value, fragment", [
    ("sft", "learning_rate", "inf", "finite"), ("sft", "learning_rate", "nan", "finite"),
    ("sft", "learning_rate", "-1e-4", ">= 0"), ("sft", "text_weight", "nan", "finite"),
    ("sft", "image_weight", "-1.0", ">= 0"), ("sft", "weight_decay", "-0.1", ">= 0"),
    ("sft", "max_grad_norm", "-1.0", ">= 0"), ("sft", "lora_alpha", "nan", "> 0"),
    ("sft", "seed", "-1", "[0, 4294967295]"), ("sft", "seed", str(2**70), str(2**70)),
    ("sft", "lora_targets", '["q_proj", "qproj"]', "'q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj'"),
    ("grpo", "rewards", '["redness@nan"]', "redness@nan"), ("grpo", "seed", str(2**40), "[0, 4294967295]"),
    ("grpo", "cfg_scale", "inf", ">= 1"), ("grpo", "temperature", "inf", "> 0"), ("grpo", "top_p", "nan", "(0.0, 1.0]"),
    ("grpo", "top_k", "-1", ">= 0"), ("grpo", "reasoning_temperature", "0.0", "rollouts must be sampled"),
])
def test_bad_settings_end_in_one_error_line_naming_the_key_before_the_model_loads(recipe, key, value, fragment,
                                                                                   monkeypatch, capsys):
    """Each of these trained NaN weights, or failed as a traceback or after the model loaded; GRPO's sampling knobs
    are named by their config keys, not by the CLI's option names."""

    def load_model(*args, **kwargs):
        raise AssertionError("the model loaded before the config was checked")

    monkeypatch.setattr("mmr1.loading.load_model", load_model)
    line = error_line(importlib.import_module(RECIPES[recipe]).main,
                      ["--model", "m", "--data", "d.jsonl", f"--{key}={value}"], capsys)
    assert f"config key '{key}'" in line and fragment in line, line


def test_the_sampling_knobs_take_the_ranges_of_the_clis_options():
    """One range per setting: GRPO's cfg_scale, top_k and top_p are the sampler's, which `python -m mmr1` checks
    its --cfg, --top-k and --top-p against; the recipe's temperatures exclude only greedy sampling."""
    from mmr1.cli import OPTION_RANGES
    from mmr1.sampling import SAMPLING_RANGES
    from training.grpo import GRPOConfig

    rules = {field.name: field.metadata.get("range") for field in dataclasses.fields(GRPOConfig)}
    for key, option in (("cfg_scale", "cfg"), ("top_k", "top_k"), ("top_p", "top_p")):
        assert rules[key] is SAMPLING_RANGES[key] is OPTION_RANGES[option]
    for key in ("temperature", "reasoning_temperature"):
        assert 0.0 not in rules[key] and 0.0 in SAMPLING_RANGES["temperature"]
        assert all((value in rules[key]) == (value in OPTION_RANGES["temperature"]) for value in (1e-6, 1.0, 1e6))


def test_a_recipe_that_changes_a_default_keeps_the_knobs_range_and_help_lists_it(capsys):
    from training.sft import SFTConfig, main

    assert SFTConfig.__dataclass_fields__["learning_rate"].metadata.get("range") is None  # only the default changes
    with pytest.raises(ConfigError, match="learning_rate"):
        build_config(SFTConfig, {"model": "m", "data": "d", "learning_rate": -1.0})
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "AdamW peak learning rate (default: 0.0001; a finite number >= 0)" in help_text


def test_the_lora_targets_are_the_language_models_linear_modules(tiny_model):
    """lora_targets is checked against this list when the config is read, so it must be what the model has."""
    from training.policy import LORA_TARGETS

    linear = {name.rsplit(".", 1)[-1] for name, module in tiny_model.language_model.named_modules()
              if isinstance(module, torch.nn.Linear)}
    assert linear == set(LORA_TARGETS)


def test_help_prints_knobs_whose_help_has_a_percent_sign(capsys):
    """argparse formats help text with %: the world pipeline's knobs say "60 %", which crashed --help."""
    from training.world.pipeline import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "at 60 % from 6,000 of them" in help_text and "--sft_records" in help_text
