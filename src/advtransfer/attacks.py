"""Attacks on ``[0,1]`` images: PGD under L∞ and L2 (Madry et al. 2018), fast-AT crafting (FGSM-RS, N-FGSM), and the
per-example correctness of a batch under no attack, PGD and AutoAttack. While crafting, the model runs in ``eval()``
with every parameter frozen (input gradients only, no ``.grad`` left); every iterate stays in the ε-ball and ``[0,1]``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import distributed as D
from .config import AttackConfig
from .errors import UserError


@dataclass(frozen=True)
class Threat:
    """A threat model plus the PGD that searches it; ``eps`` is usually the config's ``Eps`` (keeps its text)."""

    eps: float
    norm: str = "Linf"  # "Linf" | "L2"
    steps: int = 10
    step_size: float | None = None  # None = eps / 4
    iterate: str = "last"  # "last" | "best" (the iterate with the highest batch-mean loss, as the paper's code)
    early_exit: bool = False  # an example stops (keeps its iterate) once misclassified; changes the attack

    def __post_init__(self) -> None:
        if self.early_exit and self.iterate == "best":
            raise UserError("attack: early_exit needs iterate 'last' (the 'best' rule compares whole-batch losses)")

    @property
    def alpha(self) -> float:
        return self.eps / 4 if self.step_size is None else self.step_size

    @classmethod
    def of(cls, attack: AttackConfig, steps: int | None = None, early_exit: bool = False) -> Threat:
        """The config's threat model, with ``steps`` PGD steps (default: the training attack's)."""
        return cls(attack.eps, attack.norm.value, steps or attack.steps, attack.step_size, attack.iterate, early_exit)


@contextlib.contextmanager
def autocast(enabled: bool, device: torch.device) -> Iterator[None]:
    """bf16 autocast if ``enabled``; on CPU, math SDPA (the fused kernel's bf16 backward is slow: bf16_attention.py)"""
    with contextlib.ExitStack() as stack:
        if enabled:
            stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
            if device.type == "cpu":
                stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        yield


@contextlib.contextmanager
def attacking(model: nn.Module) -> Iterator[None]:
    """Eval mode and every parameter frozen while crafting (no weight-gradient graph); the caller's state returns."""
    was, flags = model.training, [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was)


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """CW margin per example: ``max_{j != y} z_j - z_y`` (positive once misclassified)."""
    other = logits.clone().scatter_(1, y[:, None], -torch.inf)
    return other.amax(1) - logits.gather(1, y[:, None]).squeeze(1)


def per_example_loss(logits: Tensor, y: Tensor, loss: str, clean: Tensor | None = None) -> Tensor:
    logits = logits.float()
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "margin":
        return margin_loss(logits, y)
    if loss == "kl":  # TRADES inner maximisation: KL(p_clean || p_adv)
        return F.kl_div(F.log_softmax(logits, 1), F.softmax(clean.float(), 1), reduction="none").sum(1)
    raise ValueError(f"unknown attack loss {loss!r}")


def _norms(t: Tensor) -> Tensor:
    """Per-example L2 norms (at least 1e-12), shaped to broadcast over ``t``."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (t.ndim - 1))


def uniform_start(x: Tensor, eps: float, norm: str) -> Tensor:
    """A perturbation uniform in the ε-ball, clipped so that ``x + delta`` stays in ``[0,1]``."""
    if norm == "Linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        direction = torch.randn_like(x)
        radius = eps * torch.rand(len(x), device=x.device).pow(1.0 / x[0].numel())
        delta = direction / _norms(direction) * radius.view(-1, *[1] * (x.ndim - 1))
    return (x + delta).clamp_(0, 1) - x


def project(delta: Tensor, eps: float, norm: str) -> Tensor:
    return delta.clamp_(-eps, eps) if norm == "Linf" else delta * torch.clamp(eps / _norms(delta), max=1.0)


def ascend(delta: Tensor, grad: Tensor, alpha: float, norm: str) -> Tensor:
    return delta + (alpha * grad.sign() if norm == "Linf" else alpha * grad / _norms(grad))


def input_grad(model: nn.Module, x: Tensor, y: Tensor, loss: str, bf16: bool, clean=None):
    """(summed loss, its gradient w.r.t. ``x``, logits): the sum makes each example's step independent of the batch."""
    x = x.detach().requires_grad_(True)
    with autocast(bf16, x.device):
        logits = model(x)
        obj = per_example_loss(logits, y, loss, clean).sum()
    return obj.detach(), torch.autograd.grad(obj, x)[0], logits.detach()


