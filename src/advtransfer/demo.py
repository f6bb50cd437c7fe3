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
from .report import results_table

ORDER = ["linear", "full", "vpt", "lora", "adapter", "bias"]


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


def run_demo(out: Path, methods: list[str] | None = None, overwrite: bool = False) -> str:
    t0 = time.time()
    methods = methods or ORDER
    cards = []
    for path, cfg in demo_configs(out, methods):
        if (path / RESULT).exists() and not overwrite:
            cards.append(json.loads((path / RESULT).read_text()))
            continue
        resume = not overwrite and (path / "config.yaml").exists()  # an interrupted demo continues
        cards.append(run(cfg, path, overwrite=overwrite, resume=resume))
    c = cards[0]
    header = (
        f"Demo: robust MNIST mini-ViT -> Fashion-MNIST, eps={c['eps']} {c['norm']}; train {c.get('n_train')} images x "
        f"{len(_epochs(out / 'linear-ranli'))} epochs "
        f"(PGD-7), test clean/PGD-10 on n={c['n_eval']}, AutoAttack (standard) on n={c.get('n_autoattack')}; "
        f"wall {time.time() - t0:.0f} s"
    )
    table = header + "\n\n" + results_table(cards)
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text("# advtransfer demo\n\n" + table + "\n"))
    print(table)
    return table
