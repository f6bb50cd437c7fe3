"""Clean / PGD / AutoAttack accuracy with per-example masks, and sanity flags against false robustness.

Every accuracy is the mean of a per-example boolean mask (True = still correct), so an ensemble result
is the per-example worst case (a logical AND over attacks), never a mean over attacks. AutoAttack is
fra31's standard version through ``pyautoattack``: APGD-CE, APGD-T and FAB-T with ``min(9, K-1)`` target
classes, Square with 5000 queries. The model is evaluated in ``eval()`` mode and in fp32.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .attacks import Threat, pgd
from .errors import UserError
from .models import atomic_write

ATTACKS = ("clean", "pgd", "autoattack")
AA_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square", "apgd-dlr", "fab")


@torch.no_grad()
def clean_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():  # no graph for trainable parameters: evaluation only reads the logits
            return torch.cat(
                [model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size] for i in range(0, len(x), batch_size)]
            )
    finally:
        model.train(was)


def pgd_correct(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: Threat,
    *,
    restarts: int = 1,
    loss: str = "ce",
    batch_size: int = 256,
) -> torch.Tensor:
    """Per-example mask: still correct after PGD (worst case over restarts)."""
    out = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        adv = pgd(model, xb, yb, threat, restarts=restarts, loss=loss)
        out.append(clean_correct(model, adv, yb, batch_size))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def autoattack_correct(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "Linf",
    num_classes: int | None = None,
    version: str = "standard",
    attacks: Sequence[str] = (),
    seed: int = 0,
    batch_size: int = 256,
    state_path: Path | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example AutoAttack mask (True = robust) and adversarial images; resumable via ``state_path``.

    The attacks of the chosen version run one after another, each on the examples still robust, exactly
    as ``run_standard_evaluation`` does, so the mask is the per-example worst case. We drive the sequence
    ourselves (one attack per call) because pyautoattack 0.2.0's own state file cannot be reloaded (it
    writes the attack set as a Python repr); our JSON state records the mask after every finished attack.
    """
    from pyautoattack import AutoAttack

    if version == "custom":
        bad = [a for a in attacks if a not in AA_ATTACKS]
        if not attacks or bad:
            raise UserError(f"eval: custom AutoAttack needs attacks from {list(AA_ATTACKS)}, got {list(attacks)}")
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    was = model.training
    model.eval()
    try:
        custom = list(attacks) if version == "custom" else None
        aa = AutoAttack(model, eps=eps, norm=norm, seed=seed, version=version, device=x.device, attacks=custom)
        aa.verbose = False
        k = num_classes or int(model(x[:1]).shape[1])
        aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, k - 1)
        aa.fab.n_target_classes = min(aa.fab.n_target_classes, k - 1)
        sequence = list(aa.attacks_to_run)
        key = _aa_key(model, x, y, eps=eps, norm=norm, seed=seed, version=version, attacks=sequence, k=k)
        state = _load_aa_state(state_path, key)
        if state is None:
            robust0 = clean_correct(model, x, y, batch_size).cpu().tolist()
            state = {"key": key, "done": [], "robust": robust0, "per_attack": {}}
            _save_aa_state(state_path, state)
        robust = torch.tensor(state["robust"], dtype=torch.bool)
        x_adv = x.clone()
        for attack in sequence:
            if attack in state["done"]:
                continue
            idx = robust.nonzero().squeeze(1)
            if len(idx):
                aa.attacks_to_run = [attack]
                on = idx.to(x.device)
                adv, _ = aa.run_standard_evaluation(x[on], y[on], batch_size=batch_size)
                adv = adv.to(x.device)
                broken = ~clean_correct(model, adv, y[idx], batch_size).cpu()
                robust[idx[broken]] = False
                x_adv[on[broken.to(x.device)]] = adv[broken.to(x.device)]
            state["done"].append(attack)
            state["robust"] = robust.tolist()
            state["per_attack"][attack] = robust.float().mean().item()
            _save_aa_state(state_path, state)
    finally:
        model.train(was)
    return robust, x_adv


def _aa_key(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **settings) -> dict:
    """What an AutoAttack state belongs to: settings, the labels, and the model's logits on a few images."""
    import hashlib

    with torch.no_grad():
        probe = model(x[:4]).float().cpu().numpy().round(3).tobytes()
    data = y.cpu().numpy().tobytes() + x[:4].cpu().numpy().tobytes()
    return {
        **settings,
        "n": len(x),
        "data": hashlib.sha256(data).hexdigest()[:16],
        "model": hashlib.sha256(probe).hexdigest()[:16],
    }


def _load_aa_state(path: Path | None, key: dict) -> dict | None:
    if path is None or not Path(path).exists():
        return None
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"eval: AutoAttack state {path} is unreadable; delete it to start over") from None
    if state.get("key") != key:
        raise UserError(f"eval: AutoAttack state {path} belongs to another evaluation (model, data or settings differ)")
    return state


