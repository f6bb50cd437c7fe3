"""Checkpoint files: ours round-trip; foreign ones (timm ``.pth.tar`` with ``args``, RobustBench
``Sequential(normaliser, model)``, DDP/containers, old-timm Swin layouts) load with every key checked and the
source's logits; pickles that would run code are refused before anything runs; bad keys and files are one line."""

from __future__ import annotations

import argparse
import os
import pickle
import re
import shlex
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from conftest import TINY_VIT, tiny
from safetensors.torch import save_file
from torch import nn

from advtransfer.checkpoints import load_classifier, save_checkpoint
from advtransfer.cli import main
from advtransfer.config import DataConfig
from advtransfer.data import load_splits, tensors
from advtransfer.errors import UserError
from advtransfer.evaluation import evaluate
from advtransfer.methods import apply_method
from advtransfer.models import Classifier, ModelSpec, build
from advtransfer.weightfiles import load_backbone_weights, load_foreign, read_source, read_spec, read_state

VIT = "vit_tiny_patch16_224"
SWIN = "swin_tiny_patch4_window7_224"
SWIN_KW = dict(img_size=16, patch_size=2, in_chans=1, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4)


def _swin(seed: int, num_classes: int = 10) -> Classifier:
    torch.manual_seed(seed)
    return build(ModelSpec(SWIN, dict(SWIN_KW), num_classes)).eval()


# ----------------------------------------------------------------------------- our checkpoints


@pytest.mark.parametrize("method, options", [("full", {}), ("lora", {"rank": 2})])
def test_checkpoint_round_trip(tmp_path: Path, method: str, options: dict) -> None:
    spec = ModelSpec(VIT, dict(TINY_VIT), 10, mean=[0.25], std=[0.75])
    torch.manual_seed(0)
    model = build(spec)
    apply_method(model, method, options)
    spec.method = {"name": method, "options": options}
    spec.classes = [str(i) for i in range(10)]
    spec.trained = {"dataset": "mnist", "eps": "8/255"}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # LoRA B is zero at init: make every tensor matter
    path = tmp_path / "ck.safetensors"
    save_checkpoint(model, spec, path)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.safetensors"]  # no temp file left behind
    assert read_spec(path) == spec
    loaded, spec2 = load_classifier(path)
    assert spec2 == spec and not loaded.training
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    assert loaded.mean.flatten().tolist() == [0.25]
    src = read_source(path)  # the richer view: the spec, our mean/std, the backbone's own keys
    assert src.spec == spec and (src.mean, src.std) == ([0.25], [0.75]) and "pos_embed" in src.state


def test_read_spec_needs_our_metadata(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pth")
    for p in (path, tmp_path / "plain.pth"):
        with pytest.raises(UserError, match=r"no advtransfer metadata .*--backbone NAME"):
            read_spec(p)


@pytest.mark.parametrize(
    "meta, pattern",
    [
        ("{not json", "unreadable advtransfer metadata"),
        ("[1, 2]", "unreadable advtransfer metadata"),
        ('{"backbone": "vit_tiny_patch16_224", "bogus_field": 1}', "unreadable advtransfer metadata.*bogus_field"),
    ],
)
def test_read_spec_bad_metadata(tmp_path: Path, meta: str, pattern: str) -> None:
    path = tmp_path / "odd.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"advtransfer": meta})
    with pytest.raises(UserError, match=pattern):
        read_spec(path)


# ----------------------------------------------------------------------------- foreign formats


class Normalise(nn.Module):
    """RobustBench's ``ImageNormalizer``: buffers ``mean`` and ``std`` shaped (1, C, 1, 1)."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Opaque:
    """A config object inside ``args``: restoring it for real would run ``__setstate__`` (it creates a marker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).touch()


def _old_swin_layout(backbone: nn.Module) -> dict:
    """Invert timm's Swin filter: downsample at the end of stage N, ``head.`` not ``head.fc.``, buffers persisted."""
    old = {}
    for k, v in backbone.state_dict().items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        old[k.replace("head.fc.", "head.")] = v
    old.update({k: v for k, v in backbone.named_buffers() if k.endswith(("relative_position_index", "attn_mask"))})
    return old


def _timm_pth_tar(d: Path) -> tuple[Path, nn.Module, list[float] | None, str]:
    src = tiny(1).backbone
    ema = {k: torch.zeros_like(v) for k, v in src.state_dict().items()}  # logits would differ if this were read
    args = argparse.Namespace(
        model=VIT, lr=0.1, sched="cosine", opaque=Opaque(d / "RAN"), nested=[argparse.Namespace()]
    )
    path = d / "model_best.pth.tar"
    optimizer = {"state": {}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999)}]}
    ckpt = {"epoch": 7, "arch": VIT, "state_dict": src.state_dict(), "state_dict_ema": ema, "args": args}
    torch.save({**ckpt, "optimizer": optimizer, "version": 2, "metric": 41.5}, path)
    return path, src, None, "read 'state_dict' (ignored arch, args, epoch, metric, optimizer, state_dict_ema"


