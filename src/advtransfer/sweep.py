"""Sweeps: the entries of a grid file (``grid.py``) run by N local worker processes or as a SLURM array, phase by
phase (a RoLI run after the linear run it reuses); finished runs are skipped, interrupted ones resumed."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .grid import Entry, expand, load_grid
from .rundir import RESULT


def status(e: Entry, out: Path) -> str:
    d = out / e.name
    return "done" if (d / RESULT).exists() else ("resume" if (d / "config.yaml").exists() else "todo")


def write_configs(entries: list[Entry], out: Path) -> Path:
    cdir = out / "_sweep" / "configs"
    cdir.mkdir(parents=True, exist_ok=True)
    for e in entries:
        (cdir / f"{e.name}.yaml").write_text(yaml.safe_dump(e.tree, sort_keys=False))
    return cdir


def dry_run_json(entries: list[Entry]) -> str:
    """One resolved config per line (``--dry-run --json``), with the run's name and what it depends on."""
    return "\n".join(json.dumps({"run": e.name, "phase": e.phase, "deps": e.deps, **e.tree}) for e in entries)


def _missing(entries: list[Entry]) -> list[str]:
    """The source checkpoints that are not files here."""
    return sorted({c for e in entries if (c := e.cfg.model.checkpoint) and not Path(c).is_file()})


def dry_run_table(entries: list[Entry], out: Path) -> str:
    n_done = sum(status(e, out) == "done" for e in entries)
    lines = [
        f"{len(entries)} runs ({n_done} finished, {len(entries) - n_done} to run) in "
        f"{max(e.phase for e in entries)} phase(s) under {out}",
        f"{'#':>4} {'ph':>2} {'status':<6}  {'name':<60} {'method/init':<22} {'seed':>4}  stage 1",
    ]
    for i, e in enumerate(entries, 1):
        c = e.cfg
        objective = "" if c.train.objective.value == "at" else f"[{c.train.objective.value}]"
        mi = f"{c.method.name}/{c.method.init.value}{objective}"
        lines.append(f"{i:>4} {e.phase:>2} {status(e, out):<6}  {e.name:<60} {mi:<22} {c.seed:>4}  {e.probe_note}")
    if missing := _missing(entries):
        lines.append(f"note: checkpoint(s) not found here: {', '.join(missing)}")
    return "\n".join(lines)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def subprocess_launcher(out: Path, threads: int) -> Callable[[Entry], subprocess.Popen]:
    """``python -m advtransfer run CONFIG --out DIR [--resume]`` with OMP_NUM_THREADS=threads, log to _sweep/logs."""
    logs = out / "_sweep" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def launch(e: Entry) -> subprocess.Popen:
        d = out / e.name
        cmd = [sys.executable, "-m", "advtransfer", "run", str(out / "_sweep" / "configs" / f"{e.name}.yaml")]
        cmd += ["--out", str(d), *(["--resume"] if (d / "config.yaml").exists() else [])]
        with open(logs / f"{e.name}.log", "a") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    return launch


def execute(
    entries: list[Entry],
    out: Path,
    workers: int,
    launch: Callable[[Entry], Any] | None = None,
    log: Callable[[str], None] = print,
    poll: float = 0.5,
) -> dict[str, str]:
    """Run unfinished entries, ``workers`` at a time, each after its probe: {name: done|ok|failed (.)|blocked (.)}."""
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
                if (rc := proc.poll()) is None:
                    continue
                del running[name]
                ok = rc == 0 and (out / name / RESULT).exists()
                result[name] = "ok" if ok else f"failed (exit {rc}; log: {out / '_sweep' / 'logs' / (name + '.log')})"
                verdict = "done  " if ok else "FAILED"
                log(f"[sweep {time.time() - t0:6.0f}s] {verdict} {name} ({time.time() - started:.0f}s)")
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
    text = SLURM.format(
        n=len(entries),
        grid=grid_path,
        script=script,
        out=shlex.quote(str(out)),
        out_raw=out,
        workdir=shlex.quote(os.getcwd()),
        python=shlex.quote(sys.executable),
        arrays=arrays,
        phases=" ".join(map(str, phases)),
    )
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(text)
    script.chmod(0o755)
    return script


def run_sweep(
    grid_path: str | Path,
    out: str | Path,
    *,
    workers: int = 1,
    dry_run: bool = False,
    as_json: bool = False,
    slurm: str | Path | None = None,
    sets: list[str] | tuple[str, ...] = (),
    report: bool = True,
    launch: Callable[[Entry], Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, str]:
    """``advtransfer sweep``: expand, then print (dry run), write a SLURM script, or execute locally."""
    out = Path(out).resolve()
    entries = expand(load_grid(grid_path), out, sets)
    if dry_run:
        log(dry_run_json(entries) if as_json else dry_run_table(entries, out))
        return {e.name: status(e, out) for e in entries}
    if slurm:
        path = write_slurm(entries, out, Path(slurm).resolve(), str(grid_path))
        phases = max(e.phase for e in entries)
        log(f"wrote {path} ({len(entries)} runs in {phases} phase(s)); submit: bash {path} submit")
        return {e.name: status(e, out) for e in entries}
    if missing := _missing(entries):
        raise UserError(f"sweep: checkpoint(s) not found: {', '.join(missing[:5])}")
    log(f"[sweep] {len(entries)} runs under {out}, {workers} worker(s), OMP_NUM_THREADS={max(1, cores() // workers)}")
    result = execute(entries, out, workers, launch=launch, log=log)
    counts = {k: sum(1 for s in result.values() if s.split(" ")[0] == k) for k in ("done", "ok", "failed", "blocked")}
    log("[sweep] " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if report and any((out / e.name / RESULT).exists() for e in entries):
        from .document import write_report

        log(f"[sweep] report: {write_report([out], out)}")
    return result
