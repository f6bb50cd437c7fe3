"""The shipped source checkpoints still reproduce their cards (±1.5 points) on the fixed subset of their test split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from advtransfer.checkpoints import load_classifier
from advtransfer.config import DataConfig
from advtransfer.data import load_splits, tensors
from advtransfer.evaluation import evaluate

MODELS = Path(__file__).resolve().parents[1] / "models"
TOL = 0.015


ROBUST, NATURAL = ["mnist_minivit_robust", "union_minivit_robust"], ["mnist_minivit_natural", "union_minivit_natural"]


def _subset(name: str):
    card = json.loads((MODELS / f"{name}.card.json").read_text())
    model, spec = load_classifier(MODELS / f"{name}.safetensors")
    sub = card["subset"]
    dataset = sub.get("dataset", "mnist")
    assert spec.trained["dataset"] == dataset and spec.num_classes == 10
    x, y = tensors(load_splits(DataConfig(name=dataset, n_val=0, n_test=sub["n"])).test)
    return model, x, y, sub, float(card["config"]["attack"]["eps"])


@pytest.mark.parametrize("name", ROBUST + NATURAL)
def test_card_reproduces(name):
    """Clean and PGD-20 on the card's 500 test images."""
    model, x, y, sub, eps = _subset(name)
    r = evaluate(model, x, y, eps=eps, attacks=("clean", "pgd"), pgd_steps=20, seed=0, checks=False)
    assert r["clean"] == pytest.approx(sub["clean"], abs=TOL)
    assert r["pgd"] == pytest.approx(sub["pgd20"], abs=TOL)


@pytest.mark.slow
@pytest.mark.parametrize("name", ROBUST + NATURAL)
def test_card_autoattack_reproduces(name):
    """Standard AutoAttack on the card's first 100 test images: FAB-T and Square on the points APGD leaves cost
    minutes per model on CPU (100 s for the natural MNIST source's 3), so this runs in ``make test-slow``."""
    model, x, y, sub, eps = _subset(name)
    n = sub["n_autoattack"]
    aa = evaluate(model, x[:n], y[:n], eps=eps, attacks=("autoattack",), seed=0, checks=False)
    assert aa["autoattack"] == pytest.approx(sub["autoattack"], abs=TOL)


@pytest.mark.parametrize("kind", ["mnist", "union"])
def test_robust_is_robust_and_natural_is_not(kind):
    robust = json.loads((MODELS / f"{kind}_minivit_robust.card.json").read_text())["full_test"]
    natural = json.loads((MODELS / f"{kind}_minivit_natural.card.json").read_text())["full_test"]
    assert robust["clean"] > 0.85 and robust["autoattack"] > 0.5  # clearly robust at its training eps
    assert natural["clean"] > 0.9 and natural["autoattack"] < 0.05  # near 0 % robust there