def _save_aa_state(path: Path | None, state: dict) -> None:
    if path is not None:
        atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(state)), all_ranks=True)


def _noise(p: float, n: int) -> float:
    """Two binomial standard errors plus one example: what a difference must exceed to count."""
    return 2 * math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1)) + 1.0 / max(n, 1)


def model_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, was_training: bool) -> list[dict]:
    """Checks on the model itself: train mode, determinism, probabilities instead of logits, zero gradients."""
    flags = []
    if was_training:
        flags.append(
            {"flag": "model_in_train_mode", "detail": "the model was passed in train mode; evaluated in eval mode"}
        )
    x, y = x[:64], y[:64]
    with torch.no_grad():
        a, b = model(x), model(x)
    if not torch.allclose(a, b, atol=1e-5, rtol=1e-4):
        flags.append(
            {
                "flag": "nondeterministic_forward",
                "detail": "two eval-mode forwards differ: randomness can fake robustness",
            }
        )
    if (a >= 0).all() and torch.allclose(a.sum(1), torch.ones(len(a), device=a.device), atol=1e-3):
        flags.append(
            {
                "flag": "outputs_look_like_probabilities",
                "detail": "rows are non-negative and sum to 1: attacks need logits",
            }
        )
    xg = x.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(xg).float(), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, xg)
    vanishing = (g.flatten(1).abs().amax(1) < 1e-10).float().mean().item()
    if vanishing > 0.1:
        flags.append(
            {
                "flag": "vanishing_input_gradients",
                "detail": f"{vanishing:.0%} of examples have zero input gradient: gradient masking",
            }
        )
    return flags


def result_flags(res: dict, n: int) -> list[dict]:
    """Checks across the accuracies of one evaluation."""
    flags = []
    clean = res.get("clean")
    for key in ("pgd", "autoattack"):
        if clean is not None and res.get(key) is not None and res[key] > clean + 1e-9:
            flags.append(
                {
                    "flag": "robust_above_clean",
                    "detail": f"{key} {res[key]:.4f} > clean {clean:.4f}: impossible for a correct attack",
                }
            )
    if res.get("pgd") is not None and res.get("autoattack") is not None:
        if res["autoattack"] > res["pgd"] + _noise(res["pgd"], n):
            flags.append(
                {
                    "flag": "autoattack_above_pgd",
                    "detail": f"AutoAttack {res['autoattack']:.4f} > PGD {res['pgd']:.4f} beyond noise",
                }
            )
    return flags


