"""Evaluation people can trust: masks, AutoAttack wiring and resume, sanity flags on broken models, hygiene."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advtransfer import evaluate
from advtransfer.attacks import Threat, autoattack, clean_correct, pgd
from advtransfer.checks import autoattack_flags, sweep_flags
from advtransfer.config import DataConfig
from advtransfer.data import load_splits, tensors
from advtransfer.evaluation import autoattack_mask, sweep, tensor_batches
from advtransfer.models import ModelSpec, build


def autoattack_correct(model, x, y, *, eps, version="standard", attacks=(), seed=0, batch_size=256, state_path=None):
    """The AutoAttack mask of examples ``x`` (streamed in batches), from the clean mask, as the evaluation runs it."""
    k = int(model(x[:1]).shape[1])
    load = tensor_batches(x, y, batch_size)
    clean = clean_correct(model, x, y).cpu()
    return autoattack_mask(
        model,
        load,
        torch.arange(len(x)),
        clean,
        eps=eps,
        norm="Linf",
        num_classes=k,
        version=version,
        attacks=attacks,
        seed=seed,
        state_path=state_path,
    )


@pytest.fixture(scope="module")
def mnist():
    s = load_splits(DataConfig(name="mnist", n_train=3000, n_val=100, n_test=200))
    return tensors(s.train), tensors(s.test)


@pytest.fixture(scope="module")
def natural_mlp(mnist):
    """An undefended MLP trained for a few seconds on 3000 MNIST images (~90 % clean)."""
    (x, y), _ = mnist
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(8):
        for i in range(0, len(x), 100):
            opt.zero_grad()
            F.cross_entropy(model(x[i : i + 100]), y[i : i + 100]).backward()
            opt.step()
    return model.eval()


class Quantised(nn.Module):
    """Gradient masking on purpose: a non-differentiable input quantisation in front of the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 2) / 2)


class Softmaxed(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).softmax(1)


class Noisy(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x + 0.05 * torch.randn_like(x))


def _flags(res: dict) -> set[str]:
    return {f["flag"] for f in res["flags"]}


def test_undefended_model_broken_and_masks(natural_mlp, mnist):
    _, (x, y) = mnist
    res = evaluate(natural_mlp, x, y, eps=0.2, attacks=("clean", "pgd"))
    assert res["clean"] > 0.8
    assert res["pgd"] <= 0.02  # broken to ~0 % at a moderate eps
    for k in ("clean", "pgd"):
        assert res[k] == pytest.approx(res["masks"][k].float().mean().item())
    assert res["pgd_settings"]["step_size"] == pytest.approx(0.05)  # eps/4 default, recorded
    assert not _flags(res) - {"accuracy_at_huge_eps"}, res["flags"]


def test_clean_model_raises_no_flags(natural_mlp, mnist):
    _, (x, y) = mnist
    res = evaluate(natural_mlp, x[:100], y[:100], eps=0.05, attacks=("clean", "pgd"))
    assert res["flags"] == []


def test_masked_gradients_flagged_and_square_breaks_them(natural_mlp, mnist):
    _, (x, y) = mnist
    x, y = x[:100], y[:100]
    masked = Quantised(natural_mlp)
    res = evaluate(masked, x, y, eps=0.3, attacks=("clean", "pgd"))
    assert res["pgd"] > 0.5  # PGD is fooled by the zero gradients...
    assert "vanishing_input_gradients" in _flags(res)
    assert "accuracy_at_huge_eps" in _flags(res)
    mask, _ = autoattack_correct(masked, x, y, eps=0.3, version="custom", attacks=["square"], seed=0, batch_size=100)
    assert mask.float().mean().item() < res["pgd"] - 0.3  # ...but black-box Square is not


def test_probabilities_train_mode_and_randomness_flagged(natural_mlp, mnist):
    _, (x, y) = mnist
    x, y = x[:64], y[:64]
    assert "outputs_look_like_probabilities" in _flags(
        evaluate(Softmaxed(natural_mlp), x, y, eps=0.1, attacks=("clean",))
    )
    assert "nondeterministic_forward" in _flags(evaluate(Noisy(natural_mlp), x, y, eps=0.1, attacks=("clean",)))
    natural_mlp.train()
    res = evaluate(natural_mlp, x, y, eps=0.1, attacks=("clean",))
    assert "model_in_train_mode" in _flags(res) and natural_mlp.training  # flagged; caller's mode restored
    natural_mlp.eval()


