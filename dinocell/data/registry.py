"""Dataset strings: `Name:key=value:key=value` -> a registered dataset class called with typed keyword arguments.

A config names its data with one string (`train.dataset_path`), so experiments switch datasets without code. The keys
and their types come from the class's `__init__` signature, so a dataset documents its own string by its signature.

Colons inside values: the string is split at every ':'. A segment that starts with `identifier=` begins a new key; any
other segment continues the previous value, joined back with ':'. So `S3Dataset:root=s3://bucket/prefix:size=10`
gives `root='s3://bucket/prefix'`, and a value may hold ':' as long as the text after that ':' does not look like
`identifier=...`.

Value syntax by annotated type: int, float, str, pathlib.Path; bool as true/false/yes/no/1/0; lists and tuples as
comma-separated items (`patch_size=512,512,6`; an empty value is an empty list); Optional[...] accepts none/null;
Literal[...] must be one of its choices.
"""

from __future__ import annotations

import difflib
import inspect
import pathlib
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

from dinocell.data.dataset import DatasetError, SampleDataset

_REGISTRY: dict[str, type] = {}  # every accepted name (canonical and aliases) -> class
_CANONICAL: dict[str, type] = {}  # canonical names only, for listings
_NEW_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")
_NONE = ("none", "null")
_NOT_KEYS = ("self", "transform")  # constructor parameters that a dataset string cannot set


class DatasetStringError(DatasetError):
    """A dataset string that names no registered dataset, an unknown key, or a value of the wrong type."""


def register_dataset(name: str, *aliases: str) -> Callable[[type], type]:
    """Class decorator: make the class reachable as `name` (and each alias) in dataset strings."""

    def decorator(cls: type) -> type:
        if not issubclass(cls, SampleDataset):
            raise TypeError(f"dataset '{name}': {cls.__qualname__} must subclass dinocell.data.SampleDataset")
        for key in (name, *aliases):
            if key in _REGISTRY and _REGISTRY[key] is not cls:
                raise ValueError(f"dataset name '{key}' is already registered by {_REGISTRY[key].__qualname__}")
            _REGISTRY[key] = cls
        _CANONICAL[name] = cls
        return cls

    return decorator


def list_datasets() -> dict[str, type]:
    """Canonical registered names -> classes, sorted by name."""
    return dict(sorted(_CANONICAL.items()))