def attack_strength_flags(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: Threat,
    num_classes: int,
    batch_size: int,
) -> list[dict]:
    """Stronger attacks must not do worse; a huge ε must break the model. Run on up to 100 examples."""
    flags = []
    x, y = x[:100], y[:100]
    n = len(x)
    base = pgd_correct(model, x, y, threat, batch_size=batch_size).float().mean().item()
    stronger = Threat(threat.eps, threat.norm, threat.steps * 2, threat.alpha / 2)
    more = pgd_correct(model, x, y, stronger, restarts=2, batch_size=batch_size).float().mean().item()
    if more > base + _noise(base, n):
        flags.append(
            {
                "flag": "stronger_attack_raises_accuracy",
                "detail": f"PGD-{stronger.steps}x2 restarts {more:.3f} > PGD-{threat.steps} {base:.3f}",
            }
        )
    huge = Threat(0.5 if threat.norm == "Linf" else threat.eps * 20, threat.norm, 20, None)
    acc = pgd_correct(model, x, y, huge, batch_size=batch_size).float().mean().item()
    chance = 1.0 / max(num_classes, 2)
    if acc > chance + 0.1 + _noise(chance, n):
        flags.append(
            {
                "flag": "accuracy_at_huge_eps",
                "detail": f"accuracy {acc:.3f} at eps={huge.eps:g} is far above chance {chance:.3f}",
            }
        )
    return flags


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float,
    norm: str = "Linf",
    attacks: Sequence[str] = ("clean", "pgd"),
    pgd_steps: int = 10,
    pgd_step_size: float | None = None,
    pgd_restarts: int = 1,
    pgd_loss: str = "ce",
    batch_size: int = 256,
    seed: int = 0,
    aa_version: str = "standard",
    aa_attacks: Sequence[str] = (),
    aa_state: Path | None = None,
    num_classes: int | None = None,
    checks: bool = True,
) -> dict:
    """Accuracies as fractions in [0,1] under ``"clean"``, ``"pgd"``, ``"autoattack"`` (those requested).

    Works on any ``nn.Module`` mapping ``[0,1]`` images to logits. ``pgd_step_size=None`` means ε/4.
    Also returns ``"n"``, the settings, per-example ``"masks"`` (bool tensors) and ``"flags"``, a list
    of ``{"flag", "detail"}`` sanity warnings (empty when nothing looks suspicious).
    """
    bad = [a for a in attacks if a not in ATTACKS]
    if bad:
        raise UserError(f"eval: unknown attack(s) {bad}; known: {list(ATTACKS)}")
    if norm not in ("Linf", "L2"):
        raise UserError(f"eval: norm must be Linf or L2, got {norm!r}")
    if images.ndim != 4 or len(images) != len(labels) or len(images) == 0:
        raise UserError(
            f"eval: need images [N,C,H,W] and N labels, got {tuple(images.shape)} and {tuple(labels.shape)}"
        )
    if images.min() < 0 or images.max() > 1:
        raise UserError("eval: images must be in [0,1] (normalisation belongs inside the model)")
    was_training = model.training
    model.eval()
    threat = Threat(eps, norm, pgd_steps, pgd_step_size)
    n = len(images)
    res: dict = {"n": n, "eps": eps, "norm": norm, "seed": seed, "masks": {}}
    try:
        with torch.random.fork_rng(devices=[images.device] if images.is_cuda else []):
            torch.manual_seed(seed)
            clean = clean_correct(model, images, labels, batch_size)
            if "clean" in attacks:
                res["masks"]["clean"] = clean
            if "pgd" in attacks:
                raw = pgd_correct(
                    model, images, labels, threat, restarts=pgd_restarts, loss=pgd_loss, batch_size=batch_size
                )
                res["masks"]["pgd"] = raw & clean  # an example counts as robust only if it is also correct
                raw_pgd = raw.float().mean().item()
                res["pgd_settings"] = {
                    "steps": pgd_steps,
                    "step_size": threat.alpha,
                    "restarts": pgd_restarts,
                    "loss": pgd_loss,
                }
            if "autoattack" in attacks:
                import pyautoattack

                mask, _ = autoattack_correct(
                    model, images, labels, eps=eps, norm=norm, num_classes=num_classes, version=aa_version,
                    attacks=aa_attacks, seed=seed, batch_size=batch_size, state_path=aa_state,
                )  # fmt: skip
                res["masks"]["autoattack"] = mask
                res["autoattack_settings"] = {
                    "version": aa_version,
                    "standard": aa_version == "standard",
                    "attacks": list(aa_attacks) if aa_version == "custom" else ["apgd-ce", "apgd-t", "fab-t", "square"],
                    "library": f"pyautoattack {pyautoattack.__version__}",
                }
            for key, mask in res["masks"].items():
                res[key] = mask.float().mean().item()
            flags = []
            if checks:
                flags = model_flags(model, images, labels, was_training) + result_flags(res, n)
                clean_acc = clean.float().mean().item()
                if "pgd" in attacks and raw_pgd > clean_acc + _noise(clean_acc, n):
                    detail = f"PGD leaves {raw_pgd:.4f} correct > clean {clean_acc:.4f}: a correct attack cannot help"
                    flags.append({"flag": "robust_above_clean", "detail": detail})
                if "pgd" in res:
                    k = num_classes or int(model(images[:1]).shape[1])
                    flags += attack_strength_flags(model, images, labels, threat, k, batch_size)
        res["flags"] = flags
    finally:
        model.train(was_training)
    return res


def sweep(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps_list: Sequence[float], **kwargs) -> dict:
    """Robust accuracy over an ε list (a curve for the report) with a monotonicity flag."""
    points = []
    for eps in eps_list:
        if eps == 0:
            acc = clean_correct(model, images, labels).float().mean().item()
            points.append({"eps": 0.0, "pgd": acc, "clean": acc})
            continue
        r = evaluate(model, images, labels, eps=eps, checks=False, **kwargs)
        points.append({"eps": eps, **{k: r[k] for k in ("clean", "pgd", "autoattack") if k in r}})
    return {"points": points, "flags": sweep_flags(points, len(images))}


def sweep_flags(points: list[dict], n: int) -> list[dict]:
    """Flag any rise of robust accuracy with a larger ε beyond noise (AutoAttack if every point has it)."""
    attacked = [p for p in points if p["eps"] > 0]
    key = "autoattack" if attacked and all("autoattack" in p for p in attacked) else "pgd"
    flags = []
    for a, b in zip(points, points[1:]):
        acc_a, acc_b = a.get(key, a["pgd"]), b.get(key, b["pgd"])
        if b["eps"] > a["eps"] and acc_b > acc_a + _noise(acc_a, n):
            detail = f"{key} {acc_b:.3f} at eps={b['eps']:g} > {acc_a:.3f} at eps={a['eps']:g}"
            flags.append({"flag": "accuracy_not_decreasing_in_eps", "detail": detail})
    return flags
