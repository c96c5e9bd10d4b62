"""YAML files and dotted ``key.sub=value`` overrides onto the config dataclasses of
:mod:`megatron_tppo.config` (the only copy of the schema), field docs for ``--help``, dumps.

Unknown keys fail with the nearest valid key (``rollout.windw_tokens`` -> "did you mean
rollout.window_tokens?"); bad values fail naming the full dotted field; :func:`load_config`
validates before returning. Nothing heavy is imported.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

from megatron_tppo.config import ConfigError, TPPOConfig

# --------------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` (parsed from its source)."""
    src = textwrap.dedent(inspect.getsource(cls))
    body = ast.parse(src).body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.lru_cache(maxsize=None)
def flat_fields(cls: Optional[type] = None, prefix: str = "") -> dict[str, tuple[Any, str]]:
    """Every leaf field as ``{"section.sub.name": (type, doc)}`` (cached: the schema is static)."""
    cls = cls or TPPOConfig
    out: dict[str, tuple[Any, str]] = {}
    hints, docs = _hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(tp):
            out.update(flat_fields(tp, key + "."))
        else:
            out[key] = (tp, docs.get(f.name, ""))
    return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to annotation ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        last: Optional[ConfigError] = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                last = err
        raise last or ConfigError(f"{key}: cannot use {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected a bool, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a float, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not near:  # try matching only the last component, e.g. "rollout.windw" vs "window_tokens"
        leaf = key.rsplit(".", 1)[-1]
        leaves = {v.rsplit(".", 1)[-1]: v for v in valid}
        hit = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        near = [leaves[hit[0]]] if hit else []
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def set_dotted(cfg: TPPOConfig, key: str, value: Any) -> None:
    """Set one leaf field ``a.b.c`` of ``cfg`` to ``value`` (coerced to the field's type)."""
    fields = flat_fields()
    if key not in fields:
        raise _unknown_key(key, list(fields))
    tp, _ = fields[key]
    *parents, leaf = key.split(".")
    obj: Any = cfg
    for p in parents:
        obj = getattr(obj, p)
    setattr(obj, leaf, _coerce(value, tp, key))


def _flatten_mapping(data: dict, prefix: str, source: str) -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for k, v in data.items():
        if not isinstance(k, str):
            raise ConfigError(f"{source}: key {k!r} under {prefix or 'the top level'} must be a string")
        key = prefix + k
        if isinstance(v, dict):
            items.extend(_flatten_mapping(v, key + ".", source))
        else:
            items.append((key, v))
    return items


def _admits_str(tp: Any) -> bool:
    if tp is str:
        return True
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp)


def parse_override(arg: str) -> tuple[str, Any]:
    """``"rollout.window_tokens=128"`` -> ("rollout.window_tokens", 128).

    Values parse as YAML scalars, except for string fields, which take the text verbatim (so a
    template such as ``Q: {prompt}`` stays a string); ``none``/``null`` still mean None there.
    """
    import yaml

    if "=" not in arg:
        raise ConfigError(f"override {arg!r} must look like key.sub=value")
    key, raw = arg.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {arg!r} has an empty key")
    fields = flat_fields()
    if key in fields and _admits_str(fields[key][0]) and raw.lower() not in ("none", "null", "~"):
        return key, raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                validate: bool = True) -> TPPOConfig:
    """Defaults, then the YAML file at ``path``, then ``overrides`` (``key.sub=value``), then validate."""
    import yaml

    cfg = TPPOConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
        for key, value in _flatten_mapping(data, "", str(path)):
            try:
                set_dotted(cfg, key, value)
            except ConfigError as err:
                raise ConfigError(f"{path}: {err}") from None
    for arg in overrides or []:
        set_dotted(cfg, *parse_override(arg))
    return cfg.validate() if validate else cfg


def to_dict(cfg: TPPOConfig) -> dict:
    """Plain nested dict (for YAML dumps and TensorBoard hparams)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: TPPOConfig) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def help_text() -> str:
    """Every key with its type, default and doc: the ``--help`` of the entry points."""
    default = TPPOConfig()
    lines = []
    for key, (tp, doc) in flat_fields().items():
        obj: Any = default
        for part in key.split("."):
            obj = getattr(obj, part)
        lines.append(f"  {key} ({_type_name(tp)}, default {obj!r})\n      {doc}")
    return "\n".join(lines)
