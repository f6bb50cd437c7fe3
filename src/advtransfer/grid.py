"""Grid files -> named, validated runs (``Entry``): ``base`` (a run config or a path to one), ``grid`` axes (lists of
override mappings, ``KEY=VALUE`` strings or scalars of a config-key axis), ``exclude`` and ``cells`` ({when, per, set})
rules, ``reuse_probe``; runs are ``OUT/<label>__<label>...`` and RoLI entries reuse the linear run of their cell.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import RunConfig, probe_problems, to_dict
from .configfile import load_config, parse_set, put
from .errors import UserError

TOP_KEYS = {"base", "grid", "exclude", "reuse_probe", "cells"}
SECTIONS = RunConfig.model_fields  # config keys an axis may name


@dataclass
class Entry:
    """One expanded run of a grid."""

    name: str
    labels: dict[str, str]  # axis -> label of this entry's value
    keys: dict[str, list[str]]  # axis -> strings an exclude rule may match (label, raw scalar)
    tree: dict  # the resolved config as a plain dict (what is written to disk)
    cfg: RunConfig
    probe: str = ""  # name of the grid run this one reuses as its RoLI stage 1
    probe_note: str = "-"  # what the dry run says about stage 1
    phase: int = 1  # 1 + dependency depth (SLURM arrays run phase by phase)
    deps: list[str] = field(default_factory=list)


def _read(p: Path, missing: str, unreadable: str) -> Any:
    if not p.is_file():
        raise UserError(missing)
    try:
        return yaml.safe_load(p.read_text())
    except (yaml.YAMLError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{unreadable} ({type(e).__name__})") from None


def load_grid(path: str | Path) -> dict:
    """A grid file, checked, with its base config read when it is a path (relative to the grid file)."""
    p = Path(path)
    grid = _read(p, f"sweep: grid file not found: {p}", f"sweep: {p} is not a readable YAML file")
    if not isinstance(grid, dict):
        raise UserError(f"sweep: {p} must hold a mapping with 'base' and 'grid'")
    if unknown := set(grid) - TOP_KEYS:
        raise UserError(f"sweep: unknown top-level key(s) {sorted(unknown)} in {p}; known: {sorted(TOP_KEYS)}")
    base, axes, exclude = grid.get("base") or {}, grid.get("grid") or {}, grid.get("exclude") or []
    if isinstance(base, str):
        bp = p.parent / base  # an absolute base stays itself
        base = _read(bp, f"sweep: base config not found: {bp}", f"sweep: base config {bp} is not readable YAML") or {}
    if not isinstance(base, dict):
        raise UserError("sweep: 'base' must be a run config mapping or a path to one")
    if not isinstance(axes, dict) or not all(isinstance(v, list) and v for v in axes.values()):
        raise UserError("sweep: 'grid' must map each axis name to a non-empty list of values")
    if not isinstance(exclude, list) or not all(isinstance(r, dict) for r in exclude):
        raise UserError("sweep: 'exclude' must be a list of {axis: label or [labels]} mappings")
    for rule in exclude:
        if set(rule) - set(axes):
            raise UserError(f"sweep: exclude rule {rule} names unknown axes {sorted(set(rule) - set(axes))}")
    cells, reuse = grid.get("cells") or [], grid.get("reuse_probe", True)
    for rule in cells:
        if not isinstance(rule, dict) or set(rule) - {"when", "set", "per"} or not isinstance(rule.get("set"), dict):
            raise UserError(
                "sweep: a cells rule must be {when: {axis: labels}, set: {key: value}, [per: axis]}, "
                f"got {rule!r}"
            )
        if set(rule.get("when") or {}) - set(axes) or rule.get("per", next(iter(axes), None)) not in axes:
            raise UserError(f"sweep: cells rule {rule['when']} names an unknown axis")
    if not isinstance(reuse, bool):
        raise UserError(f"sweep: 'reuse_probe' must be true or false, got {reuse!r}")
    return {"base": base, "grid": axes, "exclude": exclude, "reuse_probe": reuse, "cells": cells}


def _resolve(axis: str, key: str) -> str:
    """``name`` on the ``method`` axis -> ``method.name``; other keys are full dotted paths."""
    section = SECTIONS[axis].annotation if axis in SECTIONS else None
    fields = getattr(section, "model_fields", {})
    return f"{axis}.{key}" if key.split(".")[0] in fields else key


def _word(key: str, value: Any) -> str:
    """A short label for one override value: strings as themselves (paths by their stem), numbers with their key."""
    if isinstance(value, dict):
        return "-".join(_word(k, v) for k, v in value.items())
    if isinstance(value, list):
        return "-".join(_word(key, v) for v in value)
    if isinstance(value, str):
        return Path(value).stem if ("/" in value or re.search(r"\.(safetensors|pth?|ya?ml)$", value)) else value
    return f"{key.split('.')[-1]}{str(value).lower()}"


def _clean(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", label).strip("_")[:60] or "x"


def parse_value(axis: str, value: Any) -> tuple[dict[str, Any], list[str], str, list[str]]:
    """An axis value -> (dotted overrides, KEY=VALUE strings, label, strings an exclude rule may match)."""
    if isinstance(value, dict):  # "_name" sets the label; keys of the axis's section are relative to it
        over = {_resolve(axis, str(k)): v for k, v in value.items() if k != "_name"}
        name = value.get("_name")
        label = _clean(str(name) if name is not None else "-".join(_word(k, v) for k, v in over.items()))
        return over, [], label, [label]
    if isinstance(value, str) and "=" in value or isinstance(value, list):
        items = [value] if isinstance(value, str) else value
        if not all(isinstance(s, str) and "=" in s for s in items):
            raise UserError(f"sweep: axis '{axis}': a list value must hold KEY=VALUE strings, got {value!r}")
        sets = [f"{_resolve(axis, s.split('=', 1)[0].strip())}={s.split('=', 1)[1]}" for s in items]
        label = _clean("-".join(_word(".".join(keys), v) for keys, v in map(parse_set, sets)))
        return {}, sets, label, [label]
    if value is None or isinstance(value, (str, int, float, bool)):
        if axis.split(".")[0] not in SECTIONS:
            raise UserError(
                f"sweep: axis '{axis}' is not a config key, so its values must be mappings or KEY=VALUE strings, "
                f"got {value!r}"
            )
        label = _clean(_word(axis, value) if not isinstance(value, str) else value)
        return {axis: value}, [], label, [label, str(value)]
    raise UserError(f"sweep: axis '{axis}': unsupported value {value!r}")


def _matches(keys: dict[str, list[str]], rule: dict) -> bool:
    """Whether each axis of ``rule`` has one of its labels (one, or a list) among an entry's ``keys``."""
    return all(any(str(w) in keys[a] for w in (want if isinstance(want, list) else [want])) for a, want in rule.items())


