"""Adversarial training as plain engine functions: optimiser, warmup + cosine, one step, one epoch, one stage.

PGD-AT (Madry), TRADES, natural and fast AT (FGSM-RS, N-FGSM), a PGD-step curriculum and a catastrophic-overfitting
guard; the best checkpoint by validation accuracy and a resumable state. The hot loop syncs only at checks.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch.optim.lr_scheduler import LambdaLR

from . import distributed as D
from .attacks import Threat, autocast, clean_correct, fgsm, pgd, pgd_correct, uniform_start
from .checkpoints import load_state, save_checkpoint, save_state
from .config import Objective, Optimizer, TrainConfig
from .data import batches, to_device
from .datasets import Split
from .errors import Interrupted, RunError
from .models import Classifier, ModelSpec, compiled
from .rundir import StopRequest, read_jsonl, write_jsonl

CHECK_EVERY = 25  # optimiser steps between host checks (non-finite loss; the stop flag under torchrun)


def _stop_agreed(stop: StopRequest) -> bool:
    """Whether to stop now; under torchrun a signal reaches the ranks at different times, so they agree (all-reduce)."""
    return stop.requested if D.world() == 1 else D.all_sum([float(stop.requested)])[0] > 0


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW (fused on CUDA) over the trainable parameters, weight decay by rule (``train.decay_on``)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    spare = getattr(getattr(model, "backbone", None), "no_weight_decay", set)()
    if cfg.decay_on == "non-bias":
        decay = {n for n, _ in named if "bias" not in n}
    else:  # "matrices": spares timm's ``no_weight_decay`` tokens and VPT prompts
        decay = {n for n, p in named if p.ndim >= 2 and n.removeprefix("backbone.") not in spare and "prompt" not in n}
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    if cfg.optimizer == Optimizer.SGD:
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    cuda = bool(named) and named[0][1].is_cuda
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, fused=cuda or None)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LambdaLR:
    """Linear warmup then cosine decay to 0, per optimiser step or (``schedule_per_epoch``) constant in an epoch."""

    # the paper's per-epoch schedule runs epoch 0 at a learning rate of 0; a LambdaLR keeps the resume state one integer
    def factor(step: int) -> float:
        if cfg.schedule_per_epoch:
            t, warm, total = step // steps_per_epoch, int(cfg.warmup_epochs), cfg.epochs
            if t < warm:
                return t / warm
        else:
            t, warm, total = step, int(cfg.warmup_epochs * steps_per_epoch), max(1, cfg.epochs * steps_per_epoch)
            if t < warm:
                return (t + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warm) / max(1, total - warm))))

    return LambdaLR(opt, factor)


def train_mode(model: torch.nn.Module) -> None:
    """``model.train()`` except frozen sub-modules, and drop paths unless every parameter trains (Full-FT only)."""
    model.train()
    has, trains, frozen = _frozen(model)
    if has and not trains:
        model.eval()
    elif frozen:  # stochastic depth acts in Full-FT only, as in the official code
        for m in filter(lambda m: isinstance(m, DropPath), model.modules()):
            m.eval()


def _frozen(m: torch.nn.Module) -> tuple[bool, bool, bool]:
    """(holds parameters, any trainable, any frozen) of ``m``'s subtree; frozen child subtrees go to ``eval()``."""
    own = [p.requires_grad for p in m.parameters(recurse=False)]
    kids = [(c, *_frozen(c)) for c in m.children()]
    has, trains = bool(own) or any(k[1] for k in kids), any(own) or any(k[2] for k in kids)
    if trains:
        for c, h, t, _ in kids:
            if h and not t:
                c.eval()
    return has, trains, not all(own) or any(k[3] for k in kids)


def adversarial(model, x, y, threat: Threat, cfg: TrainConfig, start: torch.Tensor | None):
    """The inputs the objective trains on (and the clean logits TRADES needs)."""
    if cfg.objective == Objective.NATURAL:
        return x, None
    if cfg.objective == Objective.AT:
        return pgd(model, x, y, threat, bf16=cfg.bf16, start=start), None
    if cfg.objective in (Objective.FGSM_RS, Objective.N_FGSM):
        return fgsm(model, x, y, threat, cfg.objective.value, bf16=cfg.bf16), None
    model.eval()  # TRADES: maximise KL to the clean prediction from a small Gaussian start
    with torch.no_grad(), autocast(cfg.bf16, x.device):
        clean = model(x)
    return pgd(model, x, y, threat, loss="kl", random_start=False, bf16=cfg.bf16, clean_logits=clean), clean


