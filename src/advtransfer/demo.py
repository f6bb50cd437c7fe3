"""``advtransfer demo``: the shipped robust mini-ViT transferred to Fashion-MNIST with every method x init.

The RanLI linear probe runs once (``probe`` settings) and is stage 1 of every RoLI run, as in the paper. Each entry is
a run directory under ``--out``; finished runs are skipped, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from importlib import resources
from pathlib import Path

import torch
import yaml

from .configfile import load_config
from .pipeline import run
from .report import ORDER, results_table
from .rundir import RESULT, read_jsonl, write_text


def demo_configs(out: Path, methods: list[str]) -> list[tuple[Path, object]]:
    base = yaml.safe_load(resources.files("advtransfer").joinpath("presets/demo.yaml").read_text())
    ckpt = Path(base["model"]["checkpoint"])
    if not ckpt.is_absolute():
        base["model"]["checkpoint"] = str(Path(__file__).resolve().parents[2] / ckpt)
    runs = [(out / "linear-ranli", load_config(base={**base, "train": base["probe"]}))]  # the probe trains as one
    for m in (name for name in methods if name != "linear"):
        for init in ("ranli", "roli"):
            sets = [f"method.name={m}", f"method.init={init}"]
            if init == "roli":  # stage 1 is the linear-ranli run
                sets.append(f"method.probe_run={out / 'linear-ranli'}")
            runs.append((out / f"{m}-{init}", load_config(overrides=sets, base=base)))
    return runs


def _run_one(job: tuple) -> dict:
    """One demo run in a worker process (single-threaded: small-batch attacks scale across processes)."""
    path, cfg, overwrite, threads = job
    if threads:
        torch.set_num_threads(threads)
    if (path / RESULT).exists() and not overwrite:
        return json.loads((path / RESULT).read_text())
    resume = not overwrite and (path / "config.yaml").exists()  # an interrupted demo continues
    return run(cfg, path, overwrite=overwrite, resume=resume)


def run_demo(out: Path, methods: list[str] | None = None, overwrite: bool = False, workers: int = 2) -> str:
    """Run the demo: the linear probe first (it is every RoLI run's stage 1), then the rest on ``workers``."""
    t0 = time.time()
    jobs = [(path, cfg, overwrite, 1) for path, cfg in demo_configs(out, methods or ORDER)]
    jobs[0] = (*jobs[0][:3], 0)  # the probe runs alone: all threads
    cards = [_run_one(jobs[0])]
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        cards += list(pool.map(_run_one, jobs[1:]))
    c, aa = cards[0], cards[0]["autoattack_settings"]
    budget = (
        "standard" if aa["standard"] else f"NON-STANDARD: {'+'.join(aa['attacks'])} only, to fit the 10-minute budget"
    )
    epochs = len(read_jsonl(out / "linear-ranli" / "metrics.jsonl"))
    header = (
        f"Demo: robust MNIST mini-ViT -> Fashion-MNIST, eps={c['eps']} {c['norm']}; train {c.get('n_train')} images x "
        f"{epochs} epochs (PGD-7), test clean/PGD-10 on n={c['n_eval']}, AutoAttack on n={c.get('n_autoattack')} "
        f"({budget}); wall {time.time() - t0:.0f} s with {workers} worker processes"
    )
    table = header + "\n\n" + results_table(cards)
    write_text(out / "report.md", "# advtransfer demo\n\n" + table + "\n")
    print(table)
    return table
