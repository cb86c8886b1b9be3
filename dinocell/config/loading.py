"""Load, merge, validate and save the training configuration.

Merge order: the schema's defaults (dinocell.config.schema, documented in dinocell/configs/ssl_default_config.yaml)
<- `--config-file` (which may extend another file through `_base_: other.yaml`, resolved relative to itself,
recursively) <- command-line dotlist overrides. Every layer is checked on its own before the merge, so an unknown key
or a value of the wrong type is reported with the file (or the command line) that set it.

A config file may also be a URL (`s3://bucket/recipe.yaml`, `https://...`), its `_base_` then resolved relative to
the URL; URLs are read through the `read_text` a caller passes (dinocell's commands pass dinocell.data.io.remote's),
since this package imports no other part of dinocell.
"""

from __future__ import annotations

import difflib
import pathlib
import posixpath
import re
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from dinocell.config.schema import SSLConfig, section_types
from dinocell.errors import UserError

BASE_KEY = "_base_"
URL = re.compile(r"^[a-z][a-z0-9+.-]*://")


class ConfigError(UserError, ValueError):
    """A configuration key that does not exist, or a value of the wrong type or out of range."""


def load_config(
    config_file: str | pathlib.Path | None = None,
    overrides: Sequence[str] = (),
    *,
    read_text: Callable[[str], str] | None = None,
) -> SSLConfig:
    """Defaults <- `config_file` (and its `_base_` chain) <- dotlist `overrides`; validated. `read_text(url)` reads
    config files given as URLs (without it, a URL is an error)."""
    layers: list[tuple[DictConfig, str]] = []
    if config_file is not None:
        layers += _file_layers(str(config_file), (), read_text)
    if overrides:
        try:
            layers.append((OmegaConf.from_dotlist(list(overrides)), "the command line"))
        except Exception as err:
            raise ConfigError(f"could not parse command-line overrides {list(overrides)}: {err}") from None
    schema = OmegaConf.structured(SSLConfig)
    reference = OmegaConf.to_container(schema)
    types_ = section_types()
    origins: dict[str, str] = {}
    for layer, origin in layers:
        plain = OmegaConf.to_container(layer, resolve=True)
        _check_known_keys(plain, reference, origin)
        for key, value in leaves(plain):
            _check_type(key, value, types_[key], origin)
            origins[key] = origin
    merged = OmegaConf.merge(schema, *(layer for layer, _ in layers))
    cfg = OmegaConf.to_object(merged)
    validate_config(cfg, origins)
    return cfg


def validate_config(cfg: SSLConfig, origins: dict[str, str] | None = None) -> None:
    """Raise ConfigError for the first impossible value; `origins` maps keys to where they were set."""
    origins = origins or {}
    for key, message in cfg.problems():
        value = _lookup(cfg, key)
        source = f" (set in {origins[key]})" if key in origins else ""
        raise ConfigError(f"{key}={value!r}{source}: {message}")


