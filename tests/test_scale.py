"""Scale features are exact or honest: streamed evaluation, clean-correct-only PGD, early exit, gradient accumulation,
compact run directories, fast AT (FGSM-RS, N-FGSM), the PGD curriculum and the catastrophic-overfitting guard."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_VIT, tiny
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from advtransfer.attacks import Threat, fgsm, pgd, pgd_correct, uniform_start
from advtransfer.checkpoints import compact_keys, load_classifier
from advtransfer.cli import main
from advtransfer.config import DataConfig, RunConfig, TrainConfig
from advtransfer.configfile import from_dict, load_config
from advtransfer.data import load_splits, tensors
from advtransfer.datasets import Split
from advtransfer.errors import UserError
from advtransfer.evaluation import evaluate, evaluate_batches, split_batches, tensor_batches
from advtransfer.models import ModelSpec
from advtransfer.train import Stage, co_collapse, fit, make_optimizer, train_step


class Counting(torch.nn.Module):
    """Counts the examples the wrapped model sees (what an attack costs)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.seen = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        return self.model(x)


def _half_right(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Labels that the model gets right on the even examples and wrong on the odd ones (about 50 % clean accuracy)."""
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = pred.clone()
    y[1::2] = (pred[1::2] + 1) % 10
    return y


def test_streamed_image_folder_equals_in_memory(tmp_path):
    """An image-file split read batch by batch (uint8 until the device) gives the same masks as the same pixels held
    in memory as one float tensor."""
    g = np.random.default_rng(0)
    pixels = g.integers(0, 256, (24, 32, 32), dtype=np.uint8)
    files = []
    for i, p in enumerate(pixels):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(p).save(files[-1])
    model = tiny(1)
    x = torch.from_numpy(pixels[:, None, 2:30, 2:30].copy()).float() / 255  # Resize(32) is the identity; crop 28
    y = _half_right(model, x)
    split = Split(y, files=files, image_size=28, channels=1)
    threat = Threat(0.01, "Linf", 3)
    kw = dict(attacks=("clean", "pgd"), seed=3, checks=False)
    streamed = evaluate_batches(model, split_batches(split, 8, torch.device("cpu")), len(y), threat, **kw)
    memory = evaluate_batches(model, tensor_batches(x, y, 8), len(y), threat, **kw)
    public = evaluate(model, x, y, eps=0.01, pgd_steps=3, batch_size=8, seed=3, checks=False)
    for k in ("clean", "pgd"):
        assert torch.equal(streamed["masks"][k], memory["masks"][k]) and torch.equal(
            memory["masks"][k], public["masks"][k]
        )
    assert 0.3 < streamed["clean"] < 0.7 and streamed["pgd"] < streamed["clean"]  # a meaningful mix of outcomes


@pytest.mark.parametrize(
    "threat, restarts",
    [
        (Threat(0.02, "Linf", 2), 1),
        (Threat(0.02, "Linf", 2), 2),
        (Threat(0.4, "L2", 2), 1),
        (Threat(0.02, "Linf", 2, iterate="best"), 1),
    ],
    ids=["linf", "linf-restarts", "l2", "best-iterate"],
)
def test_clean_correct_only_equals_full_pgd(threat, restarts):
    model = tiny(1)
    x = torch.rand(128, 1, 28, 28, generator=torch.Generator().manual_seed(0))  # outcomes depend on the starts
    y = _half_right(model, x)
    clean = model(x).argmax(1) == y
    counted = Counting(model)
    runs = {}
    for name, only in (("full", None), ("only", clean)):
        torch.manual_seed(7)
        counted.seen = 0
        # a batch with no clean-correct example first: it must leave the RNG as a full attack does
        pgd_correct(counted, x[1::2], y[1::2], threat, restarts=restarts, only=None if only is None else only[1::2])
        rng = torch.get_rng_state()
        runs[name] = (pgd_correct(counted, x, y, threat, restarts=restarts, only=only), counted.seen, rng)
    assert torch.equal(runs["only"][2], runs["full"][2])
    assert torch.equal(runs["only"][0], runs["full"][0] & clean)
    assert runs["only"][0].any() and (runs["only"][0] != clean).any()
    if threat.iterate == "last":  # the attacked examples get the very same adversarial images, for about half the cost
        assert runs["only"][1] < 0.6 * runs["full"][1]
        idx = clean.nonzero().squeeze(1)
        adv = []
        for live in (None, idx):
            torch.manual_seed(5)
            adv.append(pgd(model, x, y, threat, restarts=restarts, live=live)[idx])
        assert torch.equal(adv[0], adv[1])


def test_early_exit_is_cheaper_and_at_least_as_strong():
    model = tiny(2)
    x = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = _half_right(model, x)
    counted, got = Counting(model), {}
    for early in (False, True):
        torch.manual_seed(0)
        counted.seen = 0
        got[early] = pgd_correct(counted, x, y, Threat(0.01, "Linf", 10, early_exit=early)), counted.seen
    assert not (got[True][0] & ~got[False][0]).any()  # an example robust under early exit is robust under PGD
    assert got[True][1] < 0.8 * got[False][1] and got[False][0].any() and not got[False][0].all()
    with pytest.raises(UserError, match="early_exit"):
        Threat(0.1, iterate="best", early_exit=True)
    with pytest.raises(UserError, match="eval.early_exit"):
        from_dict(RunConfig, {"eval": {"early_exit": True}, "attack": {"iterate": "best"}})
    res = evaluate(model, x, y, eps=0.1, early_exit=True, checks=False)
    assert res["pgd_settings"]["early_exit"] is True


@pytest.mark.parametrize("objective", ["natural", "at"])
@pytest.mark.parametrize("accum", [2, 4])
def test_accumulation_equals_the_large_batch(objective, accum):
    """``accum_steps`` micro-batches give the large batch's step: weights within float tolerance after 3 steps."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
    models = {}
    for k in (1, accum):
        model = tiny(3).train()
        cfg = TrainConfig(batch_size=16, accum_steps=k, objective=objective, optimizer="sgd", lr=0.05)
        opt, threat = make_optimizer(model, cfg), Threat(0.1, "Linf", 2)
        for step in range(3):
            torch.manual_seed(step)
            start = uniform_start(x, 0.1, "Linf")
            loss, correct = train_step(model, opt, x, y, threat, cfg, start=start if objective == "at" else None)
        models[k] = (model, float(loss), int(correct))
    (big, loss_big, c_big), (small, loss_small, c_small) = models[1], models[accum]
    assert loss_small == pytest.approx(loss_big, rel=1e-5) and c_small == c_big
    diff = max((a - b).abs().max().item() for a, b in zip(big.parameters(), small.parameters()))
    moved = max((a - b).abs().max().item() for a, b in zip(big.parameters(), tiny(3).parameters()))
    assert diff < 1e-5 < moved


FAST = [
    "data.n_train=48",
    "data.n_val=16",
    "data.n_test=32",
    "train.batch_size=16",
    "attack.steps=3",
    "eval.val_pgd_steps=2",
    "eval.pgd_steps=3",
    "eval.autoattack=false",
    "eval.batch_size=16",
    "track.tensorboard=false",
]


@pytest.mark.parametrize("method", ["linear", "lora"])
def test_compact_run_reloads_exactly_and_refuses_a_changed_source(tmp_path, source, method):
    src = tmp_path / "source.safetensors"
    shutil.copy(source, src)
    cfg = {
        "data": {"name": "fashion-mnist"},
        "model": {"checkpoint": str(src)},
        "attack": {"eps": "0.1"},
        "method": {"name": method},
        "train": {"epochs": 2, "pgd_curriculum": True},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["run", str(tmp_path / "cfg.yaml"), "--out", str(out), *sum((["--set", s] for s in FAST), [])]) == 0
    model, spec = load_classifier(out / "best.safetensors")
    stored = load_file(out / "best.safetensors")
    assert sorted(stored) == sorted(compact_keys(model))  # trainable tensors only: the head (+ LoRA factors)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stored.items())
    frozen = {k: v for k, v in load_file(src).items() if k in model.state_dict() and k not in stored}
    assert frozen and all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())
    assert (out / "best.safetensors").stat().st_size < 0.5 * src.stat().st_size
    # re-evaluating the reloaded model reproduces the run's per-example masks bit for bit
    run_cfg = load_config(out / "config.yaml")
    test = load_splits(run_cfg.data, seed=run_cfg.seed).test
    res = evaluate_batches(
        model,
        split_batches(test, 16, torch.device("cpu")),
        len(test),
        Threat.of(run_cfg.attack, run_cfg.eval.pgd_steps),
        attacks=("clean", "pgd"),
        seed=run_cfg.seed,
        checks=False,
    )
    masks = load_file(out / "masks.safetensors")
    assert all(torch.equal(res["masks"][k], masks[k].bool()) for k in ("clean", "pgd"))
    # the PGD curriculum ran 1 step in the first epoch, attack.steps in the last
    steps = [json.loads(line)["train_pgd_steps"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 3]
    # a changed or missing source is refused
    state = load_file(src)
    key = next(k for k in state if k.endswith("blocks.0.attn.qkv.weight"))
    state[key] = state[key] + 1e-3
    with safe_open(src, "pt") as f:
        meta = f.metadata()
    save_file(state, src, metadata=meta)
    with pytest.raises(UserError, match="changed since"):
        load_classifier(out / "best.safetensors")
    src.unlink()
    with pytest.raises(UserError, match="missing"):
        load_classifier(out / "best.safetensors")


def test_fast_at_examples_and_training():
    """FGSM-RS stays in the ε-ball; N-FGSM (noise in 2ε, a step of ε, no projection) reaches past ε up to 3ε, by
    design; both stay in [0,1], and both objectives train (the loss on their own examples falls)."""
    model, eps = tiny(4), 0.05
    g = torch.Generator().manual_seed(2)
    x, y = 0.2 + 0.6 * torch.rand(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
    for kind, bound in (("fgsm-rs", eps), ("n-fgsm", 3 * eps)):
        torch.manual_seed(0)
        dist = (fgsm(model, x, y, Threat(eps), kind) - x).abs().flatten(1).amax(1)
        assert dist.max() <= bound + 1e-6 and dist.min() > 0.9 * eps
        if kind == "n-fgsm":
            assert (dist > 2 * eps).all()  # the step of ε on top of noise near 2ε: not projected back
        edge = fgsm(model, torch.zeros_like(x), y, Threat(eps), kind)
        assert edge.min() >= 0 and edge.max() <= 3 * eps + 1e-6
    x, y = tensors(load_splits(DataConfig(name="fashion-mnist", n_train=64, n_val=8, n_test=8)).train)
    for objective in ("fgsm-rs", "n-fgsm"):
        model = tiny(4).train()
        cfg = TrainConfig(objective=objective, lr=1e-2, weight_decay=0.0)
        opt, losses = make_optimizer(model, cfg), []
        torch.manual_seed(0)
        for _ in range(20):
            losses.append(float(train_step(model, opt, x, y, Threat(eps), cfg)[0]) / len(x))
        assert np.isfinite(losses).all() and np.mean(losses[-3:]) < 0.92 * np.mean(losses[:3]), (objective, losses)


def test_pgd_curriculum_steps():
    def steps(epochs: int, k: int, on: bool = True) -> list[int]:
        cfg = TrainConfig(epochs=epochs, pgd_curriculum=on)
        stage = Stage(None, None, cfg, Threat(0.1, "Linf", k), Threat(0.1), 0)
        return [stage.threat_at(e).steps for e in range(epochs)]

    assert steps(3, 7) == [1, 4, 7] and steps(5, 3) == [1, 1, 2, 2, 3] and steps(8, 10)[0] == 1
    assert steps(1, 7) == [7] and steps(3, 7, on=False) == [7, 7, 7]
    assert all(a <= b for a, b in zip(steps(8, 10), steps(8, 10)[1:])) and steps(8, 10)[-1] == 10
    with pytest.raises(UserError, match="train.pgd_curriculum"):
        from_dict(RunConfig, {"train": {"objective": "fgsm-rs", "pgd_curriculum": True}})


def test_overfitting_guard_on_constructed_histories():
    def h(*rows):
        return [dict(zip(("val_pgd", "train_acc"), r)) for r in rows]

    assert "catastrophic overfitting" in co_collapse(h((0.40, 0.30), (0.42, 0.35), (0.15, 0.60)))
    assert co_collapse(h((0.40, 0.30), (0.42, 0.35), (0.22, 0.60))) == ""  # above half its best
    assert co_collapse(h((0.40, 0.30), (0.42, 0.35), (0.15, 0.20))) == ""  # training accuracy fell too
    assert co_collapse(h((0.40, 0.30), (0.10, 0.35))) != ""
    assert co_collapse(h((0.40,), (0.10, 0.35))) == ""  # RoLI's initial record: no training accuracy to compare
    assert co_collapse(h((0.40, 0.3))) == ""


@pytest.mark.parametrize("guard", ["warn", "stop"])
def test_overfitting_guard_in_fit(tmp_path, monkeypatch, guard):
    """Validation collapses in epoch 3 of 5 while training accuracy rises: ``warn`` logs it and trains on, ``stop``
    ends the stage there (best checkpoint kept) and a resume does not train again."""
    import advtransfer.train as T

    scripted = iter([0.4, 0.45, 0.1, 0.1, 0.1])
    monkeypatch.setattr(T, "validate", lambda *a, **k: {"val_clean": 0.5, "val_pgd": next(scripted)})
    g = torch.Generator().manual_seed(0)
    data = Split(
        torch.randint(0, 10, (16,), generator=g),
        pixels=torch.randint(0, 256, (16, 1, 28, 28), generator=g, dtype=torch.uint8),
    )
    rises = iter([0.1, 0.2, 0.6, 0.7, 0.8])
    real = T._accumulate

    def fake_accumulate(progress, sums):  # training accuracy scripted to rise every epoch
        real(progress, sums)
        progress["correct"] = int(next(rises) * progress["seen"])

    monkeypatch.setattr(T, "_accumulate", fake_accumulate)
    cfg = TrainConfig(epochs=5, batch_size=16, objective="fgsm-rs", co_guard=guard)
    spec = ModelSpec("vit_tiny_patch16_224", dict(TINY_VIT), 10)
    logs = []
    stage = Stage(tmp_path / "s", spec, cfg, Threat(0.1), Threat(0.1), 0, log=logs.append)
    progress = fit(tiny(5), data, data, stage)
    records = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert "co_guard" in records[2] and any("catastrophic overfitting" in m for m in logs)
    if guard == "warn":
        assert len(records) == 5 and not progress.get("stopped")
    else:
        assert len(records) == 3 and progress["stopped"] and progress["best"]["epoch"] == 1
        assert fit(tiny(5), data, data, stage, resume=True)["epoch"] == 3


def test_gpu_script_cpu_smoke(tmp_path, monkeypatch):
    """``benchmarks/gpu.py --cpu-smoke`` runs every measurement of the GPU script on a tiny ViT; its FLOP count is
    7 attack passes (forward + input gradient) plus the update's forward + backward: about 17 forwards."""
    from pathlib import Path

    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import gpu

    res = gpu.main(["--cpu-smoke", "--json", str(tmp_path / "gpu.json")])
    assert json.loads((tmp_path / "gpu.json").read_text()) == res
    for key in ("train_img_per_s_bf16", "train_img_per_s_tf32", "train_img_per_s_fp32", "pgd10_eval_img_per_s"):
        assert res[key] > 0, key
    assert res["input_pipeline_img_per_s"] > 0 and "train_mfu_bf16" not in res  # no peak FLOP/s known for a CPU
    model = gpu._model(ModelSpec("vit_base_patch16_224", gpu.SMOKE_VIT, 10), torch.device("cpu"))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(1, 3, 32, 32))
    assert 16 < res["flops_per_image"] / counter.get_total_flops() < 18
