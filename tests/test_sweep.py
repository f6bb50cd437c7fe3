"""Grid sweeps: expansion, naming, RoLI probe reuse and ordering, skip-finished, SLURM script, one real tiny sweep."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from advtransfer.checkpoints import save_checkpoint
from advtransfer.cli import main
from advtransfer.errors import UserError
from advtransfer.models import ModelSpec, build
from advtransfer.sweep import cores, execute, expand, load_grid, run_sweep, write_slurm

REPO = Path(__file__).resolve().parents[1]
TINY = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def _grid(tmp_path: Path, grid: dict, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def _expand(tmp_path: Path, grid: dict, sets=()) -> list:
    return expand(load_grid(_grid(tmp_path, grid)), tmp_path / "out", sets)


METHODS = [
    {"name": "linear"},
    {"name": "full", "init": "ranli"},
    {"name": "full", "init": "roli"},
    {"name": "bias", "init": "ranli"},
]


def test_embedded_grid_expands_with_probe_reuse(tmp_path):
    out = tmp_path / "emb"
    entries = expand(load_grid(REPO / "configs/embedded/grid.yaml"), out)
    assert len(entries) == 2 * 2 * 13 * 3
    names = [e.name for e in entries]
    assert len(set(names)) == len(names)
    assert names[0] == "union-robust__mnist59__linear__seed0"
    assert names == [e.name for e in expand(load_grid(REPO / "configs/embedded/grid.yaml"), out)]  # deterministic
    by = {e.name: e for e in entries}
    roli = [e for e in entries if e.cfg.method.init.value == "roli"]
    assert len(roli) == 2 * 2 * 5 * 3
    for e in roli:
        src, data, _, seed = e.name.split("__")
        probe = f"{src}__{data}__linear__{seed}"  # the adversarial probe of the same cell
        assert e.probe == probe and e.deps == [probe] and e.phase == 2
        assert e.tree["method"]["probe_run"] == str(out / probe)
        assert e.tree["probe"] == by[probe].tree["train"]  # the reused head was trained with the probe settings
        assert e.cfg.method.probe_run == str(out / probe)
    assert all(e.phase == 1 and not e.deps for e in entries if e.cfg.method.init.value == "ranli")
    controls = [e for e in entries if e.name.split("__")[2].endswith("-6ep")]
    assert len(controls) == 2 * 2 * 2 * 3 and all(e.cfg.train.epochs == 6 for e in controls)
    aa = {e.name for e in entries if e.cfg.eval.autoattack}
    assert aa == {e.name for e in entries if e.name.startswith("union-robust") and e.name.endswith("seed0")}
    e = by["union-natural__fashion59__lora-roli__seed2"]
    assert e.cfg.model.checkpoint == "models/union_minivit_natural.safetensors" and e.cfg.seed == 2
    assert e.cfg.data.name == "fashion-mnist[5-9]" and e.cfg.data.resample and e.cfg.train.epochs == 3


def test_paper_grid_expands(tmp_path, capsys):
    entries = expand(load_grid(REPO / "configs/paper/grid.yaml"), tmp_path / "paper")
    assert len(entries) == 2 * 5 * 12  # VPT on Swin too (prompts in every window, Fig. 1's point)
    assert {e.cfg.data.name for e in entries} == {"cifar10", "cifar100", "caltech256", "cub200", "stanford-dogs"}
    assert {e.cfg.model.backbone for e in entries} == {"swin_base_patch4_window7_224", "vit_base_patch16_224"}
    for e in entries:
        c = e.cfg
        assert (c.attack.eps, c.attack.steps, c.eval.val_pgd_steps, c.eval.pgd_steps) == ("8/255", 7, 10, 10)
        assert c.eval.autoattack and c.eval.aa_version == "standard"
        assert c.model.checkpoint.startswith("checkpoints/") and c.data.root == f"data/{c.data.name}"
        if c.method.init.value == "roli":
            assert e.probe.endswith("__linear__seed0") and e.probe.split("__")[:2] == e.name.split("__")[:2]
    assert main(["sweep", str(REPO / "configs/paper/grid.yaml"), "--out", str(tmp_path / "p"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "120 runs (0 finished, 120 to run) in 2 phase(s)" in text and "checkpoint(s) not found here" in text
    assert not (tmp_path / "p").exists()  # a dry run writes nothing


# the official values of shared/paper-settings.md: (dataset, method-label) -> effective learning rate
PAPER_LR = {
    "cifar10": {
        "full-ranli": 1.25e-4,
        "full-roli": 2.5e-5,
        "adapter-ranli": 0.0125,
        "adapter-roli": 0.0125,
        "lora-ranli": 2.5e-3,
        "lora-roli": 2.5e-4,
        "bias-ranli": 1.25e-3,
        "bias-roli": 1.25e-3,
        "vpt-ranli": 0.125,
    },
    "cifar100": {
        "full-ranli": 1.25e-4,
        "full-roli": 2.5e-5,
        "adapter-ranli": 1.25e-3,
        "adapter-roli": 0.0125,
        "lora-ranli": 0.0125,
        "lora-roli": 2.5e-4,
        "bias-ranli": 1.25e-3,
        "bias-roli": 1.25e-3,
        "vpt-ranli": 0.125,
    },
    "caltech256": {
        "full-ranli": 1.25e-4,
        "full-roli": 2.5e-5,
        "adapter-ranli": 1.25e-3,
        "adapter-roli": 1.25e-4,
        "lora-ranli": 2.5e-4,
        "lora-roli": 2.5e-5,
        "bias-ranli": 2.5e-4,
        "bias-roli": 2.5e-6,
        "vpt-ranli": 0.0125,
    },
    "cub200": {
        "full-ranli": 1.25e-4,
        "full-roli": 2.5e-5,
        "adapter-ranli": 0.0125,
        "adapter-roli": 0.0125,
        "lora-ranli": 1.25e-3,
        "lora-roli": 1.25e-3,
        "bias-ranli": 1.25e-3,
        "bias-roli": 1.25e-4,
        "vpt-ranli": 0.0125,
    },
    "stanford-dogs": {
        "full-ranli": 1.25e-4,
        "full-roli": 1.25e-5,
        "adapter-ranli": 1.25e-3,
        "adapter-roli": 2.5e-5,
        "lora-ranli": 1.25e-3,
        "lora-roli": 2.5e-4,
        "bias-ranli": 2.5e-4,
        "bias-roli": 1.25e-5,
        "vpt-ranli": 0.0125,
    },
}
PROBE = {
    "cifar10": (0.0125, 0.01, 20),
    "cifar100": (0.025, 0.001, 20),
    "caltech256": (0.125, 0.01, 40),
    "cub200": (0.25, 0.001, 60),
    "stanford-dogs": (0.25, 0.01, 40),
}


def test_paper_grid_dry_run_json_has_the_official_values(tmp_path, capsys):
    assert (
        main(["sweep", str(REPO / "configs/paper/grid.yaml"), "--out", str(tmp_path / "p"), "--dry-run", "--json"]) == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 120
    for r in rows:
        _, data, method, _ = r["run"].split("__")
        t, p, opts = r["train"], r["probe"], r["method"]["options"]
        assert (r["attack"]["eps"], r["attack"]["steps"], r["attack"]["step_size"], r["attack"]["iterate"]) == (
            "8/255",
            7,
            "2/255",
            "best",
        )
        assert (r["eval"]["pgd_steps"], r["eval"]["n_autoattack"], r["eval"]["batch_size"]) == (10, 0, 64)
        assert (p["optimizer"], p["lr"], p["weight_decay"], p["epochs"]) == ("sgd", *PROBE[data])
        assert (
            t["epochs"] == PROBE[data][2]
            and t["batch_size"] == 64
            and t["warmup_epochs"] == 10
            and t["schedule_per_epoch"]
            and t["decay_on"] == p["decay_on"] == "non-bias"  # their name rule: norm weights and prompts decay
        )
        assert r["model"]["preprocess"] == "ares" and r["model"]["head_init"] == "kaiming-fan-out"
        assert (r["data"]["augment"], bool(r["data"]["split_file"])) == ((data not in ("cifar10", "cifar100"),) * 2)
        if method == "linear":  # RoLI's stage 1 trains with the probe settings
            assert t == p
        elif method != "linear-natural":
            lr = PAPER_LR[data][method.replace("-ext", "").replace("vpt-roli", "vpt-ranli")]
            assert (t["optimizer"], t["lr"], t["adam_eps"], t["betas"]) == ("adamw", lr, 1e-6, [0.9, 0.999])
            zero = (method, data) in {
                ("adapter-roli", "caltech256"),
                ("bias-roli", "caltech256"),
                ("lora-ranli", "cifar100"),
            }
            assert t["weight_decay"] == (0.0 if zero else 0.01)
        if r["method"]["name"] == "lora":
            assert opts == {"rank": 16, "alpha": 16, "dropout": 0.0, "parts": "qv"}  # their eval() turns 0.1 off
        if r["method"]["name"] == "vpt":
            assert opts == {"num_prompts": 20 if data == "cub200" else 10, "deep": True, "dropout": 0.1}
        assert opts == {"reduction": 8} if r["method"]["name"] == "adapter" else True
        assert opts == {"contains": True} if r["method"]["name"] == "bias" else True
        assert r["model"]["kwargs"] == ({"drop_path_rate": 0.5} if "swin" in r["model"]["backbone"] else {})


def test_axis_value_forms_and_naming(tmp_path):
    grid = {
        "base": {"data": {"name": "fashion-mnist"}, "attack": {"eps": "0.1"}},
        "grid": {
            "source": [{"model.checkpoint": "models/a_robust.safetensors"}],
            "method": [
                {"name": "lora", "options": {"rank": 4}, "train.lr": 3e-4},
                "name=bias",
                ["method.name=full", "method.init=roli", "train.epochs=2"],
            ],
            "train.lr": [0.001],
            "seed": [0, 1],
        },
    }
    entries = _expand(tmp_path, grid, sets=["eval.autoattack=false", "train.lr=0.5"])
    names = [e.name for e in entries]
    assert names[:2] == [
        "a_robust__lora-rank4-lr0.0003__lr0.001__seed0",
        "a_robust__lora-rank4-lr0.0003__lr0.001__seed1",
    ]
    assert "a_robust__bias__lr0.001__seed0" in names and "a_robust__full-roli-epochs2__lr0.001__seed1" in names
    lora = entries[0].cfg
    assert (
        lora.method.name == "lora"
        and lora.method.options == {"rank": 4}
        and lora.model.checkpoint.endswith("a_robust.safetensors")
    )
    assert lora.train.lr == 0.5 and lora.eval.autoattack is False  # --set applies last, to every run
    assert entries[0].cfg.name == names[0]  # the run name labels the config when the grid gives none
    full = next(e for e in entries if "full-roli" in e.name)
    assert full.cfg.train.epochs == 2 and full.probe_note.startswith("own stage 1")  # no linear run in the grid


def test_grid_errors(tmp_path):
    base = {"data": {"name": "fashion-mnist"}}
    with pytest.raises(UserError, match=r"entry x__seed0: config: unknown key 'train.lrr'"):
        _expand(tmp_path, {"base": base, "grid": {"m": [{"_name": "x", "train.lrr": 1}], "seed": [0]}})
    with pytest.raises(UserError, match="is not a config key"):
        _expand(tmp_path, {"base": base, "grid": {"source": ["a"]}})
    with pytest.raises(UserError, match="both named"):
        _expand(
            tmp_path,
            {"base": base, "grid": {"method": [{"_name": "a", "name": "full"}, {"_name": "a", "name": "bias"}]}},
        )
    with pytest.raises(UserError, match="matches no entry"):
        _expand(tmp_path, {"base": base, "grid": {"seed": [0]}, "exclude": [{"seed": 3}]})
    with pytest.raises(UserError, match="unknown top-level"):
        _expand(tmp_path, {"base": base, "grids": {}})
    with pytest.raises(UserError, match="no matching linear run"):
        _expand(
            tmp_path, {"base": base, "grid": {"method": [{"name": "full", "init": "roli", "probe_run": "{probe}"}]}}
        )
    with pytest.raises(UserError, match="grid file not found"):
        load_grid(tmp_path / "missing.yaml")
    assert main(["sweep", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) == 2


def test_exclude_probe_options_and_explicit_probe(tmp_path):
    grid = {"base": {}, "grid": {"method": METHODS, "seed": [0, 1]}, "exclude": [{"method": "bias-ranli", "seed": 1}]}
    entries = _expand(tmp_path, grid)
    assert len(entries) == 7 and "bias-ranli__seed1" not in [e.name for e in entries]
    grid["reuse_probe"] = False
    assert all(not e.probe for e in _expand(tmp_path, grid))
    del grid["exclude"]
    grid["grid"]["method"] = [{"name": "linear"}, {"name": "full", "init": "roli", "probe_run": "{probe}"}]
    assert [e.probe for e in _expand(tmp_path, grid)] == ["", "", "linear__seed0", "linear__seed1"]
    grid["grid"]["method"] = [{"name": "linear"}, {"name": "full", "init": "roli", "probe_run": "{out}/linear__seed0"}]
    roli = [e for e in _expand(tmp_path, grid) if e.probe]
    assert [e.probe for e in roli] == ["linear__seed0", "linear__seed0"]
    assert roli[1].tree["method"]["probe_run"] == str(tmp_path / "out" / "linear__seed0")


class FakeRun:
    """Stands in for a subprocess: finishes on its second poll, writing a result card unless told to fail."""

    def __init__(self, out: Path, name: str, log: list, fail: bool) -> None:
        self.out, self.name, self.log, self.fail, self.polls = out, name, log, fail, 0

    def poll(self):
        self.polls += 1
        if self.polls < 2:
            return None
        if not self.fail:
            (self.out / self.name).mkdir(parents=True, exist_ok=True)
            (self.out / self.name / "result.json").write_text("{}")
        self.log.append(("end", self.name))
        return 1 if self.fail else 0


def _fake(out: Path, fail: set[str] = frozenset()):
    log: list = []

    def launch(e):
        running = sum(1 for k, _ in log if k == "start") - sum(1 for k, _ in log if k == "end")
        log.append(("start", e.name))
        log.append(("running", running + 1))
        return FakeRun(out, e.name, log, e.name in fail)

    return launch, log


def test_execute_runs_probes_first_skips_finished_and_blocks_on_failure(tmp_path):
    out = tmp_path / "out"
    entries = _expand(tmp_path, {"base": {}, "grid": {"method": METHODS, "seed": [0, 1, 2]}})
    (out / "bias-ranli__seed2").mkdir(parents=True)
    (out / "bias-ranli__seed2" / "result.json").write_text("{}")  # finished before: skipped
    launch, log = _fake(out, fail={"linear__seed1"})
    result = execute(entries, out, workers=2, launch=launch, log=lambda m: None, poll=0)
    starts = [n for k, n in log if k == "start"]
    ends = [n for k, n in log if k == "end"]
    assert "bias-ranli__seed2" not in starts and result["bias-ranli__seed2"] == "done"
    assert max(n for k, n in log if k == "running") == 2  # never more than --workers at once
    assert starts[:3] == ["linear__seed0", "linear__seed1", "linear__seed2"]  # runs others depend on go first
    for s in (0, 2):
        assert starts.index(f"full-roli__seed{s}") > ends.index(f"linear__seed{s}")  # after its probe finished
        assert result[f"full-roli__seed{s}"] == "ok"
    assert result["linear__seed1"].startswith("failed (exit 1")
    assert result["full-roli__seed1"].startswith("blocked") and "full-roli__seed1" not in starts
    assert (out / "_sweep" / "configs" / "full-roli__seed0.yaml").is_file()
    saved = yaml.safe_load((out / "_sweep" / "configs" / "full-roli__seed0.yaml").read_text())
    assert saved["method"]["probe_run"] == str(out / "linear__seed0")

    launch2, log2 = _fake(out)  # a second pass runs only what did not finish
    result2 = execute(entries, out, workers=2, launch=launch2, log=lambda m: None, poll=0)
    assert sorted(n for k, n in log2 if k == "start") == ["full-roli__seed1", "linear__seed1"]
    assert all(s in ("done", "ok") for s in result2.values())


def test_slurm_script(tmp_path):
    out = tmp_path / "out"
    grid_path = _grid(tmp_path, {"base": {}, "grid": {"method": METHODS, "seed": [0, 1]}})
    script = tmp_path / "sweep.sbatch"
    assert main(["sweep", str(grid_path), "--out", str(out), "--slurm", str(script)]) == 0
    text = script.read_text()
    assert text.startswith("#!/bin/bash") and "#SBATCH --job-name=advtransfer" in text
    assert (
        "PHASE_1=(linear__seed0 linear__seed1 full-ranli__seed0 full-ranli__seed1 bias-ranli__seed0 bias-ranli__seed1)"
        in text
    )
    assert "PHASE_2=(full-roli__seed0 full-roli__seed1)" in text
    assert "--dependency=afterany:$prev" in text and "-m advtransfer run" in text and "--resume" in text
    assert 'if [ -f "$OUT/$NAME/result.json" ]' in text and "OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}" in text
    assert len(list((out / "_sweep" / "configs").glob("*.yaml"))) == 8
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        # a task of phase 2 resolves its run name from the array index (python swapped for echo)
        fake = text.replace('exec "$PYTHON"', "echo")
        (tmp_path / "t.sh").write_text(fake)
        r = subprocess.run(
            ["bash", str(tmp_path / "t.sh"), "2"],
            env={**os.environ, "SLURM_ARRAY_TASK_ID": "1"},
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        assert f"full-roli__seed1.yaml --out {out}/full-roli__seed1" in r.stdout
    write_slurm(expand(load_grid(grid_path), out), out, script, str(grid_path))  # idempotent rewrite


@pytest.fixture
def tiny_source(tmp_path) -> Path:
    torch.manual_seed(0)
    spec = ModelSpec("vit_tiny_patch16_224", dict(TINY), 10, mean=[0.5], std=[0.5])
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(build(spec), spec, path)
    return path


def test_real_sweep_two_workers(tmp_path, tiny_source, capsys):
    """Two tiny real runs in parallel subprocesses, then a second invocation that skips both."""
    base = {
        "data": {"name": "fashion-mnist", "n_train": 64, "n_val": 32, "n_test": 32},
        "model": {"checkpoint": str(tiny_source)},
        "attack": {"eps": "0.1", "steps": 2},
        "train": {"epochs": 1, "batch_size": 32},
        "probe": {"epochs": 1, "batch_size": 32},
        "eval": {"pgd_steps": 2, "val_pgd_steps": 2, "autoattack": False},
    }
    grid = _grid(tmp_path, {"base": base, "grid": {"method": [{"name": "linear"}, {"name": "bias"}], "seed": [0]}})
    out = tmp_path / "sweep"
    assert main(["sweep", str(grid), "--out", str(out), "--workers", "2"]) == 0, (out / "_sweep" / "logs").glob("*")
    for name in ("linear__seed0", "bias__seed0"):
        card = json.loads((out / name / "result.json").read_text())
        assert card["method"] == name.split("__")[0] and card["n_eval"] == 32
        assert json.loads((out / name / "env.json").read_text())["threads"] == max(1, cores() // 2)
        assert "-m advtransfer run" in (out / "_sweep" / "logs" / f"{name}.log").read_text()
    assert (out / "report.md").is_file() and (out / "report.html").is_file()

    def no_launch(e):
        raise AssertionError(f"{e.name} is finished and must not run again")

    result = run_sweep(grid, out, workers=2, launch=no_launch, log=lambda m: None, report=False)
    assert result == {"linear__seed0": "done", "bias__seed0": "done"}