def train_step(model, opt, x, y, threat: Threat, cfg: TrainConfig, ddp=None, start=None):
    """One optimiser step over ``cfg.accum_steps`` micro-batches; returns (loss sum, correct) as device tensors."""
    # attacks are crafted on ``model``; training goes through ``ddp`` when given; ``start``: PGD's initial perturbation
    opt.zero_grad(set_to_none=True)
    loss_sum, correct, net = x.new_zeros((), dtype=torch.float32), x.new_zeros((), dtype=torch.long), ddp or model
    parts = torch.arange(len(x), device=x.device).chunk(cfg.accum_steps)
    for i, part in enumerate(parts):
        xb, yb = x[part], y[part]
        x_in, clean = adversarial(model, xb, yb, threat, cfg, None if start is None else start[part])
        train_mode(model)
        last = ddp is None or i == len(parts) - 1  # DDP all-reduces gradients once, after the last micro-batch
        with contextlib.nullcontext() if last else ddp.no_sync():
            with autocast(cfg.bf16, x.device):
                if cfg.objective == Objective.TRADES:
                    both = net(torch.cat([xb, x_in])).float()
                    logits, adv = both[: len(xb)], both[len(xb) :]
                    kl = F.kl_div(F.log_softmax(adv, 1), F.softmax(logits, 1), reduction="batchmean")
                    loss, logits = F.cross_entropy(logits, yb) + cfg.trades_beta * kl, adv
                else:
                    logits = net(x_in).float()
                    loss = F.cross_entropy(logits, yb)
            (loss * len(xb) / len(x)).backward()
        loss_sum, correct = loss_sum + loss.detach() * len(xb), correct + (logits.argmax(1) == yb).sum()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
    opt.step()
    return loss_sum, correct