def expand(grid: dict, out: Path, sets: tuple[str, ...] | list[str] = ()) -> list[Entry]:
    """The cartesian product of the axes minus excluded entries, validated, named, with RoLI probe reuse."""
    parsed = [[(axis, *parse_value(axis, v)) for v in values] for axis, values in grid["grid"].items()]
    entries: list[Entry] = []
    names: set[str] = set()
    used = [0] * len(grid["exclude"])
    for combo in itertools.product(*parsed):
        labels = {axis: label for axis, _, _, label, _ in combo}
        keys = {axis: k for axis, _, _, _, k in combo}
        hits = [_matches(keys, rule) for rule in grid["exclude"]]
        used = [u + h for u, h in zip(used, hits)]
        if any(hits):
            continue
        name, tree = "__".join(labels.values()) or "run", copy.deepcopy(grid["base"])
        over = [kv for _, axis_over, _, _, _ in combo for kv in axis_over.items()]  # axes in order, then cells rules
        for rule in (r for r in grid["cells"] if _matches(keys, r.get("when") or {})):
            per = labels.get(rule.get("per"))  # with per, a mapping value is by that axis's label (none: no change)
            for k, v in rule["set"].items():
                if not (per and isinstance(v, dict)):
                    over.append((k, v))
                elif per in v:
                    over.append((k, v[per]))
        strings = [s for _, _, axis_sets, _, _ in combo for s in axis_sets]
        try:
            for k, v in over:
                put(tree, k.split("."), copy.deepcopy(v))
            cfg = load_config(overrides=[*strings, *sets], base=tree)
        except UserError as e:
            raise UserError(f"sweep: entry {name}: {e}") from None
        cfg = cfg if cfg.name else cfg.model_copy(update={"name": name})
        if name in names:
            raise UserError(f"sweep: two entries are both named {name}; give axis values distinct '_name's")
        names.add(name)
        entries.append(Entry(name, labels, keys, to_dict(cfg), cfg))
    for rule, u in zip(grid["exclude"], used):
        if not u:
            raise UserError(f"sweep: exclude rule {rule} matches no entry (labels are the run-name parts)")
    if not entries:
        raise UserError("sweep: the grid expands to no runs (everything excluded?)")
    link_probes(entries, Path(out), grid["reuse_probe"])
    return entries


