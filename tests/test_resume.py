"""Exact resume: a run killed at a random moment (SIGKILL) and continued with ``--resume`` ends bit-identical
to an uninterrupted one (result.json metrics, metrics.jsonl, best/state/mask tensors; wall times excluded).

Real ``advtransfer run`` subprocesses on a tiny subset of Fashion-MNIST with a tiny mini-ViT; every kill
point uses its own seeded random delay after a trigger file shows the run reached a phase, so a failure is
reproducible. Also: Ctrl-C (SIGINT) saves and exits 130, an AutoAttack evaluation interrupted between
attacks resumes without retraining, and a second run into a locked directory is refused.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from advtransfer import train
from advtransfer.checkpoints import save_checkpoint
from advtransfer.cli import main
from advtransfer.models import ModelSpec, build

TINY = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
TIMING = {"seconds", "train_seconds"}  # wall-clock fields: the only ones allowed to differ


def write_config(folder: Path, source: Path, name: str, **changes) -> Path:
    cfg = {
        "data": {"name": "fashion-mnist", "n_train": 64, "n_val": 32, "n_test": 32},
        "model": {"checkpoint": str(source)},
        "method": {"name": "full", "init": "ranli"},
        "attack": {"eps": "0.1", "steps": 2},
        "train": {"epochs": 3, "batch_size": 16, "checkpoint_every": 1},
        "probe": {"epochs": 2, "batch_size": 16, "checkpoint_every": 1},
        "eval": {
            "val_pgd_steps": 2,
            "pgd_steps": 2,
            "n_autoattack": 8,
            "aa_version": "custom",
            "aa_attacks": ["apgd-ce"],
        },
    }
    for key, value in changes.items():
        section, field = key.split("__")
        cfg[section][field] = value
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def refs(tmp_path_factory, source) -> dict[str, tuple[Path, Path]]:
    """Uninterrupted reference runs (in-process), one RanLI and one RoLI: name -> (config, run dir)."""
    root = tmp_path_factory.mktemp("refs")
    out = {}
    for name, changes in (("ranli", {}), ("roli", {"method__name": "bias", "method__init": "roli"})):
        cfg = write_config(root, source, name, **changes)
        assert main(["run", str(cfg), "--out", str(root / name)]) == 0
        out[name] = (cfg, root / name)
    return out


# ----------------------------------------------------------------------------- comparing two run directories


def _drop_timing(obj):
    if isinstance(obj, dict):
        return {k: _drop_timing(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_drop_timing(v) for v in obj]
    return obj


def _tensors_equal(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys(), a
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), f"{a.name}: {k} differs"
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        ma, mb = fa.metadata() or {}, fb.metadata() or {}
    assert ma.keys() == mb.keys()
    for k in ma:  # the resume state's metadata holds the best epoch's record, wall time included
        assert _drop_timing(json.loads(ma[k])) == _drop_timing(json.loads(mb[k])), f"{a.name}: metadata {k} differs"


def assert_same_run(ref: Path, got: Path) -> None:
    """Everything a run produces, except wall times, is bit-identical."""
    stages = [Path(".")] + [Path(s) for s in ("stage1", "stage2") if (ref / s).is_dir()]
    for s in stages:
        r, g = ref / s, got / s
        assert _drop_timing(json.loads((r / "result.json").read_text())) == _drop_timing(
            json.loads((g / "result.json").read_text())
        ), f"{s}/result.json differs"
        if (r / "metrics.jsonl").exists():
            lines = [
                [_drop_timing(json.loads(x)) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (r, g)
            ]
            assert lines[0] == lines[1], f"{s}/metrics.jsonl differs"
            for f in ("best.safetensors", "state.safetensors", "masks.safetensors"):
                _tensors_equal(r / f, g / f)
        if (r / "autoattack_state.json").exists():
            assert (r / "autoattack_state.json").read_text() == (g / "autoattack_state.json").read_text()
    leftovers = [p.name for p in got.rglob(".*") if p.name.endswith(".tmp") or p.name == ".lock"]
    assert not leftovers, f"left behind: {leftovers}"


# ----------------------------------------------------------------------------- killing a real run


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _start(cfg: Path, out: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "advtransfer", "run", str(cfg), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),  # noqa: SIM115 - closed with the process
        env=_env(),
    )


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before reaching the kill phase"
        assert time.monotonic() < end, "the run never reached the kill phase"
        time.sleep(0.002)


def _where(out: Path) -> str:
    """Where a killed run stood: each stage's saved (epoch, step), and the AutoAttack attacks done."""
    parts = []
    for d in (out, out / "stage1", out / "stage2"):
        if (d / "state.safetensors").exists():
            with safe_open(str(d / "state.safetensors"), "pt") as f:
                p = json.loads(f.metadata()["state"])["progress"]
            parts.append(f"{d.name} epoch {p['epoch']} step {p['step']}")
        if (d / "autoattack_state.json").exists():
            parts.append(f"{d.name} AutoAttack done {json.loads((d / 'autoattack_state.json').read_text())['done']}")
    return "; ".join(parts) or "nothing saved"


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