def co_collapse(history: list[dict]) -> str:
    """Catastrophic overfitting (Wong et al. 2020): last ``val_pgd`` under half its best while ``train_acc`` rose."""
    *before, last = history
    acc, best = [r["train_acc"] for r in history if "train_acc" in r], max((r["val_pgd"] for r in before), default=0)
    if "train_acc" in last and len(acc) > 1 and acc[-1] > acc[-2] and last["val_pgd"] < best / 2:
        return f"catastrophic overfitting: val pgd {last['val_pgd']:.3f} < half its best {best:.3f}, train acc up"
    return ""


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
    section: str = "train"  # the config section of ``cfg`` ("probe" for RoLI's stage 1), for messages
    workers: int = 0  # DataLoader workers for image-file splits
    validate_init: bool = False  # validate the initial model as "epoch 0" (RoLI's stage 2)
    log: Callable[[str], None] = print
    log_every: float = 30.0  # seconds between progress lines
    track: Callable[[dict], None] | None = None  # per-epoch record -> TensorBoard / CSV / W&B
    save_only: list[str] | None = None  # the tensors a compact checkpoint keeps (None = all)
    clock: float = 0.0  # time.time() minus the stage's training seconds so far (resumes included)

    best_path = property(lambda self: self.dir / "best.safetensors")
    state_path = property(lambda self: self.dir / "state.safetensors")

    def threat_at(self, epoch: int) -> Threat:
        """The training attack in ``epoch``: with ``pgd_curriculum`` PGD steps rise linearly from 1 to ``steps``."""
        n, k = self.cfg.epochs, self.threat.steps
        ramp = self.cfg.pgd_curriculum and n > 1
        return replace(self.threat, steps=1 + (k - 1) * epoch // (n - 1)) if ramp else self.threat


def validate(model: Classifier, split: Split, threat: Threat, batch_size: int, workers: int = 0, seed: int = 0) -> dict:
    """Clean and PGD accuracy on a split (fp32, eval mode), sharded over ranks, PGD on clean-correct examples only."""
    lo, hi = D.shard_bounds(len(split))
    dev, clean, rob = next(model.parameters()).device, [], []
    # PGD's starts come from ``seed`` in a forked RNG, so the training RNG (equal on every rank) stays
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        for xb, yb in batches(split, batch_size, order=torch.arange(lo, hi), workers=workers):
            x, y = to_device(xb, yb, dev)
            clean.append(clean_correct(model, x, y))
            rob.append(pgd_correct(model, x, y, threat, only=clean[-1]))
    empty = [torch.zeros(0, dtype=torch.bool)]
    c, r = (D.gather_cat(torch.cat(m or empty).to(torch.uint8), len(split)).float().mean().item() for m in (clean, rob))
    return {"val_clean": c, "val_pgd": r}


def train_one_epoch(runner, ddp, opt, sched, train: Split, epoch: int, stage: Stage, progress: dict, stop) -> None:
    """One pass over the shuffled split from ``progress["step"]`` on, checking loss and stop signal at checks."""
    cfg, dev = stage.cfg, next(runner.parameters()).device
    steps = math.ceil(len(train) / cfg.batch_size)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(stage.seed * 100_003 + epoch))
    first, t_log, t0 = progress["step"], time.time(), time.time()
    threat = stage.threat_at(epoch)
    args = dict(order=order, start=first * cfg.batch_size, workers=stage.workers, seed=stage.seed, epoch=epoch)
    sums = torch.zeros(3, dtype=torch.float64, device=dev)  # loss sum, correct, seen (this process, since last save)
    bad = torch.full((), -1, dtype=torch.long, device=dev)  # first step with a non-finite loss, -1 = none
    for xb, yb in batches(train, cfg.batch_size, train=True, **args):
        x, y = to_device(xb, yb, dev)
        # PGD's start is drawn for the whole global batch, then sharded: N ranks step exactly as one process does
        lo, hi = D.shard_bounds(len(y))
        start = uniform_start(x, threat.eps, threat.norm)[lo:hi] if cfg.objective == Objective.AT else None
        loss, correct = train_step(runner, opt, x[lo:hi], y[lo:hi], threat, cfg, ddp, start)
        sched.step()
        bad = torch.where((bad < 0) & ~torch.isfinite(loss), progress["step"], bad)
        sums += torch.stack([loss.double(), correct.double(), sums.new_tensor(hi - lo)])
        progress["step"] += 1
        at_check = progress["step"] % CHECK_EVERY == 0 or progress["step"] == steps
        stopping = (D.world() == 1 or at_check) and _stop_agreed(stop)
        saving = stopping or (cfg.checkpoint_every and (epoch * steps + progress["step"]) % cfg.checkpoint_every == 0)
        if at_check or saving:
            _check_finite(bad, epoch, stage, progress)
        if saving:
            _accumulate(progress, sums)
            _save(stage, getattr(runner, "_orig_mod", runner), opt, sched, progress)  # the model behind torch.compile
        if stopping:
            raise Interrupted(f"interrupted; state saved in {stage.state_path}")
        if time.time() - t_log > stage.log_every:
            t_log, where = time.time(), f"{stage.dir.name} epoch {epoch + 1} step {progress['step']}/{steps}"
            rate = (progress["step"] - first) * cfg.batch_size / (t_log - t0)
            eta = (steps - progress["step"]) * cfg.batch_size / max(rate, 1e-9)
            stage.log(f"{where}: {rate:.1f} img/s, ETA {eta:.0f} s")
    _check_finite(bad, epoch, stage, progress)
    _accumulate(progress, sums)


def _accumulate(progress: dict, sums: torch.Tensor) -> None:
    """Add this process's running sums to ``progress`` as global numbers (summed over ranks) and reset them."""
    for key, value in zip(("loss_sum", "correct", "seen"), D.all_sum(sums.tolist())):
        progress[key] += value if key == "loss_sum" else int(value)
    sums.zero_()


def _save(stage: Stage, model, opt, sched, progress: dict) -> None:
    progress["seconds"] = round(time.time() - stage.clock, 2)  # training time across resumes, saved with the state
    save_state(stage.state_path, model, opt, sched, progress, stage.save_only)


def _check_finite(bad: torch.Tensor, epoch: int, stage: Stage, progress: dict) -> None:
    if (step := int(bad)) < 0:
        return
    kept = f"last good state kept in {stage.state_path}" if stage.state_path.exists() else "no checkpoint was saved yet"
    hint = f"try a smaller {stage.section}.lr"
    if epoch == 0 and step == 0:
        hint = "before any update, so the starting weights are at fault (model.checkpoint, RoLI head)"
    where = f"{stage.dir.name} at epoch {epoch + 1} step {step + 1}"
    raise RunError(f"training stopped: non-finite loss in {where} ({hint}); {kept}")