def link_probes(entries: list[Entry], out: Path, reuse: bool) -> None:
    """Point RoLI entries at the linear run of their cell, which then trains with their probe settings; set phases."""
    by_name, probe_of = {e.name: e for e in entries}, {}
    for e in (e for e in entries if e.cfg.method.init.value == "roli"):
        c, want = e.cfg, e.cfg.method.probe_run
        if want and want != "{probe}":  # a given run; "{out}" is the output root
            path = Path(want.replace("{out}", str(out)))
            e.tree["method"]["probe_run"], e.probe_note = str(path), f"given: {path}"
            e.probe = path.name if path.parent == out and path.name in by_name else ""
            continue
        if not want and not reuse:
            e.probe_note = "own stage 1"
            continue
        linear = [lin for lin in entries if lin.cfg.train.objective == c.probe.objective]
        cands = [lin for lin in linear if not probe_problems(lin.cfg, c, check_train=False)]
        if not cands and want == "{probe}":
            raise UserError(f"sweep: RoLI entry {e.name} asks for '{{probe}}' but the grid has no matching linear run")
        if not cands:
            e.tree["method"]["probe_run"], e.probe_note = "", "own stage 1 (no linear run in its cell)"
            continue
        shared = [sum(lin.labels[a] == e.labels[a] for a in e.labels) for lin in cands]
        best = [lin for lin, n in zip(cands, shared) if n == max(shared)]
        if len(best) > 1:
            raise UserError(
                f"sweep: RoLI entry {e.name} matches several linear runs ({', '.join(b.name for b in best)});"
                " set its method.probe_run to '{out}/NAME'"
            )
        lin = best[0]
        if probe_of.setdefault(lin.name, e.tree["probe"]) != e.tree["probe"]:
            raise UserError(f"sweep: RoLI entries reusing {lin.name} have different probe settings; make them equal")
        e.probe, e.probe_note = lin.name, f"reuses {lin.name}"
        e.tree["method"]["probe_run"] = str(out / lin.name)
        e.cfg = load_config(base=e.tree)
    for name, probe in probe_of.items():  # a RoLI head is always trained as a probe
        lin = by_name[name]
        lin.tree["train"], lin.probe_note = copy.deepcopy(probe), "trains with the probe settings (RoLI stage 1)"
        lin.cfg = load_config(base=lin.tree)
    for e in entries:  # phase = 1 + dependency depth
        e.deps = [e.probe] if e.probe else []
        seen, cur = {e.name}, e
        while cur.probe:
            if cur.probe in seen:
                raise UserError(f"sweep: circular probe reuse through {cur.probe}")
            seen.add(cur.probe)
            cur = by_name[cur.probe]
        e.phase = len(seen)
