"""The Classifier's preprocessing, checkpoints (safe formats only) and foreign-weight loading that names keys."""

from __future__ import annotations

import copy
import os
import pickle
import shlex
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT
from safetensors.torch import save_file

from advtransfer.errors import UserError
from advtransfer.methods import apply_method
from advtransfer.models import (
    Classifier,
    ModelSpec,
    atomic_write,
    build,
    is_convnet,
    load_backbone_weights,
    load_classifier,
    patchify_as_matmul,
    read_spec,
    read_state,
    save_checkpoint,
)


def _spec(num_classes: int = 10, **kwargs) -> ModelSpec:
    return ModelSpec("vit_tiny_patch16_224", {**TINY_VIT, **kwargs}, num_classes)


def _built(seed: int, num_classes: int = 10, **kwargs) -> Classifier:
    torch.manual_seed(seed)
    return build(_spec(num_classes, **kwargs)).eval()


# ----------------------------------------------------------------------------- build and forward


def test_forward_is_normalise_resize_backbone(tiny_vit: Classifier) -> None:
    assert tiny_vit.input_size == (28, 28) and tiny_vit.in_chans == 1
    assert tiny_vit.mean.flatten().tolist() == [0.5] and tiny_vit.std.flatten().tolist() == [0.5]
    torch.manual_seed(1)
    x = torch.rand(3, 1, 20, 20)  # native resolution differs from the backbone's
    with torch.no_grad():
        want = tiny_vit.backbone((F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False) - 0.5) / 0.5)
        got = tiny_vit(x)
        assert torch.allclose(got, want, atol=1e-6)
        x28 = torch.rand(3, 1, 28, 28)  # already the right size: no resampling at all
        assert torch.equal(tiny_vit(x28), tiny_vit.backbone((x28 - 0.5) / 0.5))
        assert not torch.allclose(tiny_vit(x28), tiny_vit.backbone(x28))  # normalisation does happen
    assert got.shape == (3, 10)
    assert tiny_vit.head is tiny_vit.backbone.head


def test_grey_images_repeat_to_rgb() -> None:
    spec = ModelSpec("vit_tiny_patch16_224", dict(img_size=28, patch_size=7, embed_dim=32, depth=1, num_heads=2), 4,
                     mean=[0.1, 0.2, 0.3], std=[0.5, 0.6, 0.7])  # fmt: skip
    torch.manual_seed(0)
    model = build(spec).eval()
    assert model.in_chans == 3 and spec.in_chans == 3
    x = torch.rand(2, 1, 28, 28)
    mean = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.6, 0.7]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), model.backbone((x.repeat(1, 3, 1, 1) - mean) / std), atol=1e-6)
        assert torch.allclose(model(x), model(x.repeat(1, 3, 1, 1)), atol=1e-6)
    with pytest.raises(UserError, match="expects 3-channel images, got 2"):
        model(torch.rand(2, 2, 28, 28))


def test_input_size_from_patch_embed_for_vit() -> None:
    spec = ModelSpec("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2), 3)
    model = build(spec)
    assert model.backbone.pretrained_cfg["input_size"][-1] == 224  # the cfg would be wrong here
    assert spec.input_size == [32, 32] and model.input_size == (32, 32)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 3)  # grey 28x28 in, resized to 32 inside


@pytest.mark.parametrize(
    "name, kwargs, px, converted",
    [
        ("vit_tiny_patch16_224", TINY_VIT, 28, 1),
        ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)), 32, 1),  # stem only, not 2x2 downsamples
        ("resnet18", {}, 32, 0),  # a 7x7 stride-2 stem is no patchify conv
    ],
)
def test_patchify_as_matmul_is_the_same_function(name: str, kwargs: dict, px: int, converted: int) -> None:
    """The stem's matrix-product form: same state-dict keys, logits, input gradient and weight gradients."""
    torch.manual_seed(0)
    fast = build(ModelSpec(name, dict(kwargs), 5)).eval()
    slow = copy.deepcopy(fast)
    assert patchify_as_matmul(slow, enable=False) == converted
    assert slow.state_dict().keys() == fast.state_dict().keys()
    x = torch.rand(3, fast.in_chans, px, px)
    grads = []
    for model in (fast, slow):
        xi = x.clone().requires_grad_(True)
        model.zero_grad()
        logits = model(xi)
        logits.square().sum().backward()
        grads.append((logits.detach(), xi.grad, {n: p.grad for n, p in model.named_parameters()}))
    (l1, g1, w1), (l2, g2, w2) = grads
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)
    for n in w1:
        torch.testing.assert_close(w1[n], w2[n], atol=1e-4, rtol=1e-4, msg=n)
    assert patchify_as_matmul(slow) == converted  # and back


