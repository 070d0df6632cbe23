"""Typed training configs: a dataclass per recipe, filled from a TOML file and `--key value` overrides.

Every knob is a dataclass field with a `help` in its metadata, so `--help` lists them all; a bad config fails
here, before any model loads, naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from mmr1.errors import MMR1Error, report_user_errors

T = TypeVar("T")


class ConfigError(MMR1Error):
    """A config file or override that cannot be used, naming the key."""


def knob(default: Any, help: str, **kwargs) -> Any:
    """A config field with its documentation."""
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _convert(cls: type, name: str, value: Any) -> Any:
    hints = typing.get_type_hints(cls)
    expected = hints[name]
    options = typing.get_args(expected) if isinstance(expected, types.UnionType) else (expected,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is Path and isinstance(value, (str, Path)):
            return Path(value)
        if option in (int, str, bool) and type(value) is option:
            return value
        if typing.get_origin(option) is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
    raise ConfigError(f"config key {name!r} must be {expected}, got {value!r}")


def build_config(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """`cls` from a flat dict; unknown keys and wrong types name the key."""
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    missing = [name for name, field in fields.items() if name not in values
               and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{source}: missing required key(s) {missing}")
    converted = {name: _convert(cls, name, value) for name, value in values.items()}
    try:
        return cls(**converted)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{source}: {error}") from error


def _parse_override(text: str) -> Any:
    """A command-line value read as TOML when it parses (numbers, booleans, lists), else as a string."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def config_from_args(cls: type[T], description: str, argv: list[str] | None = None) -> T:
    """Parse `--config F` plus `--key value` overrides for every knob of `cls` (listed by --help)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=Path, help="TOML file with the keys below")
    for field in dataclasses.fields(cls):
        default = None if field.default is dataclasses.MISSING else field.default
        parser.add_argument(f"--{field.name}", default=None, metavar="VALUE",
                            help=f"{field.metadata.get('help', '')} (default: {default})")
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config is not None:
        try:
            values.update(tomllib.loads(args.config.read_text(encoding="utf-8")))
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"cannot read config {args.config}: {error}") from error
    for field in dataclasses.fields(cls):
        override = getattr(args, field.name)
        if override is not None:
            values[field.name] = _parse_override(override)
    return build_config(cls, values, str(args.config or "command line"))


def check_recipe_keys(config: Any, at_least_one: tuple[str, ...]) -> None:
    """The checks every recipe shares: model and data given, counts positive, known subject source and dtype."""
    for name in ("model", "data"):
        if getattr(config, name) is None:
            raise ValueError(f"config key {name!r} is required")
    for name in ("steps", *at_least_one):
        if getattr(config, name) < 1:
            raise ValueError(f"config key {name!r} must be at least 1")
    if config.subject_source not in ("reference", "none"):
        raise ValueError("config key 'subject_source' must be 'reference' or 'none'")
    if config.dtype not in ("fp32", "bf16"):
        raise ValueError("config key 'dtype' must be 'fp32' or 'bf16'")


def recipe_main(cls: type[T], description: str, train, argv: list[str] | None) -> int:
    """`python -m training.<recipe>`: parse the config, train, print the final checkpoint; user errors exit 2."""

    def run() -> int:
        print(f"final checkpoint: {train(config_from_args(cls, description, argv))}")
        return 0

    return report_user_errors(run)


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready values (paths as strings), for checkpoints and metrics."""
    return {key: str(value) if isinstance(value, Path) else value for key, value in dataclasses.asdict(config).items()}