def config_to_yaml(cfg: SSLConfig) -> str:
    """The configuration as YAML text (what `--print-config` shows and config.yaml holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_to_dict(cfg: SSLConfig) -> dict[str, Any]:
    """The configuration as plain nested dicts (for trackers such as wandb)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def save_config(cfg: SSLConfig, path: str | pathlib.Path) -> pathlib.Path:
    """Write the configuration (atomically: a crash never leaves half a file)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(config_to_yaml(cfg))
    tmp.replace(path)
    return path


def _lookup(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _locate(location: str, relative_to: str | None = None) -> str:
    """An absolute path or URL for `location`, read relative to the file `relative_to` (a path or a URL)."""
    if URL.match(location):
        return location
    if relative_to is not None and URL.match(relative_to) and not location.startswith("/"):
        scheme, rest = relative_to.split("://", 1)
        host, _, path = rest.partition("/")
        return f"{scheme}://{host}{posixpath.normpath(posixpath.join('/', posixpath.dirname(path), location))}"
    base = pathlib.Path(relative_to).parent if relative_to is not None else pathlib.Path()
    return str((base / pathlib.Path(location).expanduser()).resolve())


def _read_layer(location: str, read_text: Callable[[str], str] | None, where: str) -> DictConfig | ListConfig:
    if not URL.match(location):
        if not pathlib.Path(location).is_file():
            raise ConfigError(f"config file '{location}' does not exist{where}")
        text = pathlib.Path(location).read_text()
    elif read_text is None:
        raise ConfigError(f"config file '{location}' is a URL: load it through a dinocell command (or pass "
                          "read_text=dinocell.data.io.remote.read_text)")
    else:
        try:
            text = read_text(location)
        except FileNotFoundError:
            raise ConfigError(f"config file '{location}' does not exist{where}") from None
        except OSError as err:  # refused, unreachable
            raise ConfigError(f"config file '{location}' cannot be read{where}: {err}") from None
    try:
        return OmegaConf.create(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{location}' is not valid YAML: {' '.join(str(err).split())}") from None


def _file_layers(
    location: str, chain: tuple[str, ...], read_text: Callable[[str], str] | None
) -> list[tuple[DictConfig, str]]:
    """The file and its `_base_` ancestors, base first, each with a label naming the file."""
    location = _locate(location, chain[-1] if chain else None)
    if location in chain:
        cycle = " -> ".join((*chain, location))
        raise ConfigError(f"config files extend each other in a cycle: {cycle}")
    layer = _read_layer(location, read_text, f" (named as {BASE_KEY} in {chain[-1]})" if chain else "")
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"config file '{location}' must hold a mapping of sections, not a {type(layer).__name__}")
    layers: list[tuple[DictConfig, str]] = []
    if BASE_KEY in layer:
        base = layer.pop(BASE_KEY)
        if not isinstance(base, str):
            raise ConfigError(f"{BASE_KEY} in '{location}' must be one file name, got {base!r}")
        layers = _file_layers(base, (*chain, location), read_text)
    return [*layers, (layer, f"config file '{location}'")]


def leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every leaf of a plain nested dict; lists are leaves."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


def _check_known_keys(layer: dict, reference: dict, origin: str, prefix: str = "") -> None:
    for key, value in layer.items():
        dotted = f"{prefix}{key}"
        if key not in reference:
            wrong = next(iter(leaves(value, f"{dotted}.")))[0] if isinstance(value, dict) and value else dotted
            valid = [k for k, _ in leaves(reference, prefix)]
            close = difflib.get_close_matches(wrong, valid, n=1, cutoff=0.5) or [
                f"{prefix}{k}" for k in difflib.get_close_matches(str(key), list(reference), n=1, cutoff=0.4)
            ]
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{wrong}' in {origin}.{hint}")
        if isinstance(reference[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"'{dotted}' in {origin} is a section; set its keys, e.g. {dotted}.<key>=...")
            _check_known_keys(value, reference[key], origin, f"{dotted}.")


def _check_type(key: str, value: Any, expected: Any, origin: str) -> None:
    """A value must have its annotated type (an int is fine for a float); the message says which type."""
    if not _is_instance(value, expected):
        # `key=` on the command line is YAML's null, which surprises people who meant an empty string
        hint = f"; an empty value is null, write \"{key}=''\" for an empty string" if value is None else ""
        inner, _ = _optional(expected)
        if typing.get_origin(inner) is list and _is_instance(value, typing.get_args(inner)[0]):
            hint = f"; one value is a list of one: [{value}]"  # e.g. evaluation.knn_k (one int in older recipes)
        raise ConfigError(f"{key}={value!r} (set in {origin}): expected {_type_label(expected)}{hint}")


def _optional(expected: Any) -> tuple[Any, bool]:
    """(the non-null type, whether null is allowed) of an annotation."""
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(expected) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(expected))
    return expected, False


def _is_instance(value: Any, expected: Any) -> bool:
    inner, nullable = _optional(expected)
    if value is None:
        return nullable
    if typing.get_origin(inner) is list:
        (item,) = typing.get_args(inner)
        return isinstance(value, list) and all(_is_instance(v, item) for v in value)
    if inner is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if inner is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, inner)


def _type_label(expected: Any) -> str:
    inner, nullable = _optional(expected)
    if typing.get_origin(inner) is list:
        label = "a list of " + {float: "numbers", int: "integers", str: "strings"}[typing.get_args(inner)[0]]
    else:
        label = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}[inner]
    return label + (" or null" if nullable else "")
