"""PGD invariants (ε-ball, [0,1], model mode, no parameter grads), strength, and a cross-check with torchattacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advtransfer.attacks import Threat, margin_loss, per_example_loss, pgd
from advtransfer.config import DataConfig
from advtransfer.data import load_splits, tensors
from advtransfer.models import Classifier


@pytest.fixture(scope="module")
def mnist() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    s = load_splits(DataConfig(name="mnist", n_train=600, n_val=10, n_test=200))
    return tensors(s.train), tensors(s.test)


@pytest.fixture(scope="module")
def mlp(mnist) -> nn.Module:
    """An undefended MLP trained for ~1 s on 600 MNIST images (~85 % clean on the 200 test images)."""
    (x, y), _ = mnist
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for _ in range(10):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 50):
            idx = perm[i : i + 50]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model


def _acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


def _ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def _check_ball(adv: torch.Tensor, x: torch.Tensor, threat: Threat) -> None:
    assert adv.shape == x.shape and adv.dtype == x.dtype and not adv.requires_grad
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    d = (adv - x).flatten(1)
    if threat.norm == "Linf":
        assert float(d.abs().max()) <= threat.eps + 1e-6
    else:
        assert float(d.norm(dim=1).max()) <= threat.eps + 1e-5


THREATS = [Threat(0.1, "Linf", 5), Threat(1.5, "L2", 5)]


# ----------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("threat", THREATS, ids=["Linf", "L2"])
@pytest.mark.parametrize("restarts", [1, 3])
def test_iterates_stay_in_ball_and_range(tiny_vit: Classifier, mnist, threat: Threat, restarts: int) -> None:
    _, (x, y) = mnist
    x, y = x[:16], y[:16]
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0  # the [0,1] clamp is exercised
    x0 = x.clone()
    torch.manual_seed(0)
    adv = pgd(tiny_vit, x, y, threat, restarts=restarts)
    _check_ball(adv, x, threat)
    assert torch.equal(x, x0)  # the input is not modified in place
    assert (adv - x).abs().max() > threat.eps / 10  # it did move


@pytest.mark.parametrize("threat", THREATS, ids=["Linf", "L2"])
def test_every_iterate_in_ball(tiny_vit: Classifier, mnist, threat: Threat) -> None:
    """Not only the result: each input the model sees while crafting is inside the ball and [0,1]."""
    _, (x, y) = mnist
    x, y = x[:8], y[:8]
    seen = []
    tiny_vit.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    torch.manual_seed(0)
    pgd(tiny_vit, x, y, threat, restarts=2)
    assert len(seen) >= 2 * threat.steps  # at least every step of both restarts was seen
    for xi in seen:
        _check_ball(xi, x, threat)


@pytest.mark.parametrize("start_training", [True, False])
def test_eval_while_attacking_and_mode_restored(tiny_vit: Classifier, mnist, start_training: bool) -> None:
    _, (x, y) = mnist
    tiny_vit.train(start_training)
    modes = []
    tiny_vit.backbone.blocks[0].register_forward_pre_hook(lambda m, args: modes.append(m.training))
    for restarts in (1, 2):
        pgd(tiny_vit, x[:4], y[:4], Threat(0.1, "Linf", 2), restarts=restarts)
        assert tiny_vit.training is start_training
        assert all(m.training is start_training for m in tiny_vit.modules())
    assert modes and not any(modes)  # every crafting forward ran in eval mode


def test_mode_restored_when_attack_raises(tiny_vit: Classifier, mnist) -> None:
    _, (x, y) = mnist
    tiny_vit.train()
    with pytest.raises(ValueError, match="unknown attack loss"):
        pgd(tiny_vit, x[:2], y[:2], Threat(0.1), loss="nope")
    assert tiny_vit.training


def test_no_parameter_grads(tiny_vit: Classifier, mnist) -> None:
    _, (x, y) = mnist
    params = list(tiny_vit.parameters())
    assert all(p.requires_grad for p in params)
    for threat in THREATS:
        pgd(tiny_vit, x[:4], y[:4], threat, restarts=2)
        assert all(p.grad is None for p in params)
    # an existing gradient (mid training step) is neither accumulated into nor cleared
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    pgd(tiny_vit, x[:4], y[:4], Threat(0.1, "Linf", 3))
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in params)
    assert all(p.requires_grad for p in params)


# ----------------------------------------------------------------------------- strength


@pytest.mark.parametrize("threat", [Threat(0.1, "Linf", 10), Threat(1.5, "L2", 10)], ids=["Linf", "L2"])
def test_loss_goes_up_and_accuracy_down(mlp: nn.Module, mnist, threat: Threat) -> None:
    _, (x, y) = mnist
    torch.manual_seed(0)
    adv = pgd(mlp, x, y, threat)
    _check_ball(adv, x, threat)
    clean, robust = _ce(mlp, x, y), _ce(mlp, adv, y)
    assert robust.mean() > 3 * clean.mean()
    assert (robust >= clean - 1e-4).float().mean() > 0.95  # nearly every example's loss rises
    assert _acc(mlp, x, y) > 0.75
    assert _acc(mlp, adv, y) < _acc(mlp, x, y) - 0.3


def test_restarts_at_least_as_strong_per_example(mlp: nn.Module, mnist) -> None:
    _, (x, y) = mnist
    threat = Threat(0.07, "Linf", 5)
    torch.manual_seed(3)
    one = pgd(mlp, x, y, threat, restarts=1)
    torch.manual_seed(3)  # the first of the three restarts is then exactly the single run
    three = pgd(mlp, x, y, threat, restarts=3)
    _check_ball(three, x, threat)
    ok1, ok3 = _correct(mlp, one, y), _correct(mlp, three, y)
    assert not (ok3 & ~ok1).any()  # nothing robust to 3 restarts was broken by 1
    assert ok3.sum() <= ok1.sum()
    # among examples that survive all restarts, the kept iterate has the highest loss
    survive = ok3
    assert (_ce(mlp, three, y)[survive] >= _ce(mlp, one, y)[survive] - 1e-5).all()


def test_misclassified_clean_examples_stay_misclassified(mlp: nn.Module, mnist) -> None:
    _, (x, y) = mnist
    wrong = ~_correct(mlp, x, y)
    assert wrong.any()
    adv = pgd(mlp, x, y, Threat(0.05, "Linf", 5), restarts=2)
    assert not _correct(mlp, adv, y)[wrong].any()


def test_margin_loss(mlp: nn.Module, mnist) -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, -1.0, 0.0]])
    y = torch.tensor([1, 2])
    assert torch.allclose(margin_loss(logits, y), torch.tensor([2.0 - 3.0, 5.0 - 0.0]))
    assert torch.allclose(per_example_loss(logits, y, "margin"), margin_loss(logits, y))
    assert torch.equal(logits, torch.tensor([[1.0, 3.0, 2.0], [5.0, -1.0, 0.0]]))  # not modified in place
    _, (x, y) = mnist
    with torch.no_grad():
        z = mlp(x)
    assert torch.equal(margin_loss(z, y) > 0, z.argmax(1) != y)
    threat = Threat(0.1, "Linf", 10)
    torch.manual_seed(0)
    adv = pgd(mlp, x, y, threat, loss="margin")
    _check_ball(adv, x, threat)
    with torch.no_grad():
        assert margin_loss(mlp(adv), y).mean() > margin_loss(z, y).mean() + 1.0
    assert _acc(mlp, adv, y) < _acc(mlp, x, y) - 0.3


def test_trades_kl_inner_max(mlp: nn.Module, mnist) -> None:
    _, (x, y) = mnist
    with torch.no_grad():
        clean = mlp(x)
    threat = Threat(0.1, "Linf", 5)
    adv = pgd(mlp, x, y, threat, loss="kl", random_start=False, clean_logits=clean)
    _check_ball(adv, x, threat)
    with torch.no_grad():
        kl = per_example_loss(mlp(adv), y, "kl", clean)
    assert kl.mean() > 0.5


# ----------------------------------------------------------------------------- step size and bf16


def test_step_size_default_is_quarter_eps(tiny_vit: Classifier) -> None:
    assert Threat(0.1).alpha == pytest.approx(0.025)
    assert Threat(0.1, step_size=0.01).alpha == 0.01
    x = torch.full((4, 1, 28, 28), 0.5)  # far from 0 and 1: no clamping
    y = torch.arange(4)
    adv = pgd(tiny_vit, x, y, Threat(0.2, "Linf", steps=1), random_start=False)
    d = (adv - x).abs()
    assert torch.allclose(d.amax(), torch.tensor(0.05)) and (d > 0.049).float().mean() > 0.9
    adv = pgd(tiny_vit, x, y, Threat(2.0, "L2", steps=1), random_start=False)
    assert torch.allclose((adv - x).flatten(1).norm(dim=1), torch.full((4,), 0.5), atol=1e-5)
    adv = pgd(tiny_vit, x, y, Threat(0.2, "Linf", steps=1, step_size=0.03), random_start=False)
    assert torch.allclose((adv - x).abs().amax(), torch.tensor(0.03))


@pytest.mark.parametrize("threat", THREATS, ids=["Linf", "L2"])
def test_bf16_runs_and_stays_in_ball(tiny_vit: Classifier, mlp: nn.Module, mnist, threat: Threat) -> None:
    _, (x, y) = mnist
    adv = pgd(tiny_vit, x[:8], y[:8], threat, bf16=True, restarts=2)
    _check_ball(adv, x[:8], threat)
    assert adv.dtype == torch.float32
    torch.manual_seed(0)
    adv = pgd(mlp, x, y, threat, bf16=True)
    _check_ball(adv, x, threat)
    assert _ce(mlp, adv, y).mean() > 2 * _ce(mlp, x, y).mean()


# ----------------------------------------------------------------------------- cross-check


def test_matches_torchattacks_pgd(mlp: nn.Module, mnist) -> None:
    """Same algorithm (uniform random start, sign steps of ε/4, projection, clamp) as torchattacks.PGD.

    Tolerance: robust accuracy within 5 points on 200 images, at ε where it is far from 0 and from clean.
    """
    torchattacks = pytest.importorskip("torchattacks")
    _, (x, y) = mnist
    clean = _acc(mlp, x, y)
    for eps in (0.05, 0.08):
        torch.manual_seed(0)
        ours = _acc(mlp, pgd(mlp, x, y, Threat(eps, "Linf", 10)), y)
        torch.manual_seed(0)
        ref_adv = torchattacks.PGD(mlp, eps=eps, alpha=eps / 4, steps=10, random_start=True)(x, y)
        ref = _acc(mlp, ref_adv, y)
        assert 0.1 < ref < clean - 0.2, f"eps={eps}: reference robust accuracy {ref} makes a weak comparison"
        assert abs(ours - ref) <= 0.05, f"eps={eps}: ours {ours:.3f} vs torchattacks {ref:.3f}"


def test_bf16_on_cpu_uses_math_attention(tiny_vit: Classifier, mnist) -> None:
    """bf16 crafting on CPU runs attention on the math path (the fused CPU kernel's bf16 backward is slow on
    short sequences, docs/performance.md); the backend flags are restored afterwards; logits stay close."""
    from advtransfer.attacks import autocast

    (x, _), _ = mnist
    before = torch.backends.cuda.flash_sdp_enabled()
    with torch.no_grad():
        ref = tiny_vit(x[:16])
        with autocast(True, torch.device("cpu")):
            assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
            low = tiny_vit(x[:16])
    assert torch.backends.cuda.flash_sdp_enabled() == before
    assert low.dtype == torch.bfloat16 and (low.float() - ref).abs().max() < 0.1 * ref.abs().max()
