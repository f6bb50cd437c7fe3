"""Every sanity flag can fire: for each name in ``checks.FLAGS`` a model built to trigger exactly that flag, evaluated
through the real evaluation (``evaluate`` and ``evaluation.sweep``) on 50 MNIST test images.

The models are ``Oracle``s: 1-nearest-neighbour memorisers of the evaluated images, so each knows its input's clean
image and perturbation ``d`` exactly. A healthy oracle is right everywhere except beyond a huge radius (any attack
that large must succeed) and raises no flag; each case adds one twist: a decision rule on ``d`` (detached) and/or a
small smooth logit term that steers the attacks' gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advtransfer.attacks import Threat
from advtransfer.checks import FLAGS
from advtransfer.config import DataConfig
from advtransfer.data import load_splits, tensors
from advtransfer.evaluation import evaluate, sweep, tensor_batches

EPS = 0.1


@pytest.fixture(scope="module")
def mnist() -> tuple[torch.Tensor, torch.Tensor]:
    return tensors(load_splits(DataConfig(name="mnist", n_train=100, n_val=10, n_test=50)).test)


class Oracle(nn.Module):
    """Logits ``4 * onehot(c) + scale * (d @ w)`` for the memorised label ``c`` (``k`` outputs), then ``twist``; a
    perturbation beyond 0.45 in any pixel makes it wrong (unless ``breaks_at_huge`` is off)."""

    def __init__(self, images, labels, *, k=10, scale=1e-3, twist=None, breaks_at_huge=True) -> None:
        super().__init__()
        self.register_buffer("images", images.flatten(1).clone())
        self.register_buffer("labels", labels.clone())
        self.w = nn.Parameter(torch.randn(k, self.images.shape[1], generator=torch.Generator().manual_seed(0)))
        self.k, self.scale, self.twist, self.breaks_at_huge = k, scale, twist, breaks_at_huge
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        with torch.no_grad():
            nearest = torch.cdist(flat, self.images).argmin(1)
        clean, c = self.images[nearest], self.labels[nearest]
        d = flat - clean
        z = 4 * F.one_hot(c, self.k).float() + self.scale * d @ self.w.T
        if self.twist is not None:
            z = self.twist(z, c, d, clean)
        huge = self.breaks_at_huge & (d.detach().abs().amax(1) > 0.45)
        return torch.where(huge[:, None], z.roll(1, 1), z)


def wrong_where(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The logits, with the prediction moved to the next class where ``mask`` (detached) holds."""
    return torch.where(mask.detach()[:, None], z.roll(1, 1), z)


def free(d: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d / EPS, pixels whose clean value leaves room to move up by more than half of EPS)."""
    return d / EPS, clean < 1 - 0.6 * EPS


def wrong_on_grid(z, c, d, clean):
    """Wrong on the 8-bit grid of clean images, right off it: PGD's random start leaves the grid."""
    x = (clean + d) * 255
    return wrong_where(z, (x - x.round()).abs().amax(1) < 1e-3)


def wrong_when_small(z, c, d, clean):
    """Small perturbations fool it, larger ones do not (a detector-like defence)."""
    size = d.abs().amax(1)
    return wrong_where(z, (size > 0) & (size < 0.05))


def steer_to_half(z, c, d, clean):
    """Gradients pull each free pixel's ``u = d / EPS`` to 0.5, so sign-PGD ends oscillating within one step of it;
    the model is wrong while some pixel is between 0.19 and 0.45 from 0.5: after steps of EPS/4 one always is, after
    the stronger PGD's steps of EPS/8 none is (clean images are 0.5 away everywhere)."""
    u, room = free(d, clean)
    dist = (u - 0.5).abs() * room
    far = dist.detach().amax(1)
    return wrong_where(z, (far > 0.19) & (far < 0.45)) + 1e-2 * (dist.sum(1) / room.sum(1))[:, None] * F.one_hot(c, 10)


def up_to_class_11(z, c, d, clean):
    """A 12th output that CE-PGD raises by pushing pixels up and that wins once most free pixels are at +EPS. Its logit
    is the lowest on clean images, so AutoAttack's targeted APGD (top-9 targets) never aims at it."""
    u, room = free(d, clean)
    lift = (u * room).sum(1) / room.sum(1)
    z = z + (lift - 2)[:, None] * F.one_hot(torch.full_like(c, 11), 12)
    top = u.detach().where(room, torch.nan).nanmedian(1).values > 0.9
    return torch.where(top[:, None], 8.0 * F.one_hot(torch.full_like(c, 11), 12), z)


