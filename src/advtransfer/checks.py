"""Sanity flags against false robustness (Carlini et al. 2019's checklist, AutoAttack's guidance): each a
``{"flag": name, "detail": text}`` warning, and every one can fire (``tests/test_checks.py``). Differences count only
beyond ``noise`` (two binomial standard errors plus one example), so a flag on 100 examples means something."""

from __future__ import annotations

import math

import torch
from torch import nn

from .attacks import Threat, clean_correct, pgd, pgd_correct

FLAGS = {
    "model_in_train_mode": "the model was passed in train mode; it was evaluated in eval mode",
    "non_finite_weights": "some weights are NaN or infinite: every accuracy is meaningless",
    "non_finite_logits": "the model outputs NaN or infinite logits: argmax accuracies are meaningless",
    "nondeterministic_forward": "two eval-mode forwards differ: randomness can fake robustness",
    "outputs_look_like_probabilities": "rows are non-negative and sum to 1: attacks need logits",
    "vanishing_input_gradients": "many examples have a zero input gradient: gradient masking",
    "robust_above_clean": "PGD leaves more examples correct than no attack: a correct attack cannot help",
    "stronger_attack_raises_accuracy": "a stronger PGD leaves more examples correct than the standard one",
    "accuracy_at_huge_eps": "accuracy far above chance at a huge radius: the attack does not work",
    "autoattack_above_pgd": "AutoAttack leaves more examples correct than PGD on the same points",
    "pgd_overestimates": "AutoAttack is clearly below PGD on the same points: PGD-only numbers overstate robustness",
    "accuracy_not_decreasing_in_eps": "robust accuracy rises with a larger radius",
}


def noise(p: float, n: int) -> float:
    """Two binomial standard errors plus one example: what a difference must exceed to count."""
    return 2 * math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1)) + 1.0 / max(n, 1)


def flag(name: str, detail: str) -> dict:
    return {"flag": name, "detail": f"{detail} ({FLAGS[name]})"}


def model_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, was_training: bool) -> list[dict]:
    """Checks on the model itself (on up to 64 examples): mode, finiteness, determinism, logits, input gradients."""
    x, y = x[:64], y[:64]
    out = [flag("model_in_train_mode", "evaluated in eval mode")] if was_training else []
    if bad := [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]:
        out.append(flag("non_finite_weights", f"{len(bad)} tensor(s), e.g. {bad[0]}"))
    with torch.no_grad():
        a, b = model(x).float(), model(x).float()
    if not torch.isfinite(a).all():
        return [*out, flag("non_finite_logits", f"{int((~torch.isfinite(a)).any(1).sum())} of {len(a)} examples")]
    if not torch.allclose(a, b, atol=1e-5, rtol=1e-4):
        out.append(flag("nondeterministic_forward", f"max difference {float((a - b).abs().max()):.2e}"))
    if (a >= 0).all() and torch.allclose(a.sum(1), torch.ones(len(a), device=a.device), atol=1e-3):
        out.append(flag("outputs_look_like_probabilities", "every row sums to 1"))
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(model(xg).float(), y, reduction="sum"), xg)
    if (vanishing := (g.flatten(1).abs().amax(1) < 1e-10).float().mean().item()) > 0.1:
        out.append(flag("vanishing_input_gradients", f"{vanishing:.0%} of examples"))
    return out


def attack_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, num_classes: int) -> list[dict]:
    """Checks on the attack (up to 100 examples, all attacked): PGD must not help, a stronger PGD must not do worse,
    and a huge radius must break the model."""
    x, y, out = x[:100], y[:100], []
    n, clean, steps = len(x), clean_correct(model, x, y).float().mean().item(), threat.steps
    stronger = Threat(threat.eps, threat.norm, steps * 2, threat.alpha / 2)
    huge = Threat(0.5 if threat.norm == "Linf" else threat.eps * 20, threat.norm, 20, None)
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        raw = clean_correct(model, pgd(model, x, y, threat), y).float().mean().item()
        more = pgd_correct(model, x, y, stronger, restarts=2).float().mean().item()
        at_huge = pgd_correct(model, x, y, huge).float().mean().item()
    if raw > clean + noise(clean, n):
        out.append(flag("robust_above_clean", f"PGD-{steps} {raw:.3f} > clean {clean:.3f} on {n} examples"))
    if more > raw + noise(raw, n):
        out.append(flag("stronger_attack_raises_accuracy", f"PGD-{steps * 2}x2 {more:.3f} > PGD-{steps} {raw:.3f}"))
    chance = 1.0 / max(num_classes, 2)
    if at_huge > chance + 0.1 + noise(chance, n):
        out.append(flag("accuracy_at_huge_eps", f"{at_huge:.3f} at eps={huge.eps:g}, chance {chance:.3f}"))
    return out


def autoattack_flags(pgd_acc: float, aa_acc: float, n: int) -> list[dict]:
    """AutoAttack against PGD on the same examples: above is impossible for a working AutoAttack, clearly below means
    PGD-only numbers overstate robustness."""
    if aa_acc > pgd_acc + noise(pgd_acc, n):
        return [flag("autoattack_above_pgd", f"AutoAttack {aa_acc:.4f} > PGD {pgd_acc:.4f} on {n} examples")]
    if aa_acc < pgd_acc - noise(pgd_acc, n):
        return [flag("pgd_overestimates", f"AutoAttack {aa_acc:.4f} < PGD {pgd_acc:.4f} on {n} examples")]
    return []


def sweep_flags(points: list[dict], n: int) -> list[dict]:
    """Any rise of robust accuracy with a larger ε beyond noise (AutoAttack if every point has it, else PGD)."""
    attacked = [p for p in points if p["eps"] > 0]
    key = "autoattack" if attacked and all("autoattack" in p for p in attacked) else "pgd"
    out = []
    for a, b in zip(points, points[1:]):
        acc_a, acc_b = a.get(key, a["pgd"]), b.get(key, b["pgd"])
        if b["eps"] > a["eps"] and acc_b > acc_a + noise(acc_a, n):
            detail = f"{key} {acc_b:.3f} at eps={b['eps']:g} > {acc_a:.3f} at eps={a['eps']:g}"
            out.append(flag("accuracy_not_decreasing_in_eps", detail))
    return out
