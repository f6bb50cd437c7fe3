"""Daily-use reliability (issue 14, D1-D12): each test fails on the behaviour the issue reported and passes now.

Real runs through ``advtransfer.cli.main`` on tiny subsets of the embedded Fashion-MNIST with a tiny mini-ViT source
(seconds each); signals are real (``os.kill`` on this process) and arrive where a patched function says.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from advtransfer import evaluation, pipeline, train
from advtransfer.cli import main
from advtransfer.models import ModelSpec, build

TINY = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
BASE = {
    "data": {"name": "fashion-mnist", "n_train": 32, "n_val": 16, "n_test": 32},
    "method": {"name": "full", "init": "ranli"},
    "attack": {"eps": "0.004", "steps": 1},
    "train": {"epochs": 1, "batch_size": 16},
    "probe": {"epochs": 1, "batch_size": 16},
    "eval": {"val_pgd_steps": 1, "pgd_steps": 1, "n_autoattack": 0, "aa_version": "custom", "aa_attacks": ["apgd-ce"]},
}


def argv(tmp: Path, source: Path, out: Path, *sets: str, flags: tuple[str, ...] = ()) -> list[str]:
    """``run`` on the tiny base config (``--set`` items and flags added)."""
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump({**BASE, "model": {"checkpoint": str(source)}}))
    return ["run", str(path), "--out", str(out), *(a for s in sets for a in ("--set", s)), *flags]


def snapshot(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() if p.is_file() else None for p in sorted(out.rglob("*"))}


def last_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def leftovers(out: Path) -> list[str]:
    return [str(p) for p in out.rglob(".*") if p.name == ".lock" or p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, source) -> tuple[Path, Path]:
    """A finished RanLI run (model.kwargs.drop_path_rate set on top of the source's kwargs): (tmp, run dir)."""
    tmp = tmp_path_factory.mktemp("finished")
    assert main(argv(tmp, source, tmp / "done", "model.kwargs.drop_path_rate=0.05")) == 0
    return tmp, tmp / "done"


# ----------------------------------------------------------------------------- D1, D2, D3, D4


def test_d1_overwrite_keeps_the_finished_run_until_the_new_one_finishes(finished, source, tmp_path, capsys):
    tmp, done = finished
    out = tmp_path / "run"
    shutil.copytree(done, out)
    before = snapshot(out)
    sets = ("model.kwargs.drop_path_rate=0.05",)
    # the case: a bad eval.aa_attacks is refused before the old run is touched
    bad = argv(tmp, source, out, *sets, "eval.aa_attacks=zzz", flags=("--overwrite",))
    assert main(bad) == 2 and "eval.aa_attacks" in last_line(capsys)
    assert snapshot(out) == before
    # a new run that fails late (non-finite loss after its state was saved): exit 1, the old run is back byte for byte
    assert main(argv(tmp, source, out, *sets, "train.lr=1e30", "train.checkpoint_every=1", flags=("--overwrite",))) == 1
    assert "non-finite loss" in last_line(capsys)
    assert snapshot(out) == before
    # a new run that finishes replaces it, and nothing of the old one stays behind
    assert main(argv(tmp, source, out, *sets, "train.lr=0.002", flags=("--overwrite",))) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == 0.002
    assert not (out / ".replaced").exists() and not leftovers(out)


def test_d1_interrupted_overwrite_keeps_both_and_resume_finishes_it(finished, source, tmp_path, monkeypatch, capsys):
    tmp, done = finished
    out = tmp_path / "run"
    shutil.copytree(done, out)
    old = (out / "result.json").read_bytes()
    new = argv(tmp, source, out, "model.kwargs.drop_path_rate=0.05", "train.lr=0.002")
    real = train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a, **k: (os.kill(os.getpid(), signal.SIGINT), real(*a, **k))[1])
    assert main([*new, "--overwrite"]) == 130
    assert "continue with --resume" in last_line(capsys)
    assert (out / ".replaced" / "result.json").read_bytes() == old  # the old run waits aside
    assert not (out / "result.json").exists() and (out / "state.safetensors").exists()
    monkeypatch.setattr(train, "train_step", real)
    assert main([*new, "--resume"]) == 0
    assert not (out / ".replaced").exists() and (out / "result.json").read_bytes() != old and not leftovers(out)


