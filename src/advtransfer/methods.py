"""Finetuning methods as module surgery on one unmodified timm model.

Each method is a function ``fn(model, **options)`` that changes ``model`` (a ``Classifier``) in place and
sets ``requires_grad`` on exactly the parameters it trains; the classifier head always trains. Frozen
parameters have ``requires_grad=False`` so autograd never does work for them.

| method  | trains (besides the head)                                   | identity at init |
|---------|-------------------------------------------------------------|------------------|
| linear  | nothing                                                     | yes              |
| full    | everything                                                  | yes              |
| bias    | every bias term                                             | yes              |
| lora    | LoRA factors (peft) on attn.qkv/attn.proj/mlp.fc1/mlp.fc2   | yes (B = 0)      |
| peft    | any peft tuner for nn.Linear/Conv2d, by ``tuner`` name      | tuner-dependent  |
| adapter | bottleneck residual after each block's MLP (up = 0)         | yes              |
| vpt     | prompt tokens after the class token (shallow or deep)       | no: prompts join attention |

VPT cannot be the identity at init: its prompt tokens take part in every softmax attention. Its
tests check instead that the base tokens are untouched with zero prompts and that prompts are dropped
before the head.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable

import torch
from torch import nn

from .errors import UserError
from .models import Classifier

DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # transformer linears
CONV_TARGETS = ("conv1", "conv2", "conv3")  # ResNet-style blocks, used when no transformer linear exists


def _freeze(model: Classifier) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.head.parameters():
        p.requires_grad_(True)


def linear(model: Classifier) -> None:
    """Linear probing: only the head trains."""
    _freeze(model)


def full(model: Classifier) -> None:
    """Full finetuning: every parameter trains."""
    for p in model.parameters():
        p.requires_grad_(True)


def bias(model: Classifier) -> None:
    """Bias tuning (BitFit): every bias term and the head train."""
    _freeze(model)
    for name, p in model.backbone.named_parameters():
        if name.endswith("bias"):
            p.requires_grad_(True)


# ----------------------------------------------------------------------------- peft tuners


def _peft_configs() -> dict[str, type]:
    import peft

    return {
        "lora": peft.LoraConfig,
        "loha": peft.LoHaConfig,
        "lokr": peft.LoKrConfig,
        "ia3": peft.IA3Config,
        "oft": peft.OFTConfig,
        "boft": peft.BOFTConfig,
        "vera": peft.VeraConfig,
        "fourierft": peft.FourierFTConfig,
        "hra": peft.HRAConfig,
        "randlora": peft.RandLoraConfig,
    }


TUNERS = ("lora", "loha", "lokr", "ia3", "oft", "boft", "vera", "fourierft", "hra", "randlora")


def _target_regex(model: Classifier, targets: tuple[str, ...] | list[str] | None) -> str:
    """A full-match regex over module names; by default the transformer linears, else ResNet convs."""
    names = [n for n, _ in model.backbone.named_modules()]
    head = next(n for n, m in model.backbone.named_modules() if m is model.head)
    for cand in [targets] if targets else [DEFAULT_TARGETS, CONV_TARGETS]:
        alts = "|".join(re.escape(t) for t in cand)
        rx = rf"(?!{re.escape(head)}$)(.*\.)?({alts})"
        if any(re.fullmatch(rx, n) for n in names):
            return rx
    raise UserError(
        f"method: no module of {type(model.backbone).__name__} matches targets {list(targets or DEFAULT_TARGETS)}"
    )


def peft_tuner(model: Classifier, tuner: str = "lora", targets: list[str] | None = None, **options) -> None:
    """Inject any peft tuner into the backbone's linears (names in ``targets``); its new weights + head train.

    ``options`` go to the tuner's peft config (e.g. ``r``, ``lora_alpha`` for LoRA; ``r`` for LoHa).
    """
    import peft

    configs = _peft_configs()
    if tuner not in configs:
        raise UserError(f"method: unknown peft tuner {tuner!r}; known: {', '.join(configs)}")
    try:
        config = configs[tuner](target_modules=_target_regex(model, targets), **options)
    except (TypeError, ValueError) as e:
        raise UserError(f"method: bad options for peft tuner {tuner}: {str(e).splitlines()[0]}") from None
    before = {id(p) for p in model.parameters()}
    peft.inject_adapter_in_model(config, model.backbone)
    _freeze(model)
    for p in model.parameters():
        if id(p) not in before:
            p.requires_grad_(True)


def lora(
    model: Classifier, rank: int = 8, alpha: float = 16, dropout: float = 0.0, targets: list[str] | None = None
) -> None:
    """LoRA through peft: ``W + (alpha/rank) B A``, A random (Kaiming), B zero, on ``targets``."""
    peft_tuner(model, "lora", targets, r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=True)


def merge_tuners(model: Classifier) -> Classifier:
    """Fold peft tuner weights into the base layers (identical logits) and remove the wrappers in place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.backbone.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent = model.backbone.get_submodule(name.rpartition(".")[0]) if "." in name else model.backbone
            setattr(parent, name.rpartition(".")[2], module.get_base_layer())
    return model


# ----------------------------------------------------------------------------- adapter


class Adapter(nn.Module):
    """``y = mlp(x); y + scale * up(act(down(y)))`` — up zero-initialised (identity at init), down random."""

    def __init__(self, mlp: nn.Module, dim: int, bottleneck: int, scale: float) -> None:
        super().__init__()
        self.mlp = mlp
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim)
        self.scale = scale
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(x)
        return y + self.scale * self.up(self.act(self.down(y)))


