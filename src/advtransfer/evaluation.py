"""Clean / PGD / AutoAttack accuracy as per-example masks (True = still correct; an ensemble is their AND), streamed a
batch at a time, with sanity flags. PGD attacks only the clean-correct examples (same result, lower cost); AutoAttack
(fra31's, via pyautoattack) runs attack by attack over the still-robust examples, resumable after every batch."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from . import distributed as D
from .attacks import Threat, attacking, autoattack, autoattack_correct, clean_correct, pgd_correct
from .checks import attack_flags, autoattack_flags, model_flags, sweep_flags
from .config import AA_ATTACKS
from .data import batches, to_device
from .datasets import Split
from .errors import Interrupted, UserError
from .rundir import StopRequest, atomic_write

ATTACKS = ("clean", "pgd", "autoattack")
Batches = Callable[[Tensor], Iterator[tuple[Tensor, Tensor, Tensor]]]  # idx -> (idx chunk, x, y) on the device


def tensor_batches(images: Tensor, labels: Tensor, batch_size: int) -> Batches:
    def load(idx: Tensor):
        for chunk in idx.split(batch_size) if len(idx) else ():
            yield chunk, images[chunk.to(images.device)], labels[chunk.to(labels.device)]

    return load


def split_batches(split: Split, batch_size: int, device: torch.device, workers: int = 0) -> Batches:
    def load(idx: Tensor):
        at = 0
        for xb, yb in batches(split, batch_size, order=idx, workers=workers):
            yield idx[at : at + len(yb)], *to_device(xb, yb, device)
            at += len(yb)

    return load


def _check_stop(stop: StopRequest | None, what: str) -> None:
    if stop is not None and D.all_sum([float(stop.requested)])[0] > 0:
        raise Interrupted(f"interrupted during {what}")


def clean_pgd_masks(model: nn.Module, load: Batches, idx: Tensor, threat: Threat | None, restarts, loss, stop) -> dict:
    """Masks over ``idx``, in its order: ``clean`` and, with a ``threat``, ``pgd`` (robust and correct)."""
    out: dict[str, list[Tensor]] = {"clean": [], **({"pgd": []} if threat else {})}
    for _, x, y in load(idx):
        out["clean"].append(c := clean_correct(model, x, y))
        if threat is not None:
            out["pgd"].append(pgd_correct(model, x, y, threat, restarts=restarts, loss=loss, only=c))
        _check_stop(stop, "the clean/PGD evaluation")
    return {k: torch.cat(v).cpu() if v else torch.zeros(0, dtype=torch.bool) for k, v in out.items()}


def autoattack_mask(
    model: nn.Module,
    load: Batches,
    idx: Tensor,
    clean: Tensor,
    *,
    eps: float,
    norm: str,
    num_classes: int,
    version: str = "standard",
    attacks: Sequence[str] = (),
    seed: int = 0,
    state_path: Path | None = None,
    stop: StopRequest | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[Tensor, dict]:
    """Per-example AutoAttack mask over ``idx`` (True = robust) from the ``clean`` mask, and its settings. Each attack
    runs over the examples still robust, batch by batch; the JSON state at ``state_path`` records the mask after every
    batch, so an interrupted evaluation continues where it stopped (pyautoattack 0.2.0's own state file cannot be
    reloaded: it writes the attack set as a Python repr). ``log`` gets each attack's start and end."""
    import pyautoattack

    log = log or (lambda msg: None)
    dev = next(model.parameters()).device
    aa, sequence = autoattack(model, eps, norm, num_classes, version=version, attacks=attacks, seed=seed, device=dev)
    settings = dict(eps=float(eps), norm=norm, seed=seed, version=version, attacks=sequence, k=num_classes)
    key = _state_key(model, load, idx, settings)
    state = _load_state(state_path, key) or {"key": key, "done": [], "robust": clean.tolist(), "per_attack": {}}
    robust = torch.tensor(state["robust"], dtype=torch.bool)
    for attack in sequence:
        if attack in state["done"]:
            log(f"AutoAttack {attack}: done before this process, {int(robust.sum())} of {len(idx)} robust")
            continue
        todo, t0 = robust.nonzero().squeeze(1), time.time()
        todo = todo[todo >= state.get("upto", -1)] if state.get("attack") == attack else todo
        log(f"AutoAttack {attack}: attacking {len(todo)} of {len(idx)} examples")
        for chunk, x, y in load(idx[todo]):
            at, todo = todo[: len(chunk)], todo[len(chunk) :]
            robust[at] = autoattack_correct(aa, attack, x, y, model).cpu()
            state.update(robust=robust.tolist(), attack=attack, upto=int(todo[0]) if len(todo) else len(idx))
            _save_state(state_path, state)
            _check_stop(stop, f"AutoAttack {attack}" + (" (its finished batches are saved)" if state_path else ""))
        state["done"].append(attack)
        state["per_attack"][attack] = robust.float().mean().item()
        _save_state(state_path, state)
        log(f"AutoAttack {attack}: {int(robust.sum())} of {len(idx)} robust ({time.time() - t0:.1f} s)")
    library = f"pyautoattack {pyautoattack.__version__}"
    return robust, {"version": version, "standard": version == "standard", "attacks": sequence, "library": library}


