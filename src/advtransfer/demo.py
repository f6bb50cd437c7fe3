"""``advtransfer demo``: the shipped robust mini-ViT transferred to Fashion-MNIST with every method x init.

The RanLI linear probe is run once and doubles as stage 1 of every RoLI run (as in the paper, one robust
linear head initialises all methods). Each entry is an ordinary run directory under ``--out``; finished
runs are skipped, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

import yaml

from .config import load_config
from .models import atomic_write
from .pipeline import RESULT, run
from .report import ORDER, results_table


def demo_configs(out: Path, methods: list[str]) -> list[tuple[Path, object]]:
    base = yaml.safe_load(resources.files("advtransfer").joinpath("presets/demo.yaml").read_text())
    ckpt = Path(base["model"]["checkpoint"])
    if not ckpt.is_absolute():
        base["model"]["checkpoint"] = str(Path(__file__).resolve().parents[2] / ckpt)
    runs = [(out / "linear-ranli", load_config(base=base))]
    for m in methods:
        if m == "linear":
            continue
        for init in ("ranli", "roli"):
            sets = [f"method.name={m}", f"method.init={init}"]
            cfg_base = base
            if init == "roli":  # the reused probe is the linear-ranli run: record its settings as `probe`
                sets.append(f"method.probe_run={out / 'linear-ranli'}")
                cfg_base = {**base, "probe": base["train"]}
            runs.append((out / f"{m}-{init}", load_config(overrides=sets, base=cfg_base)))
    return runs


def _epochs(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _run_one(job: tuple) -> dict:
    """One demo run in a worker process (single-threaded: small-batch attacks scale across processes)."""
    import torch

    path, cfg, overwrite, threads = job
    if threads:
        torch.set_num_threads(threads)
    if (path / RESULT).exists() and not overwrite:
        return json.loads((path / RESULT).read_text())
    resume = not overwrite and (path / "config.yaml").exists()  # an interrupted demo continues
    return run(cfg, path, overwrite=overwrite, resume=resume)


def run_demo(out: Path, methods: list[str] | None = None, overwrite: bool = False, workers: int = 2) -> str:
    """Run the demo: the linear probe first (it is every RoLI run's stage 1), then the rest on ``workers``."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.time()
    jobs = [(path, cfg, overwrite, 1) for path, cfg in demo_configs(out, methods or ORDER)]
    jobs[0] = (*jobs[0][:3], 0)  # the probe runs alone: all threads
    cards = [_run_one(jobs[0])]
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        cards += list(pool.map(_run_one, jobs[1:]))
    c = cards[0]
    header = (
        f"Demo: robust MNIST mini-ViT -> Fashion-MNIST, eps={c['eps']} {c['norm']}; train {c.get('n_train')} images x "
        f"{len(_epochs(out / 'linear-ranli'))} epochs "
        f"(PGD-7), test clean/PGD-10 on n={c['n_eval']}, AutoAttack on n={c.get('n_autoattack')} "
        f"({'standard' if c['autoattack_settings']['standard'] else 'NON-STANDARD: ' + '+'.join(c['autoattack_settings']['attacks']) + ' only, to fit the 10-minute budget'}); "
        f"wall {time.time() - t0:.0f} s with {workers} worker processes"
    )
    table = header + "\n\n" + results_table(cards)
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text("# advtransfer demo\n\n" + table + "\n"))
    print(table)
    return table