def test_convnets_are_built_channels_last(tmp_path: Path) -> None:
    """ConvNets get channels-last weights (same function); a checkpoint and a resumed optimiser state made
    from them continue bit-identically; a ViT keeps its layout."""
    from advtransfer.config import TrainConfig
    from advtransfer.train import load_state, make_optimizer, make_scheduler, save_state

    assert not is_convnet(_built(0).backbone)  # a ViT: its patchify stem does not count

    def resnet() -> tuple[Classifier, ModelSpec]:
        torch.manual_seed(0)
        spec = ModelSpec("resnet18", {}, 5, input_size=[32, 32])
        return build(spec), spec

    model, spec = resnet()
    assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval()
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(model.eval()(x), plain(x), atol=1e-5, rtol=1e-4)
    save_checkpoint(model, spec, tmp_path / "r.safetensors")
    back, _ = load_classifier(tmp_path / "r.safetensors")
    assert torch.equal(back(x), model(x)) and back.backbone.conv1.weight.is_contiguous(
        memory_format=torch.channels_last
    )

    cfg = TrainConfig(epochs=1, batch_size=4)

    def steps(m: Classifier, opt, n: int) -> None:
        m.train()
        for _ in range(n):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()

    opt = make_optimizer(model, cfg)
    steps(model, opt, 1)
    save_state(tmp_path / "state.safetensors", model, opt, make_scheduler(opt, cfg, 1), {"epoch": 0, "step": 1})
    fresh, _ = resnet()
    opt2 = make_optimizer(fresh, cfg)
    load_state(tmp_path / "state.safetensors", fresh, opt2, make_scheduler(opt2, cfg, 1))
    torch.manual_seed(1)
    steps(model, opt, 2)
    torch.manual_seed(1)
    steps(fresh, opt2, 2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_patch_conv_crops_like_a_strided_conv() -> None:
    """Inputs not divisible by the patch: the conv drops the remainder rows/columns, so must the product."""
    conv = torch.nn.Conv2d(2, 6, kernel_size=(7, 5), stride=(7, 5))
    ref = conv(x := torch.rand(2, 2, 30, 23))
    assert patchify_as_matmul(conv) == 1 and ref.shape == (2, 6, 4, 4)
    torch.testing.assert_close(conv(x), ref, atol=1e-5, rtol=1e-5)


def test_input_size_and_mean_from_pretrained_cfg_otherwise() -> None:
    spec = ModelSpec("test_efficientnet", {}, 5)
    model = build(spec)
    assert spec.input_size == [160, 160] and model.input_size == (160, 160)
    assert spec.mean == pytest.approx([0.485, 0.456, 0.406]) and spec.std == pytest.approx([0.229, 0.224, 0.225])
    seen = []
    model.backbone.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        model.eval()(torch.rand(2, 3, 32, 32))
    assert seen == [(2, 3, 160, 160)]
    explicit = ModelSpec("test_efficientnet", {}, 5, input_size=[64, 64])
    seen.clear()
    m2 = build(explicit).eval()
    m2.backbone.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        m2(torch.rand(1, 3, 32, 32))
    assert seen == [(1, 3, 64, 64)]


def test_build_errors() -> None:
    with pytest.raises(UserError, match="unknown timm backbone 'no_such_net'"):
        build(ModelSpec("no_such_net", {}, 10))
    with pytest.raises(UserError, match="bad kwargs for vit_tiny_patch16_224"):
        build(ModelSpec("vit_tiny_patch16_224", {**TINY_VIT, "no_such_kwarg": 1}, 10))
    with pytest.raises(UserError, match="mean/std need 1 values"):
        build(ModelSpec("vit_tiny_patch16_224", dict(TINY_VIT), 10, mean=[0.5, 0.5], std=[0.5, 0.5]))


# ----------------------------------------------------------------------------- our checkpoints


@pytest.mark.parametrize("method, options", [("full", {}), ("lora", {"rank": 2})])
def test_checkpoint_round_trip(tmp_path: Path, method: str, options: dict) -> None:
    spec = _spec()
    spec.mean, spec.std = [0.25], [0.75]
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


def test_read_spec_needs_our_metadata(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(UserError, match="no advtransfer metadata"):
        read_spec(path)


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


# ----------------------------------------------------------------------------- foreign weights


def _assert_backbone_loaded(target: Classifier, source: Classifier, head_before: dict) -> None:
    src = source.backbone.state_dict()
    for k, v in target.backbone.state_dict().items():
        if k.startswith("head."):
            assert torch.equal(v, head_before[k]), f"{k}: head must not be loaded"
        else:
            assert torch.equal(v, src[k]), f"{k} was not loaded"


def _head(model: Classifier) -> dict:
    return {k: v.clone() for k, v in model.backbone.state_dict().items() if k.startswith("head.")}


def test_load_from_our_safetensors_skips_head(tmp_path: Path) -> None:
    source, spec = _built(1, num_classes=5), _spec(5)
    build(spec)  # fills mean/std/input size into the spec
    path = tmp_path / "src.safetensors"
    save_checkpoint(source, spec, path)
    target = _built(2, num_classes=10)
    head = _head(target)
    assert not torch.equal(target.backbone.pos_embed, source.backbone.pos_embed)
    load_backbone_weights(target, path)
    _assert_backbone_loaded(target, source, head)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}},
        lambda sd: {"model": sd, "epoch": 3},
    ],
    ids=["plain", "state_dict+module", "model"],
)
def test_load_from_pth(tmp_path: Path, wrap) -> None:
    source = _built(1, num_classes=1000)
    path = tmp_path / "src.pth"
    torch.save(wrap(source.backbone.state_dict()), path)
    target = _built(2)
    head = _head(target)
    load_backbone_weights(target, path)
    _assert_backbone_loaded(target, source, head)


