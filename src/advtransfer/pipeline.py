"""One run: config -> data -> model (+ method) -> train stage(s) -> streamed test evaluation -> result card.

RanLI is one stage; RoLI is two, ``stage1/`` (the adversarial linear probe, or a finished linear run reused through
``method.probe_run``) and ``stage2/`` (the finetune from the probe's head); ``result.json`` is the final stage's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from . import distributed as D
from .attacks import Threat
from .checkpoints import compact_keys, load_head, source_of
from .config import Init, RunConfig, probe_problems, to_dict
from .configfile import load_config
from .data import load_splits, worker_count
from .datasets import Splits
from .errors import Interrupted, UserError
from .evaluation import evaluate_batches, split_batches
from .methods import apply_method, count
from .models import PREPROCESS, Classifier, ModelSpec, build, compiled, is_convnet
from .rundir import (
    RESULT,
    RunDir,
    StopRequest,
    atomic_write,
    environment,
    read_json,
    record_resume,
    write_json,
    write_text,
)
from .track import Tracker
from .train import Stage, fit
from .weightfiles import load_backbone_weights, read_spec, read_state


def source_spec(cfg: RunConfig, splits: Splits) -> tuple[ModelSpec, str]:
    """The model a run starts from, and its mean/std's origin: explicit > preset > checkpoint > timm's default."""
    m = cfg.model
    ckpt = Path(m.checkpoint) if m.checkpoint else None
    if ckpt is not None and not ckpt.is_file():
        raise UserError(f"checkpoint: file not found: {ckpt}")
    backbone, kwargs, mean, std, origin = m.backbone, dict(m.kwargs), list(m.mean), list(m.std), "model.mean/std"
    if not mean and m.preprocess:
        (mean, std), origin = map(list, PREPROCESS[m.preprocess]), f"model.preprocess={m.preprocess}"
    if ckpt is not None and ckpt.suffix == ".safetensors":
        src = read_spec(ckpt)
        if backbone and backbone != src.backbone:
            raise UserError(f"checkpoint: {ckpt} is a {src.backbone}, but the config asks for {backbone}")
        backbone, kwargs = src.backbone, {**src.kwargs, **kwargs}  # config kwargs (e.g. drop_path_rate) on top
        if not mean:
            mean, std, origin = src.mean, src.std, f"the metadata of {ckpt.name}"
    if not backbone:
        raise UserError("config: model.backbone is empty and no advtransfer checkpoint names one")
    trained = {
        "dataset": cfg.data.name,
        "objective": cfg.train.objective.value,
        "eps": str(cfg.attack.eps),
        "norm": cfg.attack.norm.value,
        "epochs": cfg.train.epochs,
        "seed": cfg.seed,
        "source": m.checkpoint or ("timm-pretrained" if m.pretrained else "scratch"),
    }
    spec = ModelSpec(
        backbone,
        kwargs,
        splits.num_classes,
        mean=mean,
        std=std,
        classes=splits.classes,
        input_size=[m.input_size] * 2 if m.input_size else [],
        trained=trained,
        method={"name": cfg.method.name, "options": dict(cfg.method.options)},
    )
    return spec, origin if mean else f"timm's default for {backbone}"


def make_model(cfg: RunConfig, spec: ModelSpec, seed: int, log=None) -> Classifier:
    """Build the backbone (seeded head), load source weights (``log`` gets what was mapped), apply the method."""
    torch.manual_seed(seed)
    model = build(spec, pretrained=cfg.model.pretrained and not cfg.model.checkpoint)
    if spec.num_classes < 2:
        raise UserError(f"data: need at least 2 classes, got {spec.num_classes}")
    if cfg.model.head_init == "kaiming-fan-out":  # the paper's RanLI head: a prior of 1/100 per class
        torch.nn.init.kaiming_normal_(model.head.weight, mode="fan_out")
        torch.nn.init.constant_(model.head.bias, -math.log(99))
    if cfg.model.checkpoint:
        notes = load_backbone_weights(model, Path(cfg.model.checkpoint))
        if log is not None and notes:
            log(f"source {cfg.model.checkpoint}: " + "; ".join(notes))
    if torch.cuda.is_available():  # cuDNN autotuning pays off for ConvNets' many fixed-shape convolutions
        torch.backends.cudnn.benchmark = is_convnet(model)
    return apply_method(model, spec.method["name"], spec.method["options"]).to(D.device())


def run_stage(
    cfg: RunConfig, splits: Splits, spec: ModelSpec, path: Path, section: str, rd: RunDir, head_from: Path | None = None
) -> tuple[Classifier, dict]:
    """Train one stage with the ``section`` settings ("train" or "probe"); return its best model and progress."""
    model = make_model(cfg, spec, cfg.seed, rd.log)
    if head_from is not None:
        load_head(model, head_from)
        rd.log(f"RoLI: head loaded from {head_from}")
    compact = cfg.model.checkpoint and spec.method["name"] != "full"
    if compact:  # the backbone never changes: keep what trains, and a pointer to the source
        spec = spec.model_copy(update={"trained": {**spec.trained, **source_of(Path(cfg.model.checkpoint))}})
    tracker = Tracker(path, cfg, rd.resuming)
    stage = Stage(
        path,
        spec,
        getattr(cfg, section),
        Threat.of(cfg.attack),
        Threat.of(cfg.attack, cfg.eval.val_pgd_steps),
        cfg.seed,
        cfg.eval.batch_size,
        section,
        worker_count(cfg.data),
        validate_init=head_from is not None,
        log=rd.log,
        log_every=cfg.track.log_every,
        track=tracker.log,
        save_only=compact_keys(model) if compact else None,
    )
    try:
        progress = fit(model, splits.train, splits.val, stage, resume=rd.resuming)
    finally:
        tracker.close()
    best = make_model(cfg, spec, cfg.seed)
    best.load_state_dict(read_state(stage.best_path), strict=not compact)
    return best.eval(), progress


def probe_head(cfg: RunConfig, splits: Splits, spec: ModelSpec, out: Path, rd: RunDir) -> Path:
    """RoLI stage 1: train the adversarial linear probe (or reuse a fitting finished run); return its best weights."""
    if cfg.method.probe_run:
        probe = Path(cfg.method.probe_run)
        if not (probe / "best.safetensors").is_file() or not (probe / "config.yaml").is_file():
            raise UserError(
                f"config: method.probe_run {probe} holds no best.safetensors and config.yaml of a finished run"
            )
        if problems := probe_problems(load_config(probe / "config.yaml"), cfg):
            raise UserError(f"config: method.probe_run {probe} does not fit this run: " + "; ".join(problems))
        rd.log(f"RoLI: reusing the linear probe of {probe}")
        return probe / "best.safetensors"
    s1 = out / "stage1"
    if not (s1 / RESULT).exists():
        lin = cfg.model_copy(update={"method": cfg.method.model_copy(update={"name": "linear", "options": {}})})
        lin_spec = spec.model_copy(update={"method": {"name": "linear", "options": {}}})
        model, progress = run_stage(lin, splits, lin_spec, s1, "probe", rd)
        res = test_eval(model, splits, lin, s1, autoattack=False, log=rd.log)
        write_json(s1 / RESULT, result_card(lin, lin_spec, model, progress, {**res, "n_train": len(splits.train)}))
    return s1 / "best.safetensors"


def test_eval(
    model: Classifier, splits: Splits, cfg: RunConfig, out: Path, autoattack: bool, log: Callable[[str], None] = print
) -> dict:
    """Clean, PGD and (``autoattack``) AutoAttack on the test split, streamed and sharded; saves the masks."""
    e, dev, n = cfg.eval, next(model.parameters()).device, len(splits.test)
    net = compiled(model) if cfg.train.compile else model  # the same weights, evaluation compiled too
    aa = f", AutoAttack ({e.aa_version}) on {min(e.n_autoattack or n, n)}"
    log(f"{out.name} test: clean + PGD-{e.pgd_steps} on {n} examples" + (aa if autoattack else ""))
    batches = split_batches(splits.test, e.batch_size, dev, worker_count(cfg.data))
    attacks = ("clean", "pgd", "autoattack") if autoattack else ("clean", "pgd")
    aa_args = dict(aa_version=e.aa_version, aa_attacks=e.aa_attacks, aa_state=out / "autoattack_state.json")
    kw = dict(attacks=attacks, restarts=e.pgd_restarts, seed=cfg.seed, n_autoattack=e.n_autoattack, log=log)
    with StopRequest() as stop:  # a signal stops it with AutoAttack's finished batches saved
        try:
            threat = Threat.of(cfg.attack, e.pgd_steps)
            res = evaluate_batches(net, batches, n, threat, num_classes=splits.num_classes, stop=stop, **aa_args, **kw)
        except Interrupted as why:
            raise Interrupted(f"{why}; state saved in {out}") from None
    masks = {k: v.to(torch.uint8) for k, v in res["masks"].items()}
    atomic_write(out / "masks.safetensors", lambda tmp: save_file(masks, tmp))
    card = {
        "clean_acc": res["clean"],
        "pgd_acc": res["pgd"],
        "autoattack_acc": res.get("autoattack"),
        "n_eval": res["n"],
        "pgd_settings": res["pgd_settings"],
        "flags": res["flags"],
        "notes": [],
    }
    if autoattack:
        card.update(n_autoattack=res["n_autoattack"], autoattack_settings=res["autoattack_settings"])
    else:
        card["notes"].append("AutoAttack was off: the robust accuracy is PGD's alone and may overstate robustness")
    return card


def result_card(cfg: RunConfig, spec: ModelSpec, model: Classifier, progress: dict, res: dict) -> dict:
    """The run's result card: what ran, the test results ``res``, the best validation epoch and the training time."""
    best, a = progress["best"], cfg.attack
    return {
        "name": cfg.name,
        "method": spec.method["name"],
        "method_options": spec.method["options"],
        "init": cfg.method.init.value,
        "backbone": spec.backbone,
        "source": spec.trained["source"],
        "dataset": cfg.data.name + ("" if cfg.data.variant == "none" else f" ({cfg.data.variant})"),
        "seed": cfg.seed,
        "eps": str(a.eps),
        "eps_value": float(a.eps),
        "norm": a.norm.value,
        "objective": cfg.train.objective.value,
        "mean": spec.mean,
        "std": spec.std,
        **res,
        "best_epoch": best["epoch"],
        "val_clean": best["val_clean"],
        "val_pgd": best["val_pgd"],
        "trainable_params": count(model),
        "total_params": count(model, only_trainable=False),
        "train_attack": {"steps": a.steps, "step_size": Threat.of(a).alpha, "iterate": a.iterate},
        "train_seconds": progress["seconds"],
    }