def fit(model: Classifier, train: Split, val: Split, stage: Stage, resume: bool = False) -> dict:
    """Train one stage (resumable bit-identically from its state); return its progress (``best``, ``seconds``)."""
    stage.dir.mkdir(parents=True, exist_ok=True)
    cfg, metrics = stage.cfg, stage.dir / "metrics.jsonl"
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, math.ceil(len(train) / cfg.batch_size))
    progress = {"epoch": 0, "step": 0, "best": None, "loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
    if resume and stage.state_path.exists():
        progress = load_state(stage.state_path, model, opt, sched)
        if progress["epoch"] >= cfg.epochs or progress.get("stopped"):
            stage.log(f"{stage.dir.name}: training already finished ({progress['epoch']} epochs); not retraining")
            return progress
        if D.rank() != 0:  # the saved running sums are global: rank 0 alone carries them on
            progress.update(loss_sum=0.0, correct=0, seen=0)
        stage.log(f"resumed {stage.dir.name} at epoch {progress['epoch'] + 1} step {progress['step']}")
        write_jsonl(metrics, [r for r in read_jsonl(metrics) if r["epoch"] < progress["epoch"]])
    else:  # every RNG from the seed (a resume restores them all from the state)
        for seed in (torch.manual_seed, random.seed, np.random.seed):
            seed(stage.seed)
        metrics.unlink(missing_ok=True)
    stage.clock = time.time() - progress["seconds"]
    runner = compiled(model) if cfg.compile else model  # shares model's parameters: model is validated and saved
    if cfg.compile:
        stage.log("torch.compile on; the first attack and training steps compile the model")
    ddp = D.ddp(model, stage.log, compile_it=cfg.compile)
    with StopRequest() as stop:  # SIGINT/SIGTERM stop at the next check with the state saved
        if stage.validate_init and progress["best"] is None:
            _epoch_end(model, val, stage, progress, {"epoch": -1, "lr": 0.0}, metrics, opt, sched)
        for epoch in range(progress["epoch"], cfg.epochs):
            t0 = time.time()
            train_one_epoch(runner, ddp, opt, sched, train, epoch, stage, progress, stop)
            seen = max(1, progress["seen"])
            record = {
                "epoch": epoch,
                "train_loss": progress["loss_sum"] / seen,
                "train_acc": progress["correct"] / seen,
            }
            record.update(lr=sched.get_last_lr()[0], seconds=round(time.time() - t0, 2))
            progress.update(epoch=epoch + 1, step=0, loss_sum=0.0, correct=0, seen=0)
            _epoch_end(model, val, stage, progress, record, metrics, opt, sched)
            if _stop_agreed(stop):
                raise Interrupted(f"interrupted; state saved in {stage.state_path}")
            if progress.get("stopped"):
                break
    D.barrier()  # rank 0 has written best/state before anyone reads them
    return progress


def _epoch_end(model, val: Split, stage: Stage, progress: dict, record: dict, metrics: Path, opt, sched) -> None:
    """Validate, keep the best checkpoint, append the record (metrics.jsonl + trackers), save the resume state."""
    seed = stage.seed * 1000 + record["epoch"] + 1
    record.update(validate(model, val, stage.val_threat, stage.eval_batch_size, stage.workers, seed))
    if stage.cfg.pgd_curriculum and "train_loss" in record:
        record["train_pgd_steps"] = stage.threat_at(record["epoch"]).steps
    history = progress.setdefault("history", [])  # what the overfitting guard reads (kept in the resume state)
    history.append({k: record[k] for k in ("val_pgd", "train_acc") if k in record})
    if stage.cfg.co_guard != "off" and (co := co_collapse(history)):
        record["co_guard"], stopping = co, stage.cfg.co_guard == "stop"
        stage.log(f"warning: {stage.dir.name} epoch {record['epoch'] + 1}: {co}" + ("; stopping" * stopping))
        progress["stopped"] = co if stopping else progress.get("stopped")
    key = "val_clean" if stage.cfg.objective == Objective.NATURAL else "val_pgd"  # natural training: select on clean
    if progress["best"] is None or record[key] > progress["best"][key]:
        progress["best"] = record
        save_checkpoint(model, stage.spec, stage.best_path, only=stage.save_only)
    what = "initial model" if record["epoch"] < 0 else f"epoch {record['epoch'] + 1}/{stage.cfg.epochs}"
    train_part = f"loss {record['train_loss']:.3f} train {record['train_acc']:.3f} " if "train_loss" in record else ""
    val_part = f"val clean {record['val_clean']:.3f} val pgd {record['val_pgd']:.3f}"
    stage.log(f"{stage.dir.name} {what}: {train_part}{val_part}")
    write_jsonl(metrics, [*read_jsonl(metrics), record])
    if stage.track is not None:
        stage.track(record)
    _save(stage, model, opt, sched, progress)