def test_robust_above_clean_and_eps_sweep_flags(natural_mlp, mnist):
    # robust_above_clean: a model that is right only off the 8-bit grid (tests/test_checks.py builds it)
    assert "autoattack_above_pgd" in [f["flag"] for f in autoattack_flags(0.3, 0.6, 100)]
    _, (x, y) = mnist
    good = sweep(
        natural_mlp,
        tensor_batches(x[:100], y[:100], 100),
        100,
        Threat(0.1),
        [0.0, 0.02, 0.05, 0.1],
        attacks=("clean", "pgd"),
    )
    accs = [p["pgd"] for p in good["points"]]
    assert accs == sorted(accs, reverse=True) and good["flags"] == []
    rising = [{"eps": 0.0, "pgd": 0.9}, {"eps": 0.1, "pgd": 0.3}, {"eps": 0.2, "pgd": 0.6}]
    assert [f["flag"] for f in sweep_flags(rising, 100)] == ["accuracy_not_decreasing_in_eps"]


def test_autoattack_resume_gives_same_mask(natural_mlp, mnist, tmp_path):
    """Interrupt AutoAttack after APGD-CE (a forward counter raises), resume from its state file."""
    _, (x, y) = mnist
    x, y = x[:10], y[:10]
    eps = 0.03
    full, _ = autoattack_correct(natural_mlp, x, y, eps=eps, seed=0, batch_size=10)

    class Crash(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m, self.calls, self.armed = m, 0, False

        def forward(self, z):
            self.calls += 1
            if self.armed and self.calls > 400:  # APGD-CE (100 iters) is done by then, APGD-T is running
                raise KeyboardInterrupt
            return self.m(z)

    crash = Crash(natural_mlp)
    crash.armed = True
    state = tmp_path / "aa.json"
    with pytest.raises(KeyboardInterrupt):
        autoattack_correct(crash, x, y, eps=eps, seed=0, batch_size=10, state_path=state)
    assert json.loads(state.read_text())["done"] == ["apgd-ce"]
    resumed, _ = autoattack_correct(natural_mlp, x, y, eps=eps, seed=0, batch_size=10, state_path=state)
    assert full.any()  # some examples survive APGD-CE, so the resumed attacks have work to do
    assert torch.equal(resumed, full)


def test_autoattack_target_classes_capped_for_few_classes(mnist):
    """Standard AA uses 9 target classes; with 5 classes it must use 4 (not crash or silently mis-run)."""
    _, (x, y) = mnist
    keep = y < 5
    x5, y5 = x[keep][:20], y[keep][:20]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 5)).eval()
    mask, settings = autoattack_correct(model, x5, y5, eps=0.1, seed=0, batch_size=20)
    aa, _ = autoattack(model, 0.1, "Linf", 5)
    assert aa.apgd_targeted.n_target_classes == 4 and aa.fab.n_target_classes == 4
    x_adv = aa.apgd.perturb(x5, y5)  # APGD-CE alone: its iterates stay in the ball
    assert mask.shape == (20,) and (x_adv - x5).abs().max() <= 0.1 + 1e-6 and settings["attacks"][1] == "apgd-t"


def test_threat_model_at_native_resolution():
    """An attack on 28 px images stays within eps at 28 px even when the backbone runs at 56 px."""
    torch.manual_seed(0)
    spec = ModelSpec(
        "vit_tiny_patch16_224", dict(img_size=56, patch_size=14, in_chans=3, embed_dim=32, depth=1, num_heads=2), 10
    )
    model = build(spec).eval()
    x = torch.rand(4, 1, 28, 28)
    y = torch.randint(0, 10, (4,))
    adv = pgd(model, x, y, Threat(8 / 255, "Linf", 3))
    assert adv.shape == x.shape and (adv - x).abs().max() <= 8 / 255 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1


def test_pgd_agrees_with_apgd_ce(natural_mlp, mnist):
    """Cross-check: our PGD-20 and pyautoattack's APGD-CE (100 iters) agree within 5 points."""
    _, (x, y) = mnist
    x, y = x[:200], y[:200]
    ours = evaluate(natural_mlp, x, y, eps=0.05, attacks=("pgd",), pgd_steps=20, checks=False)["pgd"]
    apgd, _ = autoattack_correct(
        natural_mlp, x, y, eps=0.05, version="custom", attacks=["apgd-ce"], seed=0, batch_size=200
    )
    assert abs(ours - apgd.float().mean().item()) <= 0.05, (ours, apgd.float().mean().item())
