"""Typed configuration: dataclasses in, YAML files and ``--set a.b=c`` overrides on top.

Every component owns a small ``@dataclass`` config next to its code. This module turns
plain dicts (from YAML) into those dataclasses, checking every field against its type
annotation, and reports the first problem as a one-line ``ConfigError`` that names the
field by its dotted path (``data.batch_size: expected int, got 'abc'``).

A config class may define ``validate(self)`` for cross-field checks; it raises
``ConfigError("field", "message")`` with a field name relative to itself and the
path is prefixed automatically. A class-level ``REMOVED_FIELDS = {"old": "where it went"}``
turns a field that moved or went into an error that says so, instead of "unknown field".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")
_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A user-facing config problem. ``str(err)`` is one line: ``<field>: <what is wrong>``."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)

    def prefixed(self, prefix: str) -> "ConfigError":
        field = f"{prefix}.{self.field}" if self.field else prefix
        return ConfigError(field, self.message)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', origin)}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert it (dicts into dataclasses)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and value not in choices:
            # YAML 1.1 reads a bare no/off (yes/on) as a boolean; take the word the field allows.
            words = ("no", "off", "false") if not value else ("yes", "on", "true")
            value = next((w for w in words if w in choices), value)
        if value not in choices:
            raise ConfigError(path, f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(path, f"expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return {
            _convert(k, key_tp, path): _convert(v, val_tp, f"{path}.{k}") for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(path, f"expected a path, got {value!r}")
        return Path(value)
    raise TypeError(f"{path}: unsupported config annotation {tp!r}")


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown, missing and mistyped fields raise."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    join = (lambda name: f"{path}.{name}") if path else (lambda name: name)
    removed = getattr(cls, "REMOVED_FIELDS", {})
    for key in data:
        if key in removed and key not in fields:
            raise ConfigError(join(str(key)), removed[key])
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(join(str(key)), f"unknown field (known: {known})")
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], join(name))
        elif field.default is _MISSING and field.default_factory is _MISSING:
            raise ConfigError(join(name), "required field is missing")
    cfg = cls(**kwargs)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as err:
            raise err.prefixed(path) if path else err
    return cfg


def drop_removed_fields(cls: type, data: Any) -> Any:
    """``data`` without the fields that ``cls`` and the configs inside it list in
    ``REMOVED_FIELDS``. For configs a run wrote (its resolved ``config.yaml``): the run was
    made with those fields, so in it they are a record, not a request, and an old run stays
    readable. A config a user writes still gets the error that says where the field went."""
    if not isinstance(data, dict):
        return data
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    removed = getattr(cls, "REMOVED_FIELDS", {})
    out = {}
    for key, value in data.items():
        if key in removed and key not in fields:
            continue
        inner = _nested_config(hints[key]) if key in fields else None
        if inner is not None and isinstance(value, list):
            value = [drop_removed_fields(inner, v) for v in value]
        elif inner is not None:
            value = drop_removed_fields(inner, value)
        out[key] = value
    return out


def _nested_config(tp: Any) -> type | None:
    """The config class a field holds: itself, in a list, or optional; else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    return next((c for c in map(_nested_config, typing.get_args(tp)) if c is not None), None)


def to_dict(cfg: Any) -> Any:
    """The plain (YAML/JSON-ready) form of a config."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``section.key=value`` to a plain dict; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError("--set", f"expected section.key=value, got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError("--set", f"bad field name {dotted!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(keys[: i + 1]), "is not a section; cannot set a field in it")
        node = child
    node[keys[-1]] = value


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", f"file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError("--config", f"{path} is not valid YAML ({err.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path} must contain a mapping at the top level")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """YAML file (optional) + ``--set`` overrides -> validated ``cls``."""
    data = load_yaml(path) if path else {}
    for assignment in overrides:
        apply_override(data, assignment)
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (YAML, or JSON for a .json path) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    data = to_dict(cfg)
    text = json.dumps(data, indent=2) if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
    tmp.write_text(text)
    tmp.replace(path)


def _assignment(text: str) -> str:
    """An argparse type: ``--set`` takes SECTION.KEY=VALUE words, so a stray word (a
    positional after ``--set a=1``) is an error that names it, not a silently eaten value."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected SECTION.KEY=VALUE, got {text!r}")
    return text


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML experiment config")
    parser.add_argument(
        "--set", dest="overrides", action="extend", nargs="+", type=_assignment, default=[],
        metavar="SECTION.KEY=VALUE",
        help="override config fields: --set a.b=1 c.d=2, or --set repeated; values are parsed as YAML",
    )


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build the config from parsed CLI args; a bad config exits with code 2 and one line."""
    try:
        return load_config(cls, args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
