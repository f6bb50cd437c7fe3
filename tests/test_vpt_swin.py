"""VPT on timm's Swin Transformer (module surgery): exactness of the prompt path, counts, dropout, attacks, CLI.

A tiny Swin (32x32 RGB, patch 2, window 4, dims 16/32, two blocks per stage) has shifted windows in both stages,
a patch merge, and several windows in the last stage, so every part of the prompt path runs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from advtransfer import cli, methods
from advtransfer.attacks import Threat, pgd
from advtransfer.checkpoints import load_classifier, save_checkpoint
from advtransfer.config import TrainConfig
from advtransfer.errors import UserError
from advtransfer.methods import apply_method, count, trainable
from advtransfer.methods import prompts as prompt_layers
from advtransfer.models import ModelSpec, build
from advtransfer.train import make_optimizer, train_mode, train_step

C, P = 10, 3  # classes, prompts per block
DIMS, DEPTHS = (16, 32), (2, 2)
TINY = dict(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=DEPTHS, num_heads=(1, 2))
HEAD = DIMS[-1] * C + C


def make(seed: int = 0, **options) -> tuple[nn.Module, ModelSpec]:
    torch.manual_seed(seed)
    spec = ModelSpec("swin_tiny_patch4_window7_224", dict(TINY), C, input_size=[32, 32])
    model = build(spec).eval()
    if options is not None and options.get("method", True):
        apply_method(model, "vpt", options)
        spec.method = {"name": "vpt", "options": options}
    return model, spec


def base() -> nn.Module:
    return make(method=False)[0]


def data(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, C, (n,), generator=g)


def prompts(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.endswith(".prompts")}


@pytest.mark.parametrize("deep", [True, False])
def test_zero_prompts_is_the_unmodified_model(deep):
    x, _ = data()
    ref = base()
    model, _ = make(num_prompts=0, deep=deep)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
        assert not torch.equal(make(num_prompts=P, deep=deep)[0](x), ref(x))


@pytest.mark.parametrize("deep", [True, False])
def test_every_prompt_gets_a_gradient_and_no_frozen_parameter_does(deep):
    model, _ = make(num_prompts=P, deep=deep)
    x, y = data()
    nn.functional.cross_entropy(model(x), y).backward()
    ps = prompts(model)
    assert len(ps) == (sum(DEPTHS) if deep else 1)
    for name, p in ps.items():
        assert (p.grad.abs().sum(-1) > 0).all(), name  # every prompt token of every block
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {n for n, _ in trainable(model)}


def test_trainable_counts_and_init():
    model = make(num_prompts=P)[0]
    assert count(model) == P * sum(d * n for d, n in zip(DIMS, DEPTHS)) + HEAD
    assert count(make(num_prompts=P, deep=False)[0]) == P * DIMS[0] + HEAD
    values = torch.cat([p.flatten() for p in prompts(model).values()])
    bound = (6 / (3 * 2 * 2 + DIMS[0])) ** 0.5  # VPT: uniform, sqrt(6 / (in_chans * patch^2 + embed_dim))
    assert 0.9 * bound < values.abs().max() <= bound


@pytest.mark.parametrize("tokens,expected", [(10, 120_320), (20, 240_640)])
def test_swin_b_prompt_count(tokens, expected):
    # 10 x (2*128 + 2*256 + 18*512 + 2*1024): the official count. Built on the meta device: no memory, no init.
    model = build(ModelSpec("swin_base_patch4_window7_224", {"device": "meta"}, C))
    apply_method(model, "vpt", {"num_prompts": tokens})
    ps = prompts(model)
    assert len(ps) == 24 and sum(p.numel() for p in ps.values()) == expected
    assert count(model) == expected + 1024 * C + C


@pytest.mark.parametrize("arch", ["swin", "vit"])
def test_prompt_dropout_only_in_training(arch):
    def build_one(dropout: float) -> nn.Module:
        if arch == "swin":
            return make(num_prompts=P, dropout=dropout)[0]
        torch.manual_seed(0)
        vit = build(
            ModelSpec("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2), C)
        )
        apply_method(vit, "vpt", {"num_prompts": P, "dropout": dropout})
        return vit

    x, _ = data()
    plain, dropped = build_one(0.0), build_one(0.5)
    with torch.no_grad():
        ref = plain.eval()(x)
        assert torch.equal(dropped.eval()(x), ref)  # eval: dropout off
        assert torch.equal(dropped(x), ref)
        train_mode(plain)  # the frozen backbone stays in eval (Swin's default drop path 0.1 stays off)
        assert torch.equal(plain(x), ref)
        train_mode(dropped)
        assert not torch.equal(dropped(x), dropped(x))


def _shifted_block() -> tuple[prompt_layers.SwinPrompted, torch.Tensor]:
    model, _ = make(num_prompts=P)
    wrapped = model.backbone.layers[0].blocks[1]
    assert any(wrapped.block.shift_size) and (wrapped.block.attn_mask < 0).any()  # a shifted block, masked
    return wrapped, torch.randn(2, 16, 16, DIMS[0])


def test_shifted_block_attention_against_a_reference():
    """Each window attends over [its sample's prompts after norm1; its tokens] with the relative-position bias
    and shift mask on token pairs and zero for every pair with a prompt; prompts get the mean of their outputs
    over the sample's windows, then the block's MLP, each with a residual."""
    wrapped, x = _shifted_block()
    blk, attn = wrapped.block, wrapped.block.attn
    seen = {}
    attn.register_forward_hook(
        lambda m, a, kw, out: seen.update(x=a[0], mask=kw["mask"], y=out, p=m.prompts), with_kwargs=True
    )
    with torch.no_grad():
        _, p_out = wrapped((x, torch.zeros(2, P, DIMS[0])))  # its own prompts replace the incoming ones (deep)
        pn = blk.norm1(wrapped.prompts).expand(2, -1, -1)
        xw, nw, area, h = seen["x"], seen["mask"].shape[0], seen["x"].shape[1], attn.num_heads
        tokens = torch.cat([pn.repeat_interleave(nw, 0), xw], 1)
        q, k, v = attn.qkv(tokens).unflatten(-1, (3, h, -1)).permute(2, 0, 3, 1, 4)
        rel = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(area, area, h)
        bias = torch.zeros(h, P + area, P + area)
        bias[:, P:, P:] = rel.permute(2, 0, 1)
        mask = torch.zeros(nw, P + area, P + area)
        mask[:, P:, P:] = seen["mask"]
        logits = (q @ k.transpose(-2, -1)) * attn.scale + bias + mask.repeat(2, 1, 1).unsqueeze(1)
        out = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).flatten(2))
        torch.testing.assert_close(seen["y"], out[:, P:], rtol=0, atol=1e-5)
        p_attn = out[:, :P].unflatten(0, (2, nw)).mean(1)
        torch.testing.assert_close(seen["p"], p_attn, rtol=0, atol=1e-5)
        p_mid = wrapped.prompts + p_attn  # the prompts' residual attention + MLP update, as the patch tokens'
        torch.testing.assert_close(p_out, p_mid + blk.mlp(blk.norm2(p_mid)), rtol=0, atol=1e-5)
        attn.prompts = pn
        full = attn._get_rel_pos_bias()[0]
        attn.prompts = None
        assert full[:, :P].eq(0).all() and full[:, :, :P].eq(0).all() and torch.equal(full[:, P:, P:], bias[:, P:, P:])


def test_a_prompt_reaches_every_window_of_a_shifted_block():
    wrapped, x = _shifted_block()
    with torch.no_grad():
        y0, p0 = wrapped((x, None))
        wrapped.prompts[0, 0] += torch.randn(DIMS[0])  # one prompt token (not a constant: norm1 removes it)
        y1, p1 = wrapped((x, None))
    assert (y1 - y0).abs().amax(-1).gt(0).all()  # every token of every window (and sample) changed
    assert not torch.equal(p0, p1)


def test_last_block_prompts_enter_the_final_norm_and_pool():
    model, _ = make(num_prompts=P)
    bb = model.backbone
    x, _ = data()
    with torch.no_grad():
        feats = bb.forward_features((x - model.mean) / model.std)
        assert feats.shape == (3, 1, P + 8 * 8, DIMS[-1])  # P prompts + the 8x8 last-stage grid
        torch.testing.assert_close(bb.forward_head(feats), bb.head.fc(feats.mean((1, 2))), rtol=0, atol=1e-6)
        last = prompts(model)["backbone.layers.1.blocks.1.prompts"]
        ref = model(x)
        last[0, 0] += torch.randn(DIMS[-1])
        assert not torch.allclose(model(x), ref, atol=1e-4)


def test_shallow_prompts_are_carried_through_patch_merging():
    # VPT's shallow Swin: stage-0 prompts, carried block to block; at a merge each enters as a 2x2 patch of itself
    model, _ = make(num_prompts=P, deep=False)
    stages, seen = model.backbone.layers, {}
    stages[0].blocks[-1].register_forward_hook(lambda m, a, out: seen.update(before=out[1]))
    stages[1].blocks[0].register_forward_pre_hook(lambda m, a: seen.update(after=a[0][1]))
    with torch.no_grad():
        model(data()[0])
        merge = stages[1].downsample.merge
        torch.testing.assert_close(seen["after"], merge.reduction(merge.norm(seen["before"].repeat(1, 1, 4))))
    assert seen["after"].shape == (3, P, DIMS[1]) and seen["after"].std(0).gt(0).all()  # per-sample prompts


def test_pgd_and_training_go_through_the_prompts(tmp_path):
    model, spec = make(num_prompts=P, dropout=0.1)
    x, y = data()
    xi = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(model(xi), y), xi)
    assert grad.abs().sum() > 0
    threat = Threat(0.05, "Linf", 3)
    torch.manual_seed(0)
    adv = pgd(model, x, y, threat)
    assert (adv - x).abs().max() <= 0.05 + 1e-6 and not torch.equal(adv, x)
    assert all(p.grad is None for p in model.parameters())

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig()
    opt = make_optimizer(model, cfg)
    for _ in range(2):
        train_step(model, opt, x, y, threat, cfg)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {n for n, _ in trainable(model)}
    torch.manual_seed(0)
    assert not torch.equal(pgd(model, x, y, threat), adv)  # the attack sees the trained prompts

    save_checkpoint(model, spec, tmp_path / "m.safetensors")
    loaded, _ = load_classifier(tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    copy.deepcopy(model)  # no tensors left on the modules between calls


@pytest.mark.parametrize(
    "options,match",
    [
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"num_prompts": -1}, "num_prompts"),
        ({"num_prompts": 2.5}, "num_prompts"),
        ({"dropout": "0.1"}, "dropout"),
    ],
)
def test_bad_options_are_user_errors(options, match):
    with pytest.raises(UserError, match=match):
        make(**options)


def test_other_backbones_are_refused():
    model = build(ModelSpec("resnet18", dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64)), C))
    with pytest.raises(UserError, match="vpt supports timm VisionTransformer and SwinTransformer, not ResNet"):
        apply_method(model, "vpt", {})


def test_cli_methods_lists_vpt_on_swin_b(monkeypatch, capsys):
    # only the vpt row (and the base model): two Swin-B builds instead of sixteen
    monkeypatch.setattr(methods, "METHODS", {"vpt": methods.vpt})
    monkeypatch.setattr(methods, "TUNERS", ())
    assert cli.main(["methods", "--backbone", "swin_base_patch4_window7_224", "--num-classes", "10"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| vpt |")]
    assert len(rows) == 1 and rows[0].startswith(f"| vpt | {120_320 + 1024 * 10 + 10:,} | 0.15")  # prompts + head
