"""Experiment tracking and progress in the log: every stage directory's ``metrics.csv`` and TensorBoard events read back
with the numbers of ``metrics.jsonl`` (also across a resume that retrains an epoch), W&B offline, progress lines
during training and AutoAttack, and a line before each long silent phase."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from advtransfer import train
from advtransfer.cli import main
from advtransfer.rundir import read_jsonl

CONFIG = {
    "data": {"name": "fashion-mnist", "n_train": 32, "n_val": 16, "n_test": 32},
    "method": {"name": "full", "init": "roli"},
    "attack": {"eps": "0.004", "steps": 1},
    "train": {"epochs": 3, "batch_size": 16},
    "probe": {"epochs": 1, "batch_size": 16},
    "eval": {"val_pgd_steps": 1, "pgd_steps": 1, "n_autoattack": 0, "aa_version": "custom"},
    "track": {"log_every": 1e-6},
}


def write_config(tmp: Path, source: Path, **track) -> list[str]:
    cfg = json.loads(json.dumps(CONFIG))
    cfg["model"] = {"checkpoint": str(source)}
    cfg["eval"]["aa_attacks"] = ["apgd-ce", "apgd-t"]
    cfg["track"].update(track)
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return ["run", str(tmp / "cfg.yaml"), "--out", str(tmp / "run")]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, source) -> Path:
    """A RoLI run killed right after stage 2 tracked its second epoch but before it saved that epoch's state (so the
    resumed run trains that epoch again and tracks it twice), then resumed to the end."""
    tmp = tmp_path_factory.mktemp("track")
    argv = write_config(tmp, source)
    real, saves = train._save, []

    def killed_at_the_fourth_save(*a, **k):  # stage 1 epoch 1; stage 2 initial model, epochs 1 and 2
        saves.append(1)
        if len(saves) == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "_save", killed_at_the_fourth_save)
        assert main(argv) == 130
    assert len(read_jsonl(tmp / "run" / "stage2" / "metrics.jsonl")) == 3  # initial model, epochs 1 and 2
    assert main([*argv, "--resume"]) == 0
    return tmp / "run"


def numbers(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float) and k != "epoch"}


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_metrics_csv_and_tensorboard_equal_metrics_jsonl_across_a_resume(resumed, stage):
    records = read_jsonl(resumed / stage / "metrics.jsonl")
    assert [r["epoch"] for r in records] == ([0] if stage == "stage1" else [-1, 0, 1, 2])
    with open(resumed / stage / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records)
    for row, rec in zip(rows, records):
        assert {k: float(v) for k, v in row.items() if v != ""} == {k: float(v) for k, v in rec.items()}
    acc = EventAccumulator(str(resumed / stage / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {k for r in records for k in numbers(r)}
    for tag in tags:  # one event per epoch (the retrained epoch's first events were purged), same values
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        want = [(r["epoch"] + 1, pytest.approx(numbers(r)[tag], rel=1e-6)) for r in records if tag in r]
        assert got == want, tag


def test_progress_lines_for_training_autoattack_and_silent_phases(resumed):
    log = (resumed / "log.txt").read_text()
    for stage, steps in (("stage1", 2), ("stage2", 2)):  # 32 images in batches of 16, every step (log_every 1e-6)
        lines = re.findall(rf"{stage} epoch (\d) step (\d)/{steps}: [\d.]+ img/s, ETA \d+ s", log)
        epochs = 1 if stage == "stage1" else 3
        assert {(str(e), str(s)) for e in range(1, epochs + 1) for s in (1, 2)} <= set(lines), stage
    state = json.loads((resumed / "stage2" / "autoattack_state.json").read_text())
    for attack in ("apgd-ce", "apgd-t"):
        robust = round(state["per_attack"][attack] * 32)
        assert re.search(rf"AutoAttack {attack}: attacking \d+ of 32 examples\n", log), attack
        assert re.search(rf"AutoAttack {attack}: {robust} of 32 robust \([\d.]+ s\)\n", log), attack
    order = [
        "stage2 test: clean + PGD-1 on 32 examples, AutoAttack (custom) on 32",
        "AutoAttack apgd-ce: attacking",
        "AutoAttack apgd-t: attacking",
        "sanity checks on 32 examples",
        "result: clean",
    ]
    at = [log.rindex(line) for line in order]
    assert at == sorted(at), at
    assert "stage1 test: clean + PGD-1 on 32 examples\n" in log  # the probe's test evaluation has no AutoAttack


def test_no_progress_lines_with_a_long_interval(tmp_path, source):
    argv = write_config(tmp_path, source, log_every=1e9, tensorboard=False)
    assert main([*argv, "--set", "method.init=ranli", "--set", "train.epochs=1", "--set", "eval.autoattack=false"]) == 0
    assert "img/s" not in (tmp_path / "run" / "log.txt").read_text()
    assert not (tmp_path / "run" / "tensorboard").exists() and (tmp_path / "run" / "metrics.csv").is_file()
    assert not (tmp_path / "run" / "wandb").exists()  # off by default: no account, no network


def test_wandb_offline_run_writes_its_files(tmp_path, source, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    argv = write_config(tmp_path, source, wandb=True, tensorboard=False)
    assert main([*argv, "--set", "method.init=ranli", "--set", "train.epochs=2", "--set", "eval.autoattack=false"]) == 0
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), sorted(p.name for p in (tmp_path / "run").rglob("*"))
