"""Smoke test of the paper preset on fabricated inputs: one Swin-B RoLI cell and one ViT-B RoLI cell of
``configs/paper/grid.yaml`` run end to end on CPU (1 epoch, a few 224-px images) and write their ``result.json``.

    python scripts/paper_smoke.py OUT_DIR [--workers N]

It fabricates ARES-format checkpoints (random weights of timm's Swin-B and ViT-B saved as ARES/timm do: a
``torch.save`` of a dict holding the state dict, with an ``argparse.Namespace`` of training args beside it), a tiny
image folder of JPEGs in several sizes with a VPT-style split folder (train/val/test JSON), then runs the two cells
through ``advtransfer sweep`` with the preset's settings and only the size overrides printed below.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CELLS = {"ares_swin_base_at.pth": "swin_base_patch4_window7_224", "ares_vit_base_at.pth": "vit_base_patch16_224"}
SMALL = [
    "data.n_val=0",
    "train.epochs=1",
    "probe.epochs=1",
    "train.batch_size=4",
    "probe.batch_size=4",
    "train.warmup_epochs=0",
    "probe.warmup_epochs=0",
    "eval.n_autoattack=2",
    "eval.aa_version=custom",
    "eval.aa_attacks=[apgd-ce]",
    "eval.batch_size=4",
    "model.head_init=timm",
]


def fabricate(root: Path) -> None:
    """ARES-format checkpoints and a 3-class image folder with a VPT-style split folder."""
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    for name, arch in CELLS.items():
        torch.manual_seed(0)
        state = timm.create_model(arch, num_classes=1000).state_dict()
        args = argparse.Namespace(model=arch, epochs=300, attack_eps=4 / 255, lr=5e-4)
        torch.save({"epoch": 299, "arch": arch, "state_dict": state, "args": args}, root / "checkpoints" / name)
    rng = np.random.default_rng(0)
    images, split = root / "data" / "caltech256" / "256_ObjectCategories", {"train": {}, "val": {}, "test": {}}
    for c in range(3):
        folder = images / f"{c + 1:03d}.class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(7):
            h, w = rng.integers(240, 400, size=2)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
            part = "train" if i < 4 else ("val" if i < 5 else "test")
            split[part][f"{folder.name}/{i}.jpg"] = c
    (root / "data" / "splits" / "caltech256").mkdir(parents=True, exist_ok=True)
    for part, entries in split.items():
        (root / "data" / "splits" / "caltech256" / f"{part}.json").write_text(json.dumps(entries))


def main(out: str, workers: int) -> None:
    root = Path(out).resolve()
    fabricate(root)
    grid = yaml.safe_load((REPO / "configs/paper/grid.yaml").read_text())
    grid["grid"]["dataset"] = [d for d in grid["grid"]["dataset"] if d["_name"] == "caltech256"]
    grid["grid"]["method"] = [m for m in grid["grid"]["method"] if m["_name"] in ("linear", "full-roli")]
    for src in grid["grid"]["source"]:
        src["model.checkpoint"] = str(root / "checkpoints" / Path(src["model.checkpoint"]).name)
    for d in grid["grid"]["dataset"]:
        d["data.root"], d["data.split_file"] = str(root / "data/caltech256"), str(root / "data/splits/caltech256")
    (root / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    cmd = [
        sys.executable,
        "-m",
        "advtransfer",
        "sweep",
        str(root / "grid.yaml"),
        "--out",
        str(root / "runs"),
        "--workers",
        str(workers),
        *[a for s in SMALL for a in ("--set", s)],
    ]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    for card in sorted((root / "runs").glob("*/result.json")):
        c = json.loads(card.read_text())
        print(
            f"{card.parent.name}: clean {c['clean_acc']:.3f} pgd {c['pgd_acc']:.3f} autoattack "
            f"{c['autoattack_acc']} n={c['n_eval']} trainable {c['trainable_params']:,} mean {c['mean']} "
            f"({c['preprocessing_from']}) train {c['train_seconds']} s"
        )
    print(f"wall {time.time() - t0:.0f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="a new or earlier output folder (finished cells are skipped)")
    parser.add_argument("--workers", type=int, default=1, help="cells at a time (default 1; 2 halves the wall time)")
    args = parser.parse_args()
    main(args.out, args.workers)
