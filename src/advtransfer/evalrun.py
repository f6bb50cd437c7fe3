"""``advtransfer eval``: score a checkpoint on a dataset's test split — clean, PGD, AutoAttack, an ε sweep, sanity
flags — streamed, and written (``eval.json``, masks, AutoAttack state: resumable) when ``out`` is given."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from .attacks import Threat
from .checkpoints import load_checkpoint
from .config import DataConfig, Eps
from .data import load_splits
from .errors import UserError
from .evaluation import evaluate_batches, split_batches, sweep
from .pipeline import check_channels
from .rundir import StopRequest, atomic_write, write_json


def eval_checkpoint(
    checkpoint: str,
    data: str,
    *,
    root: str = "",
    eps: str = "8/255",
    norm: str = "Linf",
    attacks: Sequence[str] = ("clean", "pgd", "autoattack"),
    n: int = 1000,
    pgd_steps: int = 10,
    pgd_restarts: int = 1,
    pgd_loss: str = "ce",
    aa_version: str = "standard",
    aa_attacks: Sequence[str] = (),
    batch_size: int = 256,
    seed: int = 0,
    out: str = "",
    backbone: str = "",
    kwargs: dict | None = None,
    num_classes: int = 0,
    mean: Sequence[float] = (),
    std: Sequence[float] = (),
) -> dict:
    """Evaluate ``checkpoint`` (ours, or a foreign file with ``backbone``) at the largest ε of ``eps`` (a
    comma-separated list runs a sweep over all of them); print the table; return the result."""
    limits = {"--n": (n, 0), "--pgd-steps": (pgd_steps, 1), "--pgd-restarts": (pgd_restarts, 1)}
    for name, (value, low) in {**limits, "--batch-size": (batch_size, 1)}.items():
        if value < low:
            raise UserError(f"eval: {name} must be >= {low}, got {value}")
    eps_list = [Eps(e) for e in eps.split(",") if e.strip()]
    if not eps_list or min(eps_list) < 0 or max(eps_list) <= 0:
        raise UserError(f"eval: --eps needs values >= 0 and at least one > 0, got {eps!r}")
    if norm == "Linf" and max(eps_list) > 1:
        raise UserError(f"eval: --eps must be <= 1 for Linf (pixels are in [0,1]), got {eps!r}")
    splits = load_splits(DataConfig(name=data, root=root, n_test=n, n_val=0))
    model, spec, notes = load_checkpoint(
        Path(checkpoint), backbone=backbone, num_classes=num_classes, kwargs=kwargs, mean=mean, std=std
    )
    if notes:
        print("weights: " + "; ".join(notes))
    if splits.num_classes != spec.num_classes:
        raise UserError(f"eval: checkpoint has {spec.num_classes} classes but {data} has {splits.num_classes}")
    check_channels(spec, splits.test.channels)
    load = split_batches(splits.test, batch_size, next(model.parameters()).device)
    where, threat, size = Path(out) if out else None, Threat(max(eps_list), norm, pgd_steps), len(splits.test)
    kw = dict(attacks=tuple(attacks), restarts=pgd_restarts, loss=pgd_loss, seed=seed, num_classes=spec.num_classes)
    aa = dict(aa_version=aa_version, aa_attacks=aa_attacks, aa_state=where / "autoattack_state.json" if where else None)
    with StopRequest() as stop:
        res = evaluate_batches(model, load, size, threat, stop=stop, **aa, **kw)
        if len(eps_list) > 1:
            no_aa = [a for a in attacks if a != "autoattack"]
            sw = sweep(model, load, size, threat, eps_list, **{**kw, "attacks": no_aa})
            res["sweep"], res["flags"] = sw["points"], res["flags"] + sw["flags"]
    masks = res.pop("masks")
    _print(res, f"{checkpoint} on {data} test, n={res['n']}, eps={eps.split(',')[-1]} {norm}", aa_version)
    if where is not None:
        masks = {k: v.to(torch.uint8) for k, v in masks.items()}
        atomic_write(where / "masks.safetensors", lambda tmp: save_file(masks, tmp))
        write_json(where / "eval.json", {"checkpoint": checkpoint, "data": data, "eps_arg": eps, "notes": notes, **res})
    return res


def _print(res: dict, title: str, aa_version: str) -> None:
    """The result table: accuracies, the ε sweep, and the sanity flags with their details."""
    print(title)
    for k in ("clean", "pgd", "autoattack"):
        if k in res:
            label = " (custom, NON-STANDARD)" if k == "autoattack" and aa_version != "standard" else ""
            print(f"  {k:<11}{res[k] * 100:6.2f} %{label}")
    if "sweep" in res:
        print("  eps sweep: " + "  ".join(f"{p['eps']:.4f}:{p['pgd'] * 100:.1f}%" for p in res["sweep"]))
    print("  flags: " + (", ".join(f["flag"] for f in res["flags"]) or "none"))
    for f in res["flags"]:
        print(f"    {f['flag']}: {f['detail']}")