def _state_key(model: nn.Module, load: Batches, idx: Tensor, settings: dict) -> dict:
    """What an AutoAttack state belongs to: settings, the examples, and the model's logits on a few of them."""
    _, x, y = next(load(idx[:4]))
    with torch.no_grad():
        logits = model(x).float().cpu().numpy().round(3).tobytes()
    data = idx.numpy().tobytes() + y.cpu().numpy().tobytes() + x.cpu().numpy().tobytes()
    digest = {k: hashlib.sha256(v).hexdigest()[:16] for k, v in (("data", data), ("model", logits))}
    return {**settings, "n": len(idx), **digest}


def _load_state(path: Path | None, key: dict) -> dict | None:
    if path is None or not Path(path).exists():
        return None
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        raise UserError(f"eval: AutoAttack state {path} is unreadable; delete it to start over") from None
    if state.get("key") != key:
        raise UserError(f"eval: AutoAttack state {path} belongs to another evaluation (model, data or settings differ)")
    return state


def _save_state(path: Path | None, state: dict) -> None:
    if path is not None:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(state)), all_ranks=True)


def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    eps: float,
    norm: str = "Linf",
    attacks: Sequence[str] = ("clean", "pgd"),
    pgd_steps: int = 10,
    pgd_step_size: float | None = None,
    pgd_restarts: int = 1,
    pgd_loss: str = "ce",
    early_exit: bool = False,
    batch_size: int = 256,
    seed: int = 0,
    aa_version: str = "standard",
    aa_attacks: Sequence[str] = (),
    aa_state: Path | None = None,
    num_classes: int | None = None,
    checks: bool = True,
) -> dict:
    """Accuracies in [0,1] under the requested ``"clean"``, ``"pgd"``, ``"autoattack"`` of any ``nn.Module`` mapping
    ``[0,1]`` images to logits; also ``"n"``, the settings, per-example ``"masks"`` and ``"flags"`` (checks.py).
    ``pgd_step_size=None`` means ε/4; ``early_exit``: the PGD variant of ``Threat.early_exit``."""
    if images.ndim != 4 or len(images) != len(labels) or len(images) == 0:
        shapes = f"{tuple(images.shape)} and {tuple(labels.shape)}"
        raise UserError(f"eval: need images [N,C,H,W] and N labels, got {shapes}")
    if images.min() < 0 or images.max() > 1:
        raise UserError("eval: images must be in [0,1] (normalisation belongs inside the model)")
    threat = Threat(eps, norm, pgd_steps, pgd_step_size, early_exit=early_exit)
    return evaluate_batches(
        model,
        tensor_batches(images, labels, batch_size),
        len(images),
        threat,
        attacks=attacks,
        restarts=pgd_restarts,
        loss=pgd_loss,
        seed=seed,
        aa_version=aa_version,
        aa_attacks=aa_attacks,
        aa_state=aa_state,
        num_classes=num_classes,
        checks=checks,
    )


