"""One configuration mechanism for every job: typed, frozen dataclasses from YAML plus dotted overrides.

    config = load_config(LabelJobConfig, "label.yaml", ["decoder.attach_fragments=false"],
                         values={"input": "s3://b/images/", "infer.boxsize": 512})

Precedence, lowest first: the dataclass defaults, the YAML file (any URI, read through `pipelines.storage`),
`values` (the commands' flag shortcuts, already typed), then the `section.key=value` overrides (values parsed
as YAML scalars: "1e-3", "[1, 2]", "null", "false"). Job configs nest the library's own configs
(`infer: InferConfig`, `decoder: DecoderConfig`, ...), so a new library option is reachable from every job
without command-line code. Unknown keys name the dotted path and list the accepted ones; wrong types name the
key. Fields marked `SECRET` (storage options) are neither read from files nor printed nor logged.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from pipelines import storage
from pipelines.errors import UsageError

SECRET = {"secret": True}
"""`dataclasses.field(metadata=SECRET)`: set only in code (credentials), never from a file, printed or logged."""


def load_config(cls: type, uri: str | None = None, overrides: Iterable[str] = (), *,
                values: Mapping[str, Any] | None = None, secrets: Mapping[str, Any] | None = None,
                storage_options: Mapping | None = None):
    """Build `cls` from its defaults < the YAML mapping at `uri` < `values` ({"a.b": value}) < `overrides`
    (["a.b=value"]); `secrets` ({field: value}) set SECRET fields directly. Raises UsageError naming the
    dotted key of anything wrong."""
    data = _merged(defaults_dict(cls), read_yaml(uri, storage_options) if uri else {})
    pairs = [*(values or {}).items(), *(parse_override(text) for text in overrides)]
    return config_from_dict(cls, apply_values(data, pairs), secrets=secrets)


def read_yaml(uri: str, storage_options: Mapping | None = None) -> dict:
    """The YAML mapping stored at `uri` (any URI); an empty file is {}."""
    with storage.open_binary(uri, storage_options) as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise UsageError(f"config {uri}: must hold a YAML mapping, got {type(data).__name__}")
    return data


def to_dict(config: Any) -> dict:
    """Plain nested data (lists for tuples), without SECRET fields: JSON/YAML-serialisable and accepted back
    by `config_from_dict` / `load_config` (`--print-config` output is a valid `--config` file)."""
    return _plain(config)


def format_config(config: Any) -> str:
    """`to_dict(config)` as indented JSON (valid YAML, so it can be saved and passed back as --config)."""
    return json.dumps(to_dict(config), indent=2)


def parse_override(text: str) -> tuple[str, Any]:
    """"a.b.c=value" -> ("a.b.c", value parsed as a YAML scalar; "1e-3" is a float, not YAML 1.1's string)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or key.startswith("-"):
        raise UsageError(f"override {text!r} must look like section.key=value")
    value = yaml.safe_load(raw) if raw else ""
    if isinstance(value, str) and _looks_numeric(raw):
        value = float(raw)
    return key, _Override(raw, value)


class _Override(str):
    """An override's text and its YAML reading: a str field takes the text as written (`network.engine=null`
    is the engine "null", not None), every other field the parsed value."""

    def __new__(cls, text: str, parsed: Any):
        self = super().__new__(cls, text)
        self.parsed = parsed
        return self


def apply_values(data: dict, pairs: Iterable[tuple[str, Any]]) -> dict:
    """A copy of `data` with each dotted key set; integer parts index lists (`stages.0.epochs`). Unknown keys
    are set here and refused by `config_from_dict` with their dotted name."""
    result = copy.deepcopy(data)
    for key, value in pairs:
        node, parts = result, key.split(".")
        for part in parts[:-1]:
            node = _child(node, part, key)
        if isinstance(node, list):
            node[_index(node, parts[-1], key)] = value
        else:
            node[parts[-1]] = value
    return result


def config_from_dict(cls: type, data: Any, path: str = "", secrets: Mapping[str, Any] | None = None):
    """Build dataclass `cls` from nested dicts/lists, refusing unknown keys, SECRET keys and wrong types;
    `secrets` are passed to `cls` as they are."""
    where = path or cls.__name__
    if not isinstance(data, dict):
        raise UsageError(f"config: {where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init and not f.metadata.get("secret")}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UsageError(f"config: unknown key(s) {', '.join(_join(path, k) for k in unknown)}; "
                         f"{where} accepts {', '.join(sorted(names))}")
    values = {key: _coerce(hints[key], value, _join(path, key)) for key, value in data.items()}
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in values and f.name not in
               (secrets or {}) and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UsageError(f"config: {', '.join(_join(path, name) for name in missing)} must be given")
    try:
        return cls(**values, **(secrets or {}))
    except ValueError as error:  # the dataclass's own validation: say where it sits in the config
        if path and not isinstance(error, UsageError):
            raise UsageError(f"config: {path}: {error}") from None
        raise


def defaults_dict(cls: type) -> dict:
    """The defaults of `cls`'s fields that have one, as plain data (nested dataclasses recursively)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("secret"):
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = _plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = _plain(f.default_factory())
    return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not f.metadata.get("secret")}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _merged(base: dict, update: Mapping) -> dict:
    """`base` with `update` merged in: mappings recursively, anything else (lists included) replaced."""
    out = dict(base)
    for key, value in update.items():
        out[key] = _merged(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, Mapping) \
            else value
    return out


def _child(node: Any, part: str, key: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, key)]
    if not isinstance(node, dict):
        raise UsageError(f"override {key!r}: {part!r} is inside a value that is not a section")
    if not isinstance(node.get(part), (dict, list)):  # an absent or null section: start it empty
        node[part] = {}
    return node[part]


def _index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise UsageError(f"override {key!r}: {part!r} is not an index of a {len(node)}-item list")
    return int(part)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(value, _Override):
        wants_text = hint is str or (origin in (typing.Union, types.UnionType) and str in args
                                     and value.parsed is not None)
        value = str(value) if wants_text else value.parsed
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return _coerce(options[0], value, path) if len(options) == 1 else value
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else config_from_dict(hint, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"config: {path} must be a list, got {value!r}")
        item = args[0] if args else Any
        if len(args) == 2 and args[1] is Ellipsis or len(args) == 1:
            return tuple(_coerce(item, v, f"{path}.{i}") for i, v in enumerate(value))
        if len(args) != len(value):
            raise UsageError(f"config: {path} needs {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, f"{path}.{i}") for i, (a, v) in enumerate(zip(args, value)))
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is not hint:
        raise UsageError(f"config: {path} must be {hint.__name__}, got {value!r}")
    return value
