"""Ship a pretrained source model: copy a run's best checkpoint into models/ and write its card.

    python scripts/make_card.py runs/sources/mnist_robust mnist_minivit_robust [N_AA_SUBSET]

The card (``models/NAME.md`` + machine-readable ``models/NAME.card.json``) gives the exact command, seed,
epochs, threat model and the accuracies measured by the run on the full MNIST test split (clean, PGD-20;
AutoAttack on its first ``n_autoattack`` images), plus the figures on the fixed 500-image subset that
``tests/test_shipped_models.py`` re-measures (clean, PGD-20 on 500; standard AutoAttack on its first 100).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import yaml

from advtransfer.checkpoints import load_classifier
from advtransfer.config import DataConfig
from advtransfer.data import load_splits, tensors
from advtransfer.evaluation import evaluate

ROOT = Path(__file__).resolve().parents[1]
N_SUBSET, N_AA_SUBSET = 500, 100


def subset_figures(ckpt: Path, eps: float, dataset: str, n_aa: int) -> dict:
    """What the shipped-model test re-measures: same images, seed and settings every time (AutoAttack on the first
    ``n_aa`` of them; 0 = none)."""
    model, _ = load_classifier(ckpt)
    x, y = tensors(load_splits(DataConfig(name=dataset, n_val=0, n_test=N_SUBSET)).test)
    r = evaluate(model, x, y, eps=eps, attacks=("clean", "pgd"), pgd_steps=20, seed=0, checks=False)
    aa = evaluate(model, x[:n_aa], y[:n_aa], eps=eps, attacks=("autoattack",), seed=0, checks=False) if n_aa else {}
    return {
        "dataset": dataset,
        "n": N_SUBSET,
        "clean": r["clean"],
        "pgd20": r["pgd"],
        "n_autoattack": n_aa,
        "autoattack": aa.get("autoattack"),
    }


def main(run_dir: str, name: str, n_aa: str = str(N_AA_SUBSET)) -> None:
    run = Path(run_dir)
    card = json.loads((run / "result.json").read_text())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    dest = ROOT / "models" / f"{name}.safetensors"
    dest.parent.mkdir(exist_ok=True)
    shutil.copyfile(run / "best.safetensors", dest)
    dataset = cfg["data"]["name"]
    subset = subset_figures(dest, card["eps_value"], dataset, int(n_aa))
    config_file = f"configs/sources/{run.name}.yaml"
    wall = sum(m["seconds"] for m in metrics)
    info = {
        "name": name,
        "command": f"advtransfer pretrain {config_file} --out runs/sources/{run.name}",
        "config": cfg,
        "seed": card["seed"],
        "epochs": cfg["train"]["epochs"],
        "objective": card["objective"],
        "threat_model": f"{card['norm']} eps={card['eps']}",
        "full_test": {
            "n": card["n_eval"],
            "clean": card["clean_acc"],
            "pgd20": card["pgd_acc"],
            "n_autoattack": card.get("n_autoattack"),
            "autoattack": card["autoattack_acc"],
        },
        "subset": subset,
        "best_epoch": card["best_epoch"] + 1,
        "train_seconds": round(wall),
        "flags": card["flags"],
    }
    (ROOT / "models" / f"{name}.card.json").write_text(json.dumps(info, indent=2) + "\n")
    ft, sb = info["full_test"], subset
    kind = "adversarially (PGD-AT, PGD-7, step eps/4)" if card["objective"] == "at" else "naturally (no attack)"
    md = f"""# {name}

A mini-ViT (`{card["backbone"]}` with `{cfg["model"]["kwargs"]}`, {card["total_params"]:,} parameters)
trained from scratch {kind} on `{dataset}` ({card["n_train"]:,} training images; {card["n_val"]:,} held out for validation).

- Command: `{info["command"]}` (then `python scripts/make_card.py runs/sources/{run.name} {name}`)
- Seed {info["seed"]}, {info["epochs"]} epochs (best epoch by validation {"PGD" if card["objective"] == "at" else "clean"} accuracy: {info["best_epoch"]}),
  AdamW lr {cfg["train"]["lr"]}, weight decay {cfg["train"]["weight_decay"]}, batch {cfg["train"]["batch_size"]}, warmup {cfg["train"]["warmup_epochs"]} epoch + cosine;
  training wall time {info["train_seconds"]} s on 2 CPU cores (1 thread).
- Threat model: {info["threat_model"]} in [0,1] pixel space; normalisation (mean {card.get("mean", 0.5)}) is inside the model.

| {dataset} test | n | clean % | PGD-20 % | AutoAttack (standard) % |
|---|---:|---:|---:|---:|
| full test split | {ft["n"]} (AA: {ft["n_autoattack"]}) | {100 * ft["clean"]:.2f} | {100 * ft["pgd20"]:.2f} | {100 * ft["autoattack"]:.2f} |
| fixed subset (re-checked by the tests) | {sb["n"]} (AA: {sb["n_autoattack"]}) | {100 * sb["clean"]:.2f} | {100 * sb["pgd20"]:.2f} | {"—" if sb["autoattack"] is None else f"{100 * sb['autoattack']:.2f}"} |

Sanity flags of the evaluation: {", ".join(f["flag"] for f in card["flags"]) or "none"}.
"""
    (ROOT / "models" / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main(*sys.argv[1:])
