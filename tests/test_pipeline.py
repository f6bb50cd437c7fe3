"""End-to-end: the CLI on tiny subsets of real Fashion-MNIST, RanLI and RoLI, run directories, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from advtransfer.checkpoints import read_state
from advtransfer.cli import main

TINY = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
FAST = [
    "data.n_train=64",
    "data.n_val=32",
    "data.n_test=32",
    "train.epochs=2",
    "train.batch_size=32",
    "probe.epochs=1",
    "probe.batch_size=32",
    "attack.steps=2",
    "eval.val_pgd_steps=2",
    "eval.pgd_steps=3",
    "eval.n_autoattack=8",
    "eval.aa_version=custom",
    "eval.aa_attacks=[apgd-ce]",
]


def _config(tmp_path: Path, source: Path, **method) -> Path:
    cfg = {
        "data": {"name": "fashion-mnist"},
        "model": {"checkpoint": str(source)},
        "attack": {"eps": "0.1"},
        "method": {"name": "full", "init": "ranli", **method},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(args: list[str]) -> int:
    return main(args)


def test_ranli_run_directory(tmp_path, source):
    out = tmp_path / "run"
    assert _run(["run", str(_config(tmp_path, source)), "--out", str(out), *sum((["--set", s] for s in FAST), [])]) == 0
    for f in (
        "config.yaml",
        "env.json",
        "metrics.jsonl",
        "best.safetensors",
        "state.safetensors",
        "result.json",
        "log.txt",
        "masks.safetensors",
    ):
        assert (out / f).is_file(), f
    card = json.loads((out / "result.json").read_text())
    for k in (
        "method",
        "init",
        "backbone",
        "dataset",
        "seed",
        "eps",
        "norm",
        "clean_acc",
        "pgd_acc",
        "autoattack_acc",
        "n_eval",
        "flags",
    ):
        assert k in card, k
    assert card["eps"] == "0.1" and card["n_eval"] == 32 and card["method"] == "full"
    assert 0 <= card["pgd_acc"] <= card["clean_acc"] <= 1
    assert card["autoattack_settings"]["standard"] is False  # custom AA is labelled non-standard
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1]
    assert json.loads((out / "env.json").read_text())["torch"].startswith("2.14")
    log = (out / "log.txt").read_text()  # the mean/std in use, logged before training starts
    assert log.index(f"preprocessing: mean {card['mean']} std {card['std']}") < log.index("epoch 1/")
    # a finished run is never overwritten unless asked
    assert _run(["run", str(_config(tmp_path, source)), "--out", str(out)]) == 2


def test_roli_two_stages_and_head_transfer(tmp_path, source):
    out = tmp_path / "roli"
    assert (
        _run(
            [
                "run",
                str(_config(tmp_path, source, init="roli")),
                "--out",
                str(out),
                *sum((["--set", s] for s in FAST), []),
            ]
        )
        == 0
    )
    assert (out / "stage1" / "result.json").is_file() and (out / "stage2" / "result.json").is_file()
    top = json.loads((out / "result.json").read_text())
    assert top == json.loads((out / "stage2" / "result.json").read_text())
    assert top["init"] == "roli" and json.loads((out / "stage1" / "result.json").read_text())["method"] == "linear"
    assert "RoLI: head loaded from" in (out / "log.txt").read_text()
    # the stage-2 model before training carries exactly the stage-1 best head
    from advtransfer.checkpoints import load_head
    from advtransfer.configfile import load_config
    from advtransfer.data import load_splits
    from advtransfer.pipeline import make_model, source_spec

    cfg = load_config(out / "config.yaml")
    spec, _ = source_spec(cfg, load_splits(cfg.data))
    model = make_model(cfg, spec, cfg.seed)
    load_head(model, out / "stage1" / "best.safetensors")
    prefix = model.head_prefix
    stage1 = {k: v for k, v in read_state(out / "stage1" / "best.safetensors").items() if k.startswith(prefix)}
    assert stage1 and all(torch.equal(model.state_dict()[k], v) for k, v in stage1.items())


def test_bad_config_exit_2(tmp_path, source, capsys):
    cfg = _config(tmp_path, source)
    assert _run(["run", str(cfg), "--out", str(tmp_path / "x"), "--set", "train.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.lrr" in err and "Traceback" not in err
    for bad in ("attack.eps=0", "method.name=nope", "data.name=nope", "train.epochs=two"):
        assert _run(["run", str(cfg), "--out", str(tmp_path / "y"), "--set", bad]) == 2, bad
    assert not (tmp_path / "y" / "result.json").exists()


def test_every_subcommand_has_help():
    for cmd in ([], ["demo"], ["run"], ["pretrain"], ["eval"], ["methods"], ["report"], ["fetch-data"]):
        p = subprocess.run(
            [sys.executable, "-m", "advtransfer", *cmd, "--help"], capture_output=True, text=True, timeout=120
        )
        assert p.returncode == 0 and "usage: advtransfer" in p.stdout, cmd


def test_resume_keeps_the_first_environment(tmp_path):
    from advtransfer.rundir import record_resume

    path = tmp_path / "env.json"
    path.write_text(json.dumps({"git_sha": "aaa", "torch": "2.14.1"}))
    logged = []
    env = record_resume(path, {"git_sha": "bbb", "torch": "2.14.1"}, logged.append)
    assert env["git_sha"] == "aaa" and env["resumes"] == [{"git_sha": "bbb", "torch": "2.14.1"}]
    assert len(logged) == 1 and "git_sha" in logged[0] and "torch" not in logged[0]
    path.write_text(json.dumps(env))
    env = record_resume(path, {"git_sha": "aaa", "torch": "2.14.1"}, logged.append)
    assert len(env["resumes"]) == 2 and len(logged) == 1  # same as the first: nothing to warn about