def _robustbench(d: Path) -> tuple[Path, nn.Module, list[float] | None, str]:
    src = nn.Sequential(Normalise([0.3], [0.6]), tiny(2).backbone)
    path = d / "Carmon2019Unlabeled.pt"
    torch.save(src.state_dict(), path)
    return path, src, [0.3], "mean/std from the normaliser '0.', model under '1.'"


def _named_ddp(d: Path) -> tuple[Path, nn.Module, list[float] | None, str]:
    src = nn.Sequential(OrderedDict(normalize=Normalise([0.2], [0.4]), model=tiny(3).backbone))
    path = d / "ddp.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 1}, path)
    return path, src, [0.2], "stripped 'module.'; mean/std from the normaliser 'normalize.', model under 'model.'"


def _old_swin(d: Path) -> tuple[Path, nn.Module, list[float] | None, str]:
    src = _swin(4).backbone
    path = d / "ares_swin.pth"
    torch.save({"model": _old_swin_layout(src)}, path)
    return path, src, None, "timm swin_transformer.checkpoint_filter_fn"


FORMATS = {"timm-pth-tar": _timm_pth_tar, "robustbench": _robustbench, "named-ddp": _named_ddp, "old-swin": _old_swin}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_foreign_format_gives_the_source_logits(tmp_path: Path, fmt: str) -> None:
    path, src, file_mean, note = FORMATS[fmt](tmp_path)
    arch, kwargs = (SWIN, SWIN_KW) if fmt == "old-swin" else (VIT, TINY_VIT)
    given = [] if file_mean else [0.5]
    model, spec, notes = load_foreign(path, ModelSpec(arch, dict(kwargs), 0, given, given))
    assert spec.num_classes == 10 and spec.mean == (file_mean or [0.5])  # head size read from the file
    assert note in "; ".join(notes), notes
    size = model.input_size
    x = torch.rand(3, 1, *size)
    with torch.no_grad():
        want = src(x) if file_mean else src((x - 0.5) / 0.5)
        assert torch.allclose(model(x), want, atol=1e-5)
    if fmt == "old-swin":
        assert "dropped 5 non-persistent buffers (relative_position_index x4, attn_mask x1)" in notes
    if fmt == "timm-pth-tar":
        assert "inert stand-ins for argparse.Namespace, test_checkpoints.Opaque (never constructed)" in notes
        assert not (tmp_path / "RAN").exists(), "an object in args was constructed by its own code"
    # the same file as a transfer source: backbone loaded (head skipped), features equal
    target = _swin(9, 5) if fmt == "old-swin" else tiny(9, 5)
    head = {k: v.clone() for k, v in target.backbone.state_dict().items() if k.startswith("head")}
    assert load_backbone_weights(target, path) == notes
    with torch.no_grad():
        assert torch.allclose(target.backbone.forward_features(x), model.backbone.forward_features(x), atol=1e-5)
    assert all(torch.equal(target.backbone.state_dict()[k], v) for k, v in head.items())


def test_ours_as_a_source_skips_head(tmp_path: Path) -> None:
    source = tiny(1, 5)
    spec = ModelSpec(VIT, dict(TINY_VIT), 5, mean=[0.5], std=[0.5])
    save_checkpoint(source, spec, tmp_path / "src.safetensors")
    target = tiny(2)
    head = {k: v.clone() for k, v in target.backbone.state_dict().items() if k.startswith("head.")}
    notes = load_backbone_weights(target, tmp_path / "src.safetensors")
    assert notes == ["mean/std from top-level buffers, model under 'backbone.'"]
    for k, v in target.backbone.state_dict().items():
        assert torch.equal(v, head[k] if k.startswith("head.") else source.backbone.state_dict()[k]), k


