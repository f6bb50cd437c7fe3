"""Grid files: one YAML file -> the cartesian product of runs (``Entry``), named, validated, with RoLI probe reuse.

A grid file::

    base: {...}          # a run config (the schema of `advtransfer run`), or a path to one (relative to this file)
    grid:                # axes, expanded in the order written; each is a list of values
      source: [{_name: robust, model.checkpoint: models/a.safetensors}, ...]
      method: [{name: linear}, {name: full, init: roli, train.lr: 1.0e-4}, "method.name=bias", ...]
      seed: [0, 1, 2]
    exclude: [{source: robust, method: [vpt-ranli, vpt-roli]}]   # drop entries whose axis labels match
    cells:               # settings of the cells whose labels match (after the axes; later rules win)
      - {when: {method: full-roli}, set: {train.lr: 2.5e-5}}
      - {when: {method: [lora-ranli]}, per: dataset, set: {train.lr: {cifar10: 2.5e-3, cifar100: 0.0125}}}
    reuse_probe: true    # RoLI runs use the linear run of the same cell as stage 1 (default true)

An axis value is a mapping of overrides, a ``KEY=VALUE`` string (as ``--set``), a list of such strings, or
a scalar when the axis itself names a config key (``seed: [0, 1]``, ``train.lr: [1e-3, 1e-4]``). Inside a
mapping, a key whose first part is a field of the axis's config section is relative to it (``name`` on the
``method`` axis is ``method.name``); any other key is a full dotted path (``train.lr``). ``_name`` sets the
value's label. Mappings apply in axis order, then ``cells`` rules (with ``per: AXIS`` each value maps that axis's
labels to values; a label it lacks leaves the key as it is), then ``KEY=VALUE`` strings, then ``--set``.

Each entry is an ordinary run directory ``OUT/<label>__<label>__...`` (one label per axis, so adding a value
to an axis never renames existing runs); its resolved config is written to ``OUT/_sweep/configs/``.

RoLI reuse: a RoLI entry whose ``method.probe_run`` is empty (with ``reuse_probe``) or ``"{probe}"`` gets
the grid's linear run of the same cell, chosen by the one RoLI rule (``config.probe_problems``): method
``linear``, init ``ranli``, the RoLI entry's ``probe.objective``, the same data, model, attack, seed and validation
attack. That linear run then trains with the RoLI entries' ``probe`` settings (its ``train`` section becomes
their ``probe`` section: a RoLI head is always trained as a probe), and the RoLI entries depend on it (they run
after it; a SLURM phase later). ``{out}`` in ``probe_run`` is the output root.
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


# ----------------------------------------------------------------------------- reading and expanding a grid


def load_grid(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"sweep: grid file not found: {p}")
    try:
        grid = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"sweep: {p} is not a readable YAML file ({type(e).__name__})") from None
    if not isinstance(grid, dict):
        raise UserError(f"sweep: {p} must hold a mapping with 'base' and 'grid'")
    unknown = set(grid) - TOP_KEYS
    if unknown:
        raise UserError(f"sweep: unknown top-level key(s) {sorted(unknown)} in {p}; known: {sorted(TOP_KEYS)}")
    base = grid.get("base") or {}
    if isinstance(base, str):
        bp = (p.parent / base) if not Path(base).is_absolute() else Path(base)
        if not bp.is_file():
            raise UserError(f"sweep: base config not found: {bp}")
        try:
            base = yaml.safe_load(bp.read_text()) or {}
        except (yaml.YAMLError, ValueError, UnicodeDecodeError) as e:
            raise UserError(f"sweep: base config {bp} is not readable YAML ({type(e).__name__})") from None
    if not isinstance(base, dict):
        raise UserError("sweep: 'base' must be a run config mapping or a path to one")
    axes = grid.get("grid") or {}
    if not isinstance(axes, dict) or not all(isinstance(v, list) and v for v in axes.values()):
        raise UserError("sweep: 'grid' must map each axis name to a non-empty list of values")
    exclude = grid.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(r, dict) for r in exclude):
        raise UserError("sweep: 'exclude' must be a list of {axis: label or [labels]} mappings")
    for rule in exclude:
        if set(rule) - set(axes):
            raise UserError(f"sweep: exclude rule {rule} names unknown axes {sorted(set(rule) - set(axes))}")
    cells = grid.get("cells") or []
    for rule in cells:
        if not isinstance(rule, dict) or set(rule) - {"when", "set", "per"} or not isinstance(rule.get("set"), dict):
            raise UserError(
                f"sweep: a cells rule must be {{when: {{axis: labels}}, set: {{key: value}}, [per: axis]}}, got {rule!r}"
            )
        if set(rule.get("when") or {}) - set(axes) or rule.get("per", next(iter(axes), None)) not in axes:
            raise UserError(f"sweep: cells rule {rule['when']} names an unknown axis")
    if not isinstance(grid.get("reuse_probe", True), bool):
        raise UserError(f"sweep: 'reuse_probe' must be true or false, got {grid['reuse_probe']!r}")
    return {
        "base": base,
        "grid": axes,
        "exclude": exclude,
        "reuse_probe": grid.get("reuse_probe", True),
        "cells": cells,
    }


def _resolve(axis: str, key: str) -> str:
    """``name`` on the ``method`` axis -> ``method.name``; other keys are full dotted paths."""
    section = SECTIONS[axis].annotation if axis in SECTIONS else None
    fields = getattr(section, "model_fields", {})
    return f"{axis}.{key}" if key.split(".")[0] in fields else key


def _word(key: str, value: Any) -> str:
    """A short label for one override value: strings as themselves (paths by their stem), numbers with their key."""
    leaf = key.split(".")[-1]
    if isinstance(value, dict):
        return "-".join(_word(k, v) for k, v in value.items())
    if isinstance(value, list):
        return "-".join(_word(key, v) for v in value)
    if isinstance(value, str):
        return Path(value).stem if ("/" in value or re.search(r"\.(safetensors|pth?|ya?ml)$", value)) else value
    return f"{leaf}{str(value).lower()}"


def _clean(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", label).strip("_")[:60] or "x"


def parse_value(axis: str, value: Any) -> tuple[dict[str, Any], list[str], str, list[str]]:
    """An axis value -> (dotted overrides, KEY=VALUE strings, label, strings an exclude rule may match)."""
    if isinstance(value, dict):
        value = dict(value)
        name = value.pop("_name", None)
        over = {_resolve(axis, str(k)): v for k, v in value.items()}
        label = _clean(str(name) if name is not None else "-".join(_word(k, v) for k, v in over.items()))
        return over, [], label, [label]
    if isinstance(value, str) and "=" in value or isinstance(value, list):
        items = [value] if isinstance(value, str) else value
        if not all(isinstance(s, str) and "=" in s for s in items):
            raise UserError(f"sweep: axis '{axis}': a list value must hold KEY=VALUE strings, got {value!r}")
        sets = [f"{_resolve(axis, s.split('=', 1)[0].strip())}={s.split('=', 1)[1]}" for s in items]
        label = _clean("-".join(_word(".".join(parse_set(s)[0]), parse_set(s)[1]) for s in sets))
        return {}, sets, label, [label]
    if value is None or isinstance(value, (str, int, float, bool)):
        head = axis.split(".")[0]
        if head not in SECTIONS:
            raise UserError(
                f"sweep: axis '{axis}' is not a config key, so its values must be mappings or KEY=VALUE strings, "
                f"got {value!r}"
            )
        label = _clean(_word(axis, value) if not isinstance(value, str) else value)
        return {axis: value}, [], label, [label, str(value)]
    raise UserError(f"sweep: axis '{axis}': unsupported value {value!r}")


def expand(grid: dict, out: Path, sets: tuple[str, ...] | list[str] = ()) -> list[Entry]:
    """The cartesian product of the axes minus excluded entries, validated, named, with RoLI probe reuse."""
    out = Path(out)
    axes = list(grid["grid"].items())
    parsed = [[(axis, *parse_value(axis, v)) for v in values] for axis, values in axes]
    entries: list[Entry] = []
    seen: set[str] = set()
    used = [0] * len(grid["exclude"])
    for combo in itertools.product(*parsed):
        labels = {axis: label for axis, _, _, label, _ in combo}
        keys = {axis: k for axis, _, _, _, k in combo}
        hits = [all(_matches(keys[a], want) for a, want in rule.items()) for rule in grid["exclude"]]
        used = [u + h for u, h in zip(used, hits)]
        if any(hits):
            continue
        name = "__".join(labels.values()) or "run"
        tree = copy.deepcopy(grid["base"])
        strings = []
        for _, over, s, _, _ in combo:
            for k, v in over.items():
                _put(tree, k, v, name)
            strings += s
        for rule in grid["cells"]:
            if all(_matches(keys[a], want) for a, want in (rule.get("when") or {}).items()):
                for k, v in rule["set"].items():
                    v = v.get(labels[rule["per"]], _KEEP) if rule.get("per") and isinstance(v, dict) else v
                    if v is not _KEEP:
                        _put(tree, k, v, name)
        try:
            cfg = load_config(overrides=[*strings, *sets], base=tree)
        except UserError as e:
            raise UserError(f"sweep: entry {name}: {e}") from None
        if not cfg.name:
            cfg = cfg.model_copy(update={"name": name})
        if name in seen:
            raise UserError(f"sweep: two entries are both named {name}; give axis values distinct '_name's")
        seen.add(name)
        entries.append(Entry(name, labels, keys, to_dict(cfg), cfg))
    for rule, u in zip(grid["exclude"], used):
        if not u:
            raise UserError(f"sweep: exclude rule {rule} matches no entry (labels are the run-name parts)")
    if not entries:
        raise UserError("sweep: the grid expands to no runs (everything excluded?)")
    link_probes(entries, out, grid["reuse_probe"])
    return entries


_KEEP = object()


def _put(tree: dict, key: str, value: Any, name: str) -> None:
    try:
        put(tree, key.split("."), copy.deepcopy(value))
    except UserError as e:
        raise UserError(f"sweep: entry {name}: {e}") from None


def _matches(keys: list[str], want: Any) -> bool:
    wants = want if isinstance(want, list) else [want]
    return any(str(w) in keys for w in wants)


def link_probes(entries: list[Entry], out: Path, reuse: bool) -> None:
    """Point RoLI entries at the linear run of their cell (see the module docstring); set phases."""
    by_name, probe_of = {e.name: e for e in entries}, {}
    for e in entries:
        c = e.cfg
        if c.method.init.value != "roli":
            continue
        want = c.method.probe_run
        if want and want != "{probe}":
            path = Path(want.replace("{out}", str(out)))
            e.tree["method"]["probe_run"], e.probe_note = str(path), f"given: {path}"
            e.probe = path.name if path.parent == out and path.name in by_name else ""
            continue
        if not want and not reuse:
            e.probe_note = "own stage 1"
            continue
        cands = [
            lin
            for lin in entries
            if lin.cfg.train.objective == c.probe.objective and not probe_problems(lin.cfg, c, check_train=False)
        ]
        if not cands:
            if want == "{probe}":
                raise UserError(
                    f"sweep: RoLI entry {e.name} asks for '{{probe}}' but the grid has no matching linear run"
                )
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
    for name, probe in probe_of.items():  # a linear run that is RoLI's stage 1 trains with the probe settings
        lin = by_name[name]
        lin.tree["train"], lin.probe_note = copy.deepcopy(probe), "trains with the probe settings (RoLI stage 1)"
        lin.cfg = load_config(base=lin.tree)
    for e in entries:
        e.deps = [e.probe] if e.probe else []
    for e in entries:  # phase = 1 + dependency depth
        seen, cur = {e.name}, e
        while cur.probe:
            if cur.probe in seen:
                raise UserError(f"sweep: circular probe reuse through {cur.probe}")
            seen.add(cur.probe)
            cur = by_name[cur.probe]
        e.phase = len(seen)
