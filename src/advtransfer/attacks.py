"""PGD under L∞ and L2 (Madry et al., 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks").

Inputs are ``[0,1]`` images at their native resolution; the model does its own resize/normalisation.
Contracts: the model runs in ``eval()`` while crafting and gets its caller's mode back; gradients are
taken with respect to the input only (``torch.autograd.grad``), so no ``.grad`` is ever left on
parameters and no weight-gradient work is done; every iterate stays inside the ε-ball and ``[0,1]``.

Defaults: ``step_size=None`` means ε/4 (the paper's setting for L∞: PGD-7/10 with step ε/4); random start
uniform in the L∞ ball, or uniform in the L2 ball. With ``restarts > 1`` each example keeps its worst
case: an iterate that fools the model is kept over any that does not; otherwise the highest loss wins.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Threat:
    """A threat model plus the PGD that searches it."""

    eps: float
    norm: str = "Linf"  # "Linf" | "L2"
    steps: int = 10
    step_size: float | None = None  # None = eps / 4

    @property
    def alpha(self) -> float:
        return self.eps / 4 if self.step_size is None else self.step_size


@contextlib.contextmanager
def autocast(enabled: bool, device: torch.device):
    """bf16 autocast on CPU or CUDA when ``enabled``; a no-op context otherwise.

    On CPU, attention inside runs on PyTorch's math SDPA path: the fused CPU flash-attention kernel's bf16
    backward is slow on short sequences (``benchmarks/bf16_attention.py``, one attack step vs fp32: 28-px
    mini-ViT, 17 tokens, 0.47x fused vs 1.30x math; ViT-Tiny/224 1.39x vs 1.35x; docs/performance.md).
    """
    if not enabled:
        yield
        return
    with torch.autocast(device.type, dtype=torch.bfloat16), contextlib.ExitStack() as stack:
        if device.type == "cpu":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        yield


@contextlib.contextmanager
def params_frozen(model: nn.Module):
    """Switch off ``requires_grad`` on every parameter while crafting: the forward then records no graph
    for weight gradients (less memory, less work); the caller's flags are restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CW margin per example: ``max_{j != y} z_j - z_y`` (positive once misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], -torch.inf)
    return other.amax(1) - true


def per_example_loss(
    logits: torch.Tensor, y: torch.Tensor, loss: str, clean_logits: torch.Tensor | None = None
) -> torch.Tensor:
    logits = logits.float()
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "margin":
        return margin_loss(logits, y)
    if loss == "kl":  # TRADES inner maximisation: KL(p_clean || p_adv)
        return F.kl_div(F.log_softmax(logits, 1), F.softmax(clean_logits.float(), 1), reduction="none").sum(1)
    raise ValueError(f"unknown attack loss {loss!r}")


def uniform_start(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "Linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        d = x[0].numel()
        direction = torch.randn_like(x)
        direction /= direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.ndim - 1))
        radius = eps * torch.rand(x.shape[0], device=x.device).pow(1.0 / d)
        delta = direction * radius.view(-1, *[1] * (x.ndim - 1))
    return (x + delta).clamp_(0, 1) - x


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "Linf":
        return delta.clamp_(-eps, eps)
    n = delta.flatten(1).norm(dim=1).view(-1, *[1] * (delta.ndim - 1))
    return delta * torch.clamp(eps / n.clamp_min(1e-12), max=1.0)


def _ascend(delta: torch.Tensor, grad: torch.Tensor, alpha: float, norm: str) -> torch.Tensor:
    if norm == "Linf":
        return delta + alpha * grad.sign()
    g = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (grad.ndim - 1))
    return delta + alpha * grad / g


def _pgd_once(
    model, x, y, threat: Threat, loss: str, random_start: bool, bf16: bool, clean_logits, start=None
) -> torch.Tensor:
    if start is not None:  # a start drawn by the caller (e.g. for a whole global batch split across ranks)
        delta = (x + _project(start.clone(), threat.eps, threat.norm)).clamp_(0, 1) - x
    else:
        delta = uniform_start(x, threat.eps, threat.norm) if random_start else torch.zeros_like(x)
    if loss == "kl" and not random_start:
        delta = (x + 0.001 * torch.randn_like(x)).clamp_(0, 1) - x  # TRADES' small Gaussian start
    for _ in range(threat.steps):
        delta.requires_grad_(True)
        with autocast(bf16, x.device):
            logits = model(x + delta)
        obj = per_example_loss(logits, y, loss, clean_logits).sum()  # sum: each example's step ignores batch size
        (grad,) = torch.autograd.grad(obj, delta)
        with torch.no_grad():
            delta = _project(_ascend(delta, grad, threat.alpha, threat.norm), threat.eps, threat.norm)
            delta = (x + delta).clamp_(0, 1) - x
    return (x + delta).detach()


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: Threat,
    *,
    restarts: int = 1,
    loss: str = "ce",
    random_start: bool = True,
    bf16: bool = False,
    clean_logits: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Projected gradient descent; returns adversarial images in ``[0,1]`` within ``threat.eps`` of ``x``.

    Args:
        model: maps ``[0,1]`` images to logits. Put in ``eval()`` while attacking; its mode is restored.
        x, y: images ``[N,C,H,W]`` in ``[0,1]`` and int64 labels.
        threat: ε, norm (``Linf``/``L2``), steps and step size (default ε/4).
        restarts: random restarts; the per-example worst case is kept.
        loss: ``ce`` (cross-entropy), ``margin`` (CW-style), or ``kl`` (TRADES; needs ``clean_logits``).
        bf16: craft under bf16 autocast (training speed); reported evaluations use fp32.
        start: the first restart's initial perturbation (default: drawn here, uniform in the ball).
    """
    was_training = model.training
    model.eval()
    try:
        with params_frozen(model):
            if restarts == 1:
                return _pgd_once(model, x, y, threat, loss, random_start, bf16, clean_logits, start)
            best, best_loss = x.clone(), torch.full((len(x),), -math.inf, device=x.device)
            fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
            for _ in range(restarts):
                adv = _pgd_once(model, x, y, threat, loss, random_start, bf16, clean_logits)
                with torch.no_grad():
                    logits = model(adv)
                    l_adv = per_example_loss(logits, y, loss, clean_logits)
                    wrong = logits.argmax(1) != y
                take = ~fooled & (wrong | (l_adv > best_loss))
                best[take], best_loss[take] = adv[take], l_adv[take]
                fooled |= wrong
            return best
    finally:
        model.train(was_training)