def test_headless_source_and_mean_std_rules(tmp_path: Path) -> None:
    feats = tiny(1, 0).backbone  # a feature extractor: no head at all
    torch.save(feats.state_dict(), tmp_path / "feat.pth")
    load_backbone_weights(target := tiny(2), tmp_path / "feat.pth")
    assert torch.equal(target.backbone.pos_embed, feats.pos_embed)
    with pytest.raises(UserError, match=r"no classifier head \(head\.weight\)"):
        load_foreign(tmp_path / "feat.pth", ModelSpec(VIT, dict(TINY_VIT), 0, [0.5], [0.5]))
    with pytest.raises(UserError, match=r"feat\.pth carries no mean/std .*--mean/--std"):
        load_foreign(tmp_path / "feat.pth", ModelSpec(VIT, dict(TINY_VIT), 10))
    path, *_ = _robustbench(tmp_path)
    with pytest.raises(UserError, match=r"normalises with mean \[0\.3\] std \[0\.6\], not the given ones"):
        load_foreign(path, ModelSpec(VIT, dict(TINY_VIT), 0, [0.5], [0.5]))


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda sd: sd.pop("blocks.1.mlp.fc2.weight"), r"missing keys: blocks\.1\.mlp\.fc2\.weight$"),
        (
            lambda sd: sd.update({"blocks.2.norm1.weight": torch.ones(32)}),
            r"unexpected keys: blocks\.2\.norm1\.weight$",
        ),
        (
            lambda sd: sd.update({"pos_embed": torch.zeros(1, 10, 32)}),  # timm could resample it: we do not
            r"shape mismatch: pos_embed \(1, 10, 32\) vs \(1, 17, 32\)$",
        ),
    ],
    ids=["missing", "unexpected", "shape"],
)
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_key_problems_are_named(tmp_path: Path, edit, pattern: str, suffix: str) -> None:
    sd = dict(tiny(1).backbone.state_dict())
    edit(sd)
    path = tmp_path / f"bad{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    target = tiny(2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(UserError, match=r"^checkpoint: .*bad.* does not fit the model — " + pattern) as e:
        load_backbone_weights(target, path)
    assert "\n" not in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # nothing half-loaded


def test_old_swin_key_problem_is_named_after_timms_mapping(tmp_path: Path) -> None:
    old = _old_swin_layout(_swin(1).backbone)
    old["layers.0.downsample.reduction.weight"] = torch.zeros(3, 3)
    torch.save(old, tmp_path / "swin.pth")
    with pytest.raises(UserError, match=r"shape mismatch: layers\.1\.downsample\.reduction\.weight \(3, 3\) vs"):
        load_backbone_weights(_swin(2), tmp_path / "swin.pth")


def test_wrong_architecture_lists_many(tmp_path: Path) -> None:
    path = tmp_path / "wide.pth"
    torch.save(tiny(1, embed_dim=48, num_heads=2).backbone.state_dict(), path)
    with pytest.raises(UserError, match=r"shape mismatch: .*\(\+\d+ more\)"):
        load_backbone_weights(tiny(2), path)


# ----------------------------------------------------------------------------- pickles that would run code


def _touch(path: str) -> None:
    Path(path).touch()


class Runs:
    """Unpickling this calls ``fn(*args)``, which creates the marker file."""

    def __init__(self, fn, *args) -> None:
        self.call = (fn, args)

    def __reduce__(self):
        return self.call


PAYLOADS = {
    "os.system": lambda m: Runs(os.system, f"touch {shlex.quote(str(m))}"),
    "builtins.open": lambda m: Runs(open, str(m), "w"),
    "own-function": lambda m: Runs(_touch, str(m)),
}


