"""Config files and overrides -> a validated ``RunConfig``: YAML files, ``--set KEY=VALUE`` dotted overrides, and
pydantic's validation errors translated into one ``UserError`` line that names the key (``did you mean`` included).

Pydantic was chosen over OmegaConf: it was already in our dependency tree, validates constraints (``ge``/``gt``,
literals, enums) declaratively next to each field, and has no interpolation syntax to surprise a user's strings.
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

# ----------------------------------------------------------------------------- errors, one line naming the key

_MESSAGES = {
    "int": "must be an integer",
    "bool": "must be true or false",
    "float": "must be a number",
    "finite": "must be finite",
    "model": "must be a mapping",
    "dict": "must be a mapping",
    "string": "must be a string",
    "tuple": "must be a list",
    "list": "must be a list",
}


def _explain(e: ValidationError) -> UserError:
    err = e.errors(include_url=False)[0]
    loc = [str(p) for p in err["loc"] if isinstance(p, str) and p.isidentifier()]  # not union branch tags
    key, kind, ctx, got = ".".join(loc), err["type"], err.get("ctx", {}), err.get("input")
    if kind == "extra_forbidden":  # the unknown key is the last location, whatever its spelling ("08")
        last = str(err["loc"][-1])
        loc = [*(loc[:-1] if loc and loc[-1] == last else loc), last]
        key, names = ".".join(loc), list(_section(loc[:-1]).model_fields)
        close = difflib.get_close_matches(loc[-1], names, n=1)
        hint = f" (did you mean '{'.'.join([*loc[:-1], close[0]])}'?)" if close else ""
        return UserError(f"config: unknown key '{key}'{hint}")
    if kind in ("enum", "literal_error"):
        return UserError(f"config: '{key}' must be one of {_choices(ctx['expected'])}, got {got!r}")
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


def _choices(expected: str) -> list[str]:
    return [c.strip("'") for c in expected.replace(" or ", ",").split(",") if c.strip()]


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


# ----------------------------------------------------------------------------- --set KEY=VALUE


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


def apply_set(tree: dict, item: str) -> None:
    """Set one ``--set KEY=VALUE`` into a nested config dict (see ``put``)."""
    parts, value = parse_set(item)
    put(tree, parts, value, raw=item.split("=", 1)[1].strip())


def put(tree: dict, parts: list[str], value: Any, raw: str = "") -> None:
    """Set the key path ``parts`` of a nested config dict, checked against the schema (unknown keys name the closest
    one). A textual field (str, ε) takes the ``raw`` text when YAML read it as something else (``name=2024-01-01``
    stays a string, ``attack.eps=0.10`` stays ``"0.10"``); free-form mappings (``model.kwargs``,
    ``method.options``) take any sub-key. Mappings in ``tree`` are copied, never mutated."""
    full, cls = ".".join(parts), RunConfig
    for i, key in enumerate(parts):
        field = cls.model_fields.get(key) if cls is not None else None
        if cls is not None and field is None:
            close = difflib.get_close_matches(key, list(cls.model_fields), n=1)
            hint = f" (did you mean '{'.'.join([*parts[:i], close[0]])}'?)" if close else ""
            raise UserError(f"config: unknown key '{full}'{hint}")
        ann = field.annotation if field is not None else None
        if i == len(parts) - 1:
            textual = ann in (str, Eps, Eps | None)
            tree[key] = raw if textual and raw and not isinstance(value, (str, dict, list)) else value
            return
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        elif cls is None or ann is dict:
            cls = None  # inside a free-form mapping
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
        apply_set(tree, item)
    return from_dict(RunConfig, tree)
