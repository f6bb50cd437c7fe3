"""Config files and overrides -> a validated ``RunConfig``: YAML files, ``--set KEY=VALUE`` dotted overrides, and
pydantic's errors as one ``UserError`` line naming the key. Pydantic over OmegaConf: declarative constraints per field,
already a dependency, and no interpolation syntax to surprise a user's strings.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .config import Eps, RunConfig
from .errors import UserError

_MESSAGES = {"int": "must be an integer", "bool": "must be true or false", "float": "must be a number"}
_MESSAGES |= {"finite": "must be finite", "string": "must be a string"}
_MESSAGES |= dict.fromkeys(("model", "dict"), "must be a mapping") | dict.fromkeys(("tuple", "list"), "must be a list")


def _unknown(full: str, parent: list[str], key: str, names: typing.Iterable[str]) -> UserError:
    """``unknown key`` naming the full path, with the closest field of its section as a hint."""
    close = difflib.get_close_matches(key, list(names), n=1)
    hint = f" (did you mean '{'.'.join([*parent, close[0]])}'?)" if close else ""
    return UserError(f"config: unknown key '{full}'{hint}")


def _explain(e: ValidationError) -> UserError:
    err = e.errors(include_url=False)[0]
    loc = [str(p) for p in err["loc"] if isinstance(p, str) and p.isidentifier()]  # not union branch tags
    key, kind, ctx, got = ".".join(loc), err["type"], err.get("ctx", {}), err.get("input")
    if kind == "extra_forbidden":  # the unknown key is the last location, whatever its spelling ("08")
        last = str(err["loc"][-1])
        loc = [*(loc[:-1] if loc and loc[-1] == last else loc), last]
        return _unknown(".".join(loc), loc[:-1], last, _section(loc[:-1]).model_fields)
    if kind in ("enum", "literal_error"):
        choices = [c.strip("'") for c in ctx["expected"].replace(" or ", ",").split(",") if c.strip()]
        return UserError(f"config: '{key}' must be one of {choices}, got {got!r}")
    bound = {"greater_than_equal": ">=", "greater_than": ">", "less_than": "<"}.get(kind)
    if bound:
        return UserError(f"config: {key} must be {bound} {next(iter(ctx.values()))}, got {got!r}")
    if kind == "value_error":  # our own checks name the field: "eps must be > 0" in section "attack"
        text = str(ctx.get("error", err["msg"]))
        first = text.split()[0]
        if loc and first == loc[-1]:
            return UserError(f"config: {'.'.join([*loc[:-1], text])}")
        if first in _section(loc).model_fields:
            return UserError(f"config: {'.'.join([*loc, text])}")
        return UserError(f"config: {key}: {text}" if key else f"config: {text}")
    what = _MESSAGES.get(kind.split("_")[0]) or _MESSAGES.get(kind.rsplit("_", 1)[-1]) or err["msg"]
    return UserError(f"config: '{key}' {what}, got {got!r}")


def _section(loc: list[str]) -> type[BaseModel]:
    """The model class at a key path (``[]`` = ``RunConfig``)."""
    cls: type[BaseModel] = RunConfig
    for key in loc:
        field = cls.model_fields.get(key)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return cls
        cls = field.annotation
    return cls


def from_dict(cls: type[BaseModel], data: Any) -> Any:
    """Validate a (partial) nested dict into ``cls``; every problem is one ``UserError`` line naming the key."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise _explain(e) from None


def parse_set(item: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003). The value is read as YAML (numbers, bools, lists)."""
    if "=" not in item:
        raise UserError(f"--set: expected KEY=VALUE, got {item!r}")
    key, raw = item.split("=", 1)
    parts = [p.strip() for p in key.strip().split(".")]
    if not all(parts):
        raise UserError(f"--set: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, OverflowError):  # e.g. the date 2001-13-45, a 5000-digit int
        value = raw
    return parts, raw if value is None else value


def put(tree: dict, parts: list[str], value: Any, raw: str = "") -> None:
    """Set the key path ``parts`` of a nested config dict (mappings copied, not mutated), checked by the schema."""
    full, cls = ".".join(parts), RunConfig
    for i, key in enumerate(parts):
        field = cls.model_fields.get(key) if cls is not None else None
        if cls is not None and field is None:
            raise _unknown(full, parts[:i], key, cls.model_fields)
        ann = field.annotation if field is not None else None
        if i == len(parts) - 1:  # a textual field (str, ε) keeps the raw text: name=2024-01-01, attack.eps=0.10
            textual = ann in (str, Eps, Eps | None)
            tree[key] = raw if textual and raw and not isinstance(value, (str, dict, list)) else value
            return
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        elif cls is None or ann is dict:
            cls = None  # inside a free-form mapping (model.kwargs, method.options): any sub-key
        else:
            raise UserError(f"config: '{key}' in '{full}' has no sub-keys")
        tree[key] = dict(tree[key]) if isinstance(tree.get(key), dict) else {}
        tree = tree[key]


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict:
    """A YAML file holding a mapping; every problem is a one-line ``UserError``."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config: file not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"config: {p} is not valid YAML{f' at line {mark.line + 1}' if mark else ''}") from None
    except UnicodeDecodeError:  # before ValueError, its base class
        raise UserError(f"config: {p} is not a text file") from None
    except (ValueError, OverflowError) as e:  # a YAML scalar its constructor rejects, e.g. 2001-13-45
        raise UserError(f"config: {p} holds a value YAML cannot read: {e}") from None
    if not isinstance(loaded, dict | None):
        raise UserError(f"config: {p} must hold a mapping at the top level")
    return loaded or {}


def load_config(
    path: str | Path | None = None, overrides: typing.Sequence[str] = (), base: dict | None = None
) -> RunConfig:
    """``base`` dict + YAML file (optional) + ``--set`` overrides -> a validated ``RunConfig``."""
    tree = _merge(dict(base or {}), read_yaml(path)) if path is not None else dict(base or {})
    for item in overrides:
        put(tree, *parse_set(item), raw=item.split("=", 1)[1].strip())
    return from_dict(RunConfig, tree)
