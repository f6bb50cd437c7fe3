"""torchrun with 2 CPU processes (gloo) equals 1 process at the same global batch, within fp tolerance.

The tolerance covers the order of the gradient all-reduce (a mean of two half-batch means instead of
one mean) and the evaluation's per-shard PGD random starts: weights within 1e-4, clean accuracy equal,
PGD accuracy within 2 examples.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from advtransfer.checkpoints import read_state, save_checkpoint
from advtransfer.models import ModelSpec, build

TINY = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def _cmd(cfg: Path, out: Path, *extra: str, ranks: int = 2) -> list[str]:
    """``advtransfer run`` in one process, or under torchrun with ``ranks`` CPU processes."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 else []
    return [sys.executable, *launcher, "-m", "advtransfer", "run", str(cfg), "--out", str(out), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(cfg: Path, out: Path, ranks: int) -> dict:
    p = subprocess.run(_cmd(cfg, out, ranks=ranks), capture_output=True, text=True, env=_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def _torchrun(cfg: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        _cmd(cfg, out, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env()
    )


def _source(tmp_path: Path) -> str:
    """A randomly initialised tiny ViT source checkpoint."""
    torch.manual_seed(0)
    spec = ModelSpec("vit_tiny_patch16_224", dict(TINY), 10, mean=[0.5], std=[0.5])
    save_checkpoint(build(spec), spec, tmp_path / "src.safetensors")
    return str(tmp_path / "src.safetensors")


def test_two_process_ddp_equals_one_process(tmp_path):
    cfg = {
        "data": {"name": "fashion-mnist", "n_train": 64, "n_val": 32, "n_test": 32},
        "model": {"checkpoint": _source(tmp_path)},
        "method": {"name": "full"},
        "attack": {"eps": "0.1", "steps": 2},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.001},
        "eval": {
            "val_pgd_steps": 2,
            "pgd_steps": 2,
            "autoattack": True,
            "n_autoattack": 8,
            "aa_version": "custom",
            "aa_attacks": ["apgd-ce"],
        },
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    one = _run(path, tmp_path / "one", ranks=1)
    two = _run(path, tmp_path / "two", ranks=2)
    w1, w2 = read_state(tmp_path / "one" / "best.safetensors"), read_state(tmp_path / "two" / "best.safetensors")
    assert w1.keys() == w2.keys()
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert worst < 1e-4, worst
    assert one["clean_acc"] == two["clean_acc"] and one["n_eval"] == two["n_eval"] == 32
    assert abs(one["pgd_acc"] - two["pgd_acc"]) <= 2 / 32
    assert two["n_autoattack"] == 8 and 0 <= two["autoattack_acc"] <= two["clean_acc"]
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert m1[0]["train_loss"] == pytest.approx(m2[0]["train_loss"], abs=1e-4)
    assert (tmp_path / "two" / "log.txt").read_text().count("result:") == 1  # only rank 0 writes


def test_ctrl_c_under_torchrun_then_resume_equals_an_uninterrupted_run(tmp_path):
    """SIGINT to torchrun reaches the ranks at different moments; they still stop at one step, save the
    epoch's global running sums, and the resumed run's metrics and weights equal an uninterrupted run's."""
    cfg = {
        "data": {"name": "fashion-mnist", "n_train": 2048, "n_val": 32, "n_test": 32},  # an epoch: ~1 s on 2 cores
        "model": {"checkpoint": _source(tmp_path)},
        "attack": {"eps": "0.1", "steps": 2},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.001},
        "eval": {"val_pgd_steps": 2, "pgd_steps": 2, "autoattack": False},
    }
    (path := tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert _torchrun(path, ref).wait(timeout=300) == 0
    proc = _torchrun(path, out)
    end = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists():  # mid-epoch 2: epoch 1's sums are done, epoch 2's running
        assert proc.poll() is None and time.monotonic() < end, "the run ended before it could be interrupted"
        time.sleep(0.01)
    time.sleep(0.1)  # well inside epoch 2 (a fixed 0.3 s outlasted a whole 512-image epoch on a quiet, fast CPU)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode != 0 and err.count("interrupted; state saved") == 2, err[-2000:]
    assert not (out / "result.json").exists()
    resumed = _torchrun(path, out, "--resume")
    err = resumed.communicate(timeout=300)[1]
    assert resumed.returncode == 0, err[-2000:]
    assert "resumed run at epoch 2 step" in (out / "log.txt").read_text()
    strip = [
        {k: v for k, v in json.loads(x).items() if k != "seconds"}
        for d in (ref, out)
        for x in (d / "metrics.jsonl").read_text().splitlines()
    ]
    assert strip[:2] == strip[2:]
    w1, w2 = read_state(ref / "best.safetensors"), read_state(out / "best.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    again = _torchrun(path, out)  # a finished run: every rank refuses it cleanly, none waits on a dead peer
    err = again.communicate(timeout=120)[1]
    assert again.returncode != 0 and "already holds a finished run" in err and "rank 0 refused" in err, err[-2000:]
    assert "Connection closed" not in err


def test_shutdown_leaves_the_process_group():
    """Every init is paired with a shutdown: a live gloo group at interpreter exit can SIGABRT the rank."""
    import torch.distributed as dist

    from advtransfer import distributed

    distributed.shutdown()  # no group: a no-op
    dist.init_process_group("gloo", world_size=1, rank=0, store=dist.HashStore())
    assert distributed.world() == 1 and dist.is_initialized()
    distributed.shutdown(ok=True)  # barrier over one rank, then destroy
    assert not dist.is_initialized()
    dist.init_process_group("gloo", world_size=1, rank=0, store=dist.HashStore())
    distributed.shutdown(ok=False)  # after a failure: no barrier, still destroyed
    assert not dist.is_initialized()
