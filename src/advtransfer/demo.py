"""``advtransfer demo``: the shipped robust mini-ViT transferred to Fashion-MNIST with every method x init.

The RanLI linear probe is run once and doubles as stage 1 of every RoLI run (as in the paper, one robust
linear head initialises all methods). Each entry is an ordinary run directory under ``--out``; finished
runs are skipped, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import yaml

from .config import load_config
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
            if init == "roli":
                sets.append(f"method.probe_run={out / 'linear-ranli'}")
            runs.append((out / f"{m}-{init}", load_config(overrides=sets, base=base)))
    return runs


def run_demo(out: Path, methods: list[str] | None = None, overwrite: bool = False) -> str:
    t0 = time.time()
    methods = methods or ORDER
    cards = []
    for path, cfg in demo_configs(out, methods):
        if (path / RESULT).exists() and not overwrite:
            import json

            cards.append(json.loads((path / RESULT).read_text()))
            continue
        cards.append(run(cfg, path, overwrite=overwrite))
    c = cards[0]
    header = (
        f"Demo: robust MNIST mini-ViT -> Fashion-MNIST, eps={c['eps']} {c['norm']}; train {2000} images x 3 epochs "
        f"(PGD-7), test clean/PGD-10 on n={c['n_eval']}, AutoAttack (standard) on n={c.get('n_autoattack')}; "
        f"wall {time.time() - t0:.0f} s"
    )
    table = header + "\n\n" + results_table(cards)
    (out / "report.md").write_text("# advtransfer demo\n\n" + table + "\n")
    print(table)
    return table
