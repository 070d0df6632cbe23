"""Typed training configs: a dataclass per recipe, filled from a TOML file and `--key value` overrides.

Every knob is a dataclass field with a `help` in its metadata, so `--help` lists them all, and with the values
it takes (a numeric range, or choices) checked in one place, `check_knobs`; a bad config fails here, before any
model loads, naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from mmr1.errors import MMR1Error, report_user_errors
from mmr1.ranges import Range

T = TypeVar("T")
FINITE = Range()  # what every float knob without a range of its own must be
AT_LEAST_ONE, AT_LEAST_ZERO, POSITIVE = Range(1), Range(0), Range(0, low_open=True)  # counts, weights, scales
PROBABILITY = Range(0.0, 1.0, high_open=True)


class ConfigError(MMR1Error):
    """A config file or override that cannot be used, naming the key."""


def knob(default: Any, help: str, within: Range | None = None, choices: tuple | None = None, **kwargs) -> Any:
    """A config field with its documentation and the values it takes: a number `within` its range (a float knob
    without one must still be finite), a string or each item of a list among `choices`."""
    metadata: dict[str, Any] = {"help": help}
    if within is not None:
        metadata["range"] = within
    if choices is not None:
        metadata["choices"] = choices
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def _rule(cls: type, name: str, kind: str) -> Any:
    """Knob `name`'s range or choices (`kind`) from the nearest class that gives one, so that a recipe which only
    changes a shared knob's default keeps its rule."""
    for base in cls.__mro__:
        field = getattr(base, "__dataclass_fields__", {}).get(name)
        if field is not None and kind in field.metadata:
            return field.metadata[kind]
    return None


def check_knobs(config: Any) -> None:
    """Every knob of `config` against its rule, naming the key: numbers finite and in range (a NaN learning rate
    or weight would train NaN weights), strings and list items among their choices. Unset (None) knobs pass."""
    cls = type(config)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        allowed = _rule(cls, field.name, "range") or (FINITE if isinstance(value, float) else None)
        if value is not None and allowed is not None:
            allowed.check(f"config key {field.name!r}", value, ConfigError)
        choices = _rule(cls, field.name, "choices")
        if choices is not None and value is not None:
            for item in value if isinstance(value, tuple) else (value,):
                if item not in choices:
                    raise ConfigError(f"config key {field.name!r} must be one of {choices}, got {item!r}")


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
    try:
        return cls(**{name: _convert(cls, name, value) for name, value in values.items()})
    except (ConfigError, ValueError, TypeError) as error:
        raise ConfigError(f"{source}: {error}") from error


def _parse_override(text: str) -> Any:
    """A command-line value read as TOML when it parses (numbers, booleans, lists), else as a string."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def read_toml(path: Path) -> dict[str, Any]:
    """The keys of a TOML config file; an unreadable file is a ConfigError naming it."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"cannot read config {path}: {error}") from error


def config_from_args(cls: type[T], description: str, argv: list[str] | None = None) -> T:
    """Parse `--config F` plus `--key value` overrides for every knob of `cls` (listed by --help)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=Path, help="TOML file with the keys below")
    for field in dataclasses.fields(cls):
        default = None if field.default is dataclasses.MISSING else field.default
        allowed = _rule(cls, field.name, "range")
        text = f"{field.metadata.get('help', '')} (default: {default}{f'; {allowed}' if allowed else ''})"
        parser.add_argument(f"--{field.name}", default=None, metavar="VALUE",
                            help=text.replace("%", "%%"))  # argparse formats help with %: "60 %" would crash it
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config is not None:
        values.update(read_toml(args.config))
    for field in dataclasses.fields(cls):
        override = getattr(args, field.name)
        if override is not None:
            values[field.name] = _parse_override(override)
    return build_config(cls, values, str(args.config or "command line"))


def recipe_main(cls: type[T], description: str, train, argv: list[str] | None) -> int:
    """`python -m training.<recipe>`: parse the config, train, print the final checkpoint; user errors exit 2."""

    def run() -> int:
        final = train(config_from_args(cls, description, argv))
        if os.environ.get("RANK", "0") == "0":  # under `accelerate launch`, one line for the whole run
            print(f"final checkpoint: {final}")
        return 0

    return report_user_errors(run)


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready values (paths as strings), for checkpoints and metrics."""
    return {key: str(value) if isinstance(value, Path) else value for key, value in dataclasses.asdict(config).items()}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(cls: type, header: str, examples: dict[str, Any]) -> str:
    """A TOML file listing every knob of `cls` with its help: the example value where given, else the default
    (a knob without either is written commented out)."""
    parts = [header.rstrip() + "\n"]
    for field in dataclasses.fields(cls):
        value = examples.get(field.name, field.default)
        line = f"{field.name} = {_toml_value(value)}" if value is not None else f"# {field.name} ="
        parts.append(f"\n# {field.metadata.get('help', '')}\n{line}\n")
    return "".join(parts)


CONFIGS = Path(__file__).resolve().parent / "configs"
TEMPLATES = {  # file under CONFIGS: (module that runs it, its config class, title, example values)
    "sft.toml": ("training.sft", "SFTConfig", "Cold-start X-CoT SFT", {"data": "data/sft.jsonl"}),
    "grpo.toml": ("training.grpo", "GRPOConfig", "GRPO for X-CoT personalization", {"data": "data/dreambench.jsonl"}),
}


def template_text(templates: dict[str, tuple], name: str, folder: str, generator: str) -> str:
    """The text of config file `folder/name` from its `templates` entry: a header naming the command that runs it
    and the one that writes it (`python -m generator`), then every knob with its help."""
    import importlib

    module, cls, title, examples = templates[name]
    header = (f"# {title}: python -m {module} --config {folder}/{name} [--key value ...]\n"
              f"# Every key with its value (the default where not set here). Generated by python -m {generator}.")
    values = {"model": "models/mmr1/Janus-Pro-1B", **examples}
    return render_config(getattr(importlib.import_module(module), cls), header, values)


def template(name: str) -> str:
    """The text of training/configs/<name>: every knob with its help (`python -m training.config` rewrites them)."""
    return template_text(TEMPLATES, name, "training/configs", "training.config")


def write_templates(folder: Path, names, text_of) -> None:
    """Write each named config file into `folder` as `text_of(name)` renders it."""
    for name in names:
        (folder / name).write_text(text_of(name), encoding="utf-8")
        print(f"wrote {folder / name}")


if __name__ == "__main__":
    write_templates(CONFIGS, TEMPLATES, template)
