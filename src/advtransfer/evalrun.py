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
    for name, value, low in (
        ("--n", n, 0),
        ("--pgd-steps", pgd_steps, 1),
        ("--pgd-restarts", pgd_restarts, 1),
        ("--batch-size", batch_size, 1),
    ):
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
    dev = next(model.parameters()).device
    load, where = split_batches(splits.test, batch_size, dev), Path(out) if out else None
    threat = Threat(max(eps_list), norm, pgd_steps)
    kw = dict(attacks=tuple(attacks), restarts=pgd_restarts, loss=pgd_loss, seed=seed, num_classes=spec.num_classes)
    with StopRequest() as stop:
        res = evaluate_batches(
            model,
            load,
            len(splits.test),
            threat,
            aa_version=aa_version,
            aa_attacks=aa_attacks,
            aa_state=where / "autoattack_state.json" if where else None,
            stop=stop,
            **kw,
        )
        if len(eps_list) > 1:
            sw = sweep(
                model,
                load,
                len(splits.test),
                threat,
                eps_list,
                **{**kw, "attacks": [a for a in attacks if a != "autoattack"]},
            )
            res["sweep"], res["flags"] = sw["points"], res["flags"] + sw["flags"]
    masks = res.pop("masks")
    label = "" if aa_version == "standard" else " (custom, NON-STANDARD)"
    print(f"{checkpoint} on {data} test, n={res['n']}, eps={eps.split(',')[-1]} {norm}")
    for k in ("clean", "pgd", "autoattack"):
        if k in res:
            print(f"  {k:<11}{res[k] * 100:6.2f} %" + (label if k == "autoattack" else ""))
    if "sweep" in res:
        print("  eps sweep: " + "  ".join(f"{p['eps']:.4f}:{p['pgd'] * 100:.1f}%" for p in res["sweep"]))
    print("  flags: " + (", ".join(f["flag"] for f in res["flags"]) or "none"))
    for f in res["flags"]:
        print(f"    {f['flag']}: {f['detail']}")
    if where is not None:
        atomic_write(
            where / "masks.safetensors", lambda tmp: save_file({k: v.to(torch.uint8) for k, v in masks.items()}, tmp)
        )
        write_json(where / "eval.json", {"checkpoint": checkpoint, "data": data, "eps_arg": eps, "notes": notes, **res})
    return res