def dataset_keys(cls: type) -> dict[str, inspect.Parameter]:
    """The keys a dataset string may set for `cls`: its keyword parameters except `transform`."""
    params = inspect.signature(cls.__init__).parameters
    return {
        k: p
        for k, p in params.items()
        if k not in _NOT_KEYS and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def split_dataset_string(dataset_str: str) -> tuple[str, dict[str, str]]:
    """`Name:k=v:...` -> (name, raw string values), applying the ':' continuation rule of the module docstring."""
    name, *segments = dataset_str.strip().split(":")
    raw: dict[str, str] = {}
    last: str | None = None
    for segment in segments:
        if _NEW_KEY.match(segment):
            key, value = segment.split("=", 1)
            if key in raw:
                raise DatasetStringError(f"dataset string '{dataset_str}': key '{key}' is given twice")
            raw[key], last = value, key
        elif last is not None:
            raw[last] += ":" + segment
        else:
            raise DatasetStringError(
                f"dataset string '{dataset_str}': segment '{segment}' after the name is not key=value "
                f"(expected Name:key=value:key=value)"
            )
    return name, raw


def parse_dataset_string(dataset_str: str) -> tuple[type, dict[str, Any]]:
    """Resolve the class and convert every value to its annotated type, without building the dataset."""
    name, raw = split_dataset_string(dataset_str)
    cls = lookup_dataset(name)
    keys = dataset_keys(cls)
    hints = typing.get_type_hints(cls.__init__)
    kwargs: dict[str, Any] = {}
    for key, text in raw.items():
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise DatasetStringError(
                f"{name} has no key '{key}'.{hint} Its keys are: {', '.join(keys) or '(none)'}"
            )
        expected = hints.get(key, str)
        try:
            kwargs[key] = convert_value(text, expected)
        except ValueError as err:
            raise DatasetStringError(
                f"{name}: key '{key}' got '{text}', expected {type_name(expected)} ({err})"
            ) from None
    missing = [k for k, p in keys.items() if p.default is inspect.Parameter.empty and k not in kwargs]
    if missing:
        raise DatasetStringError(
            f"{name} needs the key(s) {', '.join(missing)}, e.g. '{name}:{missing[0]}=...' "
            f"(run `dinocell datasets {name}` for all keys)"
        )
    return cls, kwargs


def make_dataset(dataset_str: str, transform: Callable | None = None) -> SampleDataset:
    """Build the dataset a string names; `transform` (if given) is passed to the class as `transform=`."""
    cls, kwargs = parse_dataset_string(dataset_str)
    if transform is not None:
        kwargs["transform"] = transform
    return cls(**kwargs)


def convert_value(text: str, expected: Any) -> Any:
    """Convert one raw string to `expected` (see the module docstring); raises ValueError with the reason."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (Union, types.UnionType):
        if type(None) in args and text.strip().lower() in _NONE:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return convert_value(text, option)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError("; ".join(errors))
    if origin is Literal:
        for choice in args:
            try:
                if convert_value(text, type(choice)) == choice:
                    return choice
            except ValueError:
                continue
        close = difflib.get_close_matches(text, [str(a) for a in args], n=1)
        hint = f", closest '{close[0]}'" if close else ""
        raise ValueError(f"not one of {', '.join(str(a) for a in args)}{hint}")
    if origin in (list, tuple):
        items = [t.strip() for t in text.split(",")] if text.strip() else []
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ValueError(f"needs {len(args)} comma-separated items, got {len(items)}")
            return tuple(convert_value(t, a) for t, a in zip(items, args))
        item_type = args[0] if args else str
        values = [convert_value(t, item_type) for t in items]
        return values if origin is list else tuple(values)
    if expected is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE or lowered in _FALSE:
            return lowered in _TRUE
        raise ValueError("use true or false")
    if expected is int:
        return int(text)
    if expected is float:
        return float(text)
    if expected in (str, Any, inspect.Parameter.empty):
        return text
    if expected is pathlib.Path:
        return pathlib.Path(text)
    raise ValueError(f"dataset strings cannot express the type {expected!r}")


def type_name(expected: Any) -> str:
    """Readable type for messages and the `dinocell datasets` listing."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (Union, types.UnionType):
        return " | ".join("none" if a is type(None) else type_name(a) for a in args)
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in args)
    if origin in (list, tuple):
        inner = type_name(args[0]) if args else "str"
        return f"comma-separated {inner} list"
    if expected is pathlib.Path:
        return "path"
    return getattr(expected, "__name__", str(expected))


def lookup_dataset(name: str) -> type:
    """The class registered as `name`; an unknown name raises DatasetStringError with the closest names."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    by_lower = {n.lower(): n for n in _REGISTRY}
    close = difflib.get_close_matches(name.lower(), by_lower, n=1, cutoff=0.5)
    hint = f" Did you mean '{by_lower[close[0]]}'?" if close else ""
    raise DatasetStringError(
        f"unknown dataset '{name}'.{hint} Registered datasets: {', '.join(list_datasets()) or '(none)'}"
    )


def describe_dataset(name: str, cls: type) -> str:
    """One dataset's listing: name, first docstring line, and each key with type and default."""
    doc = (inspect.getdoc(cls) or "").split("\n")[0]
    aliases = [a for a, c in _REGISTRY.items() if c is cls and a != name]
    lines = [f"{name}" + (f" (aliases: {', '.join(aliases)})" if aliases else "") + f": {doc}"]
    hints = typing.get_type_hints(cls.__init__)
    for key, param in dataset_keys(cls).items():
        default = "required" if param.default is inspect.Parameter.empty else f"default {param.default!r}"
        lines.append(f"    {key}: {type_name(hints.get(key, str))}, {default}")
    return "\n".join(lines)
