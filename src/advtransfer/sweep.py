"""Grid sweeps: one YAML file -> the cartesian product of runs, run by N local workers or a SLURM array.

A grid file::

    base: {...}          # a run config (the schema of `advtransfer run`), or a path to one (relative to this file)
    grid:                # axes, expanded in the order written; each is a list of values
      source: [{_name: robust, model.checkpoint: models/a.safetensors}, ...]
      method: [{name: linear}, {name: full, init: roli, train.lr: 1.0e-4}, "method.name=bias", ...]
      seed: [0, 1, 2]
    exclude: [{source: robust, method: [vpt-ranli, vpt-roli]}]   # drop entries whose axis labels match
    reuse_probe: true    # RoLI runs use the linear run of the same cell as stage 1 (default true)

An axis value is a mapping of overrides, a ``KEY=VALUE`` string (as ``--set``), a list of such strings, or
a scalar when the axis itself names a config key (``seed: [0, 1]``, ``train.lr: [1e-3, 1e-4]``). Inside a
mapping, a key whose first part is a field of the axis's config section is relative to it (``name`` on the
``method`` axis is ``method.name``); any other key is a full dotted path (``train.lr``). ``_name`` sets the
value's label. Mappings apply in axis order, then ``KEY=VALUE`` strings, then the command line's ``--set``.

Each entry is an ordinary run directory ``OUT/<label>__<label>__...`` (one label per axis, so adding a value
to an axis never renames existing runs); its resolved config is written to ``OUT/_sweep/configs/``.

RoLI reuse: a RoLI entry whose ``method.probe_run`` is empty (with ``reuse_probe``) or ``"{probe}"`` gets
the grid's linear run of the same cell: method ``linear``, init ``ranli``, the RoLI entry's
``probe.objective``, and the same data, model, attack, seed and validation attack. It then depends on that
run (runs after it; a SLURM phase later) and its config's ``probe`` section is set to that run's ``train``
section, so the saved config says how its head was trained. ``{out}`` in ``probe_run`` is the output root.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import RunConfig, load_config, parse_set, to_dict
from .errors import UserError

RESULT = "result.json"
TOP_KEYS = {"base", "grid", "exclude", "reuse_probe"}
SECTIONS = typing.get_type_hints(RunConfig)  # field name -> type (a dataclass for config sections)


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
    if not isinstance(grid.get("reuse_probe", True), bool):
        raise UserError(f"sweep: 'reuse_probe' must be true or false, got {grid['reuse_probe']!r}")
    return {"base": base, "grid": axes, "exclude": exclude, "reuse_probe": grid.get("reuse_probe", True)}


def _resolve(axis: str, key: str) -> str:
    """``name`` on the ``method`` axis -> ``method.name``; other keys are full dotted paths."""
    tp = SECTIONS.get(axis)
    if (
        tp is not None
        and dataclasses.is_dataclass(tp)
        and key.split(".")[0] in {f.name for f in dataclasses.fields(tp)}
    ):
        return f"{axis}.{key}"
    return key


def _put(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise UserError(f"sweep: bad key {dotted!r}")
    for p in parts[:-1]:
        if not isinstance(tree.get(p), dict):
            tree[p] = {}
        tree = tree[p]
    tree[parts[-1]] = copy.deepcopy(value)


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
                _put(tree, k, v)
            strings += s
        try:
            cfg = load_config(overrides=[*strings, *sets], base=tree)
        except UserError as e:
            raise UserError(f"sweep: entry {name}: {e}") from None
        if not cfg.name:
            cfg = dataclasses.replace(cfg, name=name)
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


def _matches(keys: list[str], want: Any) -> bool:
    wants = want if isinstance(want, list) else [want]
    return any(str(w) in keys for w in wants)


def _probe_signature(cfg: RunConfig) -> tuple:
    """What a linear probe must share with a RoLI run to be its stage 1."""
    return (cfg.data, cfg.model, cfg.attack, cfg.seed, cfg.eval.val_pgd_steps)


def link_probes(entries: list[Entry], out: Path, reuse: bool) -> None:
    """Point RoLI entries at the linear run of their cell (see the module docstring); set phases."""
    by_name = {e.name: e for e in entries}
    for e in entries:
        c = e.cfg
        if c.method.init.value != "roli":
            continue
        want = c.method.probe_run
        if want and want != "{probe}":
            path = Path(want.replace("{out}", str(out)))
            e.tree["method"]["probe_run"] = str(path)
            e.probe_note = f"given: {path}"
            if path.parent == out and path.name in by_name:
                e.probe = path.name
            continue
        if not want and not reuse:
            e.probe_note = "own stage 1"
            continue
        cands = [
            lin for lin in entries
            if lin.cfg.method.name == "linear" and lin.cfg.method.init.value == "ranli"
            and lin.cfg.train.objective == c.probe.objective and _probe_signature(lin.cfg) == _probe_signature(c)
        ]  # fmt: skip
        if cands:
            shared = [sum(lin.labels[a] == e.labels[a] for a in e.labels) for lin in cands]
            best = [lin for lin, s in zip(cands, shared) if s == max(shared)]
            if len(best) > 1:
                raise UserError(
                    f"sweep: RoLI entry {e.name} matches several linear runs ({', '.join(b.name for b in best)}); "
                    "set its method.probe_run to '{out}/NAME'"
                )
            lin = best[0]
            e.probe, e.probe_note = lin.name, f"reuses {lin.name}"
            e.tree["method"]["probe_run"] = str(out / lin.name)
            e.tree["probe"] = copy.deepcopy(lin.tree["train"])  # the settings the reused head was trained with
            e.cfg = load_config(base=e.tree)
        elif want == "{probe}":
            raise UserError(f"sweep: RoLI entry {e.name} asks for '{{probe}}' but the grid has no matching linear run")
        else:
            e.tree["method"]["probe_run"] = ""
            e.probe_note = "own stage 1 (no linear run in its cell)"
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


# ----------------------------------------------------------------------------- running


def status(e: Entry, out: Path) -> str:
    d = out / e.name
    return "done" if (d / RESULT).exists() else ("resume" if (d / "config.yaml").exists() else "todo")


def write_configs(entries: list[Entry], out: Path) -> Path:
    cdir = out / "_sweep" / "configs"
    cdir.mkdir(parents=True, exist_ok=True)
    for e in entries:
        (cdir / f"{e.name}.yaml").write_text(yaml.safe_dump(e.tree, sort_keys=False))
    return cdir


def dry_run_table(entries: list[Entry], out: Path) -> str:
    n_done = sum(status(e, out) == "done" for e in entries)
    lines = [f"{len(entries)} runs ({n_done} finished, {len(entries) - n_done} to run) in "
             f"{max(e.phase for e in entries)} phase(s) under {out}",
             f"{'#':>4} {'ph':>2} {'status':<6}  {'name':<60} {'method/init':<22} {'seed':>4}  stage 1"]  # fmt: skip
    for i, e in enumerate(entries, 1):
        c = e.cfg
        mi = f"{c.method.name}/{c.method.init.value}" + (
            "" if c.train.objective.value == "at" else f"[{c.train.objective.value}]"
        )
        lines.append(f"{i:>4} {e.phase:>2} {status(e, out):<6}  {e.name:<60} {mi:<22} {c.seed:>4}  {e.probe_note}")
    missing = sorted({e.cfg.model.checkpoint for e in entries if e.cfg.model.checkpoint and not Path(e.cfg.model.checkpoint).is_file()})  # fmt: skip
    if missing:
        lines.append(f"note: checkpoint(s) not found here: {', '.join(missing)}")
    return "\n".join(lines)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def subprocess_launcher(out: Path, threads: int) -> Callable[[Entry], subprocess.Popen]:
    """``python -m advtransfer run CONFIG --out DIR [--resume]`` with OMP_NUM_THREADS=threads, log to _sweep/logs."""
    logs = out / "_sweep" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def launch(e: Entry) -> subprocess.Popen:
        d = out / e.name
        cmd = [
            sys.executable,
            "-m",
            "advtransfer",
            "run",
            str(out / "_sweep" / "configs" / f"{e.name}.yaml"),
            "--out",
            str(d),
        ]
        if (d / "config.yaml").exists():
            cmd.append("--resume")
        with open(logs / f"{e.name}.log", "a") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    return launch


def execute(entries: list[Entry], out: Path, workers: int, launch: Callable[[Entry], Any] | None = None,
            log: Callable[[str], None] = print, poll: float = 0.5) -> dict[str, str]:  # fmt: skip
    """Run unfinished entries with at most ``workers`` at a time, each after the run it reuses; return statuses.

    Status per run: ``done`` (finished before), ``ok``, ``failed (exit N)`` or ``blocked (...)`` (its probe run
    failed). ``launch(entry)`` returns an object with ``poll()`` (None while running) like ``subprocess.Popen``.
    """
    if workers < 1:
        raise UserError(f"sweep: --workers must be >= 1, got {workers}")
    write_configs(entries, out)
    launch = launch or subprocess_launcher(out, max(1, cores() // workers))
    result = {e.name: "done" for e in entries if status(e, out) == "done"}
    needed = {d for e in entries for d in e.deps}
    pending = sorted((e for e in entries if e.name not in result), key=lambda e: e.name not in needed)  # probes first
    running: dict[str, tuple[Any, float]] = {}
    t0 = time.time()
    try:
        while pending or running:
            for e in list(pending):
                if len(running) >= workers:
                    break
                dep_state = [result.get(d) for d in e.deps]
                if any(s not in (None, "ok", "done") for s in dep_state):
                    result[e.name] = f"blocked (stage-1 run {e.deps[0]} {dep_state[0]})"
                    pending.remove(e)
                    log(f"[sweep] {e.name}: {result[e.name]}")
                elif all(s in ("ok", "done") for s in dep_state):
                    pending.remove(e)
                    running[e.name] = (launch(e), time.time())
                    log(f"[sweep {time.time() - t0:6.0f}s] start  {e.name}")
            for name, (proc, started) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[name]
                ok = rc == 0 and (out / name / RESULT).exists()
                result[name] = "ok" if ok else f"failed (exit {rc}; log: {out / '_sweep' / 'logs' / (name + '.log')})"
                log(
                    f"[sweep {time.time() - t0:6.0f}s] {'done  ' if ok else 'FAILED'} {name} ({time.time() - started:.0f}s)"
                )
            if running or pending:
                time.sleep(poll)
    except KeyboardInterrupt:
        for proc, _ in running.values():  # the runs save their state on SIGINT; --resume continues them
            if hasattr(proc, "send_signal"):
                proc.send_signal(signal.SIGINT)
        for proc, _ in running.values():
            if hasattr(proc, "wait"):
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
        raise
    return result


# ----------------------------------------------------------------------------- SLURM


SLURM = """#!/bin/bash
# advtransfer sweep: {n} runs of {grid}, written by `advtransfer sweep --slurm`.
# Submit every phase, each phase after the previous one (RoLI runs reuse phase-1 linear probes):
#     bash {script} submit
# or one phase by hand:  sbatch --array=0-<count-1> {script} <phase>
# Finished runs (result.json) are skipped; interrupted ones continue with --resume. Edit the #SBATCH lines.
#SBATCH --job-name=advtransfer
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:1
#SBATCH --mem=64G
#SBATCH --time=24:00:00
#SBATCH --output={out_raw}/_sweep/logs/slurm-%A_%a.out
set -euo pipefail
WORKDIR={workdir}
OUT={out}
CONFIGS={out}/_sweep/configs
PYTHON={python}
{arrays}
if [ "${{1:-}}" = submit ]; then
    prev=""
    for phase in {phases}; do
        eval "n=\\${{#PHASE_$phase[@]}}"
        dep=""
        if [ -n "$prev" ]; then dep="--dependency=afterany:$prev"; fi
        prev=$(sbatch --parsable $dep --array=0-$((n - 1)) "$0" "$phase")
        echo "phase $phase: job $prev ($n runs)"
    done
    exit 0