def adapter(model: Classifier, bottleneck: int = 64, scale: float = 1.0) -> None:
    """Houlsby-style bottleneck adapter after every transformer block's MLP; adapters + head train."""
    _freeze(model)
    mlps = [(n, m) for n, m in model.backbone.named_modules() if n.endswith("mlp") and hasattr(m, "fc2")]
    if not mlps:
        raise UserError(
            f"method: adapter needs transformer blocks with an 'mlp'; {type(model.backbone).__name__} has none"
        )
    for name, mlp in mlps:
        parent, _, attr = name.rpartition(".")
        owner = model.backbone.get_submodule(parent) if parent else model.backbone
        dim = mlp.fc2.out_features if hasattr(mlp.fc2, "out_features") else mlp.fc2.out_channels
        wrapped = Adapter(mlp, dim, bottleneck, scale)
        setattr(owner, attr, wrapped)
        for p in (*wrapped.down.parameters(), *wrapped.up.parameters()):
            p.requires_grad_(True)


# ----------------------------------------------------------------------------- VPT


class Prompted(nn.Module):
    """A ViT block with prompt tokens after the prefix (class/register) tokens.

    ``insert``: add the prompts (first block); otherwise replace the previous block's prompts (deep VPT);
    ``prompts=None`` passes the previous prompts through (shallow VPT); ``drop``: remove them after the block.
    """

    def __init__(
        self, block: nn.Module, prompts: nn.Parameter | None, n_prefix: int, n_prompts: int, insert: bool, drop: bool
    ):
        super().__init__()
        self.block, self.prompts = block, prompts
        self.n_prefix, self.n_prompts, self.insert, self.drop = n_prefix, n_prompts, insert, drop

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        a, n = self.n_prefix, self.n_prompts
        if self.prompts is not None:
            p = self.prompts.to(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :a], p, x[:, a if self.insert else a + n :]], dim=1)
        x = self.block(x, **kwargs)
        return torch.cat([x[:, :a], x[:, a + n :]], dim=1) if self.drop else x


def vpt(model: Classifier, num_prompts: int = 10, deep: bool = True) -> None:
    """Visual prompt tuning (Jia et al. 2022) on a timm VisionTransformer by wrapping its blocks."""
    import timm.models.vision_transformer as vit

    bb = model.backbone
    if not isinstance(bb, vit.VisionTransformer):
        raise UserError(
            f"method: vpt supports timm VisionTransformer backbones only, not {type(bb).__name__} "
            "(Swin's windowed attention has no place for extra tokens without forking the model)"
        )
    if num_prompts < 0:
        raise UserError(f"method: vpt num_prompts must be >= 0, got {num_prompts}")
    _freeze(model)
    dim = bb.embed_dim
    pe = bb.patch_embed.proj
    fan = pe.in_channels * math.prod(pe.kernel_size) + dim
    bound = math.sqrt(6.0 / fan)  # VPT's uniform init over the patch-embedding fan
    blocks = list(bb.blocks)
    wrapped = []
    for i, blk in enumerate(blocks):
        p = None
        if i == 0 or deep:
            p = nn.Parameter(torch.empty(1, num_prompts, dim).uniform_(-bound, bound))
        wrapped.append(Prompted(blk, p, bb.num_prefix_tokens, num_prompts, insert=i == 0, drop=i == len(blocks) - 1))
    bb.blocks = nn.Sequential(*wrapped)


# ----------------------------------------------------------------------------- registry

METHODS: dict[str, Callable[..., None]] = {
    "linear": linear,
    "full": full,
    "bias": bias,
    "lora": lora,
    "peft": peft_tuner,
    "adapter": adapter,
    "vpt": vpt,
}


def apply_method(model: Classifier, name: str, options: dict | None = None) -> Classifier:
    """Apply method ``name`` with ``options`` to ``model`` in place; unknown names/options are ``UserError``."""
    if name not in METHODS:
        raise UserError(f"method: unknown method {name!r}; known: {', '.join(METHODS)}")
    fn = METHODS[name]
    try:
        inspect.signature(fn).bind(model, **(options or {}))
    except TypeError as e:
        raise UserError(f"method: bad options for {name}: {e}") from None
    fn(model, **(options or {}))
    return model


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count(model: nn.Module, only_trainable: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not only_trainable)


def method_table(backbone: str, kwargs: dict, num_classes: int) -> str:
    """Markdown table of each method's (and each peft tuner's) trainable parameters on ``backbone``."""
    from .models import ModelSpec, build

    rows = [(name, name, {}) for name in METHODS if name != "peft"]
    rows += [(f"peft:{t}", "peft", {"tuner": t}) for t in TUNERS if t != "lora"]
    base = count(build(ModelSpec(backbone, dict(kwargs), num_classes)), only_trainable=False)
    lines = [
        f"Trainable parameters on {backbone} {kwargs or ''} with a {num_classes}-class head "
        f"(backbone + head: {base:,} parameters; default options)",
        "",
        "| method | trainable | % of model |",
        "|---|---:|---:|",
    ]
    for label, name, opts in rows:
        torch.manual_seed(0)
        model = build(ModelSpec(backbone, dict(kwargs), num_classes))
        try:
            apply_method(model, name, opts)
            n = count(model)
            lines.append(f"| {label} | {n:,} | {100 * n / base:.3f} |")
        except UserError as e:
            lines.append(f"| {label} | not supported | {str(e).split(': ', 1)[-1][:70]} |")
    return "\n".join(lines)
