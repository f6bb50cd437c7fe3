"""torchrun with 2 CPU processes (gloo) equals 1 process at the same global batch, within fp tolerance.

The tolerance covers the order of the gradient all-reduce (a mean of two half-batch means instead of
one mean) and the evaluation's per-shard PGD random starts: weights within 1e-4, clean accuracy equal,
PGD accuracy within 2 examples.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from advtransfer.models import ModelSpec, build, read_state, save_checkpoint

TINY = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def _run(cmd: list[str], out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec("vit_tiny_patch16_224", dict(TINY), 10, mean=[0.5], std=[0.5])
    src = tmp_path / "src.safetensors"
    save_checkpoint(build(spec), spec, src)
    cfg = {
        "data": {"name": "fashion-mnist", "n_train": 64, "n_val": 32, "n_test": 32},
        "model": {"checkpoint": str(src)},
        "method": {"name": "full"},
        "attack": {"eps": "0.1", "steps": 2},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.001},
        "eval": {"val_pgd_steps": 2, "pgd_steps": 2, "autoattack": True, "n_autoattack": 8,
                 "aa_version": "custom", "aa_attacks": ["apgd-ce"]},
    }  # fmt: skip
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    one = _run([sys.executable, "-m", "advtransfer", "run", str(path)], tmp_path / "one")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = _run([*torchrun, "-m", "advtransfer", "run", str(path)], tmp_path / "two")
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
