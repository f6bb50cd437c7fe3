"""Every finetuning method (and every supported peft tuner) on tiny timm models: the contracts of methods.py.

The paper's own code had two silent bugs (LoRA with both factors zero, so it never trained; an adapter with
everything zero, so only one bias learned). These tests pin, for every method in the registry: identity at
init, non-zero gradients for every trainable parameter, frozen parameters untouched, the trainable-parameter
count of the method's formula (derived here from the architecture's dims, not from the code under test),
RoLI head loading, checkpoint round trips, and that PEFT parameters are inside the attack's graph.

Models are tiny (a 2-block 32-dim ViT on 28x28 grey images, and similarly small Swin / ResNet / ConvNeXt), so
the whole file runs in seconds on a shared CPU.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from advtransfer import methods
from advtransfer.attacks import Threat, pgd
from advtransfer.checkpoints import load_classifier, load_head, save_checkpoint
from advtransfer.config import TrainConfig
from advtransfer.errors import UserError
from advtransfer.methods import METHODS, TUNERS, apply_method, count, method_table, trainable
from advtransfer.methods.peft_tuners import merge_tuners
from advtransfer.models import ModelSpec, build
from advtransfer.train import make_optimizer, train_step

# peft's notes on adjusted block sizes, its optional CUDA kernels and RandLoRA's regenerated bases
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:peft")

C = 10  # classes
D, DEPTH, H = 32, 2, 64  # tiny ViT: embed dim, blocks, MLP hidden (mlp_ratio 2)
TINY = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=D, depth=DEPTH, num_heads=2, mlp_ratio=2.0)

# backbone, kwargs, input size (native resolution, so the Classifier does not resize), channels
ARCHS = {
    "vit": ("vit_tiny_patch16_224", TINY, 28, 1),
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=32, patch_size=2, embed_dim=24, depths=(1, 1), num_heads=(1, 1), window_size=4),
        32,
        3,
    ),
    # zero_init_last=False: timm zero-initialises the last BN scale of every residual block of a *scratch*
    # ResNet, which blocks all gradient to that block's convs (a property of this random init, not of a
    # method; pretrained weights never have it). With it, every block-conv tuner would show zero gradients.
    "resnet": (
        "resnet18",
        dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8, zero_init_last=False),
        32,
        3,
    ),
    "convnext": ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)), 32, 3),  # 1x1-conv MLPs
}


def _variants() -> dict[str, tuple[str, dict]]:
    """The method registry, with ``peft`` expanded over every supported tuner and ``vpt`` shallow and deep."""
    out = {}
    for name in METHODS:
        if name == "peft":
            out.update({f"peft-{t}": ("peft", {"tuner": t}) for t in TUNERS})
        elif name == "vpt":
            out["vpt-shallow"] = ("vpt", {"deep": False})
            out["vpt-deep"] = ("vpt", {"deep": True})
        else:
            out[name] = (name, {})
    return out


VARIANTS = _variants()
IDS = list(VARIANTS)

# Where a method cannot apply, it must say so with a UserError (never fail obscurely or silently).
NOT_APPLICABLE = {
    "vit": set(),
    "swin": set(),
    "convnext": {"vpt-shallow", "vpt-deep", "peft-fourierft", "peft-randlora"},  # convs; those two are Linear-only
    "resnet": {
        "vpt-shallow",
        "vpt-deep",
        "adapter",  # no transformer MLP
        "peft-oft",  # peft's OFT is not the identity at init on k>1 convs
        "peft-fourierft",
        "peft-randlora",
    },
}

THREAT = Threat(0.1, "Linf", 2)


# ----------------------------------------------------------------------------- helpers


def make(arch: str = "vit", seed: int = 0) -> tuple[nn.Module, ModelSpec]:
    backbone, kwargs, size, _ = ARCHS[arch]
    torch.manual_seed(seed)
    spec = ModelSpec(backbone, dict(kwargs), C, input_size=[size, size])
    return build(spec), spec


def data(arch: str = "vit", n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    _, _, size, chans = ARCHS[arch]
    g = torch.Generator().manual_seed(123)
    return torch.rand(n, chans, size, size, generator=g), torch.randint(0, C, (n,), generator=g)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def applied(arch: str, vid: str, seed: int = 0) -> tuple[nn.Module, ModelSpec]:
    model, spec = make(arch, seed)
    name, options = VARIANTS[vid]
    apply_method(model, name, dict(options))
    spec.method = {"name": name, "options": dict(options)}
    return model, spec


def train_two_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    cfg = TrainConfig()
    opt = make_optimizer(model, cfg)
    for _ in range(2):
        train_step(model, opt, x, y, THREAT, cfg)


@functools.cache
def trained(arch: str, vid: str):
    """(model after two adversarial steps, its spec, every parameter before training). Tests only read it."""
    model, spec = applied(arch, vid)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = data(arch)
    torch.manual_seed(1)
    train_two_steps(model, x, y)
    return model, spec, before


def training_problems(model: nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    """What breaks the training contract: trainable without gradient or not moved; frozen but changed."""
    problems = []
    for n, p in model.named_parameters():
        if p.requires_grad:
            if p.grad is None or not p.grad.abs().sum() > 0:
                problems.append(f"zero gradient: {n}")
            if torch.equal(p, before[n]):
                problems.append(f"did not move: {n}")
        elif not torch.equal(p, before[n]):
            problems.append(f"frozen but changed: {n}")
    return problems


# ----------------------------------------------------------------------------- the registry


def test_variants_cover_the_registry():
    assert {name for name, _ in VARIANTS.values()} == set(METHODS)
    assert {o["tuner"] for n, o in VARIANTS.values() if n == "peft"} == set(TUNERS)
    assert "vera" not in TUNERS  # refused with a reason: UNSUPPORTED_TUNERS, docs/methods.md


# ----------------------------------------------------------------------------- identity at init


@pytest.mark.parametrize("vid", [v for v in IDS if not v.startswith("vpt")])
def test_identity_at_init(vid):
    base, _ = make()
    x, _ = data()
    ref = logits(base, x)
    model = copy.deepcopy(base)
    name, options = VARIANTS[vid]
    apply_method(model, name, dict(options))
    torch.testing.assert_close(logits(model, x), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_zero_prompts_is_identity_and_prompts_are_dropped(deep):
    # VPT cannot be the identity at init: prompt tokens join every softmax attention. So: with no prompts
    # the model is unchanged; with prompts the logits change, yet the blocks hand the head the base's tokens.
    base, _ = make()
    x, _ = data()
    ref = logits(base, x)
    zero = copy.deepcopy(base)
    apply_method(zero, "vpt", {"num_prompts": 0, "deep": deep})
    torch.testing.assert_close(logits(zero, x), ref, rtol=0, atol=1e-6)

    prompted = copy.deepcopy(base)
    apply_method(prompted, "vpt", {"num_prompts": 5, "deep": deep})
    xn = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert prompted.backbone.forward_features(xn).shape == base.backbone.forward_features(xn).shape
    assert not torch.allclose(logits(prompted, x), ref, atol=1e-4)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("vid", IDS)
def test_two_adversarial_steps_train_every_trainable_and_nothing_else(vid):
    # Two steps, not one: with LoRA's B = 0 (adapter: up = 0; RandLoRA: lambda = 0) the partner factor's
    # gradient is exactly zero on step 1; step 1 moves B, so on step 2 every factor has a gradient.
    # The paper's bug (both LoRA factors zero) gives both factors zero gradient forever: this test would fail
    # at any number of steps (see test_paper_bugs_are_caught).
    model, _, before = trained("vit", vid)
    assert trainable(model), "no trainable parameters"
    assert training_problems(model, before) == []


def test_paper_bugs_are_caught():
    """The check above fails on the paper's two bugs: LoRA with A = B = 0, an adapter with everything zero."""
    x, y = data()
    lora, _ = applied("vit", "lora")
    for n, p in lora.named_parameters():
        if "lora_A" in n:
            nn.init.zeros_(p)
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    train_two_steps(lora, x, y)
    assert any("lora_A" in s and "zero gradient" in s for s in training_problems(lora, before))

    ad, _ = applied("vit", "adapter")
    for mod in ad.modules():
        if isinstance(mod, methods.adapters.Adapter):
            nn.init.zeros_(mod.down.weight)
            nn.init.zeros_(mod.down.bias)
    before = {n: p.detach().clone() for n, p in ad.named_parameters()}
    train_two_steps(ad, x, y)
    assert any("down" in s and "zero gradient" in s for s in training_problems(ad, before))


