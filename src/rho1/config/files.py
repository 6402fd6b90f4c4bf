"""Options from YAML files and the command line: each value checked against its field's type, unknown keys
refused, every mistake one sentence naming the key."""

from __future__ import annotations

import types
import typing
from dataclasses import fields
from pathlib import Path


def _type_name(tp) -> str:
    return {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(value, tp, key: str, where: str):
    """``value`` as the field type ``tp`` (int, float, str, bool, X | None, list[X]), or one sentence."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, args[0], key, where) for v in items]
    ok = True
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        if isinstance(value, str):  # "50_000_000", "1e6"
            text = value.replace("_", "")
            try:
                value = int(text)
            except ValueError:
                try:
                    value = float(text)
                except ValueError:
                    ok = False
        if ok and isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = ok and isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        try:
            ok = not isinstance(value, bool) and isinstance(value, (int, float, str))
            value = float(value) if ok else value
        except ValueError:
            ok = False
    elif tp is str:
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        value = str(value) if ok else value
    if not ok:
        raise ValueError(f"{where}: {key} must be {_type_name(tp)}, got {value!r}")
    return value


def config_from_dict(config_cls, data: dict, where: str, base=None):
    """A config from a mapping of option: value (keys as fields, ``model_preset``, or as options,
    ``model-preset``), each value checked against the field's type; unknown keys are refused."""
    hints = typing.get_type_hints(config_cls)
    names = [f.name for f in fields(config_cls)]
    values = {f.name: getattr(base, f.name) for f in fields(config_cls)} if base is not None else {}
    for raw_key, value in data.items():
        key = str(raw_key).lstrip("-").replace("-", "_")
        if key not in names:
            raise ValueError(f"{where} has an unknown key {raw_key!r}; valid keys: "
                             f"{', '.join(n.replace('_', '-') for n in names)}")
        values[key] = _coerce(value, hints[key], raw_key, where)
    return config_cls(**values)


def load_yaml(path: str) -> dict:
    """A YAML file of option: value, or one sentence saying what is wrong with it."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {path} does not exist" if not p.exists() else f"config file {path} is not a file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"config file {path} is not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ValueError(f"config file {path} is not valid YAML{at} ({problem}); write one `option: value` "
                         "per line") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value, one per line")
    return data