def distracted(z, c, d, clean):
    """A runner-up class whose logit falls as pixels go up dominates CE's gradient (PGD pushes pixels down), while a
    third class rising with them wins once most free pixels are at +EPS: targeted APGD aims at it and finds it."""
    u, room = free(d, clean)
    lift = ((u * room).sum(1) / room.sum(1))[:, None]
    z = z + (3.9 - lift) * F.one_hot((c + 1) % 10, 10) + lift * F.one_hot((c + 2) % 10, 10)
    top = u.detach().where(room, torch.nan).nanmedian(1).values > 0.9
    return torch.where(top[:, None], 8.0 * F.one_hot((c + 2) % 10, 10), z)


def with_nan_parameter(model: Oracle) -> Oracle:
    model.unused = nn.Parameter(torch.tensor([float("nan")]))  # e.g. a head that was never used
    return model


def flags_of(model: nn.Module, x, y, **kw) -> set[str]:
    return {f["flag"] for f in evaluate(model, x, y, eps=EPS, **kw)["flags"]}


def flags_of_sweep(model: nn.Module, x, y) -> set[str]:
    res = sweep(model, tensor_batches(x, y, 50), len(x), Threat(EPS), [0.0, 0.03, 0.1], attacks=("clean", "pgd"))
    return {f["flag"] for f in res["flags"]}


AA = dict(attacks=("clean", "pgd", "autoattack"), aa_version="custom", aa_attacks=("apgd-t",))
CASES = {  # flag -> (x, y) -> the flags the real evaluation raises for a model built to trigger exactly it
    "model_in_train_mode": lambda x, y: flags_of(Oracle(x, y).train(), x, y),
    "non_finite_weights": lambda x, y: flags_of(with_nan_parameter(Oracle(x, y)), x, y),
    "non_finite_logits": lambda x, y: flags_of(
        Oracle(x, y, twist=lambda z, c, d, clean: z - torch.inf * F.one_hot((c + 1) % 10, 10)), x, y
    ),
    "nondeterministic_forward": lambda x, y: flags_of(
        Oracle(x, y, twist=lambda z, c, d, clean: z + 0.01 * torch.randn_like(z)), x, y
    ),
    "outputs_look_like_probabilities": lambda x, y: flags_of(
        Oracle(x, y, twist=lambda z, c, d, clean: z.softmax(1)), x, y
    ),
    "vanishing_input_gradients": lambda x, y: flags_of(Oracle(x, y, scale=0.0), x, y),
    "robust_above_clean": lambda x, y: flags_of(Oracle(x, y, twist=wrong_on_grid), x, y),
    "stronger_attack_raises_accuracy": lambda x, y: flags_of(Oracle(x, y, scale=0.0, twist=steer_to_half), x, y),
    "accuracy_at_huge_eps": lambda x, y: flags_of(Oracle(x, y, breaks_at_huge=False), x, y),
    "autoattack_above_pgd": lambda x, y: flags_of(Oracle(x, y, k=12, scale=0.0, twist=up_to_class_11), x, y, **AA),
    # gradient masking: CE's gradient misleads PGD, AutoAttack's targeted DLR loss is not fooled
    "pgd_overestimates": lambda x, y: flags_of(Oracle(x, y, scale=0.0, twist=distracted), x, y, **AA),
    "accuracy_not_decreasing_in_eps": lambda x, y: flags_of_sweep(Oracle(x, y, twist=wrong_when_small), x, y),
}


def test_a_healthy_oracle_raises_no_flag(mnist):
    x, y = mnist
    res = evaluate(Oracle(x, y), x, y, eps=EPS, **AA)
    assert res["clean"] == res["pgd"] == res["autoattack"] == 1.0 and res["flags"] == []
    assert flags_of_sweep(Oracle(x, y), x, y) == set()


@pytest.mark.parametrize("name", list(CASES))
def test_each_flag_fires_alone_for_a_model_built_for_it(mnist, name):
    assert CASES[name](*mnist) == {name}


def test_every_flag_has_an_injection_test():
    assert set(CASES) == set(FLAGS)
