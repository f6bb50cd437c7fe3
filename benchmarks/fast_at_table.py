"""The fast-AT table of docs/performance.md from the sweep's result cards and per-epoch metrics.

    advtransfer sweep configs/embedded/fast_at.yaml --out runs/fast_at --workers 1
    python scripts/keep_runs.py runs/fast_at docs/fast_at     # the committed cards + metrics
    python benchmarks/fast_at_table.py docs/fast_at            # prints the table

Per objective over the seeds: clean and PGD-10 test accuracy (mean ± sample std), the seconds of an epoch's
training pass (``metrics.jsonl``; validation excluded) as median and minimum over all epochs of all seeds (the
machine is shared: the minimum is the least disturbed), and the passes of a step in forward-equivalents (a forward
plus an input gradient ~ 2, a training forward + backward ~ 3).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

PASSES = {"pgd7": 7 * 2 + 3, "fgsm-rs": 2 + 3, "n-fgsm": 2 + 3, "pgd7-curriculum": (1 + 4 + 7) / 3 * 2 + 3}


def main(runs: Path) -> None:
    rows: dict[str, list[tuple[dict, list[dict]]]] = {}
    for run in sorted(p for p in runs.iterdir() if (p / "result.json").is_file()):
        card = json.loads((run / "result.json").read_text())
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        rows.setdefault(run.name.rsplit("__", 1)[1], []).append((card, metrics))

    def pm(xs: list[float]) -> str:
        return (
            f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}"
            if len(xs) > 1
            else f"{100 * xs[0]:.1f}"
        )

    base = statistics.median(r["seconds"] for _, m in rows["pgd7"] for r in m)
    print(
        "| objective | seeds | clean % | PGD-10 % | epoch s (median) | epoch s (min) | vs PGD-7 (median) | passes/step | warnings |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name in PASSES:
        got = rows.get(name, [])
        if not got:
            continue
        secs = [r["seconds"] for _, m in got for r in m]
        warn = sum("co_guard" in r for _, m in got for r in m)
        print(
            f"| {name} | {len(got)} | {pm([c['clean_acc'] for c, _ in got])} | {pm([c['pgd_acc'] for c, _ in got])} | "
            f"{statistics.median(secs):.0f} | {min(secs):.0f} | {base / statistics.median(secs):.2f}x | "
            f"{PASSES[name]:.0f} | {warn or '-'} |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
