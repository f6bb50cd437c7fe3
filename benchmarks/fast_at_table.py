"""The fast-AT table of docs/performance.md from the sweep's result cards and per-epoch metrics.

    advtransfer sweep configs/embedded/fast_at.yaml --out runs/fast_at --workers 1
    python scripts/keep_runs.py runs/fast_at docs/fast_at     # the committed cards + metrics
    python benchmarks/fast_at_table.py docs/fast_at            # prints the table

Per objective over the seeds: clean and PGD-10 test accuracy (mean ± sample std), the seconds of an epoch's
training pass (``metrics.jsonl``; validation excluded) as minimum and median over all epochs of all seeds (these runs
shared a busy 2-core machine, so wall times are noisy: the cost ratio to cite is ``bench.py``'s interleaved
``fast_at_epoch_speedup``), and the passes of a step in forward-equivalents (a forward
plus an input gradient ~ 2, a training forward + backward ~ 3).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

PASSES = {"pgd7": 7 * 2 + 3, "fgsm-rs": 2 + 3, "n-fgsm": 2 + 3, "pgd7-curriculum": (1 + 4 + 7) / 3 * 2 + 3}


def main(runs: Path) -> None:
    rows: dict[str, dict[str, tuple[dict, list[float]]]] = {}  # objective -> seed -> (card, epoch seconds)
    for run in sorted(p for p in runs.iterdir() if (p / "result.json").is_file()):
        card = json.loads((run / "result.json").read_text())
        secs = [json.loads(line)["seconds"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        seed, objective = run.name.rsplit("__", 2)[1:]
        rows.setdefault(objective, {})[seed] = (card, [s for s in secs if s > 0])

    def pm(xs: list[float]) -> str:
        sd = f" ± {100 * statistics.stdev(xs):.1f}" if len(xs) > 1 else ""
        return f"{100 * statistics.mean(xs):.1f}{sd}"

    print("| objective | seeds | clean % | PGD-10 % | epoch s (min) | epoch s (median) | passes/step | warnings |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name in PASSES:
        got = rows.get(name, {})
        if not got:
            continue
        cards, secs = [c for c, _ in got.values()], [s for _, ss in got.values() for s in ss]
        print(
            f"| {name} | {len(got)} | {pm([c['clean_acc'] for c in cards])} | {pm([c['pgd_acc'] for c in cards])} | "
            f"{min(secs):.0f} | {statistics.median(secs):.0f} | {PASSES[name]:.0f} | "
            f"{sum('co_guard' in json.dumps(c) for c in cards) or '-'} |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
