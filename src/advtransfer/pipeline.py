"""One run: config -> data -> model (+ method) -> train stage(s) -> test evaluation -> result card.

A RanLI run is one stage. A RoLI run is two, in ``stage1/`` (adversarial linear probe) and ``stage2/``
(the finetune, its head loaded from stage 1's best checkpoint); the top-level ``result.json`` is the final
stage's. Every run directory holds ``config.yaml`` (resolved), ``env.json`` (git SHA, versions),
``metrics.jsonl`` per stage, ``best.safetensors``, ``state.safetensors`` (resume), ``result.json``,
``masks.safetensors`` (per-example robustness) and ``log.txt``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from . import distributed as D
from .attacks import Threat
from .checkpoints import check_keys, load_backbone_weights, read_spec, read_state
from .config import Init, RunConfig, to_dict
from .data import Splits, load_splits
from .errors import UserError
from .evaluate import evaluate
from .methods import apply_method, count
from .models import Classifier, ModelSpec, atomic_write, build
from .train import Stage, fit

try:
    import fcntl
except ImportError:  # Windows has no flock: runs there are not locked
    fcntl = None

RESULT = "result.json"


# ----------------------------------------------------------------------------- run directory


# what a run writes; --overwrite removes exactly these (never other files a user keeps beside them)
ARTIFACTS = ("result.json", "config.yaml", "env.json", "metrics.jsonl", "best.safetensors", "state.safetensors",
             "masks.safetensors", "autoattack_state.json", "log.txt", "stage1", "stage2")  # fmt: skip
LOCK = ".lock"


class RunDir:
    """A run directory, locked (``flock`` on ``.lock``) while in use; a second run into it is refused.

    Decides how the run starts: fresh (the directory is new or empty, or ``overwrite`` cleared it) or
    resumed (``resume`` and a ``config.yaml`` equal to ``config`` is there). A finished run (``result.json``)
    is only ever replaced with ``overwrite``. The kernel drops the lock when its process dies, so a killed
    run never leaves a stale one.
    """

    def __init__(self, path: Path, config: dict, *, resume: bool = False, overwrite: bool = False) -> None:
        if resume and overwrite:
            raise UserError("run: --resume and --overwrite contradict each other; choose one")
        self.path = Path(path)
        self.created = not self.path.exists()
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"run: --out {self.path} is a file, not a directory")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"run: cannot create run directory {self.path}: {e.strerror or e}") from None
        self._fd: int | None = None
        self._acquire()
        try:
            self.resuming = self._decide(config, resume, overwrite)
        except BaseException:
            self.release(remove_if_created=True)
            raise

    def _entries(self) -> list[Path]:
        return [p for p in self.path.iterdir() if p.name != LOCK]

    def _decide(self, config: dict, resume: bool, overwrite: bool) -> bool:
        if (self.path / RESULT).exists() and not overwrite:
            raise UserError(f"run: {self.path} already holds a finished run (use --overwrite to replace it)")
        entries = self._entries()
        if overwrite:
            if entries and not (self.path / "config.yaml").exists():
                raise UserError(f"run: {self.path} is not a run directory (no config.yaml); refusing to overwrite it")
            self.clear()
            return False
        if resume and (self.path / "config.yaml").exists():
            try:
                saved = yaml.safe_load((self.path / "config.yaml").read_text())
            except (yaml.YAMLError, ValueError) as e:
                raise UserError(f"run: cannot resume, {self.path / 'config.yaml'} is unreadable ({e})") from None
            if saved != config:
                diff = _first_difference(saved, config)
                raise UserError(f"run: --resume with a config that differs from {self.path / 'config.yaml'} ({diff})")
            for tmp in self.path.rglob(".*.tmp"):  # what a killed run was writing: never complete
                tmp.unlink()
            return True
        if entries and not resume:
            raise UserError(f"run: {self.path} is not empty (use --resume to continue it or --overwrite)")
        if entries:  # --resume, but the run died before it wrote its config: nothing of it is worth keeping
            if any(p.name not in ARTIFACTS and not p.name.endswith(".tmp") for p in entries):
                raise UserError(f"run: nothing to resume in {self.path} (no config.yaml) and it holds other files")
            self.clear()
        return False

    def _acquire(self) -> None:
        lock = self.path / LOCK
        if fcntl is None:  # no flock on this platform: run unlocked
            return
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                who = f"process {holder}" if holder else "another process"
                raise UserError(f"run: {self.path} is in use by {who} (a run holds its lock)") from None
            try:  # a holder that released between our open and flock unlinked the file we hold: retry
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def clear(self) -> None:
        """Remove this run's artifacts (and leftover temporary files), nothing else."""
        for p in self._entries():
            if p.name in ARTIFACTS or (p.name.startswith(".") and p.name.endswith(".tmp")):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    def release(self, remove_if_created: bool = False) -> None:
        if self._fd is not None:
            (self.path / LOCK).unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
        if remove_if_created and self.created:
            try:
                self.path.rmdir()  # only if empty: never removes anything it did not create
            except OSError:
                pass

    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, file=sys.stderr, flush=True)
        with open(self.path / "log.txt", "a") as f:
            f.write(line + "\n")


