"""The Classifier's preprocessing (channel repeat, resize, normalise), its build, patchify stems, atomic writes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT, tiny

from advtransfer.checkpoints import load_classifier, save_checkpoint
from advtransfer.errors import UserError
from advtransfer.models import Classifier, ModelSpec, build, is_convnet, patchify_as_matmul
from advtransfer.rundir import atomic_write

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
    spec = ModelSpec(
        "vit_tiny_patch16_224",
        dict(img_size=28, patch_size=7, embed_dim=32, depth=1, num_heads=2),
        4,
        mean=[0.1, 0.2, 0.3],
        std=[0.5, 0.6, 0.7],
    )
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

    assert not is_convnet(tiny(0).backbone)  # a ViT: its patchify stem does not count

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