# ----------------------------------------------------------------------------- parameter counts


def _vit_total() -> int:
    n_patches = (28 // 7) ** 2
    embed = 1 * 7 * 7 * D + D + D + (1 + n_patches) * D  # patch conv + bias, class token, position embedding
    block = 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + 2 * D + (D * H + H) + (H * D + D)
    return embed + DEPTH * block + 2 * D + D * C + C


def _vit_biases() -> int:
    per_block = D + 3 * D + D + D + H + D  # norm1, qkv, proj, norm2, fc1, fc2
    return D + DEPTH * per_block + D + C  # patch embed, blocks, final norm, head


# (in, out) of the targeted linears of one block: attn.qkv, attn.proj, mlp.fc1, mlp.fc2
LAYERS = [(D, 3 * D), (D, D), (D, H), (H, D)]
HEAD = D * C + C
R = 8  # default ranks: lora (ours and peft's), loha, hra


def _expected_count(vid: str) -> int:
    per_block = {
        "linear": 0,
        "lora": sum(R * (i + o) for i, o in LAYERS),  # r*(d+3d) + r*(d+d) + r*(d+h) + r*(h+d)
        "peft-lora": sum(R * (i + o) for i, o in LAYERS),
        "adapter": 2 * D * 64 + 64 + D,  # down (d*b + b) + up (b*d + d), b = 64
        "peft-loha": sum(2 * R * (i + o) for i, o in LAYERS),  # two rank-r pairs per layer
        "peft-ia3": 3 * D + D + H + H,  # output scales of qkv, proj, fc1; input scale of fc2 (feed-forward)
        "peft-oft": sum(i // 32 * (32 * 31 // 2) for i, _ in LAYERS),  # 32x32 skew-symmetric blocks
        "peft-boft": sum(i * 4 + o for i, o in LAYERS),  # in/4 blocks of 4x4, one output scale per row
        "peft-fourierft": 4 * min(1000, D * D),  # n_frequency spectral coefficients per layer
        "peft-hra": sum(R * i for i, _ in LAYERS),  # r Householder vectors of size d_in
        "vpt-deep": 10 * D,  # 10 prompts of dim d in every block
    }
    if vid == "full":
        return _vit_total()
    if vid == "bias":
        return _vit_biases() + D * C
    if vid == "vpt-shallow":
        return 10 * D + HEAD
    return DEPTH * per_block[vid] + HEAD


# lokr and randlora: their factor shapes follow peft-internal factorisation rules (no closed form worth
# re-deriving here); their counts appear in method_table and their training is checked above.
@pytest.mark.parametrize("vid", [v for v in IDS if v not in ("peft-lokr", "peft-randlora")])
def test_trainable_count_matches_formula(vid):
    model, _ = applied("vit", vid)
    assert count(model) == _expected_count(vid)
    assert count(model, only_trainable=False) >= _vit_total()


# ----------------------------------------------------------------------------- RoLI and checkpoints


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A linear-probed tiny ViT checkpoint with a non-default head (what RoLI's stage 1 leaves)."""
    model, spec = make(seed=7)
    apply_method(model, "linear")
    spec.method = {"name": "linear", "options": {}}
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_()
    path = tmp_path_factory.mktemp("stage1") / "best.safetensors"
    save_checkpoint(model, spec, path)
    return path, {k: v.clone() for k, v in model.head.state_dict().items()}


@pytest.mark.parametrize("vid", IDS)
def test_roli_head_loaded_from_stage1(vid, stage1):
    path, head = stage1
    model, _ = applied("vit", vid, seed=3)
    assert not torch.equal(model.head.weight, head["weight"])
    load_head(model, path)
    got = {k[len(model.head_prefix) :]: v for k, v in model.state_dict().items() if k.startswith(model.head_prefix)}
    assert got.keys() == head.keys()
    for k in head:
        assert torch.equal(got[k], head[k]), k
    assert all(p.requires_grad for p in model.head.parameters())  # the loaded head trains in stage 2


@pytest.mark.parametrize("vid", IDS)
def test_checkpoint_round_trip(vid, tmp_path):
    model, spec, _ = trained("vit", vid)  # trained: method weights differ from any fresh init
    save_checkpoint(model, spec, tmp_path / "m.safetensors")
    loaded, loaded_spec = load_classifier(tmp_path / "m.safetensors")
    assert loaded_spec.method == spec.method
    x, _ = data()
    torch.testing.assert_close(logits(loaded, x), logits(model, x), rtol=0, atol=0)
    assert count(loaded) == count(model)


# ----------------------------------------------------------------------------- other architectures


@pytest.mark.parametrize("arch", ["swin", "resnet", "convnext"])
@pytest.mark.parametrize("vid", IDS)
def test_other_architectures(arch, vid, tmp_path):
    if vid in NOT_APPLICABLE[arch]:
        model, _ = make(arch)
        name, options = VARIANTS[vid]
        with pytest.raises(UserError, match="method: "):
            apply_method(model, name, dict(options))
        return
    base, _ = make(arch)
    x, _ = data(arch)
    model, spec, before = trained(arch, vid)
    fresh, _ = applied(arch, vid)
    if not vid.startswith("vpt"):  # prompts join attention: VPT is not the identity at init (its own tests)
        torch.testing.assert_close(logits(fresh, x), logits(base, x), rtol=0, atol=1e-6)  # identity at init
    assert training_problems(model, before) == []
    save_checkpoint(model, spec, tmp_path / "m.safetensors")
    loaded, _ = load_classifier(tmp_path / "m.safetensors")
    torch.testing.assert_close(logits(loaded, x), logits(model, x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- merging and the attack graph


@pytest.mark.parametrize("arch,vid", [("vit", "lora"), ("resnet", "lora"), *[("vit", f"peft-{t}") for t in TUNERS]])
def test_merge_tuners_keeps_logits(arch, vid):
    from peft.tuners.tuners_utils import BaseTunerLayer

    model, _ = applied(arch, vid)
    with torch.no_grad():
        for n, p in trainable(model):
            if not n.startswith(model.head_prefix):
                p.add_(0.05 * torch.randn_like(p))  # a non-trivial update to fold in
    x, _ = data(arch)
    ref = logits(model, x)
    assert not torch.allclose(ref, logits(make(arch)[0], x), atol=1e-4)
    merge_tuners(model)
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    torch.testing.assert_close(logits(model, x), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("vid,key", [("vpt-shallow", "prompts"), ("vpt-deep", "prompts"), ("lora", "lora_B")])
def test_attack_sees_method_parameters(vid, key):
    model, _ = applied("vit", vid)
    x, y = data()

    def attack():
        torch.manual_seed(0)
        return pgd(model, x, y, Threat(0.1, "Linf", 3))

    first = attack()
    assert torch.equal(attack(), first)  # deterministic for a fixed seed
    with torch.no_grad():
        for n, p in model.named_parameters():
            if key in n:
                p.add_(torch.randn_like(p))
    assert not torch.equal(attack(), first)
    assert all(p.grad is None for p in model.parameters())  # the attack leaves no parameter gradients


# ----------------------------------------------------------------------------- table and errors


def test_method_table_lists_every_method():
    table = method_table("vit_tiny_patch16_224", dict(TINY), C)
    labels = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    expected = [m for m in METHODS if m != "peft"] + [f"peft:{t}" for t in TUNERS if t != "lora"]
    assert sorted(labels[1:]) == sorted(expected)
    assert "not supported" not in table
    assert f"| linear | {HEAD:,} |" in table


@pytest.mark.parametrize(
    "name,options,match",
    [
        ("nope", {}, "unknown method"),
        ("lora", {"rnk": 4}, "bad options"),
        ("adapter", {"bottleneck": 8, "dim": 3}, "bad options"),
        ("vpt", {"prompts": 3}, "bad options"),
        ("linear", {"rank": 4}, "bad options"),
        ("peft", {"tuner": "nope"}, "unknown peft tuner"),
        ("peft", {"tuner": "loha", "bogus": 1}, "bad options"),
        ("peft", {"tuner": "vera"}, "not supported"),
        ("lora", {"targets": ["no_such_layer"]}, "no module"),
        ("peft", {"tuner": "boft", "targets": ["attn"]}, "nn.Linear or nn.Conv2d"),
        ("peft", {"tuner": "oft", "r": 2, "oft_block_size": 16}, "peft tuner oft"),
        ("vpt", {"num_prompts": -1}, "num_prompts"),
        ("adapter", {"bottleneck": 0}, "bottleneck"),
    ],
)
def test_bad_method_or_option_is_user_error(name, options, match):
    model, _ = make()
    with pytest.raises(UserError, match=match):
        apply_method(model, name, options)


def test_oft_refuses_wide_convs_because_it_is_not_identity():
    """Pin the reason OFT is refused on ResNets: peft's OFT Conv2d is not the identity at init for k > 1.

    If a peft upgrade fixes this, this test fails: then lift the refusal in ``methods._check_layers``.
    """
    import peft

    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=False))
    x = torch.randn(1, 4, 6, 6)
    ref = conv(x)
    peft.inject_adapter_in_model(peft.OFTConfig(target_modules=["0"], oft_block_size=4), conv)
    assert not torch.allclose(conv(x), ref, atol=1e-3)


@pytest.mark.parametrize(
    "options,expected",
    [
        ({"tuner": "oft", "r": 1}, sum(i * (i - 1) // 2 for i, _ in LAYERS)),  # one block as wide as the layer
        ({"tuner": "fourierft", "n_frequency": 50}, 4 * 50),
        ({"tuner": "boft", "boft_block_size": 2}, sum(i * 2 + o for i, o in LAYERS)),
        ({"tuner": "loha", "r": 2}, sum(2 * 2 * (i + o) for i, o in LAYERS)),
    ],
)
def test_user_options_override_tuner_defaults(options, expected):
    base, _ = make()
    x, _ = data()
    model = copy.deepcopy(base)
    apply_method(model, "peft", options)
    assert count(model) == DEPTH * expected + HEAD
    torch.testing.assert_close(logits(model, x), logits(base, x), rtol=0, atol=1e-6)


def test_train_mode_keeps_frozen_subtrees_in_eval():
    """Frozen parts (BatchNorm statistics, dropout) stay in eval() while the trainable parts train."""
    from torch import nn

    from advtransfer.train import train_mode

    frozen_block = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Dropout())
    mixed = nn.Sequential(nn.Linear(4, 4), nn.Dropout(), nn.Linear(4, 4))
    model = nn.Sequential(frozen_block, mixed, nn.Dropout())
    for p in [*frozen_block.parameters(), *mixed[0].parameters()]:
        p.requires_grad_(False)
    model.eval()
    train_mode(model)
    assert model.training and mixed.training and mixed[1].training and mixed[2].training and model[2].training
    assert not any(m.training for m in frozen_block.modules()) and not mixed[0].training
    for p in model.parameters():  # everything frozen: the whole model evaluates
        p.requires_grad_(False)
    train_mode(model)
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize(
    "method, options, drops",
    [
        ("full", {}, True),
        ("linear", {}, False),
        ("lora", {"rank": 2, "alpha": 2, "dropout": 0.1, "parts": "qv"}, False),
        ("adapter", {"reduction": 8}, False),
        ("bias", {"contains": True}, False),
        ("vpt", {"num_prompts": 2, "deep": True, "dropout": 0.1}, False),
    ],
)
def test_drop_path_acts_in_full_ft_only(method, options, drops):
    """The paper preset's Swin drop path 0.5 regularises Full-FT; a PEFT method trains inside blocks whose drop path
    must stay off (the official code keeps the backbone in eval), while the method's own dropout still acts."""
    from timm.layers import DropPath

    from advtransfer.train import train_mode

    kw = dict(img_size=56, patch_size=4, window_size=7, embed_dim=16, depths=(1, 1), num_heads=(1, 2))
    spec = ModelSpec("swin_tiny_patch4_window7_224", {**kw, "drop_path_rate": 0.5}, 3, mean=[0.5] * 3, std=[0.5] * 3)
    model = apply_method(build(spec), method, options)
    train_mode(model)
    paths = [m.training for m in model.modules() if isinstance(m, DropPath)]
    assert len(paths) == 2 and all(t == drops for t in paths)
    own = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]  # the backbone's have p = 0
    assert all(m.training for m in own) and (method != "lora" or own)


@pytest.mark.parametrize("method, options", [("vpt", {"num_prompts": 2, "deep": True}), ("full", {})])
def test_weight_decay_rules(method, options):
    """ "matrices": ndim >= 2 without VPT prompts or timm's no-decay tokens; "non-bias": the paper code's name rule,
    under which norm weights and prompts decay too and no bias (relative-position tables included) does."""
    kw = dict(img_size=56, patch_size=4, window_size=7, embed_dim=16, depths=(1, 1), num_heads=(1, 2))
    model = apply_method(
        build(ModelSpec("swin_tiny_patch4_window7_224", kw, 3, mean=[0.5] * 3, std=[0.5] * 3)), method, options
    )
    names = {id(p): n for n, p in model.named_parameters()}
    for rule in ("matrices", "non-bias"):
        decay, keep = make_optimizer(model, TrainConfig(weight_decay=0.01, decay_on=rule)).param_groups
        assert decay["weight_decay"] == 0.01 and keep["weight_decay"] == 0.0
        decayed = {names[id(p)] for p in decay["params"]}
        trains = {n for n, p in model.named_parameters() if p.requires_grad}
        assert decayed | {names[id(p)] for p in keep["params"]} == trains
        if rule == "non-bias":
            assert decayed == {n for n in trains if "bias" not in n}
        else:
            assert all(model.get_parameter(n).ndim >= 2 and "prompt" not in n for n in decayed)
        prompts = {n for n in trains if "prompt" in n}
        assert bool(prompts) == (method == "vpt")
        assert (prompts <= decayed) == (rule == "non-bias" or not prompts)
        norms = {n for n in trains if "norm" in n and n.endswith("weight")}
        assert (norms <= decayed) == (rule == "non-bias" or not norms)
