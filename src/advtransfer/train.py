"""Adversarial training as plain functions: optimiser by rule, warmup + cosine, one step, one stage.

Objective (Madry PGD-AT): ``min_θ̂ E max_{‖δ‖≤ε} CE(f(x+δ), y)``; TRADES and natural training too.
A stage trains the parameters its method marks trainable, validates clean and PGD accuracy on the
validation split after each epoch, keeps the best checkpoint by validation robust accuracy (as the
paper does; natural training selects by clean accuracy), and saves a resumable state (model, optimiser, scheduler, every RNG, data position).
bf16 autocast needs no loss scaler, so there is no AMP scaler state to save.
"""

from __future__ import annotations

import json
import math
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import distributed as D
from .attacks import Threat, autocast, pgd, uniform_start
from .checkpoints import plain_tensors, save_checkpoint
from .config import Objective, Optimizer, TrainConfig
from .data import Split, batches
from .errors import RunError, UserError
from .models import Classifier, ModelSpec, atomic_write


class Interrupted(Exception):
    """Ctrl-C during training: the state was saved; resume with ``--resume``."""


def no_decay_names(model: torch.nn.Module) -> set[str]:
    """Parameters that must not decay although ``ndim >= 2``: the backbone's own list (timm's
    ``no_weight_decay``: cls/pos/register tokens) and VPT prompts."""
    backbone = getattr(model, "backbone", None)
    own = backbone.no_weight_decay() if backbone is not None and hasattr(backbone, "no_weight_decay") else set()
    names = {n for n, _ in model.named_parameters()}
    return {n for n in names if n.removeprefix("backbone.") in own or n.endswith(".prompts")}


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay by rule: on trainable weight matrices/kernels (``ndim >= 2``) only — not biases, norms,
    or tokens and prompts (``no_decay_names``)."""
    skip = no_decay_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2 and n not in skip]
    rest = [p for n, p in named if p.ndim < 2 or n in skip]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if cfg.optimizer == Optimizer.SGD:
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_scheduler(
    opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup for ``warmup_epochs``, then cosine decay to 0, stepped per optimiser step."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_mode(model: torch.nn.Module) -> None:
    """``model.train()``, except sub-modules whose parameters are all frozen stay in ``eval()``: a linear
    probe or a PEFT method must not update a frozen backbone's BatchNorm statistics or drop its features.
    Called every step, so it is one pass over the modules."""
    model.train()
    if _frozen(model) == (True, False):
        model.eval()


def _frozen(m: torch.nn.Module) -> tuple[bool, bool]:
    """(holds parameters, any of them trainable) for ``m``'s subtree. Each child subtree that holds only
    frozen parameters goes to ``eval()`` (recursively: its dropout and BatchNorm too) unless ``m`` itself is
    such a subtree, in which case an ancestor does it once for the whole of ``m``."""
    own = list(m.parameters(recurse=False))
    has, trains = bool(own), any(p.requires_grad for p in own)
    children = [(c, *_frozen(c)) for c in m.children()]
    has = has or any(h for _, h, _ in children)
    trains = trains or any(t for _, _, t in children)
    if trains:
        for c, h, t in children:
            if h and not t:
                c.eval()
    return has, trains


def train_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: Threat,
    cfg: TrainConfig,
    ddp: torch.nn.Module | None = None,
    start: torch.Tensor | None = None,
) -> tuple[float, int]:
    """One optimiser step on the configured objective; returns (loss, correct predictions on the trained inputs).

    Attacks are crafted on ``model``; the training forward/backward goes through ``ddp`` (the DDP wrapper of
    ``model``, which averages gradients across ranks) when given; ``start`` is PGD's initial perturbation.
    """
    if cfg.objective == Objective.NATURAL:
        x_in = x
    elif cfg.objective == Objective.AT:
        x_in = pgd(model, x, y, threat, bf16=cfg.bf16, start=start)
    else:  # TRADES: maximise KL to the clean prediction from a small Gaussian start
        model.eval()
        with torch.no_grad(), autocast(cfg.bf16, x.device):
            clean = model(x)
        x_in = pgd(model, x, y, threat, loss="kl", random_start=False, bf16=cfg.bf16, clean_logits=clean)
    train_mode(model)
    net = ddp or model
    opt.zero_grad(set_to_none=True)
    with autocast(cfg.bf16, x.device):
        if cfg.objective == Objective.TRADES:
            both = net(torch.cat([x, x_in])).float()
            logits, adv = both[: len(x)], both[len(x) :]
            kl = F.kl_div(F.log_softmax(adv, 1), F.softmax(logits, 1), reduction="batchmean")
            loss = F.cross_entropy(logits, y) + cfg.trades_beta * kl
            logits = adv
        else:
            logits = net(x_in).float()
            loss = F.cross_entropy(logits, y)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss ({loss.item()})")
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
    opt.step()
    return loss.item(), int((logits.argmax(1) == y).sum())


# ----------------------------------------------------------------------------- resumable state


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda{i}"] = s
    py = random.getstate()
    npy = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]], "numpy": [npy[0], npy[1].tolist(), *npy[2:]]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda")])
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = meta["numpy"]
    np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), *npy[2:]))


def save_state(path: Path, model, opt, sched, progress: dict) -> None:
    """Everything needed to continue bit-identically, as one safetensors file (written atomically).

    Tensors that share memory (tied weights) are stored as separate copies; loading copies them back into
    the model's own parameters, so the tie survives a resume.
    """
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    osd = opt.state_dict()
    for pid, st in osd["state"].items():
        for k, v in st.items():
            tensors[f"optim/{pid}/{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    rng_t, rng_m = rng_state()
    tensors.update(rng_t)
    tensors = plain_tensors(tensors)
    meta = {
        "progress": progress,
        "param_groups": osd["param_groups"],
        "scheduler": {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"},
        "rng": rng_m,
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"state": json.dumps(meta)}))


def load_state(path: Path, model, opt, sched) -> dict:
    """Restore what ``save_state`` wrote; a damaged or foreign state file is a ``UserError``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["state"])
        tensors = load_file(str(path))
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise UserError(f"resume: {path} is damaged ({type(e).__name__}); start again with --overwrite") from None
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim/"):
                _, pid, name = k.split("/", 2)
                state.setdefault(int(pid), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        sched_state = sched.state_dict()
        sched_state.update(meta["scheduler"])
        sched.load_state_dict(sched_state)
        set_rng_state(tensors, meta["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"resume: {path} does not fit this run ({why}); start again with --overwrite") from None
    return meta["progress"]


class StopRequest:
    """Defers SIGINT/SIGTERM to the next optimiser-step boundary, so the saved state is never half-updated.

    The first signal sets ``requested``; a second one raises ``KeyboardInterrupt`` at once (force quit).
    Outside the main thread signals cannot be caught and this does nothing.
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.requested = False
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


# ----------------------------------------------------------------------------- one stage


@dataclass
class Stage:
    """One training stage of a run (a RoLI run has two: the probe, then the finetune)."""

    dir: Path
    spec: ModelSpec
    cfg: TrainConfig
    threat: Threat  # training attack
    val_threat: Threat  # validation attack for model selection
    seed: int
    eval_batch_size: int = 256
    section: str = "train"  # the config section of ``cfg`` ("train", or "probe" for RoLI's stage 1), for messages
    workers: int = 0  # DataLoader workers for image-file splits (in-memory splits are sliced directly)

    @property
    def best_path(self) -> Path:
        return self.dir / "best.safetensors"

    @property
    def state_path(self) -> Path:
        return self.dir / "state.safetensors"


def validate(model: Classifier, split: Split, threat: Threat, batch_size: int, workers: int = 0) -> dict[str, float]:
    """Clean and PGD accuracy on a split (fp32, eval mode), streamed batch by batch, sharded across ranks."""
    from .evaluate import clean_correct, pgd_correct

    n = len(split)
    lo, hi = D.shard_bounds(n)
    dev = next(model.parameters()).device
    clean, rob = [], []
    for x, y in batches(split, batch_size, order=torch.arange(lo, hi), workers=workers):
        x, y = x.to(dev), y.to(dev)
        clean.append(clean_correct(model, x, y, batch_size))
        rob.append(pgd_correct(model, x, y, threat, batch_size=batch_size))
    clean_all, rob_all = (
        D.gather_cat(torch.cat(m or [torch.zeros(0, dtype=torch.bool)]).to(torch.uint8), n).bool() for m in (clean, rob)
    )
    return {"val_clean": clean_all.float().mean().item(), "val_pgd": (rob_all & clean_all).float().mean().item()}


def compiled(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``torch.compile(net)``: a wrapper sharing ``net``'s parameters (state-dict keys of ``net`` unchanged).

    On CPU, inductor needs a C++ compiler; without one this is a clear error instead of a failure at the
    first step. Each distinct (mode, requires-grad) pattern compiles once: the attack (eval, parameters
    frozen) and the training step (train) are two graphs.
    """
    import shutil

    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise UserError(
            "train.compile: torch.compile on CPU needs a C++ compiler (g++); install one or set train.compile=false"
        )
    return torch.compile(net)


def fit(model: Classifier, train: Split, val: Split, stage: Stage, log, resume: bool = False) -> dict:
    """Train one stage; return the best validation record. Writes metrics.jsonl, best/state checkpoints.

    ``state.safetensors`` is written every ``cfg.checkpoint_every`` optimiser steps and at every epoch end;
    with ``resume`` the stage continues from it bit-identically (a finished stage only returns its best
    record). SIGINT/SIGTERM stop at the next step boundary with the state saved (``Interrupted``).
    """
    stage.dir.mkdir(parents=True, exist_ok=True)
    cfg = stage.cfg
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, steps_per_epoch)
    metrics_path = stage.dir / "metrics.jsonl"
    progress = {"epoch": 0, "step": 0, "best": None, "loss_sum": 0.0, "correct": 0, "seen": 0}
    if resume and stage.state_path.exists():
        progress = load_state(stage.state_path, model, opt, sched)
        if progress["epoch"] >= cfg.epochs:
            log(f"{stage.dir.name}: training already finished ({cfg.epochs} epochs); not retraining")
            return progress["best"]
        if D.rank() != 0:  # the saved running sums are global (_global_sums): rank 0 alone carries them on
            progress.update(loss_sum=0.0, correct=0, seen=0)
        log(f"resumed {stage.dir.name} at epoch {progress['epoch'] + 1} step {progress['step']}")
        _write_metrics(metrics_path, [r for r in _read_metrics(metrics_path) if r["epoch"] < progress["epoch"]])
    else:
        torch.manual_seed(stage.seed)
        random.seed(stage.seed)
        np.random.seed(stage.seed % 2**32)
        metrics_path.unlink(missing_ok=True)

    dev = next(model.parameters()).device
    runner = model
    if cfg.compile:  # a wrapper sharing model's parameters; `model` is what is validated and saved
        runner = compiled(model, dev)
        log(f"{stage.dir.name}: torch.compile on; the first attack and training steps compile the model")
    ddp = None
    if D.world() > 1:
        from torch.nn.parallel import DistributedDataParallel

        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            if dev.type == "cuda":  # batch statistics over the global batch, as one process would compute them
                torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same Parameter objects: the optimiser still fits
            else:
                log(f"{stage.dir.name}: BatchNorm under torchrun on CPU normalises with each rank's shard "
                    "(SyncBatchNorm is GPU-only), so training differs slightly from one process")  # fmt: skip
        ddp = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        ddp = compiled(ddp, dev) if cfg.compile else ddp
    with StopRequest() as stop:
        for epoch in range(progress["epoch"], cfg.epochs):
            t0 = time.time()
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(stage.seed * 100_003 + epoch))
            start = progress["step"]
            bar = tqdm(
                batches(train, cfg.batch_size, order=order, start=start * cfg.batch_size, workers=stage.workers),
                total=steps_per_epoch - start,
                desc=f"{stage.dir.name} epoch {epoch + 1}/{cfg.epochs}",
                leave=False,
                disable=None,
            )
            try:
                for x, y in bar:
                    x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                    # PGD's random start is drawn for the whole global batch, then each rank takes its
                    # shard: N ranks take exactly the steps one process takes at the same global batch
                    start0 = (
                        uniform_start(x, stage.threat.eps, stage.threat.norm) if cfg.objective == Objective.AT else None
                    )
                    lo, hi = D.shard_bounds(len(y))
                    x, y = x[lo:hi], y[lo:hi]
                    start0 = None if start0 is None else start0[lo:hi]
                    try:
                        loss, correct = train_step(runner, opt, x, y, stage.threat, cfg, ddp=ddp, start=start0)
                    except FloatingPointError as e:
                        kept = (
                            f"last good state kept in {stage.state_path}"
                            if stage.state_path.exists()
                            else "no checkpoint was saved yet"
                        )
                        hint = (
                            "before any update, so the starting weights are at fault (model.checkpoint, RoLI head)"
                            if epoch == 0 and progress["step"] == 0
                            else f"try a smaller {stage.section}.lr"
                        )
                        raise RunError(
                            f"training stopped: {e} in {stage.dir.name} at epoch {epoch + 1} step "
                            f"{progress['step'] + 1} ({hint}); {kept}"
                        ) from None
                    sched.step()
                    progress["step"] += 1
                    progress["loss_sum"] += loss * len(y)
                    progress["correct"] += correct
                    progress["seen"] += len(y)
                    every = cfg.checkpoint_every
                    # under torchrun every rank stops at the same step (a signal reaches them at different
                    # times; a rank that stopped alone would leave the others waiting in the all-reduce)
                    stopping = D.all_sum([float(stop.requested)])[0] > 0
                    if (every and (epoch * steps_per_epoch + progress["step"]) % every == 0) or stopping:
                        save_state(stage.state_path, model, opt, sched, _global_sums(progress))
                    if stopping:
                        raise Interrupted(f"interrupted; state saved in {stage.state_path}")
            except KeyboardInterrupt:  # a second Ctrl-C, or no handler (not the main thread): mid-step, unsaved
                kept = stage.state_path if stage.state_path.exists() else "nothing saved yet"
                raise Interrupted(f"interrupted mid-step; last saved state kept ({kept})") from None
            sums = _global_sums(progress)
            record = {
                "epoch": epoch,
                "train_loss": sums["loss_sum"] / max(1, sums["seen"]),
                "train_acc": sums["correct"] / max(1, sums["seen"]),
                "lr": sched.get_last_lr()[0],
                **validate(model, val, stage.val_threat, stage.eval_batch_size, stage.workers),
                "seconds": round(time.time() - t0, 2),  # wall time: the one field that differs between runs
            }
            key = "val_clean" if cfg.objective == Objective.NATURAL else "val_pgd"  # natural training: select on clean
            if progress["best"] is None or record[key] > progress["best"][key]:
                progress["best"] = record
                save_checkpoint(model, stage.spec, stage.best_path)
            log(
                f"{stage.dir.name} epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.3f} "
                f"train {record['train_acc']:.3f} val clean {record['val_clean']:.3f} val pgd {record['val_pgd']:.3f}"
            )
            _write_metrics(metrics_path, [*_read_metrics(metrics_path), record])
            progress.update(epoch=epoch + 1, step=0, loss_sum=0.0, correct=0, seen=0)
            save_state(stage.state_path, model, opt, sched, progress)
            if stop.requested:
                raise Interrupted(f"interrupted; state saved in {stage.state_path}")
    D.barrier()  # rank 0 has written best/state before anyone reads them
    return progress["best"]


def _global_sums(progress: dict) -> dict:
    """``progress`` with the epoch's running loss/accuracy sums added over ranks (what a state file holds)."""
    loss_sum, correct, seen = D.all_sum([progress["loss_sum"], progress["correct"], progress["seen"]])
    return {**progress, "loss_sum": loss_sum, "correct": int(correct), "seen": int(seen)}


def _read_metrics(path: Path) -> list[dict]:
    """The complete records of ``metrics.jsonl`` (it is rewritten atomically, so all of them)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line a foreign editor broke: dropped, the state decides what is done
    return out


def _write_metrics(path: Path, records: list[dict]) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in records)))
