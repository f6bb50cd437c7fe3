"""Copy the small text files of every finished run under RUNS into DEST, for committing (no weights, no logs).

    python scripts/keep_runs.py runs/embedded docs/embedded

Per run folder ``RUNS/<name>/`` with a ``result.json``: ``result.json``, ``config.yaml``, ``metrics.jsonl`` and, for a
RoLI run, ``stage2/metrics.jsonl`` (what ``report.read_metrics`` reads). Unfinished runs and ``_sweep`` are skipped;
a kept run is overwritten only when its ``result.json`` differs. Prints how many runs it kept and how many were new.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

FILES = ("result.json", "config.yaml", "metrics.jsonl", "stage2/metrics.jsonl")


def keep(runs: Path, dest: Path) -> tuple[int, int]:
    """Copy FILES of each finished run; return (kept, new or changed)."""
    kept = new = 0
    for run in sorted(p for p in runs.iterdir() if (p / "result.json").is_file() and not p.name.startswith(".")):
        out = dest / run.name
        kept += 1
        old = out / "result.json"
        if old.is_file() and old.read_bytes() == (run / "result.json").read_bytes():
            continue
        new += 1
        for name in FILES:
            if (run / name).is_file():
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(run / name, out / name)
    return kept, new


if __name__ == "__main__":
    if len(sys.argv) != 3 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python scripts/keep_runs.py RUNS_DIR DEST_DIR (RUNS_DIR must exist)")
    k, n = keep(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"kept {k} finished runs in {sys.argv[2]} ({n} new or changed)")