# (name, reference, trigger: the run reached the phase, max random delay after it in seconds)
KILL_POINTS = [
    ("ranli-training", "ranli", lambda d: (d / "state.safetensors").exists(), 0.15),
    ("ranli-testing", "ranli", lambda d: _lines(d / "metrics.jsonl") >= 3, 0.6),
    ("roli-stage1", "roli", lambda d: (d / "stage1" / "state.safetensors").exists(), 0.08),
    ("roli-stage2", "roli", lambda d: (d / "stage2" / "state.safetensors").exists(), 0.5),
]


@pytest.mark.parametrize("seed", range(len(KILL_POINTS)), ids=[k[0] for k in KILL_POINTS])
def test_sigkill_then_resume_is_bit_identical(tmp_path, refs, seed):
    name, ref, trigger, max_delay = KILL_POINTS[seed]
    cfg, ref_dir = refs[ref]
    delay = random.Random(seed).uniform(0, max_delay)
    out = tmp_path / "run"
    for _ in range(4):  # a delay past the end of the run halves until the kill lands inside it
        proc = _start(cfg, out, tmp_path / "killed.log")
        _wait_for(proc, lambda: trigger(out))
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=60)
        if not (out / "result.json").exists():
            break
        shutil.rmtree(out)  # it finished first: try again with a shorter delay
        delay /= 2
    assert rc == -signal.SIGKILL and not (out / "result.json").exists(), f"{name}: the kill never landed"
    print(f"{name}: killed {delay:.3f} s after the trigger; on disk: {_where(out)}")
    assert main(["run", str(cfg), "--out", str(out), "--resume"]) == 0, f"{name}: resume failed"
    assert_same_run(ref_dir, out)


def test_sigint_saves_state_and_exits_130_then_resumes(tmp_path, refs):
    cfg, ref_dir = refs["ranli"]
    out = tmp_path / "run"
    proc = _start(cfg, out, tmp_path / "int.log")
    _wait_for(proc, lambda: (out / "state.safetensors").exists())
    time.sleep(random.Random(7).uniform(0, 0.2))
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    err = (tmp_path / "int.log").read_text()
    assert "Traceback" not in err and "--resume" in err.splitlines()[-1], err
    assert not (out / "result.json").exists() and not (out / ".lock").exists()
    assert main(["run", str(cfg), "--out", str(out), "--resume"]) == 0
    assert_same_run(ref_dir, out)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_in_process_stops_at_a_step_boundary(tmp_path, refs, monkeypatch, capsys, sig):
    """The signal arrives in the middle of a step; the state saved is the one after that whole step."""
    cfg, ref_dir = refs["ranli"]
    real, calls = train.train_step, []
    before = signal.getsignal(sig)

    def step(*a, **k):
        calls.append(1)
        if len(calls) == 6:  # epoch 2, second step: the handler defers the interrupt to the step's end
            signal.raise_signal(sig)
        return real(*a, **k)

    monkeypatch.setattr(train, "train_step", step)
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 130
    assert "state saved" in capsys.readouterr().err
    with safe_open(str(out / "state.safetensors"), "pt") as f:
        progress = json.loads(f.metadata()["state"])["progress"]
    assert (progress["epoch"], progress["step"]) == (1, 2)
    assert signal.getsignal(sig) is before  # the handler is restored
    monkeypatch.setattr(train, "train_step", real)
    assert main(["run", str(cfg), "--out", str(out), "--resume"]) == 0
    assert_same_run(ref_dir, out)