def evaluate_batches(
    model: nn.Module,
    load: Batches,
    n: int,
    threat: Threat,
    *,
    attacks: Sequence[str],
    restarts: int = 1,
    loss: str = "ce",
    seed: int = 0,
    aa_version: str = "standard",
    aa_attacks: Sequence[str] = (),
    aa_state: Path | None = None,
    n_autoattack: int = 0,
    num_classes: int | None = None,
    checks: bool = True,
    stop: StopRequest | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """``evaluate`` over a batch loader of ``n`` examples, sharded over torchrun's ranks (masks gathered). AutoAttack
    runs on the first ``n_autoattack`` examples (0 = all); ``log`` gets its progress and a line before the sanity
    checks. Bad settings are refused before anything runs."""
    if bad := [a for a in attacks if a not in ATTACKS]:
        raise UserError(f"eval: unknown attack(s) {bad}; known: {list(ATTACKS)}")
    if threat.norm not in ("Linf", "L2"):
        raise UserError(f"eval: norm must be Linf or L2, got {threat.norm!r}")
    if "autoattack" in attacks and aa_version == "custom" and (not aa_attacks or set(aa_attacks) - set(AA_ATTACKS)):
        raise UserError(f"eval: custom AutoAttack needs attacks from {list(AA_ATTACKS)}, got {list(aa_attacks)}")
    was, (lo, hi), t = model.training, D.shard_bounds(n), threat
    res: dict = {"n": n, "eps": float(t.eps), "norm": t.norm, "seed": seed, "masks": {}, "flags": []}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with attacking(model), torch.random.fork_rng(devices=devices):  # eval mode, the caller's state restored after
        torch.manual_seed(seed)
        mine = clean_pgd_masks(model, load, torch.arange(lo, hi), t if "pgd" in attacks else None, restarts, loss, stop)
        masks = {k: D.gather_cat(m.to(torch.uint8), n).bool() for k, m in mine.items()}
        res["masks"] = {k: m for k, m in masks.items() if k in attacks}
        with torch.no_grad():
            k_classes = num_classes or int(model(next(load(torch.arange(1)))[1]).shape[1])
        if "pgd" in attacks:
            pgd = dict(steps=t.steps, step_size=t.alpha, restarts=restarts, loss=loss, iterate=t.iterate)
            res["pgd_settings"] = {**pgd, "early_exit": t.early_exit}
        if "autoattack" in attacks:
            n_aa = min(n_autoattack or n, n)
            a_lo, a_hi = D.shard_bounds(n_aa)
            state = aa_state if aa_state is None or D.world() == 1 else aa_state.with_suffix(f".rank{D.rank()}.json")
            aa = dict(eps=t.eps, norm=t.norm, num_classes=k_classes, version=aa_version, attacks=aa_attacks, seed=seed)
            idx, clean = torch.arange(a_lo, a_hi), masks["clean"][a_lo:a_hi]
            mask, res["autoattack_settings"] = autoattack_mask(
                model, load, idx, clean, state_path=state, stop=stop, log=log, **aa
            )
            res["masks"]["autoattack"] = D.gather_cat(mask.to(torch.uint8), n_aa).bool()
            res["n_autoattack"] = n_aa
        res.update({key: mask.float().mean().item() for key, mask in res["masks"].items()})
        if checks:
            if log is not None:
                log(f"sanity checks on {min(n, 100)} examples (checks.py)")
            res["flags"] = _flags(model, load, res, t, k_classes, was)
        _check_stop(stop, "the sanity checks")  # a signal since the last batch is never lost
    return res


def _flags(model: nn.Module, load: Batches, res: dict, threat: Threat, k: int, was_training: bool) -> list[dict]:
    _, x, y = next(load(torch.arange(min(res["n"], 100))))
    flags = model_flags(model, x, y, was_training)
    if "pgd" in res and not any(f["flag"].startswith("non_finite") for f in flags):
        flags += attack_flags(model, x, y, threat, k)
    if "autoattack" in res and "pgd" in res["masks"]:
        n_aa = res["n_autoattack"]
        flags += autoattack_flags(res["masks"]["pgd"][:n_aa].float().mean().item(), res["autoattack"], n_aa)
    return flags


def sweep(model: nn.Module, load: Batches, n: int, threat: Threat, eps_list: Sequence[float], **kwargs) -> dict:
    """Robust accuracy over an ε list, with a monotonicity flag; ``kwargs`` as for ``evaluate_batches``."""
    points = []
    for eps in eps_list:
        kw = {**kwargs, **({"attacks": ("clean",)} if eps == 0 else {})}
        r = evaluate_batches(model, load, n, replace(threat, eps=eps), checks=False, **kw)
        points.append({"eps": float(eps), "pgd": r["clean"], **{k: r[k] for k in ATTACKS if k in r}})
    return {"points": points, "flags": sweep_flags(points, n)}