def _pgd_once(model, x, y, threat: Threat, loss: str, random_start: bool, bf16: bool, clean, start, live):
    """One PGD run on the examples ``live`` (None = all); the start is drawn for the whole batch regardless."""
    if start is not None:  # a start drawn by the caller (e.g. for a whole global batch split across ranks)
        delta = (x + project(start.clone(), threat.eps, threat.norm)).clamp_(0, 1) - x
    elif loss == "kl" and not random_start:
        delta = (x + 0.001 * torch.randn_like(x)).clamp_(0, 1) - x  # TRADES' small Gaussian start
    else:
        delta = uniform_start(x, threat.eps, threat.norm) if random_start else torch.zeros_like(x)
    best, best_loss = delta, -math.inf
    for _ in range(threat.steps):
        at = slice(None) if live is None else live
        obj, grad, logits = input_grad(model, (x + delta)[at], y[at], loss, bf16, None if clean is None else clean[at])
        if threat.iterate == "best" and (total := D.all_sum([obj.item()])[0]) > best_loss:
            best, best_loss = delta, total  # the iterate whose loss was just measured
        if threat.early_exit:  # fooled examples keep this iterate and leave the batch
            keep = logits.argmax(1) == y[at]
            live = (torch.arange(len(x), device=x.device) if live is None else live)[keep]
            at, grad = live, grad[keep]
            if not len(live):
                break
        step = project(ascend(delta[at], grad, threat.alpha, threat.norm), threat.eps, threat.norm)
        step = (x[at] + step).clamp_(0, 1) - x[at]
        delta = step if live is None else delta.index_put((live,), step)
    if threat.iterate == "best":
        at = slice(None) if live is None else live
        with torch.no_grad(), autocast(bf16, x.device):
            last = per_example_loss(model((x + delta)[at]), y[at], loss, None if clean is None else clean[at])
        delta = delta if D.all_sum([last.sum().item()])[0] > best_loss else best
    return (x + delta).detach()


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: Threat,
    *,
    restarts: int = 1,
    loss: str = "ce",
    random_start: bool = True,
    bf16: bool = False,
    clean_logits: Tensor | None = None,
    start: Tensor | None = None,
    live: Tensor | None = None,
) -> Tensor:
    """Projected gradient ascent on ``loss`` (``ce``, ``margin``, or ``kl``: TRADES, needs ``clean_logits``): images in
    ``[0,1]`` within ``threat.eps`` of ``x``. With ``restarts > 1`` each example keeps its worst case (an iterate that
    fools the model wins, else the highest loss). ``start``: the first restart's perturbation (default uniform in
    the ball); ``live``: the examples to attack (default all; the others come back at their random start)."""
    with attacking(model):
        if restarts == 1:
            return _pgd_once(model, x, y, threat, loss, random_start, bf16, clean_logits, start, live)
        at = torch.arange(len(x), device=x.device) if live is None else live
        best, best_loss = x.clone(), torch.full((len(x),), -math.inf, device=x.device)
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(restarts):
            adv = _pgd_once(model, x, y, threat, loss, random_start, bf16, clean_logits, None, live)[at]
            with torch.no_grad():
                logits = model(adv)
            c = None if clean_logits is None else clean_logits[at]
            l_adv, wrong = per_example_loss(logits, y[at], loss, c), logits.argmax(1) != y[at]
            take = ~fooled[at] & (wrong | (l_adv > best_loss[at]))
            best[at[take]], best_loss[at[take]] = adv[take], l_adv[take]
            fooled[at] |= wrong
        return best


def fgsm(model: nn.Module, x: Tensor, y: Tensor, threat: Threat, kind: str, bf16: bool = False):
    """One-step adversarial examples for fast AT (L∞). ``fgsm-rs`` (Wong et al. 2020): uniform start in the ε-ball,
    one step of 1.25 ε, projected to the ball. ``n-fgsm`` (de Jorge et al. 2022): uniform noise in the 2ε-ball, one
    step of ε, not projected (the perturbation may reach 3ε: that is the method, on purpose). Both stay in ``[0,1]``."""
    with attacking(model):
        rs = kind == "fgsm-rs"
        delta = uniform_start(x, threat.eps if rs else 2 * threat.eps, "Linf")
        grad = input_grad(model, x + delta, y, "ce", bf16)[1]
        delta = ascend(delta, grad, 1.25 * threat.eps if rs else threat.eps, "Linf")
        delta = project(delta, threat.eps, "Linf") if rs else delta
        return (x + delta).clamp_(0, 1).detach()


@torch.no_grad()
def clean_correct(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Per-example mask: predicted correctly (eval mode, fp32; the caller's mode returns)."""
    with attacking(model):
        return model(x).argmax(1) == y


def pgd_correct(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: Threat,
    *,
    restarts: int = 1,
    loss: str = "ce",
    only: Tensor | None = None,
) -> Tensor:
    """Per-example mask: still correct after PGD; ``only`` attacks just these (the rest False), as masking after."""
    idx = None if only is None or threat.iterate == "best" else only.nonzero().squeeze(1)
    robust = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    if idx is not None and not len(idx):
        for _ in range(restarts):  # draw the starts all the same: later batches see the RNG as after a full attack
            uniform_start(x, threat.eps, threat.norm)
        return robust
    adv = pgd(model, x, y, threat, restarts=restarts, loss=loss, live=idx)
    if idx is None:
        return clean_correct(model, adv, y) & (True if only is None else only)
    return robust.index_put_((idx,), clean_correct(model, adv[idx], y[idx]))


def autoattack(
    model: nn.Module,
    eps: float,
    norm: str,
    num_classes: int,
    *,
    version: str = "standard",
    attacks: Sequence[str] = (),
    seed: int = 0,
    device: torch.device | None = None,
):
    """fra31's AutoAttack (``min(9, K-1)`` target classes) and its attack sequence (``attacks`` if custom)."""
    from pyautoattack import AutoAttack

    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    custom = list(attacks) if version == "custom" else None
    aa = AutoAttack(model, eps=float(eps), norm=norm, seed=seed, version=version, device=device, attacks=custom)
    aa.verbose = False
    for part in (aa.apgd_targeted, aa.fab):
        part.n_target_classes = min(part.n_target_classes, num_classes - 1)
    return aa, list(aa.attacks_to_run)


def autoattack_correct(aa, attack: str, x: Tensor, y: Tensor, model: nn.Module) -> Tensor:
    """Per-example mask: still correct after one AutoAttack ``attack`` on a batch of (so far robust) examples."""
    with attacking(model):
        aa.attacks_to_run = [attack]
        adv, _ = aa.run_standard_evaluation(x, y, batch_size=len(x))
        return clean_correct(model, adv.to(x.device), y)