def test_autoattack_interrupted_between_attacks_resumes_without_retraining(tmp_path, source, monkeypatch):
    import pyautoattack

    cfg = write_config(
        tmp_path, source, "aa", attack__eps="0.004", eval__n_autoattack=32, eval__aa_attacks=["apgd-ce", "apgd-dlr"]
    )
    ref = tmp_path / "ref"
    assert main(["run", str(cfg), "--out", str(ref)]) == 0
    robust = json.loads((ref / "autoattack_state.json").read_text())["robust"]
    assert any(robust), "the second attack must have examples to attack for this test to mean anything"

    real, calls = pyautoattack.AutoAttack.run_standard_evaluation, []

    def interrupt_second(self, *a, **k):
        calls.append(list(self.attacks_to_run))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", interrupt_second)
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 130
    assert json.loads((out / "autoattack_state.json").read_text())["done"] == ["apgd-ce"]
    assert not (out / "result.json").exists()

    calls.clear()
    monkeypatch.setattr(
        pyautoattack.AutoAttack,
        "run_standard_evaluation",
        lambda self, *a, **k: (calls.append(list(self.attacks_to_run)), real(self, *a, **k))[1],
    )
    monkeypatch.setattr(train, "train_step", lambda *a, **k: pytest.fail("a finished stage was retrained"))
    assert main(["run", str(cfg), "--out", str(out), "--resume"]) == 0
    assert calls == [["apgd-dlr"]]  # only the attack that had not finished
    assert_same_run(ref, out)


def test_locked_run_directory_is_refused(tmp_path, refs, capsys):
    """While a run holds its directory, a second one into it fails at once with a clear error (exit 2)."""
    cfg, _ = refs["ranli"]
    out = tmp_path / "run"
    proc = _start(cfg, out, tmp_path / "first.log")
    try:
        _wait_for(proc, lambda: (out / "config.yaml").exists())
        proc.send_signal(signal.SIGSTOP)  # frozen while holding the lock
        assert main(["run", str(cfg), "--out", str(out), "--resume"]) == 2
        err = capsys.readouterr().err.strip()
        assert "in use by process" in err and err.count("\n") == 0
    finally:
        proc.kill()
        proc.wait()
    # the kernel dropped the killed process's lock: the run can now be continued
    assert main(["run", str(cfg), "--out", str(out), "--resume"]) == 0


def test_overwrite_replaces_a_finished_run_without_reusing_its_state(tmp_path, refs):
    """--overwrite clears every artifact (no stale AutoAttack state or stage-1 probe is picked up)."""
    cfg, ref_dir = refs["roli"]
    out = tmp_path / "run"
    shutil.copytree(ref_dir, out)
    (out / "notes.txt").write_text("mine")
    assert main(["run", str(cfg), "--out", str(out), "--set", "probe.lr=0.05"]) == 2  # finished: refused
    assert main(["run", str(cfg), "--out", str(out), "--set", "probe.lr=0.05", "--overwrite"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["probe"]["lr"] == 0.05
    old = [json.loads(x) for x in (ref_dir / "stage1" / "metrics.jsonl").read_text().splitlines()]
    new = [json.loads(x) for x in (out / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert len(new) == len(old) and new[0]["lr"] != old[0]["lr"]  # stage 1 was retrained, not reused
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are replaced


def test_tensors_sharing_storage_are_saved_and_resumed(tmp_path):
    """Tied weights and views: safetensors refuses shared tensors, so both writers store plain copies."""
    from advtransfer.checkpoints import read_state
    from advtransfer.config import TrainConfig
    from advtransfer.train import load_state, make_optimizer, make_scheduler, save_state

    def tied() -> torch.nn.Module:
        torch.manual_seed(0)
        spec = ModelSpec("vit_tiny_patch16_224", dict(TINY), 10, mean=[0.5], std=[0.5])
        model = build(spec)
        model.backbone.alias = model.backbone.head  # the same Linear under two names (tied weights)
        model.register_buffer("pos_view", model.backbone.pos_embed.data[0, :2])  # a view into a parameter
        return model, spec

    model, spec = tied()
    sd = model.state_dict()
    assert sd["backbone.alias.weight"].data_ptr() == sd["backbone.head.weight"].data_ptr()
    save_checkpoint(model, spec, tmp_path / "tied.safetensors")
    back = read_state(tmp_path / "tied.safetensors")
    assert all(torch.equal(back[k], v) for k, v in sd.items())

    cfg = TrainConfig(epochs=1, batch_size=4)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, 1)
    model(torch.rand(2, 1, 28, 28)).sum().backward()
    opt.step()
    sched.step()
    save_state(tmp_path / "state.safetensors", model, opt, sched, {"epoch": 1, "step": 0})
    fresh, _ = tied()
    opt2 = make_optimizer(fresh, cfg)
    sched2 = make_scheduler(opt2, cfg, 1)
    assert load_state(tmp_path / "state.safetensors", fresh, opt2, sched2) == {"epoch": 1, "step": 0}
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    assert fresh.backbone.alias.weight is fresh.backbone.head.weight  # the tie survives
