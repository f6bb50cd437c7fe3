"""Opt-in ``train.compile``: torch.compile (inductor, a real C++ build on CPU) trains the same model as eager."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from advtransfer.checkpoints import read_state
from advtransfer.cli import main

pytestmark = pytest.mark.skipif(not shutil.which("g++"), reason="inductor on CPU needs a C++ compiler")

SETS = [
    "data.n_train=64",
    "data.n_val=32",
    "data.n_test=32",
    "train.epochs=1",
    "train.batch_size=32",
    "attack.steps=2",
    "eval.val_pgd_steps=2",
    "eval.pgd_steps=2",
    "eval.autoattack=false",
]


def test_compiled_training_matches_eager(tmp_path: Path, source: Path) -> None:
    cfg = {
        "data": {"name": "fashion-mnist"},
        "model": {"checkpoint": str(source)},
        "attack": {"eps": "0.1"},
        "method": {"name": "full", "init": "ranli"},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    sets = sum((["--set", s] for s in SETS), [])
    assert main(["run", str(path), "--out", str(tmp_path / "eager"), *sets]) == 0
    assert main(["run", str(path), "--out", str(tmp_path / "compiled"), *sets, "--set", "train.compile=true"]) == 0
    eager, comp = (read_state(tmp_path / d / "best.safetensors") for d in ("eager", "compiled"))
    assert eager.keys() == comp.keys()  # the compiled wrapper does not leak into checkpoint keys
    changed = 0
    start = read_state(source)
    for k, v in eager.items():
        torch.testing.assert_close(comp[k], v, atol=2e-4, rtol=1e-3, msg=lambda m, k=k: f"{k}: {m}")
        changed += k in start and not torch.equal(v, start[k])
    assert changed > 10  # it trained (full finetuning moved the backbone), so equality above means something
    m_e, m_c = (json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[0]) for d in ("eager", "compiled"))
    assert abs(m_e["train_loss"] - m_c["train_loss"]) < 1e-3
    assert abs(m_e["val_clean"] - m_c["val_clean"]) <= 1 / 32
    assert yaml.safe_load((tmp_path / "compiled" / "config.yaml").read_text())["train"]["compile"] is True
    assert "torch.compile on" in (tmp_path / "compiled" / "log.txt").read_text()