fi
PHASE=${{1:?usage: bash $0 submit, or sbatch --array=0-N $0 PHASE}}
eval "NAME=\\${{PHASE_$PHASE[$SLURM_ARRAY_TASK_ID]}}"
cd "$WORKDIR"
if [ -f "$OUT/$NAME/result.json" ]; then echo "$NAME is finished; skipping"; exit 0; fi
RESUME=""
if [ -f "$OUT/$NAME/config.yaml" ]; then RESUME="--resume"; fi
export OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-1}}
exec "$PYTHON" -m advtransfer run "$CONFIGS/$NAME.yaml" --out "$OUT/$NAME" $RESUME
"""


def write_slurm(entries: list[Entry], out: Path, script: Path, grid_path: str) -> Path:
    """A SLURM array script with one array per phase (``bash SCRIPT submit`` chains them with dependencies)."""
    write_configs(entries, out)
    phases = sorted({e.phase for e in entries})
    arrays = "\n".join(
        f"PHASE_{p}=(" + " ".join(shlex.quote(e.name) for e in entries if e.phase == p) + ")" for p in phases
    )
    text = SLURM.format(n=len(entries), grid=grid_path, script=script, out=shlex.quote(str(out)), out_raw=out,
                        workdir=shlex.quote(os.getcwd()), python=shlex.quote(sys.executable), arrays=arrays,
                        phases=" ".join(map(str, phases)))  # fmt: skip
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(text)
    script.chmod(0o755)
    return script


def run_sweep(grid_path: str | Path, out: str | Path, *, workers: int = 1, dry_run: bool = False,
              slurm: str | Path | None = None, sets: list[str] | tuple[str, ...] = (), report: bool = True,
              launch: Callable[[Entry], Any] | None = None, log: Callable[[str], None] = print) -> dict[str, str]:  # fmt: skip
    """``advtransfer sweep``: expand, then print (dry run), write a SLURM script, or execute locally."""
    out = Path(out).resolve()
    entries = expand(load_grid(grid_path), out, sets)
    if dry_run:
        log(dry_run_table(entries, out))
        return {e.name: status(e, out) for e in entries}
    if slurm:
        path = write_slurm(entries, out, Path(slurm).resolve(), str(grid_path))
        log(
            f"wrote {path} ({len(entries)} runs in {max(e.phase for e in entries)} phase(s)); submit: bash {path} submit"
        )
        return {e.name: status(e, out) for e in entries}
    missing = sorted({e.cfg.model.checkpoint for e in entries if e.cfg.model.checkpoint and not Path(e.cfg.model.checkpoint).is_file()})  # fmt: skip
    if missing:
        raise UserError(f"sweep: checkpoint(s) not found: {', '.join(missing[:5])}")
    log(f"[sweep] {len(entries)} runs under {out}, {workers} worker(s), OMP_NUM_THREADS={max(1, cores() // workers)}")
    result = execute(entries, out, workers, launch=launch, log=log)
    counts = {k: sum(1 for s in result.values() if s.split(" ")[0] == k) for k in ("done", "ok", "failed", "blocked")}
    log("[sweep] " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if report and any((out / e.name / RESULT).exists() for e in entries):
        from .report import write_report

        log(f"[sweep] report: {write_report([out], out)}")
    return result