@pytest.mark.parametrize("payload", list(PAYLOADS))
@pytest.mark.parametrize("where", ["top", "state_dict", "args"])
@pytest.mark.parametrize("fmt", ["torch-zip", "raw-pickle"])
def test_pickle_that_runs_code_is_refused(tmp_path: Path, payload: str, where: str, fmt: str) -> None:
    marker, evil = tmp_path / "PWNED", PAYLOADS[payload](tmp_path / "PWNED")
    sd = tiny(0).backbone.state_dict()
    obj = {"top": evil, "state_dict": {"state_dict": {**sd, "w": evil}}, "args": {"state_dict": sd, "args": evil}}
    path = tmp_path / "evil.pth"
    if fmt == "torch-zip":
        torch.save(obj[where], path)
    else:
        path.write_bytes(pickle.dumps(obj[where], protocol=2))
    for load in (read_state, lambda p: load_backbone_weights(tiny(0), p)):
        with pytest.raises(
            UserError,
            match=r"refused: unsafe pickle, loading it would run [\w.]+; if you trust its source, re-save only",
        ) as e:
            load(path)
        assert "\n" not in str(e.value) and "\x1b" not in str(e.value)
    assert not marker.exists(), "the pickle ran code"


def test_truncated_and_odd_files_are_one_line(tmp_path: Path, tiny_vit: Classifier, tiny_spec: ModelSpec) -> None:
    build(tiny_spec)
    good = tmp_path / "good.safetensors"
    save_checkpoint(tiny_vit, tiny_spec, good)
    raw = good.read_bytes()
    for cut in (len(raw) // 2, len(raw) - 1, 40, 4):
        bad = tmp_path / "cut.safetensors"
        bad.write_bytes(raw[:cut])
        with pytest.raises(UserError, match="checkpoint: .*cut.safetensors"):
            load_backbone_weights(tiny(1), bad)
        with pytest.raises(UserError, match="checkpoint: .*cut.safetensors"):
            load_classifier(bad)
    pth = tmp_path / "cut.pth"
    torch.save(tiny_vit.backbone.state_dict(), pth)
    pth.write_bytes(pth.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"cut\.pth is truncated or corrupt \(.*central directory\)$"):
        load_backbone_weights(tiny(1), pth)
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02junk")
    with pytest.raises(UserError, match=r"junk\.pt is (truncated or )?corrupt") as e:
        read_state(tmp_path / "junk.pt")
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value) and "Weights only" not in str(e.value)
    with pytest.raises(UserError, match="file not found"):
        read_state(tmp_path / "nope.pth")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(UserError, match="unsupported file type '.npz'"):
        read_state(tmp_path / "w.npz")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(UserError, match="no state dict of tensors"):
        read_state(tmp_path / "meta.pth")


# ----------------------------------------------------------------------------- advtransfer eval


def test_eval_scores_a_foreign_pth(tmp_path: Path, capsys) -> None:
    """``eval --backbone`` on a timm .pth.tar (mean/std given) and a RobustBench file (mean/std its own)."""
    x, y = tensors(load_splits(DataConfig(name="mnist", n_val=0, n_test=20)).test)
    kwargs = [f"{k}={v}" for k, v in TINY_VIT.items()]
    for make, extra in ((_timm_pth_tar, ["--mean", "0.5", "--std", "0.5"]), (_robustbench, [])):
        path, src, file_mean, _ = make(tmp_path)
        ref = build(ModelSpec(VIT, dict(TINY_VIT), 10, file_mean or [0.5], [0.6] if file_mean else [0.5]))
        ref.backbone.load_state_dict(src.state_dict() if not file_mean else src[1].state_dict())
        want = evaluate(ref.eval(), x, y, eps=0.1, attacks=("clean", "pgd"), seed=0, checks=False)
        argv = ["eval", "--checkpoint", str(path), "--backbone", VIT, *kwargs, "--data", "mnist", "--n", "20"]
        assert main(argv + ["--attacks", "clean,pgd", "--eps", "0.1", *extra]) == 0
        out = capsys.readouterr().out
        assert f"{'clean':<11}{want['clean'] * 100:6.2f} %" in out and f"{'pgd':<11}{want['pgd'] * 100:6.2f} %" in out
        assert "weights: read 'state_dict'" in out if not file_mean else "normaliser '0.'" in out
    assert main(argv + ["--attacks", "clean", "--mean", "0.5", "--std", "0.5"]) == 2  # the file has its own
    assert main(["eval", "--checkpoint", str(path), "--data", "mnist"]) == 2  # foreign: needs --backbone
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not the given ones" in err[0] and "--backbone NAME" in err[1]
