"""Bad input, end to end through the CLI: a matrix of kinds of bad input, each must give

* exactly one ``advtransfer: error: ...`` line on stderr that names the problem, and no traceback;
* exit 2 for bad input / usage, exit 1 for a failure while running (non-finite loss, disk full, out of memory);
* no partial output: a fresh run that fails on bad input leaves no run directory at all, and no failed run
  ever leaves a ``result.json`` or a half-written (``.tmp``) file; a run that fails while running keeps its
  last complete checkpoint.

Most cases call ``advtransfer.cli.main`` in-process (fast; stderr through ``capsys``); a few run the real
console entry point in a subprocess to check exit codes and the absence of tracebacks there. Hypothesis
fuzzes the config file and ``--set`` syntax through ``main``: the only outcomes are success or exit 2.
"""

from __future__ import annotations

import argparse
import errno
import gzip
import hashlib
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from advtransfer import checkpoints, embedded, models, train
from advtransfer.checkpoints import save_checkpoint
from advtransfer.cli import main
from advtransfer.config import Init, to_dict
from advtransfer.configfile import load_config
from advtransfer.models import ModelSpec, build

TINY = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
BASE = {
    "data": {"name": "fashion-mnist", "n_train": 32, "n_val": 16, "n_test": 16},
    "method": {"name": "full", "init": "ranli"},
    "attack": {"eps": "0.1", "steps": 1},
    "train": {"epochs": 2, "batch_size": 16, "checkpoint_every": 1},
    "probe": {"epochs": 1, "batch_size": 16},
    "eval": {"val_pgd_steps": 1, "pgd_steps": 1, "autoattack": False},
}


# ----------------------------------------------------------------------------- fixtures and helpers


@dataclass
class Ctx:
    """What a case builds on: a temp folder, the source checkpoint, a base config, the run dir, monkeypatch."""

    tmp: Path
    source: Path
    mp: pytest.MonkeyPatch
    out: Path = field(init=False)

    def __post_init__(self) -> None:
        self.out = self.tmp / "run"

    def config(self, **sections) -> str:
        cfg = json.loads(json.dumps(BASE))
        cfg["model"] = {"checkpoint": str(self.source)}
        for name, values in sections.items():
            cfg.setdefault(name, {}).update(values)
        path = self.tmp / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    def run(self, *sets: str, **sections) -> list[str]:
        argv = ["run", self.config(**sections), "--out", str(self.out)]
        for s in sets:
            argv += ["--set", s]
        return argv

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path


def error_line(capsys, rc: int, code: int, *names: str) -> str:
    """Assert the exit code and a single error line naming the problem; return that line."""
    err = capsys.readouterr().err
    assert rc == code, f"exit {rc}, expected {code}; stderr:\n{err}"
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("advtransfer: error:")]
    assert len(errors) == 1 and err.rstrip("\n").splitlines()[-1] == errors[0], err
    for name in names:
        assert name.lower() in errors[0].lower(), f"{name!r} not named in: {errors[0]}"
    return errors[0]


def snapshot(out: Path) -> object:
    """The bytes of ``out`` (a file, or every file under a directory); None if it does not exist."""
    if out.is_file():
        return out.read_bytes()
    if out.is_dir():
        return {str(p.relative_to(out)): p.read_bytes() if p.is_file() else None for p in sorted(out.rglob("*"))}
    return None


def no_partial_output(out: Path, *, fresh_bad_input: bool) -> None:
    """A fresh run refused on bad input leaves nothing; any other failed run no result and no partial file."""
    if fresh_bad_input:
        assert not out.exists(), sorted(p.name for p in out.rglob("*"))
        return
    if out.is_dir():
        assert not (out / "result.json").exists()
        assert not [p for p in out.rglob(".*") if p.name.endswith(".tmp") or p.name == ".lock"]
        for p in out.rglob("*.safetensors"):  # whatever was kept is complete
            load_file(str(p))
        for p in out.rglob("*.json"):
            json.loads(p.read_text())