def test_d2_custom_autoattack_is_validated_before_anything_runs(tmp_path, source, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "RunDir", lambda *a, **k: pytest.fail("the run started"))
    out = tmp_path / "run"
    assert main(argv(tmp_path, source, out, "eval.aa_version=custom", "eval.aa_attacks=zzz")) == 2
    line = last_line(capsys)
    assert "eval.aa_attacks" in line and "zzz" in line and not out.exists()


def test_d3_backbone_kwargs_over_a_safetensors_source_are_used_or_refused(finished, tmp_path, source, capsys):
    tmp, done = finished
    spec = json.loads(safe_open(str(done / "best.safetensors"), "pt").metadata()["advtransfer"])
    assert spec["kwargs"] == {**TINY, "drop_path_rate": 0.05}  # the source's kwargs + the config's, as used
    assert main(argv(tmp_path, source, tmp_path / "a", "model.kwargs.depth=abc")) == 2
    assert "kwargs" in last_line(capsys) and not (tmp_path / "a").exists()
    assert main(argv(tmp_path, source, tmp_path / "b", "model.kwargs.depth=3")) == 2  # used: the weights do not fit
    assert "blocks.2" in last_line(capsys) and not (tmp_path / "b").exists()


def test_d4_validation_split_leaving_no_training_images_names_both_numbers(tmp_path, source, capsys):
    assert main(argv(tmp_path, source, tmp_path / "run", "data.n_val=100000", "data.n_train=200")) == 2
    line = last_line(capsys)
    assert "n_val=100000" in line and "n_train=200" in line and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- D5: SIGTERM anywhere


def _unhandled(signum, frame):
    raise RuntimeError("SIGTERM reached the test's own handler")


@pytest.fixture
def term_guard():
    """A SIGTERM that escapes ``main``'s handling fails the test (exit 1) instead of killing pytest."""
    old = signal.signal(signal.SIGTERM, _unhandled)
    yield _unhandled
    signal.signal(signal.SIGTERM, old)