def test_load_headless_source(tmp_path: Path) -> None:
    """A feature-extractor checkpoint (no head at all) loads: the head is skipped, not required."""
    source = _built(1, num_classes=0)
    assert not any(k.startswith("head.") for k in source.backbone.state_dict())
    path = tmp_path / "feat.pth"
    torch.save(source.backbone.state_dict(), path)
    target = _built(2)
    head = _head(target)
    load_backbone_weights(target, path)
    _assert_backbone_loaded(target, source, head)


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda sd: sd.pop("blocks.1.mlp.fc2.weight"), r"missing keys: blocks\.1\.mlp\.fc2\.weight"),
        (lambda sd: sd.update({"blocks.2.norm1.weight": torch.ones(32)}), r"unexpected keys: blocks\.2\.norm1\.weight"),
        (
            lambda sd: sd.update({"pos_embed": torch.zeros(1, 10, 32)}),
            r"shape mismatch: pos_embed \(1, 10, 32\) vs \(1, 17, 32\)",
        ),
    ],
    ids=["missing", "unexpected", "shape"],
)
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_key_problems_are_named(tmp_path: Path, edit, pattern: str, suffix: str) -> None:
    sd = dict(_built(1).backbone.state_dict())
    edit(sd)
    path = tmp_path / f"bad{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    target = _built(2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(UserError, match=pattern):
        load_backbone_weights(target, path)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # nothing half-loaded


def test_wrong_architecture_lists_many(tmp_path: Path) -> None:
    path = tmp_path / "wide.pth"
    torch.save(_built(1, embed_dim=48, num_heads=2).backbone.state_dict(), path)
    with pytest.raises(UserError, match=r"shape mismatch: .*\(\+\d+ more\)"):
        load_backbone_weights(_built(2), path)


class _Touch:
    """A pickle whose loading runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class _Open:
    """A pickle whose loading opens (creates) a marker file for writing, no shell involved."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("payload", [_Touch, _Open])
@pytest.mark.parametrize("fmt", ["torch-zip", "raw-pickle"])
def test_malicious_pth_is_refused(tmp_path: Path, payload, fmt: str) -> None:
    marker = tmp_path / "PWNED"
    obj = {"state_dict": {"pos_embed": torch.zeros(1)}, "extra": payload(marker)}
    path = tmp_path / "evil.pth"
    if fmt == "torch-zip":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    assert not marker.exists()
    with pytest.raises(UserError, match="refused: it needs unsafe unpickling"):
        load_backbone_weights(_built(0), path)
    with pytest.raises(UserError, match="refused"):
        read_state(path)
    assert not marker.exists(), "the pickle ran code"


def test_truncated_files(tmp_path: Path, tiny_vit: Classifier, tiny_spec: ModelSpec) -> None:
    build(tiny_spec)
    good = tmp_path / "good.safetensors"
    save_checkpoint(tiny_vit, tiny_spec, good)
    raw = good.read_bytes()
    for cut in (len(raw) // 2, len(raw) - 1, 40, 4):
        bad = tmp_path / "cut.safetensors"
        bad.write_bytes(raw[:cut])
        with pytest.raises(UserError, match="checkpoint: .*cut.safetensors"):
            load_backbone_weights(_built(1), bad)
        with pytest.raises(UserError, match="checkpoint: .*cut.safetensors"):
            load_classifier(bad)
    pth = tmp_path / "cut.pth"
    torch.save(tiny_vit.backbone.state_dict(), pth)
    pth.write_bytes(pth.read_bytes()[:1000])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_backbone_weights(_built(1), pth)


def test_read_state_other_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="file not found"):
        read_state(tmp_path / "nope.pth")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(UserError, match="unsupported file type '.npz'"):
        read_state(tmp_path / "w.npz")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(UserError, match="no state dict of tensors"):
        read_state(tmp_path / "meta.pth")


# ----------------------------------------------------------------------------- atomic writes


def test_atomic_write_cleans_up_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out" / "ck.safetensors"

    def broken(tmp: str) -> None:
        Path(tmp).write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert list((tmp_path / "out").iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, lambda tmp: (Path(tmp).write_bytes(b"new"), (_ for _ in ()).throw(KeyboardInterrupt())))
    assert target.read_bytes() == b"old"  # the previous file survives a failed write
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["ck.safetensors"]
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"new"))
    assert target.read_bytes() == b"new"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["ck.safetensors"]