# ----------------------------------------------------------------------------- data fixtures


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def fake_fashion(ctx: Ctx, *, n_train=40, n_test=20, labels=None, mangle: Callable[[dict], None] | None = None) -> None:
    """A tiny Fashion-MNIST cache in a temp $ADVTRANSFER_DATA, with checksums patched to match its files.

    ``mangle(files)`` may change the file bytes after the checksums were taken (a damaged download)."""
    rng = np.random.default_rng(0)
    y_train = labels if labels is not None else np.arange(n_train) % 10
    files = {
        "train-images-idx3-ubyte.gz": _idx(rng.integers(0, 256, (n_train, 28, 28))),
        "train-labels-idx1-ubyte.gz": _idx(np.asarray(y_train)),
        "t10k-images-idx3-ubyte.gz": _idx(rng.integers(0, 256, (n_test, 28, 28))),
        "t10k-labels-idx1-ubyte.gz": _idx(np.arange(n_test) % 10),
    }
    files = {k: gzip.compress(v, mtime=0) for k, v in files.items()}
    sums = {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
    if mangle:
        mangle(files)
    root = ctx.tmp / "data"
    for name, blob in files.items():
        (root / "fashion-mnist").mkdir(parents=True, exist_ok=True)
        (root / "fashion-mnist" / name).write_bytes(blob)
    ctx.mp.setenv("ADVTRANSFER_DATA", str(root))
    ctx.mp.setitem(embedded.CHECKSUMS, "fashion-mnist", sums)


def patched_idx(ctx: Ctx, name: str, raw: bytes) -> None:
    """Replace one IDX file with ``raw`` (gzipped) and patch its checksum so the parser sees it."""
    fake_fashion(ctx)
    blob = gzip.compress(raw, mtime=0)
    (ctx.tmp / "data" / "fashion-mnist" / name).write_bytes(blob)
    sums = dict(embedded.CHECKSUMS["fashion-mnist"], **{name: hashlib.sha256(blob).hexdigest()})
    ctx.mp.setitem(embedded.CHECKSUMS, "fashion-mnist", sums)


def png(path: Path, size=(8, 8), mode="RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=(120, 40, 200) if mode == "RGB" else 128).save(path)


def image_folder(ctx: Ctx, *, empty_class: bool = False, corrupt: bool = False) -> Path:
    root = ctx.tmp / "images"
    for part in ("train", "test"):
        for c in ("cat", "dog"):
            for i in range(4 if part == "train" else 2):
                png(root / part / c / f"{i}.png")
    if empty_class:
        (root / "train" / "bird").mkdir(parents=True)
        (root / "test" / "bird").mkdir(parents=True)
    if corrupt:
        (root / "train" / "cat" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return root


def other_arch_pt(ctx: Ctx) -> Path:
    """A plain .pt state dict of a different (1-block) ViT."""
    spec = ModelSpec("vit_tiny_patch16_224", dict(TINY, depth=1), 10, mean=[0.5], std=[0.5])
    path = ctx.tmp / "other.pt"
    torch.save(build(spec).backbone.state_dict(), path)
    return path


def five_class_checkpoint(ctx: Ctx, name: str = "five.safetensors") -> Path:
    spec = ModelSpec("vit_tiny_patch16_224", dict(TINY), 5, mean=[0.5], std=[0.5])
    path = ctx.tmp / name
    save_checkpoint(build(spec), spec, path)
    return path


class Evil:
    """Unpickling this would create the marker file: a checkpoint that runs code when loaded unsafely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_pt(ctx: Ctx, zipped: bool = True) -> tuple[Path, Path]:
    """A hostile checkpoint in torch's zip container (what torch.save writes) or as a bare legacy pickle."""
    marker = ctx.tmp / "PWNED"
    path = ctx.tmp / ("evil.pt" if zipped else "evil_legacy.pth")
    payload = {"state_dict": {"w": Evil(marker)}}
    if zipped:
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    return path, marker


def finished_run(ctx: Ctx) -> None:
    ctx.out.mkdir()
    (ctx.out / "config.yaml").write_text(yaml.safe_dump({"seed": 0}))
    (ctx.out / "result.json").write_text("{}")


def resumable_run(ctx: Ctx, **changes) -> list[str]:
    """A run killed after writing its config (so --resume applies), with ``changes`` to its config after."""
    from advtransfer.config import to_dict
    from advtransfer.configfile import load_config

    argv = ctx.run()
    ctx.out.mkdir()
    (ctx.out / "config.yaml").write_text(yaml.safe_dump(to_dict(load_config(argv[1]))))
    return ctx.run(*(f"{k}={v}" for k, v in changes.items())) + ["--resume"]


def damaged_state(ctx: Ctx) -> list[str]:
    argv = resumable_run(ctx)
    (ctx.out / "state.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return argv


def probe_dir(ctx: Ctx, head_classes: int, method: str = "linear") -> Path:
    d = ctx.tmp / "probe"
    d.mkdir()
    # a genuine linear probe of this source, dataset and threat model — only its head has the wrong shape
    spec = ModelSpec(
        "vit_tiny_patch16_224",
        dict(TINY),
        head_classes,
        mean=[0.5],
        std=[0.5],
        method={"name": method, "options": {}},
        trained={"source": str(ctx.source), "dataset": "fashion-mnist", "eps": "0.1", "norm": "Linf"},
    )
    save_checkpoint(build(spec), spec, d / "best.safetensors")
    cfg = load_config(base={**json.loads(json.dumps(BASE)), "model": {"checkpoint": str(ctx.source)}})
    probe = cfg.model_copy(
        update={"method": cfg.method.model_copy(update={"name": method, "init": Init.RANLI}), "train": cfg.probe}
    )
    (d / "config.yaml").write_text(yaml.safe_dump(to_dict(probe)))
    return d


def with_metadata(ctx: Ctx, change: Callable[[dict], None], name: str = "meta.safetensors") -> Path:
    """A copy of the source checkpoint whose metadata spec (a dict) went through ``change``."""
    from safetensors import safe_open

    with safe_open(str(ctx.source), "pt") as f:
        meta = f.metadata()
    spec = json.loads(meta["advtransfer"])
    change(spec)
    path = ctx.tmp / name
    save_file(load_file(str(ctx.source)), str(path), metadata={**meta, "advtransfer": json.dumps(spec)})
    return path


def tiny_state(**changes) -> dict[str, torch.Tensor]:
    """The backbone state dict of the tiny ViT, seeded."""
    torch.manual_seed(0)
    return build(ModelSpec("vit_tiny_patch16_224", dict(TINY, **changes), 10)).backbone.state_dict()


def foreign(ctx: Ctx, obj, name: str, *extra: str) -> list[str]:
    """``eval`` of ``obj`` saved with ``torch.save`` as a foreign file of the tiny ViT's architecture."""
    torch.save(obj, ctx.tmp / name)
    kwargs = [f"{k}={v}" for k, v in TINY.items()]
    return ["eval", "--checkpoint", str(ctx.tmp / name), "--data", "mnist", "--backbone", "vit_tiny_patch16_224"] + [
        *kwargs,
        *extra,
    ]


def compact_checkpoint(ctx: Ctx, *, then: Callable[[Path], None]) -> list[str]:
    """``eval`` of a compact (head-only) checkpoint of a copy of the source, after ``then(copy)``."""
    from advtransfer.checkpoints import compact_keys, source_of
    from advtransfer.methods import apply_method

    src = ctx.tmp / "src.safetensors"
    src.write_bytes(ctx.source.read_bytes())
    spec = ModelSpec("vit_tiny_patch16_224", dict(TINY), 10, mean=[0.5], std=[0.5], trained=source_of(src))
    spec.method = {"name": "linear", "options": {}}
    model = apply_method(build(spec), "linear", {})
    save_checkpoint(model, spec, ctx.tmp / "compact.safetensors", only=compact_keys(model))
    then(src)
    return ["eval", "--checkpoint", str(ctx.tmp / "compact.safetensors"), "--data", "mnist", "--n", "8"]


def grid(ctx: Ctx, text: str, *extra: str) -> list[str]:
    """``sweep`` of a grid file holding ``text`` (a dry run unless ``extra`` says otherwise)."""
    path = ctx.write("grid.yaml", text)
    return ["sweep", str(path), "--out", str(ctx.out), *(extra or ["--dry-run"])]


def locked(ctx: Ctx) -> list[str]:
    """A run directory whose lock another holder has (this process, through a second open file)."""
    import fcntl

    argv = resumable_run(ctx)
    ctx.held = open(ctx.out / ".lock", "a+")  # noqa: SIM115 - test_bad_input closes it
    fcntl.flock(ctx.held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    ctx.held.write(str(os.getpid()))
    ctx.held.flush()
    return argv


def killed_overwrite(ctx: Ctx) -> list[str]:
    """An overwrite killed mid-run: the old finished run aside in .replaced/, the new run's files in place."""
    argv = resumable_run(ctx)
    (ctx.out / ".replaced").mkdir()
    (ctx.out / ".replaced" / "result.json").write_text("{}")
    (ctx.out / ".replaced" / "config.yaml").write_text("seed: 0\n")
    return argv[:-1]  # neither --resume nor --overwrite


def foreign_state(ctx: Ctx) -> list[str]:
    """A resume state written by a run of another architecture."""
    from advtransfer.checkpoints import save_state
    from advtransfer.config import TrainConfig
    from advtransfer.train import make_optimizer, make_scheduler

    argv = resumable_run(ctx)
    model = build(ModelSpec("vit_tiny_patch16_224", dict(TINY, depth=1), 10))
    opt = make_optimizer(model, TrainConfig())
    progress = {"epoch": 0, "step": 1, "best": None, "loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
    save_state(ctx.out / "state.safetensors", model, opt, make_scheduler(opt, TrainConfig(), 2), progress)
    return argv


def split_file(ctx: Ctx, text: str, name: str = "split.txt") -> list[str]:
    """``run`` on the image folder with a split file holding ``text``."""
    return ctx.run(
        "data.name=imagefolder", f"data.root={image_folder(ctx)}", f"data.split_file={ctx.write(name, text)}"
    )


# ----------------------------------------------------------------------------- the matrix


@dataclass
class Case:
    make: Callable[[Ctx], list[str]]  # -> argv (may set files, env and patches up)
    names: tuple[str, ...]  # what the error line must name
    code: int = 2
    leaves: str = "nothing"  # nothing: no run dir at all | untouched: --out exactly as before | kept: no result


CASES: dict[str, Case] = {
    # --- config
    "config-unknown-key": Case(lambda c: c.run("train.lrr=1"), ("unknown key", "train.lrr")),
    "config-unknown-key-in-yaml": Case(lambda c: c.run(train={"epoch": 3}), ("unknown key", "train.epoch")),
    "config-wrong-type": Case(lambda c: c.run("train.epochs=two"), ("train.epochs", "integer")),
    "config-wrong-type-section": Case(lambda c: c.run("data=5"), ("data", "mapping")),
    "config-eps-zero": Case(lambda c: c.run("attack.eps=0"), ("attack.eps", "> 0")),
    "config-eps-negative": Case(lambda c: c.run("attack.eps=-8/255"), ("attack.eps",)),
    "config-eps-above-one": Case(lambda c: c.run("attack.eps=2"), ("attack.eps", "<= 1")),
    "config-eps-not-a-number": Case(lambda c: c.run("attack.eps=eight"), ("eps", "eight")),
    "config-eps-division-by-zero": Case(lambda c: c.run("attack.eps=1/0"), ("eps", "1/0")),
    "config-steps-zero": Case(lambda c: c.run("attack.steps=0"), ("attack.steps", ">= 1")),
    "config-epochs-zero": Case(lambda c: c.run("train.epochs=0"), ("train.epochs",)),
    "config-batch-size-zero": Case(lambda c: c.run("probe.batch_size=0"), ("probe.batch_size",)),
    "config-negative-lr": Case(lambda c: c.run("train.lr=-0.1"), ("train.lr", "> 0")),
    "config-bad-enum": Case(lambda c: c.run("attack.norm=L3"), ("attack.norm", "L3")),
    "config-unknown-method": Case(lambda c: c.run("method.name=prefix"), ("unknown method", "prefix")),
    "config-bad-method-option": Case(lambda c: c.run("method.name=lora", "method.options.rnk=4"), ("lora", "rnk")),
    "config-unknown-peft-tuner": Case(
        lambda c: c.run("method.name=peft", "method.options.tuner=nosuchtuner"), ("peft tuner", "nosuchtuner")
    ),
    "config-unknown-backbone": Case(
        lambda c: c.run("model.checkpoint=", "model.backbone=vit_nosuch"), ("backbone", "vit_nosuch")
    ),
    "config-backbone-kwargs-timm-rejects": Case(
        lambda c: c.run(
            "model.checkpoint=",
            "model.backbone=vit_tiny_patch16_224",
            "model.kwargs={img_size: 28, patch_size: 7, in_chans: 1, embed_dim: 33, num_heads: 2, depth: 1}",
        ),
        ("bad kwargs", "divisible"),
    ),
    "config-no-backbone": Case(lambda c: c.run("model.checkpoint="), ("model.backbone",)),
    "config-compile-without-compiler": Case(
        lambda c: (c.mp.setattr("shutil.which", lambda name, *a, **k: None), c.run("train.compile=true"))[1],
        ("train.compile", "C++ compiler"),
    ),
    "config-unknown-dataset": Case(lambda c: c.run("data.name=imagenet-z"), ("unknown dataset", "imagenet-z")),
    "config-roli-with-linear": Case(lambda c: c.run("method.name=linear", "method.init=roli"), ("roli", "linear")),
    "config-no-validation-split": Case(lambda c: c.run("data.n_val=0"), ("validation",)),
    "config-seed-out-of-range": Case(lambda c: c.run("seed=-1"), ("seed",)),
    "config-unparsable-yaml": Case(
        lambda c: ["run", str(c.write("bad.yaml", "train: [1, 2\nattack: {")), "--out", str(c.out)], ("not valid YAML",)
    ),
    "config-yaml-not-a-mapping": Case(
        lambda c: ["run", str(c.write("list.yaml", "- a\n- b\n")), "--out", str(c.out)], ("mapping",)
    ),
    "config-binary-file": Case(
        lambda c: ["run", str(c.write("bin.yaml", b"\xff\xfe\x00\x81")), "--out", str(c.out)], ("not a text file",)
    ),
    "config-file-missing": Case(lambda c: ["run", str(c.tmp / "nope.yaml"), "--out", str(c.out)], ("not found",)),
    "config-custom-autoattack-unknown-attack": Case(
        lambda c: c.run("eval.aa_version=custom", "eval.aa_attacks=zzz"), ("eval.aa_attacks", "zzz")
    ),
    "config-custom-autoattack-without-attacks": Case(
        lambda c: c.run("eval.aa_version=custom", "eval.aa_attacks=[]"), ("eval.aa_attacks", "custom")
    ),
    "config-std-zero": Case(lambda c: c.run("model.std=[0]"), ("model.std", "> 0")),
    "config-mean-not-finite": Case(lambda c: c.run("model.mean=[.nan]", "model.std=[0.5]"), ("model.mean", "finite")),
    "config-mean-std-wrong-length": Case(
        lambda c: c.run("model.mean=[0.5, 0.5]", "model.std=[0.5, 0.5]"), ("mean/std need 1 values",)
    ),
    "config-step-size-zero": Case(lambda c: c.run("attack.step_size=0"), ("attack.step_size", "> 0")),
    "config-workers-negative": Case(lambda c: c.run("data.workers=-1"), ("data.workers", "'auto'")),
    "config-log-every-zero": Case(lambda c: c.run("track.log_every=0"), ("track.log_every", "> 0")),
    "config-wandb-not-installed": Case(
        lambda c: (c.mp.setitem(sys.modules, "wandb", None), c.run("track.wandb=true"))[1],
        ("track.wandb", "not installed"),
    ),
    "set-missing-key": Case(lambda c: c.run("nothing.here=1"), ("unknown key", "nothing.here")),
    "set-without-equals": Case(lambda c: c.run("train.lr"), ("KEY=VALUE", "train.lr")),
    "set-sub-key-of-a-scalar": Case(lambda c: c.run("train.lr.x=1"), ("no sub-keys",)),
    "set-empty-key": Case(lambda c: c.run("=3"), ("bad key",)),
    # --- usage
    "usage-unknown-command": Case(lambda c: ["trian"], ("invalid choice", "trian")),
    "usage-missing-argument": Case(lambda c: ["eval", "--data", "mnist"], ("--checkpoint",)),
    "usage-bad-integer-option": Case(
        lambda c: ["eval", "--checkpoint", "x", "--data", "mnist", "--n", "ten"], ("--n",)
    ),
    "usage-resume-and-overwrite": Case(lambda c: c.run() + ["--resume", "--overwrite"], ("--resume", "--overwrite")),
    "usage-out-is-a-file": Case(
        lambda c: (setattr(c, "out", c.write("file.txt", "x")), ["run", c.config(), "--out", str(c.out)])[1],
        ("is a file",),
        leaves="untouched",
    ),
    "eval-bad-eps": Case(
        lambda c: ["eval", "--checkpoint", str(c.source), "--data", "mnist", "--eps", "x/y"], ("eps",)
    ),
    "eval-eps-zero": Case(lambda c: ["eval", "--checkpoint", str(c.source), "--data", "mnist", "--eps", "0"], ("eps",)),
    "eval-negative-n": Case(
        lambda c: ["eval", "--checkpoint", str(c.source), "--data", "mnist", "--n", "-5"], ("--n",)
    ),
    "report-missing-dir": Case(lambda c: ["report", str(c.tmp / "none")], ("no such directory",)),
    "report-corrupt-result": Case(
        lambda c: ["report", str(c.write("r/result.json", "{broken").parent)], ("not valid JSON",)
    ),
    "methods-unknown-backbone": Case(lambda c: ["methods", "--backbone", "nonet_7"], ("nonet_7",)),
    "eval-pgd-steps-zero": Case(
        lambda c: ["eval", "--checkpoint", str(c.source), "--data", "mnist", "--pgd-steps", "0"],
        ("--pgd-steps", ">= 1"),
    ),
    "eval-mean-not-numbers": Case(
        lambda c: ["eval", "--checkpoint", str(c.source), "--data", "mnist", "--backbone", "x", "--mean", "a,b"],
        ("--mean", "'a,b'"),
    ),
    "eval-unknown-attack": Case(
        lambda c: ["eval", "--checkpoint", str(c.source), "--data", "mnist", "--n", "8", "--attacks", "clean,fgsm"],
        ("unknown attack", "fgsm"),
    ),
    "eval-custom-autoattack-without-attacks": Case(
        lambda c: ["eval", "--checkpoint", str(c.source), "--data", "mnist", "--n", "8", "--aa-version", "custom"],
        ("custom AutoAttack", "apgd-ce"),
    ),
    "eval-eps-above-one-linf": Case(
        lambda c: ["eval", "--checkpoint", str(c.source), "--data", "mnist", "--eps", "0,2"], ("--eps", "<= 1")
    ),
    "eval-invalid-norm": Case(
        lambda c: ["eval", "--checkpoint", str(c.source), "--data", "mnist", "--norm", "L3"], ("--norm", "L3")
    ),
    "report-empty-directory": Case(
        lambda c: (c.tmp.joinpath("runs").mkdir(), ["report", str(c.tmp / "runs")])[1], ("no result.json",)
    ),
    "report-result-not-a-card": Case(
        lambda c: ["report", str(c.write("r/result.json", "[1, 2]").parent)], ("does not hold a result card",)
    ),
    "sweep-grid-missing": Case(lambda c: ["sweep", str(c.tmp / "none.yaml"), "--out", str(c.out)], ("not found",)),
    "sweep-unknown-top-key": Case(lambda c: grid(c, "{base: {}, grid: {seed: [0]}, axes: 1}"), ("top-level", "axes")),
    "sweep-empty-axis": Case(lambda c: grid(c, "{base: {}, grid: {seed: []}}"), ("non-empty list",)),
    "sweep-axis-not-a-config-key": Case(lambda c: grid(c, "{base: {}, grid: {foo: [1]}}"), ("axis 'foo'",)),
    "sweep-exclude-unknown-axis": Case(
        lambda c: grid(c, "{base: {}, grid: {seed: [0]}, exclude: [{nope: 1}]}"), ("exclude", "nope")
    ),
    "sweep-exclude-matches-nothing": Case(
        lambda c: grid(c, "{base: {}, grid: {seed: [0, 1]}, exclude: [{seed: 7}]}"), ("matches no entry",)
    ),
    "sweep-cells-rule-malformed": Case(
        lambda c: grid(c, "{base: {}, grid: {seed: [0]}, cells: [{when: 1}]}"), ("cells rule must be",)
    ),
    "sweep-cells-unknown-axis": Case(
        lambda c: grid(c, "{base: {}, grid: {seed: [0]}, cells: [{when: {nope: a}, set: {train.lr: 1}}]}"),
        ("cells rule", "unknown axis"),
    ),
    "sweep-reuse-probe-not-a-bool": Case(
        lambda c: grid(c, "{base: {}, grid: {seed: [0]}, reuse_probe: 3}"), ("reuse_probe", "true or false")
    ),
    "sweep-entry-bad-config": Case(
        lambda c: grid(c, "{base: {train: {lrr: 1}}, grid: {seed: [0]}}"), ("entry seed0", "train.lrr")
    ),
    "sweep-duplicate-run-names": Case(
        lambda c: grid(c, "{base: {}, grid: {method: [{name: lora}, {name: lora}]}}"), ("both named lora",)
    ),
    "sweep-roli-without-linear-run": Case(
        lambda c: grid(c, "{base: {method: {name: full, init: roli, probe_run: '{probe}'}}, grid: {seed: [0]}}"),
        ("RoLI entry", "no matching linear run"),
    ),
    "sweep-workers-zero": Case(
        lambda c: grid(c, "{base: {}, grid: {seed: [0]}}", "--workers", "0"), ("--workers", ">= 1")
    ),
    "sweep-checkpoint-missing": Case(
        lambda c: grid(
            c, f"{{base: {{model: {{checkpoint: {c.tmp / 'gone.pt'}}}}}, grid: {{seed: [0]}}}}", "--no-report"
        ),
        ("checkpoint(s) not found", "gone.pt"),
    ),
    # --- data
    "data-missing-directory": Case(
        lambda c: c.run("data.name=imagefolder", f"data.root={c.tmp / 'no_such_dir'}"),
        ("does not exist", "no_such_dir"),
    ),
    "data-corrupt-image": Case(
        lambda c: c.run(
            "data.name=imagefolder",
            f"data.root={image_folder(c, corrupt=True)}",
            "model.checkpoint=",
            "model.backbone=vit_tiny_patch16_224",
            "model.kwargs={img_size: 16, patch_size: 8, embed_dim: 16, depth: 1, num_heads: 1}",
            "data.image_size=16",
            "data.n_val=2",
            "data.n_train=0",
            "data.n_test=0",
            "train.checkpoint_every=0",  # the bad image is met before any state is saved: nothing is kept
        ),
        ("cannot read image", "0.png"),
    ),
    "data-empty-class": Case(
        lambda c: c.run("data.name=imagefolder", f"data.root={image_folder(c, empty_class=True)}"),
        ("no images", "bird"),
    ),
    "data-wrong-channel-count": Case(
        lambda c: c.run("data.name=imagefolder", f"data.root={image_folder(c)}", "data.n_val=2", "data.n_train=6"),
        ("3 channels", "takes 1"),
    ),
    "data-split-file-label-out-of-range": Case(
        lambda c: c.run(
            "data.name=imagefolder",
            f"data.root={image_folder(c)}",
            f"data.split_file={c.write('split.txt', 'train/cat/0.png -1 train' + chr(10))}",
        ),
        ("out of range", "-1"),
    ),
    "data-checksum-mismatch": Case(
        lambda c: (fake_fashion(c, mangle=lambda f: f.update({"t10k-labels-idx1-ubyte.gz": b"tampered"})), c.run())[1],
        ("checksum mismatch", "t10k-labels"),
    ),
    "data-truncated-idx": Case(
        lambda c: (patched_idx(c, "train-images-idx3-ubyte.gz", _idx(np.zeros((40, 28, 28)))[:-100]), c.run())[1],
        ("truncated", "train-images"),
    ),
    "data-corrupt-idx-magic": Case(
        lambda c: (patched_idx(c, "t10k-images-idx3-ubyte.gz", b"\x00\x00\x0d\x03" + bytes(12)), c.run())[1],
        ("magic", "t10k-images"),
    ),
    "data-corrupt-gzip": Case(
        lambda c: (
            fake_fashion(c),
            (c.tmp / "data/fashion-mnist/train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00broken"),
            c.mp.setitem(
                embedded.CHECKSUMS["fashion-mnist"],
                "train-labels-idx1-ubyte.gz",
                hashlib.sha256(b"\x1f\x8b\x08\x00broken").hexdigest(),
            ),
            c.run(),
        )[-1],
        ("cannot read IDX", "train-labels"),
    ),
    "data-labels-out-of-range": Case(
        lambda c: (fake_fashion(c, labels=np.array([0, 1, 2, 12] * 10)), c.run())[1], ("label 12", "out of range")
    ),
    "data-images-labels-count-differ": Case(
        lambda c: (patched_idx(c, "t10k-labels-idx1-ubyte.gz", _idx(np.zeros(7))), c.run())[1],
        ("20 images", "7 labels"),
    ),
    "data-validation-split-takes-every-image": Case(
        lambda c: c.run("data.n_val=100000", "data.n_train=200"), ("data.n_val=100000", "data.n_train=200")
    ),
    "data-composite-malformed-name": Case(lambda c: c.run("data.name=mnist[0-4"), ("bad dataset name",)),
    "data-composite-class-out-of-range": Case(lambda c: c.run("data.name=mnist[0-12]"), ("no class 10",)),
    "data-composite-empty-range": Case(
        lambda c: c.run("data.name=mnist[5-2]+fashion-mnist[0-4]"), ("empty class range", "5-2")
    ),
    "data-composite-class-twice": Case(lambda c: c.run("data.name=mnist[1,1]"), ("selects a class twice",)),
    "data-composite-different-kinds": Case(
        lambda c: c.run("data.name=fashion-mnist[0-1]+imagefolder", f"data.root={image_folder(c)}"),
        ("must share image size and channels",),
    ),
    "data-imagefolder-without-root": Case(lambda c: c.run("data.name=imagefolder"), ("needs data.root",)),
    "data-imagefolder-test-class-not-in-train": Case(
        lambda c: (
            png(image_folder(c) / "test" / "bird" / "0.png"),
            c.run("data.name=imagefolder", f"data.root={c.tmp / 'images'}"),
        )[1],
        ("bird", "no folder under"),
    ),
    "data-split-file-wrong-field-count": Case(
        lambda c: split_file(c, "train/cat/0.png 0\n"), ("line 1", "expected 3 fields")
    ),
    "data-split-file-unknown-split": Case(lambda c: split_file(c, "train/cat/0.png 0 dev\n"), ("unknown split 'dev'",)),
    "data-split-file-image-twice": Case(
        lambda c: split_file(c, "train/cat/0.png 0 train\ntrain/cat/0.png 0 test\n"), ("already listed",)
    ),
    "data-split-file-label-gap": Case(
        lambda c: split_file(c, "train/cat/0.png 0 train\ntrain/dog/0.png 2 test\n"), ("without gaps", "1 has no image")
    ),
    "data-split-file-missing-image": Case(lambda c: split_file(c, "train/cat/9.png 0 train\n"), ("missing", "9.png")),
    "data-split-file-json-not-a-mapping": Case(
        lambda c: split_file(c, "[1, 2]", "split.json"), ("must map train, test",)
    ),
    # --- checkpoints
    "checkpoint-missing": Case(lambda c: c.run(f"model.checkpoint={c.tmp / 'gone.safetensors'}"), ("not found",)),
    "checkpoint-truncated": Case(
        lambda c: c.run(f"model.checkpoint={c.write('cut.safetensors', c.source.read_bytes()[:5000])}"),
        ("cut.safetensors",),
    ),
    "checkpoint-not-safetensors": Case(
        lambda c: c.run(f"model.checkpoint={c.write('text.safetensors', 'hello')}"), ("text.safetensors",)
    ),
    "checkpoint-unsupported-suffix": Case(
        lambda c: c.run(
            "model.backbone=vit_tiny_patch16_224",
            f"model.kwargs={json.dumps(TINY)}",
            f"model.checkpoint={c.write('w.h5', 'x')}",
        ),
        ("unsupported file type", ".h5"),
    ),
    "checkpoint-wrong-architecture": Case(
        lambda c: c.run(
            "model.backbone=vit_tiny_patch16_224",
            f"model.kwargs={json.dumps(TINY)}",
            f"model.checkpoint={other_arch_pt(c)}",
        ),
        ("does not fit", "blocks.1"),
    ),
    "checkpoint-config-architecture-mismatch": Case(
        lambda c: c.run("model.backbone=resnet18"), ("resnet18", "vit_tiny_patch16_224")
    ),
    "checkpoint-pt-without-tensors": Case(
        lambda c: (
            torch.save([1, 2, 3], c.tmp / "list.pt"),
            c.run(
                "model.backbone=vit_tiny_patch16_224",
                f"model.kwargs={json.dumps(TINY)}",
                f"model.checkpoint={c.tmp / 'list.pt'}",
            ),
        )[1],
        ("no state dict",),
    ),
    "checkpoint-malicious-pickle": Case(
        lambda c: c.run(
            "model.backbone=vit_tiny_patch16_224",
            f"model.kwargs={json.dumps(TINY)}",
            f"model.checkpoint={evil_pt(c)[0]}",
        ),
        ("refused", "unsafe"),
    ),
    "checkpoint-malicious-legacy-pickle": Case(
        lambda c: c.run(
            "model.backbone=vit_tiny_patch16_224",
            f"model.kwargs={json.dumps(TINY)}",
            f"model.checkpoint={evil_pt(c, zipped=False)[0]}",
        ),
        ("refused", "unsafe"),
    ),
    "checkpoint-wrong-classes-for-eval": Case(
        lambda c: ["eval", "--checkpoint", str(five_class_checkpoint(c)), "--data", "mnist", "--n", "8"],
        ("5 classes", "10"),
    ),
    "checkpoint-eval-without-metadata": Case(
        lambda c: (
            save_file({"w": torch.zeros(2)}, str(c.tmp / "bare.safetensors")),
            ["eval", "--checkpoint", str(c.tmp / "bare.safetensors"), "--data", "mnist"],
        )[1],
        ("no advtransfer metadata",),
    ),
    "checkpoint-roli-head-wrong-shape": Case(
        lambda c: c.run("method.init=roli", f"method.probe_run={probe_dir(c, head_classes=5)}"),
        ("does not fit", "shape mismatch", "head"),
    ),
    "checkpoint-roli-probe-not-a-linear-probe": Case(
        lambda c: c.run("method.init=roli", f"method.probe_run={probe_dir(c, head_classes=10, method='full')}"),
        ("does not fit", "not 'linear'"),
    ),
    "checkpoint-roli-probe-run-without-best": Case(
        lambda c: c.run("method.init=roli", f"method.probe_run={c.tmp}"), ("probe_run", "no best.safetensors")
    ),
    "checkpoint-metadata-field-wrong-type": Case(
        lambda c: c.run(f"model.checkpoint={with_metadata(c, lambda s: s.update(method='full'))}"), ("field 'method'",)
    ),
    "checkpoint-metadata-mean-not-finite": Case(
        lambda c: c.run(f"model.checkpoint={with_metadata(c, lambda s: s.update(mean=[float('nan')]))}"),
        ("field 'mean'", "finite"),
    ),
    "checkpoint-integer-weight": Case(
        lambda c: foreign(
            c,
            {**tiny_state(), "cls_token": tiny_state()["cls_token"].to(torch.int32)},
            "int.pt",
            "--mean",
            "0.5",
            "--std",
            "0.5",
        ),
        ("cls_token is torch.int32, expected torch.float32",),
    ),
    "checkpoint-foreign-without-mean-std": Case(lambda c: foreign(c, tiny_state(), "ares.pth"), ("no mean/std",)),
    "checkpoint-normaliser-disagrees": Case(
        lambda c: foreign(
            c,
            {
                "0.mean": torch.tensor([0.5]),
                "0.std": torch.tensor([0.5]),
                **{f"1.{k}": v for k, v in tiny_state().items()},
            },
            "robustbench.pt",
            "--mean",
            "0.1",
            "--std",
            "0.2",
        ),
        ("normalises with mean [0.5]", "not the given ones"),
    ),
    "checkpoint-foreign-without-head": Case(
        lambda c: foreign(
            c,
            {k: v for k, v in tiny_state().items() if not k.startswith("head.")},
            "nohead.pt",
            "--mean",
            "0.5",
            "--std",
            "0.5",
        ),
        ("no classifier head",),
    ),
    "checkpoint-timm-saver-other-architecture": Case(
        lambda c: foreign(
            c,
            {"state_dict": tiny_state(depth=1), "args": argparse.Namespace(model="vit"), "epoch": 3},
            "timm.pth.tar",
            "--mean",
            "0.5",
            "--std",
            "0.5",
        ),
        ("does not fit", "blocks.1"),
    ),
    "checkpoint-compact-source-changed": Case(
        lambda c: compact_checkpoint(
            c,
            then=lambda p: save_file(
                {k: v + 1 for k, v in load_file(str(p)).items()}, str(p), metadata={"advtransfer": "{}"}
            ),
        ),
        ("compact", "changed since"),
    ),
    "checkpoint-compact-source-missing": Case(
        lambda c: compact_checkpoint(c, then=lambda p: p.unlink()), ("compact", "is missing")
    ),
    "checkpoint-kwargs-without-backbone": Case(
        lambda c: ["eval", "--checkpoint", str(c.source), "--data", "mnist", "img_size=28"], ("go with --backbone",)
    ),
    # --- run directories
    "rundir-finished-without-overwrite": Case(
        lambda c: (finished_run(c), c.run())[1], ("finished run", "--overwrite"), leaves="untouched"
    ),
    "rundir-not-empty": Case(
        lambda c: (c.write("run/notes.txt", "mine"), c.run())[1], ("not empty", "--resume"), leaves="untouched"
    ),
    "rundir-overwrite-foreign-directory": Case(
        lambda c: (c.write("run/notes.txt", "mine"), c.run() + ["--overwrite"])[1],
        ("not a run directory",),
        leaves="untouched",
    ),
    "rundir-resume-different-config": Case(
        lambda c: resumable_run(c, **{"train.lr": 0.5}), ("differs", "train.lr"), leaves="untouched"
    ),
    "rundir-resume-damaged-state": Case(damaged_state, ("state.safetensors", "damaged"), leaves="kept"),
    "rundir-locked-by-another-run": Case(locked, ("in use by process",), leaves="untouched"),
    "rundir-after-a-killed-overwrite-without-flags": Case(
        killed_overwrite, ("not empty", "--resume"), leaves="untouched"
    ),
    "rundir-resume-unreadable-config": Case(
        lambda c: (resumable_run(c), (c.out / "config.yaml").write_text("train: [1\n"), c.run() + ["--resume"])[2],
        ("cannot resume", "unreadable"),
        leaves="untouched",
    ),
    "rundir-resume-without-config-beside-other-files": Case(
        lambda c: (c.write("run/notes.txt", "mine"), c.run() + ["--resume"])[1],
        ("nothing to resume", "other files"),
        leaves="untouched",
    ),
    "rundir-out-cannot-be-created": Case(
        lambda c: (setattr(c, "out", c.write("file.txt", "x") / "run"), ["run", c.config(), "--out", str(c.out)])[1],
        ("cannot create run directory",),
    ),
    "rundir-resume-state-of-another-model": Case(foreign_state, ("does not fit this run",), leaves="kept"),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_bad_input(kind, tmp_path, source, monkeypatch, capsys):
    case = CASES[kind]
    ctx = Ctx(tmp_path, source, monkeypatch)
    argv = case.make(ctx)
    before = snapshot(ctx.out)
    print(kind, "->", error_line(capsys, main(argv), case.code, *case.names))
    if case.leaves == "untouched":
        assert snapshot(ctx.out) == before and before is not None
    elif case.leaves == "kept":  # a resumed run keeps its directory (here with the damaged file it reported)
        assert not (ctx.out / "result.json").exists() and not list(ctx.out.rglob(".*.tmp"))
    else:
        no_partial_output(ctx.out, fresh_bad_input=case.leaves == "nothing")
    if kind.startswith("checkpoint-malicious"):
        assert not (tmp_path / "PWNED").exists(), "the pickle ran code"
    if hasattr(ctx, "held"):  # a lock this test held on purpose
        ctx.held.close()


def test_matrix_covers_at_least_100_kinds():
    assert len(CASES) >= 100
    for area in ("config", "set", "usage", "eval", "report", "sweep", "data", "checkpoint", "rundir"):
        assert any(k.startswith(area) for k in CASES), area


# ----------------------------------------------------------------------------- failures while running (exit 1)


def test_non_finite_loss_stops_and_keeps_last_good_state(tmp_path, source, monkeypatch, capsys):
    ctx = Ctx(tmp_path, source, monkeypatch)
    line = error_line(capsys, main(ctx.run("train.lr=1e30")), 1, "non-finite loss", "train.lr", "state.safetensors")
    assert "epoch 1 step 2" in line  # step 1 overshoots, step 2 is NaN
    no_partial_output(ctx.out, fresh_bad_input=False)
    state = load_file(str(ctx.out / "state.safetensors"))  # the state of the last step that had a finite loss
    assert all(torch.isfinite(v.float()).all() for k, v in state.items() if k.startswith("model/"))
    # ... and it is resumable: the same NaN is reached again, deterministically
    assert main(ctx.run("train.lr=1e30") + ["--resume"]) == 1
    assert "epoch 1 step 2" in capsys.readouterr().err


def test_non_finite_loss_in_the_roli_probe_names_the_probe_lr(tmp_path, source, monkeypatch, capsys):
    ctx = Ctx(tmp_path, source, monkeypatch)
    argv = ctx.run("method.init=roli", "probe.lr=1e30", "probe.epochs=3", "data.n_train=64")
    error_line(capsys, main(argv), 1, "non-finite loss", "in stage1", "probe.lr")
    no_partial_output(ctx.out, fresh_bad_input=False)
    assert not (ctx.out / "stage2").exists()


def test_non_finite_source_weights_are_blamed_not_the_lr(tmp_path, source, monkeypatch, capsys):
    """A checkpoint holding NaN: the very first loss is non-finite, before any update."""
    from safetensors import safe_open

    ctx = Ctx(tmp_path, source, monkeypatch)
    state = load_file(str(source))
    state["backbone.cls_token"] = torch.full_like(state["backbone.cls_token"], float("nan"))
    with safe_open(str(source), "pt") as f:
        meta = f.metadata()
    save_file(state, str(tmp_path / "nan.safetensors"), metadata=meta)
    line = error_line(capsys, main(ctx.run(f"model.checkpoint={tmp_path / 'nan.safetensors'}")), 1, "non-finite")
    assert "before any update" in line and "model.checkpoint" in line and "no checkpoint was saved" in line
    no_partial_output(ctx.out, fresh_bad_input=False)


def test_disk_full_simulated_keeps_complete_files(tmp_path, source, monkeypatch, capsys):
    """ENOSPC in the middle of writing the second state: the first one stays whole, the partial one goes."""
    ctx = Ctx(tmp_path, source, monkeypatch)
    real, calls = checkpoints.save_file, []

    def fill_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"\x00" * 1000)  # half a file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoints, "save_file", fill_disk)
    error_line(capsys, main(ctx.run()), 1, "disk full", "state.safetensors")
    no_partial_output(ctx.out, fresh_bad_input=False)
    with __import__("safetensors").safe_open(str(ctx.out / "state.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["state"])["progress"]["step"] == 1  # the first, complete state


def test_disk_full_real_tmpfs(tmp_path, source, monkeypatch, capsys):
    """A real 128 KiB tmpfs (needs root): the run fails with exit 1 and leaves no partial file."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        ctx = Ctx(tmp_path, source, monkeypatch)
        ctx.out = mnt / "run"
        error_line(capsys, main(ctx.run()), 1, "disk full")
        no_partial_output(ctx.out, fresh_bad_input=False)
        assert (ctx.out / "config.yaml").exists()  # what was written before the disk filled is whole
        yaml.safe_load((ctx.out / "config.yaml").read_text())
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_out_of_memory_suggests_a_smaller_batch(tmp_path, source, monkeypatch, capsys):
    ctx = Ctx(tmp_path, source, monkeypatch)

    def oom(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(models.Classifier, "forward", oom)
    error_line(capsys, main(ctx.run()), 1, "out of memory", "batch_size")
    no_partial_output(ctx.out, fresh_bad_input=False)


def test_bad_input_found_after_a_checkpoint_keeps_the_run_resumable(tmp_path, source, monkeypatch, capsys):
    """Bad input met mid-run (here: at the second validation) once training state exists: exit 2, the run
    directory and its state stay (no result.json), and after the fix --resume finishes it."""
    from advtransfer.errors import UserError

    ctx = Ctx(tmp_path, source, monkeypatch)
    real, calls = train.validate, []

    def bad_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise UserError("data: cannot read image x.png: OSError")
        return real(*a, **k)

    monkeypatch.setattr(train, "validate", bad_second)
    error_line(capsys, main(ctx.run()), 2, "x.png")
    no_partial_output(ctx.out, fresh_bad_input=False)
    assert (ctx.out / "state.safetensors").exists()
    monkeypatch.setattr(train, "validate", real)
    assert main(ctx.run() + ["--resume"]) == 0 and (ctx.out / "result.json").exists()


def test_unexpected_exception_is_one_line_and_debug_shows_it(tmp_path, source, monkeypatch, capsys):
    ctx = Ctx(tmp_path, source, monkeypatch)
    monkeypatch.setattr("advtransfer.pipeline.load_splits", lambda *a, **k: 1 / 0)
    error_line(capsys, main(ctx.run()), 1, "internal error", "ZeroDivisionError", "division by zero", "--debug")
    ctx.out = tmp_path / "run2"
    with pytest.raises(ZeroDivisionError):
        main(["--debug", *ctx.run()])


# ----------------------------------------------------------------------------- real processes


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "advtransfer", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def test_subprocess_bad_config_exit_2_one_line(tmp_path, source):
    ctx = Ctx(tmp_path, source, pytest.MonkeyPatch())
    p = _cli(*ctx.run("attack.eps=0", "train.lrr=1"), cwd=tmp_path)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("advtransfer: error: ") and "train.lrr" in p.stderr
    assert not ctx.out.exists()
    p = _cli("run", "--set", cwd=tmp_path)  # an argparse usage error is one line too
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def test_subprocess_malicious_pickle_is_refused_and_runs_no_code(tmp_path, source):
    ctx = Ctx(tmp_path, source, pytest.MonkeyPatch())
    path, marker = evil_pt(ctx)
    argv = ctx.run(
        "model.backbone=vit_tiny_patch16_224", f"model.kwargs={json.dumps(TINY)}", f"model.checkpoint={path}"
    )
    p = _cli(*argv, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "refused" in p.stderr.splitlines()[-1] and "Traceback" not in p.stderr
    assert not marker.exists(), "unpickling ran code"
    assert not ctx.out.exists()
    with mock.patch(f"{os.system.__module__}.system") as system:  # the file is hostile: an unsafe load runs it
        torch.load(path, weights_only=False)
    system.assert_called_once_with(f"touch {marker}")


def test_subprocess_debug_shows_the_traceback(tmp_path, source):
    ctx = Ctx(tmp_path, source, pytest.MonkeyPatch())
    p = _cli("--debug", *ctx.run("attack.eps=0"), cwd=tmp_path)
    assert p.returncode != 0 and "Traceback" in p.stderr and "attack.eps" in p.stderr


# ----------------------------------------------------------------------------- fuzzing through main


def _fake_run(cfg, out, **kw):
    """Stands in for the pipeline: the config was parsed and validated, that is all the fuzz needs."""
    return {
        "method": cfg.method.name,
        "init": cfg.method.init.value,
        "clean_acc": 0.0,
        "pgd_acc": 0.0,
        "autoattack_acc": None,
        "n_eval": 0,
    }


FIELDS = [
    "seed",
    "name",
    "data",
    "model",
    "method",
    "attack",
    "train",
    "probe",
    "eval",
    "eps",
    "steps",
    "lr",
    "epochs",
    "batch_size",
    "name",
    "options",
    "kwargs",
    "norm",
    "init",
    "n_val",
    "aa_attacks",
    "x",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["8/255", "1/0", "Linf", "L2", "roli", "full", "lora", "0x10", "1e400"]),
)
trees = st.recursive(
    scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(st.sampled_from(FIELDS), kids, max_size=4)),
    max_leaves=12,
)
set_items = st.one_of(
    st.text(max_size=30),
    st.builds(
        lambda k, v: f"{k}={v}",
        st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3).map(".".join),
        st.text(max_size=15),
    ),
)


def _outcome(argv: list[str], capsys) -> None:
    with mock.patch("advtransfer.pipeline.run", _fake_run):
        rc = main(argv)
    err = capsys.readouterr().err
    assert rc in (0, 2), f"exit {rc}: {err}"
    assert "Traceback" not in err
    if rc == 2:
        assert err.count("\n") == 1 and err.startswith("advtransfer: error:"), err


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=st.dictionaries(st.sampled_from(FIELDS), trees, max_size=5))
def test_fuzz_config_file_through_main(tmp_path, capsys, tree):
    path = tmp_path / "fuzz.yaml"
    try:
        path.write_text(yaml.safe_dump(tree, allow_unicode=True))
    except UnicodeEncodeError:  # a lone surrogate cannot be written as UTF-8 at all
        return
    _outcome(["run", str(path), "--out", str(tmp_path / "out")], capsys)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_fuzz_config_text_through_main(tmp_path, capsys, text):
    path = tmp_path / "fuzz.yaml"
    try:
        path.write_text(text)
    except UnicodeEncodeError:
        return
    _outcome(["run", str(path), "--out", str(tmp_path / "out")], capsys)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(set_items, min_size=1, max_size=4))
def test_fuzz_set_overrides_through_main(tmp_path, capsys, items):
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    _outcome(["run", str(empty), "--out", str(tmp_path / "out"), *(a for it in items for a in ("--set", it))], capsys)