def _term_in(monkeypatch, module, name: str) -> list:
    """Send SIGTERM to this process the first time ``module.name`` is called; returns the list of calls."""
    real, calls = getattr(module, name), []

    def wrapper(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest.mark.parametrize(
    "where, phase",
    [
        ("pgd_correct", "interrupted during the clean/PGD evaluation; state saved in"),
        ("autoattack_correct", "interrupted during AutoAttack apgd-ce (its finished batches are saved); state saved"),
    ],
)
def test_d5_sigterm_in_test_evaluation_exits_130_and_resumes(
    tmp_path, source, monkeypatch, capsys, term_guard, where, phase
):
    run = argv(tmp_path, source, tmp_path / "run")
    calls = _term_in(monkeypatch, evaluation, where)
    assert main(run) == 130
    assert calls, f"{where} never ran: the test needs examples to attack"
    line = last_line(capsys)
    assert line.startswith(f"advtransfer: {phase}") and line.endswith("; continue with --resume"), line
    monkeypatch.undo()
    monkeypatch.setattr(train, "train_step", lambda *a, **k: pytest.fail("a finished stage was retrained"))
    assert main([*run, "--resume"]) == 0 and not leftovers(tmp_path / "run")


def test_d5_sigterm_outside_a_safe_point_exits_130_and_unlocks(tmp_path, source, monkeypatch, capsys, term_guard):
    _term_in(monkeypatch, pipeline, "load_splits")
    assert main(argv(tmp_path, source, tmp_path / "run")) == 130
    assert signal.getsignal(signal.SIGTERM) is term_guard  # main put the caller's handler back
    assert last_line(capsys) == "advtransfer: interrupted; continue with --resume"
    assert not leftovers(tmp_path / "run")


def test_d5_sigterm_in_eval_exits_130_and_says_how_to_continue(tmp_path, source, monkeypatch, capsys, term_guard):
    _term_in(monkeypatch, evaluation, "pgd_correct")
    args = ["eval", "--checkpoint", str(source), "--data", "fashion-mnist", "--n", "16", "--pgd-steps", "1"]
    assert main([*args, "--eps", "0.004", "--out", str(tmp_path / "e")]) == 130
    assert last_line(capsys) == (
        "advtransfer: interrupted during the clean/PGD evaluation; rerun with the same --out to continue"
    )
    assert not (tmp_path / "e" / "eval.json").exists()


# ----------------------------------------------------------------------------- D6, D7, D8, D10: checkpoints


def _with_meta(src: Path, dst: Path, change) -> Path:
    """A copy of our checkpoint ``src`` whose metadata spec (a dict) went through ``change``."""
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    spec = json.loads(meta["advtransfer"])
    change(spec)
    save_file(load_file(str(src)), str(dst), metadata={**meta, "advtransfer": json.dumps(spec)})
    return dst


def test_d6_malformed_metadata_field_is_exit_2_naming_it(tmp_path, source, capsys):
    bad = _with_meta(source, tmp_path / "bad.safetensors", lambda s: s.update(method="full"))
    assert main(argv(tmp_path, source, tmp_path / "run", f"model.checkpoint={bad}")) == 2
    assert "field 'method'" in last_line(capsys)
    assert main(["eval", "--checkpoint", str(bad), "--data", "fashion-mnist", "--n", "8"]) == 2
    assert "field 'method'" in last_line(capsys)


def test_d7_nan_weights_are_flagged_in_eval(tmp_path, source, capsys):
    state = load_file(str(source))
    state["backbone.blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    with safe_open(str(source), "pt") as f:
        save_file(state, str(tmp_path / "nan.safetensors"), metadata=f.metadata())
    args = ["eval", "--checkpoint", str(tmp_path / "nan.safetensors"), "--data", "fashion-mnist"]
    assert main([*args, "--n", "16", "--attacks", "clean,pgd", "--pgd-steps", "1", "--out", str(tmp_path / "e")]) == 0
    flags = {f["flag"] for f in json.loads((tmp_path / "e" / "eval.json").read_text())["flags"]}
    assert {"non_finite_weights", "non_finite_logits"} <= flags and "nondeterministic_forward" not in flags
    assert "non_finite_weights" in capsys.readouterr().out


@pytest.mark.parametrize(
    "sets, names",
    [
        (("model.std=[0]",), ("model.std", "> 0")),
        (("model.mean=[.nan]", "model.std=[0.5]"), ("model.mean", "finite")),
        (("model.std=[.inf]",), ("model.std", "finite")),
    ],
)
def test_d8_bad_mean_std_in_the_config_is_exit_2_at_validation(tmp_path, source, monkeypatch, capsys, sets, names):
    monkeypatch.setattr(pipeline, "RunDir", lambda *a, **k: pytest.fail("the run started"))
    assert main(argv(tmp_path, source, tmp_path / "run", *sets)) == 2
    line = last_line(capsys)
    assert all(n in line for n in names), line


@pytest.mark.parametrize("field, value", [("std", [0.0]), ("mean", [float("nan")]), ("std", [float("inf")])])
def test_d8_bad_mean_std_in_metadata_is_exit_2_naming_it(tmp_path, source, capsys, field, value):
    bad = _with_meta(source, tmp_path / "bad.safetensors", lambda s: s.update({field: value}))
    assert main(argv(tmp_path, source, tmp_path / "run", f"model.checkpoint={bad}")) == 2
    assert f"field '{field}'" in last_line(capsys) and not (tmp_path / "run").exists()


def test_d10_integer_tensor_for_a_float_weight_is_refused(tmp_path, source, capsys):
    torch.manual_seed(0)
    state = build(ModelSpec("vit_tiny_patch16_224", dict(TINY), 10)).backbone.state_dict()
    state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"].to(torch.int32)
    torch.save(state, tmp_path / "int.pt")
    sets = ("model.backbone=vit_tiny_patch16_224", f"model.kwargs={json.dumps(TINY)}", "model.mean=[0.5]")
    assert (
        main(
            argv(
                tmp_path, source, tmp_path / "run", *sets, "model.std=[0.5]", f"model.checkpoint={tmp_path / 'int.pt'}"
            )
        )
        == 2
    )
    line = last_line(capsys)
    assert "blocks.0.attn.qkv.weight is torch.int32, expected torch.float32" in line
    args = ["eval", "--checkpoint", str(tmp_path / "int.pt"), "--data", "fashion-mnist", "--backbone"]
    assert (
        main([*args, "vit_tiny_patch16_224", *(f"{k}={v}" for k, v in TINY.items()), "--mean", "0.5", "--std", "0.5"])
        == 2
    )
    assert "torch.int32, expected torch.float32" in last_line(capsys)


# ----------------------------------------------------------------------------- D9, D11, D12: run directories


def test_d9_the_umask_applies_to_every_file(tmp_path, source):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = argv(tmp_path, source, out, "eval.autoattack=false", "method.init=roli", "method.name=bias")
    p = subprocess.run(
        [sys.executable, "-m", "advtransfer", *run],
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.umask(0o027),
    )
    assert p.returncode == 0, p.stderr
    modes = {str(q.relative_to(out)): stat.S_IMODE(q.stat().st_mode) for q in [out, *out.rglob("*")]}
    assert {k for k, m in modes.items() if m != (0o750 if (out / k).is_dir() else 0o640)} == set(), modes
    assert {"stage1/best.safetensors", "stage2/state.safetensors", "log.txt", "result.json"} <= set(modes)


def test_d11_seconds_count_every_stage_and_every_process(tmp_path, source, monkeypatch, capsys):
    """The first process's clock runs 1000 s per training step; it is interrupted in stage 2, and the resumed
    process's result counts those seconds (stage 1 + stage 2 before the interruption) in ``seconds``."""
    run = argv(tmp_path, source, tmp_path / "run", "method.init=roli", "train.epochs=2")
    real_step, real_time, steps = train.train_step, time.time, []

    def slow_step(*a, **k):
        steps.append(1)
        if len(steps) == 3:  # stage 1 had 2 steps; stop after stage 2's first
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*a, **k)

    monkeypatch.setattr(train, "train_step", slow_step)
    monkeypatch.setattr(time, "time", lambda: real_time() + 1000.0 * len(steps))
    assert main(run) == 130
    monkeypatch.undo()
    assert main([*run, "--resume"]) == 0
    card = json.loads((tmp_path / "run" / "result.json").read_text())
    stage1 = json.loads((tmp_path / "run" / "stage1" / "result.json").read_text())
    assert stage1["train_seconds"] >= 2000 and card["train_seconds"] >= 1000  # stage 2, across both processes
    assert card["seconds"] >= stage1["train_seconds"] + card["train_seconds"] >= 3000


def _full_disk_at(monkeypatch, n: int) -> list:
    """The ``n``-th ``os.fsync`` (each atomic write makes one) fails with ENOSPC."""
    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


@pytest.mark.parametrize("n", [1, 2, 4, 7])
def test_d12_no_lock_left_after_a_disk_full_failure(tmp_path, source, monkeypatch, capsys, n):
    out = tmp_path / "run"
    calls = _full_disk_at(monkeypatch, n)
    assert main(argv(tmp_path, source, out, "eval.autoattack=false", "train.checkpoint_every=1")) == 1
    assert len(calls) == n and "disk full" in last_line(capsys)
    assert not leftovers(out) and not (out / "result.json").exists()
    monkeypatch.undo()
    assert (
        main(argv(tmp_path, source, out, "eval.autoattack=false", "train.checkpoint_every=1", flags=("--resume",))) == 0
    )


def test_d12_no_lock_left_after_an_internal_error(tmp_path, source, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "source_spec", lambda *a: 1 / 0)
    assert main(argv(tmp_path, source, tmp_path / "run")) == 1
    assert "internal error" in last_line(capsys) and not leftovers(tmp_path / "run")