def _first_difference(a, b, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
    return f"{where or 'config'}: saved {a!r}, now {b!r}"


def record_resume(path: Path, now: dict, log) -> dict:
    """The run's first environment stays in ``env.json``; each resume appends its own under ``resumes``,
    and a resume under different library versions or code says so in the log."""
    try:
        first = json.loads(path.read_text())
    except (OSError, ValueError):
        return now  # no readable record of the first process: this one is the best there is
    resumes = [*first.pop("resumes", []), now]
    changed = sorted(k for k in now if k != "resumes" and first.get(k) != now[k])
    if changed:
        log(f"warning: resumed with different {', '.join(changed)} than the run started with (env.json keeps both)")
    return {**first, "resumes": resumes}


def environment() -> dict:
    """Git SHA and library versions, recorded with every run."""
    import peft
    import pyautoattack
    import timm
    import torchvision

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return {
        "git_sha": sha or "unknown",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "peft": peft.__version__,
        "pyautoattack": pyautoattack.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


# ----------------------------------------------------------------------------- model from config


def source_spec(cfg: RunConfig, splits: Splits) -> ModelSpec:
    """The model a run starts from: architecture from the config or the checkpoint's metadata."""
    m = cfg.model
    ckpt = Path(m.checkpoint) if m.checkpoint else None
    if ckpt is not None and not ckpt.is_file():
        raise UserError(f"checkpoint: file not found: {ckpt}")
    backbone, kwargs, mean, std = m.backbone, dict(m.kwargs), list(m.mean), list(m.std)
    if ckpt is not None and ckpt.suffix == ".safetensors":
        src = read_spec(ckpt)
        if backbone and (backbone != src.backbone or (kwargs and kwargs != src.kwargs)):
            raise UserError(
                f"checkpoint: {ckpt} is a {src.backbone} {src.kwargs}, but the config asks for {backbone} {kwargs}"
            )
        backbone, kwargs = src.backbone, src.kwargs
        mean, std = mean or src.mean, std or src.std
    if not backbone:
        raise UserError("config: model.backbone is empty and no advtransfer checkpoint names one")
    return ModelSpec(
        backbone=backbone,
        kwargs=kwargs,
        num_classes=splits.num_classes,
        mean=mean,
        std=std,
        input_size=[m.input_size, m.input_size] if m.input_size else [],
        classes=splits.classes,
        method={"name": cfg.method.name, "options": dict(cfg.method.options)},
        trained={"dataset": cfg.data.name, "objective": cfg.train.objective.value, "eps": cfg.attack.eps,
                 "norm": cfg.attack.norm.value, "epochs": cfg.train.epochs, "seed": cfg.seed,
                 "source": m.checkpoint or ("timm-pretrained" if m.pretrained else "scratch")},
    )  # fmt: skip


def make_model(cfg: RunConfig, spec: ModelSpec, seed: int, log: Callable[[str], None] | None = None) -> Classifier:
    """Build the backbone (seeded head), load source weights (``log``: what was mapped), then apply the method."""
    torch.manual_seed(seed)
    model = build(spec, pretrained=cfg.model.pretrained and not cfg.model.checkpoint)
    if spec.num_classes < 2:
        raise UserError(f"data: need at least 2 classes, got {spec.num_classes}")
    if cfg.model.checkpoint:
        notes = load_backbone_weights(model, Path(cfg.model.checkpoint))
        if log is not None and notes:
            log(f"source {cfg.model.checkpoint}: " + "; ".join(notes))
    return apply_method(model, spec.method["name"], spec.method["options"]).to(D.device())


def head_prefix(model: Classifier) -> str:
    return f"backbone.{model.head_name}."


def load_head(model: Classifier, path: Path) -> None:
    """RoLI: copy the classifier head of a stage-1 checkpoint into ``model`` (shapes checked by name)."""
    prefix = head_prefix(model)
    source = {k: v for k, v in read_state(path).items() if k.startswith(prefix)}
    target = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    check_keys(target, source, path, skip=set())
    model.load_state_dict(source, strict=False)


# ----------------------------------------------------------------------------- the run


def _threats(cfg: RunConfig) -> tuple[Threat, Threat, Threat]:
    eps, norm, step = cfg.eps, cfg.attack.norm.value, cfg.step_size
    return (
        Threat(eps, norm, cfg.attack.steps, step),
        Threat(eps, norm, cfg.eval.val_pgd_steps, step),
        Threat(eps, norm, cfg.eval.pgd_steps, step),
    )


def test_eval(model: Classifier, splits: Splits, cfg: RunConfig, out: Path, autoattack: bool) -> dict:
    """Clean + PGD on the test split, AutoAttack on its first ``n_autoattack`` examples; masks saved."""
    e = cfg.eval
    n_test = len(splits.test)
    lo, hi = D.shard_bounds(n_test)  # under torchrun every rank evaluates a shard; masks are gathered
    dev = next(model.parameters()).device
    x, y = (t.to(dev) for t in splits.test.tensors(torch.arange(lo, hi)))
    common = dict(eps=cfg.eps, norm=cfg.attack.norm.value, pgd_steps=e.pgd_steps, pgd_step_size=cfg.step_size,
                  pgd_restarts=e.pgd_restarts, batch_size=e.batch_size, seed=cfg.seed, num_classes=splits.num_classes)  # fmt: skip
    res = evaluate(model, x, y, attacks=("clean", "pgd"), **common)
    if D.world() > 1:
        res["masks"] = {k: D.gather_cat(m.to(torch.uint8), n_test).bool() for k, m in res["masks"].items()}
        res.update({k: m.float().mean().item() for k, m in res["masks"].items()}, n=n_test)
    out_res = {
        "clean_acc": res["clean"],
        "pgd_acc": res["pgd"],
        "n_eval": res["n"],
        "pgd_settings": res["pgd_settings"],
        "flags": res["flags"],
    }
    masks = {k: v.to(torch.uint8) for k, v in res["masks"].items()}
    out_res["autoattack_acc"] = None
    if autoattack:
        n = min(e.n_autoattack or n_test, n_test)
        a_lo, a_hi = D.shard_bounds(n)
        if lo <= a_lo and a_hi <= hi:  # always in one process: the subset is already loaded, read nothing twice
            xa, ya = x[a_lo - lo : a_hi - lo], y[a_lo - lo : a_hi - lo]
        else:
            xa, ya = (t.to(dev) for t in splits.test.tensors(torch.arange(a_lo, a_hi)))
        state = out / ("autoattack_state.json" if D.world() == 1 else f"autoattack_state.rank{D.rank()}.json")
        aa = evaluate(model, xa, ya, attacks=("autoattack",), aa_version=e.aa_version, aa_attacks=e.aa_attacks,
                      aa_state=state, checks=False, **common)  # fmt: skip
        aa_mask = D.gather_cat(aa["masks"]["autoattack"].to(torch.uint8), n).bool()
        aa["autoattack"] = aa_mask.float().mean().item()
        out_res.update(autoattack_acc=aa["autoattack"], n_autoattack=n, autoattack_settings=aa["autoattack_settings"])
        masks["autoattack"] = aa_mask.to(torch.uint8)
        from .evaluate import result_flags

        sub = {
            "clean": res["masks"]["clean"][:n].float().mean().item(),
            "pgd": res["masks"]["pgd"][:n].float().mean().item(),
            "autoattack": aa["autoattack"],
        }
        out_res["flags"] = res["flags"] + [
            f for f in result_flags(sub, n) if f["flag"] not in {g["flag"] for g in res["flags"]}
        ]
    atomic_write(out / "masks.safetensors", lambda tmp: save_file(masks, tmp))
    return out_res


def run_stage(
    cfg: RunConfig,
    splits: Splits,
    spec: ModelSpec,
    stage_dir: Path,
    train_cfg,
    log,
    resume: bool,
    head_from: Path | None,
) -> tuple[Classifier, dict]:
    model = make_model(cfg, spec, cfg.seed, log)
    if head_from is not None:
        load_head(model, head_from)
        log(f"RoLI: head loaded from {head_from}")
    train_threat, val_threat, _ = _threats(cfg)
    section = "probe" if train_cfg is cfg.probe else "train"
    stage = Stage(
        stage_dir, spec, train_cfg, train_threat, val_threat, cfg.seed, cfg.eval.batch_size, section, cfg.data.workers
    )
    best = fit(model, splits.train, splits.val, stage, log, resume=resume)
    best_model = make_model(cfg, spec, cfg.seed)
    best_model.load_state_dict(read_state(stage.best_path))
    return best_model.eval(), best


def run(cfg: RunConfig, out: Path, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Execute a run into ``out``; return its result card (also written to ``out/result.json``).

    ``resume`` continues an interrupted run bit-identically (finished stages and AutoAttack attacks are
    not redone); ``overwrite`` replaces a finished one. A fresh run that fails on bad input (``UserError``)
    before it saved any training state removes what it wrote; any other failed run keeps its checkpoints
    and log (so it can be resumed), never a result.json.
    """
    out = Path(out)
    if cfg.method.init == Init.ROLI and cfg.method.name == "linear":
        raise UserError(
            "config: init 'roli' needs a finetuning method other than 'linear' (RoLI's stage 1 is the linear probe)"
        )
    refused: UserError | None = None
    rd: RunDir | _Follower = _Follower()  # other torchrun ranks follow rank 0's decision and write nothing
    if D.is_main():
        try:
            rd = RunDir(out, to_dict(cfg), resume=resume, overwrite=overwrite)
        except UserError as e:  # every rank must hear of it, or the others wait in the next collective
            refused = e
    n_refused, resuming = D.all_sum([float(refused is not None), float(rd.resuming)])
    if refused is not None:
        raise refused
    if n_refused:
        raise UserError(f"run: rank 0 refused {out} (its message says why)")
    rd.resuming = resuming > 0
    discard = False
    try:
        return _run(cfg, out, rd)
    except UserError:
        # bad input found before any training was saved: leave nothing behind. Once a state exists the
        # directory stays (no result.json), so a run that met e.g. a bad image late can be fixed and resumed.
        discard = not rd.resuming and not any(out.rglob("state.safetensors"))
        if discard:
            rd.clear()
        raise
    finally:
        rd.release(remove_if_created=discard)


def _run(cfg: RunConfig, out: Path, rd: RunDir) -> dict:
    t0 = time.time()
    resume = rd.resuming
    atomic_write(out / "config.yaml", lambda tmp: Path(tmp).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False)))
    env = environment()
    if resume:
        rd.log(f"resuming {out}")
        env = record_resume(out / "env.json", env, rd.log)
    write_json(out / "env.json", env)
    splits = load_splits(cfg.data)
    rd.log(
        f"data {cfg.data.name}: train {len(splits.train)} val {len(splits.val)} test {len(splits.test)}, {splits.num_classes} classes"
    )
    if len(splits.val) == 0:
        raise UserError("data: the validation split is empty (data.n_val must be >= 1; model selection needs it)")
    spec = source_spec(cfg, splits)
    check_channels(spec, splits.train.channels)
    head_from = None
    final_dir = out
    if cfg.method.init == Init.ROLI:
        head_from = probe_head(cfg, splits, spec, out, rd.log, resume)
        final_dir = out / "stage2"
    model, best = run_stage(cfg, splits, spec, final_dir, cfg.train, rd.log, resume, head_from)
    rd.log(f"best epoch {best['epoch'] + 1}: val clean {best['val_clean']:.4f} val pgd {best['val_pgd']:.4f}; testing")
    res = test_eval(model, splits, cfg, final_dir, cfg.eval.autoattack)
    res.update(n_train=len(splits.train), n_val=len(splits.val))
    card = result_card(cfg, spec, model, best, res, time.time() - t0)
    if final_dir != out:
        write_json(final_dir / RESULT, card)
    write_json(out / RESULT, card)
    rd.log(f"result: clean {card['clean_acc']:.4f} pgd {card['pgd_acc']:.4f} autoattack {card['autoattack_acc']}")
    return card


class _Follower:
    """The run directory as seen by a rank other than 0: no lock, no log, no writes."""

    resuming = False

    def log(self, msg: str) -> None:
        pass

    def clear(self) -> None:
        pass

    def release(self, remove_if_created: bool = False) -> None:
        pass


def check_probe(probe: ModelSpec, spec: ModelSpec, path: Path) -> None:
    """A reused RoLI probe must be a linear probe of the same source, classes and threat model."""
    problems = []
    if probe.method.get("name") != "linear":
        problems.append(f"it was trained with method {probe.method.get('name')!r}, not 'linear'")
    for key, what in (("source", "source checkpoint"), ("dataset", "dataset"), ("eps", "eps"), ("norm", "norm")):
        if probe.trained.get(key) != spec.trained.get(key):
            problems.append(f"its {what} is {probe.trained.get(key)!r}, not {spec.trained.get(key)!r}")
    if probe.classes and spec.classes and probe.classes != spec.classes:
        problems.append("its classes differ")
    if problems:
        raise UserError(f"config: method.probe_run {path.parent} does not fit this run: " + "; ".join(problems))


def check_channels(spec: ModelSpec, channels: int) -> None:
    """Grey images may feed an RGB model (the model repeats the channel); anything else must match."""
    want = int(spec.kwargs.get("in_chans", 3))
    if channels != want and channels != 1:
        raise UserError(f"data: images have {channels} channels but the model takes {want}")


def probe_head(cfg: RunConfig, splits: Splits, spec: ModelSpec, out: Path, log, resume: bool) -> Path:
    """RoLI stage 1: adversarial linear probing (or a finished probe run to reuse); returns its best checkpoint."""
    if cfg.method.probe_run:
        probe = Path(cfg.method.probe_run)
        path = probe / "best.safetensors"
        if not path.is_file():
            raise UserError(f"config: method.probe_run {probe} holds no best.safetensors")
        check_probe(read_spec(path), spec, path)
        log(f"RoLI: reusing the linear probe of {probe}")
        return path
    s1 = out / "stage1"
    if (s1 / RESULT).exists():
        return s1 / "best.safetensors"
    lin_spec = replace(spec, method={"name": "linear", "options": {}})
    lin_cfg = replace(cfg, method=replace(cfg.method, name="linear", options={}))
    model, best = run_stage(lin_cfg, splits, lin_spec, s1, cfg.probe, log, resume, None)
    res = test_eval(model, splits, lin_cfg, s1, autoattack=False)
    res.update(n_train=len(splits.train), n_val=len(splits.val))
    write_json(s1 / RESULT, result_card(lin_cfg, lin_spec, model, best, res, 0.0))
    return s1 / "best.safetensors"


def result_card(cfg: RunConfig, spec: ModelSpec, model: Classifier, best: dict, res: dict, seconds: float) -> dict:
    return {
        "name": cfg.name,
        "method": spec.method["name"],
        "method_options": spec.method["options"],
        "init": cfg.method.init.value,
        "backbone": spec.backbone,
        "source": cfg.model.checkpoint or ("timm-pretrained" if cfg.model.pretrained else "scratch"),
        "dataset": cfg.data.name,
        "seed": cfg.seed,
        "eps": cfg.attack.eps,
        "eps_value": cfg.eps,
        "norm": cfg.attack.norm.value,
        "objective": cfg.train.objective.value,
        **res,
        "best_epoch": best["epoch"],
        "val_clean": best["val_clean"],
        "val_pgd": best["val_pgd"],
        "trainable_params": count(model),
        "total_params": count(model, only_trainable=False),
        "train_attack": {"steps": cfg.attack.steps, "step_size": cfg.step_size},
        "seconds": round(seconds, 1),
    }