def run(cfg: RunConfig, out: Path, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Run ``cfg`` into ``out``; return its result card (``resume``: bit-identically; ``overwrite``: a finished run)."""
    if cfg.method.init == Init.ROLI and cfg.method.name == "linear":
        raise UserError(
            "config: init 'roli' needs a finetuning method other than 'linear' (RoLI's stage 1 is the probe)"
        )
    out, refused, rd = Path(out), None, None
    if D.is_main():
        try:
            rd = RunDir(out, to_dict(cfg), resume=resume, overwrite=overwrite)
        except UserError as e:  # every rank must hear of it, or the others wait in the next collective
            refused = e
    n_refused, resuming = D.all_sum([float(refused is not None), float(rd is not None and rd.resuming)])
    if refused is not None or n_refused:
        raise refused or UserError(f"run: rank 0 refused {out} (its message says why)")
    rd = rd or RunDir.follower(resuming > 0)  # other torchrun ranks follow rank 0's decision and write nothing
    ok, discard, keep = False, False, False
    try:
        card, ok = _run(cfg, out, rd), True
    except UserError:
        # bad input found before any training was saved: leave nothing behind. Once a state exists the directory
        # stays (no result.json), so a run that met e.g. a bad image late can be fixed and resumed.
        discard = not rd.resuming and not any(out.rglob("state.safetensors"))
        raise
    except (Interrupted, KeyboardInterrupt):
        keep = True  # --resume continues it (a run it replaces stays aside until then)
        raise
    finally:
        rd.release(ok, discard=discard, keep=keep)
    return card


def _run(cfg: RunConfig, out: Path, rd: RunDir) -> dict:
    write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    env = {**environment(), "threads": torch.get_num_threads()}
    if rd.resuming:
        rd.log(f"resuming {out}")
        env = record_resume(out / "env.json", env, rd.log)
    write_json(out / "env.json", env)
    splits = load_splits(cfg.data, seed=cfg.seed)
    sizes = f"train {len(splits.train)} val {len(splits.val)} test {len(splits.test)}"
    rd.log(f"data {cfg.data.name}: {sizes}, {splits.num_classes} classes")
    for note in splits.notes:
        rd.log(note)
    if len(splits.val) == 0:
        raise UserError("data: the validation split is empty (data.n_val must be >= 1; model selection needs it)")
    spec, origin = source_spec(cfg, splits)
    rd.log(f"preprocessing: mean {[round(v, 4) for v in spec.mean]} std {[round(v, 4) for v in spec.std]} ({origin})")
    check_channels(spec, splits.train.channels)
    hardware = {"device": "cpu"}
    if torch.cuda.is_available():  # TF32 for fp32 matmuls and convolutions on Ampere+ GPUs (``train.tf32``)
        tf32 = cfg.train.tf32 and torch.cuda.get_device_capability()[0] >= 8
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        hardware = {"device": torch.cuda.get_device_name(), "tf32": tf32}
    head_from = probe_head(cfg, splits, spec, out, rd) if cfg.method.init == Init.ROLI else None
    final = out / "stage2" if head_from is not None else out
    model, progress = run_stage(cfg, splits, spec, final, "train", rd, head_from)
    best = progress["best"]
    rd.log(f"best epoch {best['epoch'] + 1}: val clean {best['val_clean']:.4f} val pgd {best['val_pgd']:.4f}; testing")
    t_test = time.time()
    res = test_eval(model, splits, cfg, final, cfg.eval.autoattack, log=rd.log)
    res.update(n_train=len(splits.train), n_val=len(splits.val), preprocessing_from=origin, hardware=hardware)
    card = result_card(cfg, spec, model, progress, res)
    stage1 = out / "stage1" / RESULT
    earlier = read_json(stage1).get("train_seconds", 0.0) if head_from is not None and stage1.is_file() else 0.0
    card["seconds"] = round(earlier + progress["seconds"] + time.time() - t_test, 1)  # training (all resumes) + test
    if final != out:
        write_json(final / RESULT, card)
    write_json(out / RESULT, card)
    rd.log(f"result: clean {card['clean_acc']:.4f} pgd {card['pgd_acc']:.4f} autoattack {card['autoattack_acc']}")
    return card


def check_channels(spec: ModelSpec, channels: int) -> None:
    """Grey images may feed an RGB model (the model repeats the channel); anything else must match."""
    want = int(spec.kwargs.get("in_chans", 3))
    if channels != want and channels != 1:
        raise UserError(f"data: images have {channels} channels but the model takes {want}")
