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
| peft    | a peft tuner (``tuner`` option, see below)                  | yes (see below)  |
| adapter | bottleneck residual after each block's MLP (up = 0)         | yes              |
| vpt     | prompt tokens in attention (ViT, Swin), shallow or deep     | no: prompts join attention |

VPT cannot be the identity at init: its prompt tokens take part in every softmax attention. Its
tests check instead that with zero prompts the model is unchanged, and where prompts go (``vpt``).

Where methods apply: every method works on timm ViTs and Swins; on ConvNeXt all but ``vpt`` (needs a
``VisionTransformer`` or ``SwinTransformer``); on ResNets ``linear``, ``full``, ``bias``, ``lora`` and the
conv-capable tuners (targets ``conv1/conv2/conv3``), not ``adapter`` (no MLP) nor ``vpt``. Where a method does
not apply it raises ``UserError``.

peft tuners (``TUNERS``), injected in place with ``peft.inject_adapter_in_model`` on the targets
(default: the transformer linears, else the ResNet convs). Each was checked (``tests/test_methods.py``) to be
the identity at init (logits within 1e-6), to give every new parameter a non-zero gradient and move it
within two adversarial training steps, and to survive a safetensors save/load round trip bit-exactly:

| tuner     | defaults set here (peft's otherwise)                        | layers            |
|-----------|-------------------------------------------------------------|-------------------|
| lora      | —                                                           | Linear, Conv2d    |
| loha      | —                                                           | Linear, Conv2d    |
| lokr      | —                                                           | Linear, Conv2d    |
| ia3       | ``feedforward_modules`` = ``mlp.fc2`` (peft has no default)  | Linear, Conv2d    |
| oft       | — (block size 32, adjusted per layer by peft)               | Linear, 1x1 Conv2d|
| boft      | ``boft_block_size`` = largest divisor <= 4 of every fan-in  | Linear, Conv2d    |
| fourierft | ``init_weights=True`` (zero spectrum: identity at init), ``n_frequency`` <= smallest weight | Linear |
| hra       | —                                                           | Linear, Conv2d    |
| randlora  | ``save_projection=False`` (bases regenerated from their seed) | Linear          |

(``oft``: giving ``r`` alone sets ``oft_block_size=0``, since peft takes exactly one of the two.)

Not supported:
- ``vera``: peft refuses ``inject_adapter_in_model`` for VeRA (its shared random projections are state of
  the tuner object, kept only by ``get_peft_model``'s ``PeftModel`` wrapper, which would break the
  one-model contract). Asking for it is a ``UserError`` that says so.
- ``oft`` on convolutions larger than 1x1 (ResNets): peft's OFT ``Conv2d`` rotates unfolded patches and
  folds them back with ``F.fold``, which sums overlapping patches, so even the zero rotation changes the
  output (not identity at init). Refused with a ``UserError``; 1x1 convs (ConvNeXt MLPs) are fine.
- ``fourierft`` and ``randlora`` on convolutions: peft implements them for ``nn.Linear`` only (``UserError``).
- peft's default FourierFT (random spectrum) is not the identity at init; RandLoRA's default
  (``save_projection=True``) stores one basis tensor shared by all layers, which safetensors refuses to save.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.models import swin_transformer as swin
from timm.models import vision_transformer as vit
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
        "fourierft": peft.FourierFTConfig,
        "hra": peft.HRAConfig,
        "randlora": peft.RandLoraConfig,
    }


TUNERS = ("lora", "loha", "lokr", "ia3", "oft", "boft", "fourierft", "hra", "randlora")
UNSUPPORTED_TUNERS = {
    "vera": "peft refuses to inject VeRA in place (its shared random projections live on the tuner object, "
    "which only get_peft_model keeps); wrapping the model in a PeftModel would break the one-model contract",
}
LINEAR_ONLY = ("fourierft", "randlora")  # peft implements these for nn.Linear only


def _target_regex(model: Classifier, targets: tuple[str, ...] | list[str] | None) -> str:
    """A full-match regex over module names; by default the transformer linears, else ResNet convs."""
    names = [n for n, _ in model.backbone.named_modules()]
    head = model.head_name
    for cand in [targets] if targets else [DEFAULT_TARGETS, CONV_TARGETS]:
        alts = "|".join(re.escape(t) for t in cand)
        rx = rf"(?!{re.escape(head)}$)(.*\.)?({alts})"
        if any(re.fullmatch(rx, n) for n in names):
            return rx
    raise UserError(
        f"method: no module of {type(model.backbone).__name__} matches targets {list(targets or DEFAULT_TARGETS)}"
    )


def _fan_in(layer: nn.Module) -> int:
    """The input dimension a peft rotation acts on: ``in_features``, or ``in_channels * kh * kw`` for a conv."""
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels * math.prod(layer.kernel_size)
    return layer.in_features


def _tuner_defaults(tuner: str, layers: dict[str, nn.Module], options: dict) -> dict:
    """Default options that make ``tuner`` valid on these layers and the identity at init (user options win).

    - ia3: the MLP's second linear (``mlp.fc2``) is the feed-forward layer whose *input* is scaled (as in the paper).
    - oft: giving ``r`` alone means ``oft_block_size=0`` (peft wants exactly one of the two).
    - boft: block size = the largest divisor (<= 4, peft's default) of every target's fan-in.
    - fourierft: zero spectrum (peft's default is random, which is not the identity at init) and at most as many
      frequencies as the smallest target weight has entries (peft's default 1000).
    - randlora: the random bases are not saved (peft stores one tensor shared by every layer, which safetensors
      refuses); peft regenerates them from ``projection_prng_key`` with torch's CPU generator when a checkpoint
      is loaded (the round trip is bit-exact, tested).
    """
    if tuner == "ia3":
        return {"feedforward_modules": r"(.*\.)?mlp\.fc2"}
    if tuner == "oft" and "r" in options and "oft_block_size" not in options:
        return {"oft_block_size": 0}
    if tuner == "boft" and "boft_block_num" not in options:
        g = math.gcd(*(_fan_in(m) for m in layers.values()))
        return {"boft_block_size": max(b for b in (1, 2, 3, 4) if g % b == 0)}
    if tuner == "fourierft":
        smallest = min(m.weight.numel() for m in layers.values())
        return {"init_weights": True, "n_frequency": min(1000, smallest)}
    if tuner == "randlora":
        return {"save_projection": False}
    return {}


def _check_layers(tuner: str, layers: dict[str, nn.Module]) -> None:
    """Refuse layer types a tuner cannot handle (peft would fail obscurely, or, for OFT, silently)."""
    other = [f"{n} ({type(m).__name__})" for n, m in layers.items() if not isinstance(m, (nn.Linear, nn.Conv2d))]
    if other:
        raise UserError(f"method: peft targets must be nn.Linear or nn.Conv2d layers, not {other[0]}")
    convs = [n for n, m in layers.items() if isinstance(m, nn.Conv2d)]
    if tuner in LINEAR_ONLY and convs:
        raise UserError(f"method: peft tuner {tuner} supports nn.Linear only, but targets convolutions ({convs[0]})")
    wide = [n for n in convs if math.prod(layers[n].kernel_size) > 1]
    if tuner == "oft" and wide:
        # peft's OFT Conv2d rotates unfolded patches and folds them back, which sums overlapping patches:
        # for a kernel larger than 1x1 even the zero rotation changes the output (measured: not identity at init)
        raise UserError(f"method: peft's OFT is not the identity at init on convolutions larger than 1x1 ({wide[0]})")


def peft_tuner(model: Classifier, tuner: str = "lora", targets: list[str] | None = None, **options) -> None:
    """Inject any peft tuner into the backbone's linears (names in ``targets``); its new weights + head train.

    ``options`` go to the tuner's peft config (e.g. ``r``, ``lora_alpha`` for LoRA; ``r`` for LoHa) and override
    the defaults of ``_tuner_defaults``.
    """
    import peft

    configs = _peft_configs()
    if tuner in UNSUPPORTED_TUNERS:
        raise UserError(f"method: peft tuner {tuner} is not supported: {UNSUPPORTED_TUNERS[tuner]}")
    if tuner not in configs:
        raise UserError(f"method: unknown peft tuner {tuner!r}; known: {', '.join(configs)}")
    rx = _target_regex(model, targets)
    layers = {n: m for n, m in model.backbone.named_modules() if re.fullmatch(rx, n)}
    _check_layers(tuner, layers)
    options = {**_tuner_defaults(tuner, layers, options), **options}
    try:
        config = configs[tuner](target_modules=rx, **options)
    except (TypeError, ValueError) as e:
        raise UserError(f"method: bad options for peft tuner {tuner}: {str(e).splitlines()[0]}") from None
    if tuner != "lora":  # BOFT, HRA, ... view conv weights as NCHW-contiguous: undo build's channels-last
        model.backbone.to(memory_format=torch.contiguous_format)
    before = {id(p) for p in model.parameters()}
    try:
        peft.inject_adapter_in_model(config, model.backbone)
    except (TypeError, ValueError) as e:
        raise UserError(
            f"method: peft tuner {tuner} cannot be applied to {type(model.backbone).__name__} with {options}: "
            f"{str(e).strip().splitlines()[0]}"
        ) from None
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
    """``y = mlp(x); y + scale * up(act(down(y)))`` — up zero-initialised (identity at init), down random.

    ``conv=True`` for MLPs of 1x1 convolutions on ``NCHW`` maps (ConvNeXt with ``conv_mlp``): down/up are then
    1x1 convolutions too, with the same parameters as the linear version.
    """

    def __init__(self, mlp: nn.Module, dim: int, bottleneck: int, scale: float, conv: bool = False) -> None:
        super().__init__()
        self.mlp = mlp
        self.down = nn.Conv2d(dim, bottleneck, 1) if conv else nn.Linear(dim, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Conv2d(bottleneck, dim, 1) if conv else nn.Linear(bottleneck, dim)
        self.scale = scale
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(x)
        return y + self.scale * self.up(self.act(self.down(y)))


def adapter(model: Classifier, bottleneck: int = 64, scale: float = 1.0) -> None:
    """Houlsby-style bottleneck adapter after every transformer block's MLP; adapters + head train."""
    if bottleneck < 1:
        raise UserError(f"method: adapter bottleneck must be >= 1, got {bottleneck}")
    _freeze(model)
    mlps = [(n, m) for n, m in model.backbone.named_modules() if n.endswith("mlp") and hasattr(m, "fc2")]
    if not mlps:
        raise UserError(
            f"method: adapter needs transformer blocks with an 'mlp'; {type(model.backbone).__name__} has none"
        )
    for name, mlp in mlps:
        parent, _, attr = name.rpartition(".")
        owner = model.backbone.get_submodule(parent) if parent else model.backbone
        conv = isinstance(mlp.fc2, nn.Conv2d)
        dim = mlp.fc2.out_channels if conv else mlp.fc2.out_features
        wrapped = Adapter(mlp, dim, bottleneck, scale, conv=conv)
        setattr(owner, attr, wrapped)
        for p in (*wrapped.down.parameters(), *wrapped.up.parameters()):
            p.requires_grad_(True)


# ----------------------------------------------------------------------------- VPT


class _Prompted(nn.Module):
    """A wrapped block that owns (or passes on) prompt tokens; prompt dropout is per sample, in training only."""

    def __init__(self, block: nn.Module, prompts: nn.Parameter | None, dropout: float) -> None:
        super().__init__()
        self.block, self.prompts, self.dropout = block, prompts, dropout

    def draw(self, x: torch.Tensor) -> torch.Tensor:
        """This block's prompts for the batch ``x``: ``(B, P, C)``."""
        return F.dropout(self.prompts.to(x.dtype).expand(x.shape[0], -1, -1), self.dropout, self.training)


class Prompted(_Prompted):
    """A ViT block with prompt tokens after the prefix (class/register) tokens.

    ``insert``: add the prompts (first block); otherwise replace the previous block's prompts (deep VPT);
    ``prompts=None`` passes the previous prompts through (shallow VPT); ``drop``: remove them after the block.
    """

    def __init__(
        self,
        block: nn.Module,
        prompts: nn.Parameter | None,
        n_prefix: int,
        n_prompts: int,
        insert: bool,
        drop: bool,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(block, prompts, dropout)
        self.n_prefix, self.n_prompts, self.insert, self.drop = n_prefix, n_prompts, insert, drop

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        a, n = self.n_prefix, self.n_prompts
        if self.prompts is not None:
            x = torch.cat([x[:, :a], self.draw(x), x[:, a if self.insert else a + n :]], dim=1)
        x = self.block(x, **kwargs)
        return torch.cat([x[:, :a], x[:, a + n :]], dim=1) if self.drop else x


class PromptedWindowAttention(swin.WindowAttention):
    """timm's window attention (class swapped in place, same weights) with ``prompts`` as extra tokens.

    While ``prompts`` (``(B, P, C)``, set by ``SwinPrompted``) is a tensor, every window of sample b gets b's
    prompts prepended: they join its keys and values (and queries) with zero relative-position bias and zero
    shift mask in their rows and columns. After the call ``prompts`` holds their outputs, averaged over b's windows.
    """

    prompts: torch.Tensor | None = None

    def _get_rel_pos_bias(self) -> torch.Tensor:
        n = 0 if self.prompts is None else self.prompts.shape[1]
        return F.pad(super()._get_rel_pos_bias(), (n, 0, n, 0))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.prompts is None:
            return super().forward(x, mask)
        (b, n), nw = self.prompts.shape[:2], x.shape[0] // self.prompts.shape[0]  # windows are batch-major
        x = torch.cat([self.prompts.to(x.dtype).repeat_interleave(nw, 0), x], 1)
        y = super().forward(x, None if mask is None else F.pad(mask, (n, 0, n, 0)))
        self.prompts = y[:, :n].unflatten(0, (b, nw)).mean(1)
        return y[:, n:]


class SwinPrompted(_Prompted):
    """A timm Swin block (NHWC) carrying prompt tokens: ``(x, prompts) -> (x, prompts)``.

    The first block takes the patch grid alone; ``prompts=None`` passes the previous prompts through (shallow).
    Patch tokens follow timm's block exactly, with the prompts (after ``norm1``) in every window's attention;
    prompt tokens get the same residual attention + MLP update. ``last``: return all tokens as one NHWC row
    ``(B, 1, P + H*W, C)``, so the final norm and average pool include the prompts.
    """

    def __init__(self, block: nn.Module, prompts: nn.Parameter | None, dropout: float, last: bool) -> None:
        super().__init__(block, prompts, dropout)
        self.last = last
        block.attn.__class__ = PromptedWindowAttention

    def forward(self, xp: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | tuple:
        x, p = xp if isinstance(xp, tuple) else (xp, None)
        p, blk = (p if self.prompts is None else self.draw(x)), self.block
        blk.attn.prompts = blk.norm1(p)
        x = blk(x)
        p, blk.attn.prompts = p + blk.attn.prompts, None  # no drop path: the frozen block stays in eval mode
        p = p + blk.mlp(blk.norm2(p))
        return torch.cat([p, x.flatten(1, 2)], 1).unsqueeze(1) if self.last else (x, p)


class PromptedMerging(nn.Module):
    """timm's patch merging, carrying the prompts on: each enters as a 2x2 patch of copies of itself (as VPT)."""

    def __init__(self, merge: nn.Module) -> None:
        super().__init__()
        self.merge = merge

    def forward(self, xp: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        (x, p), m = xp, self.merge
        return m(x), m.reduction(m.norm(p.repeat(1, 1, 4)))


def vpt(model: Classifier, num_prompts: int = 10, deep: bool = True, dropout: float = 0.0) -> None:
    """Visual prompt tuning (Jia et al. 2022) on a timm ViT or Swin by wrapping its blocks; prompts + head train.

    Args:
        num_prompts: prompt tokens per block (deep) or in all (shallow); the paper uses 10 (20 for CUB).
        deep: new prompts in every block (VPT-Deep), else only before the first block, carried on (shallow).
        dropout: prompt dropout, per sample, in training only (the paper: 0.1).

    Init uniform ±sqrt(6 / (in_chans·patch² + embed_dim)). ViT: prompts after the class token, dropped after the
    last block. Swin follows the official VPT-Swin (KMnP/vpt) exactly in: prompts after ``norm1`` join every
    window's attention (shifted too) with zero relative-position bias and zero shift mask in their rows and
    columns; their outputs are averaged over the windows and get the block's residual + MLP; deep: every block
    of every stage has its own (``num_prompts`` x Σ block dims parameters: 120,320 on Swin-B); shallow: carried
    through patch merging as 2x2 patches of copies; the last block's prompts enter the final norm and average
    pool. Equivalent, not identical: (1) prompt outputs are averaged over each sample's own windows; the
    official code averages a (windows, batch) view of batch-major windows, mixing samples when both exceed 1
    (so deep VPT on Swin-B at 224 px agrees exactly: its last stage has one window); (2) its deep prompts after
    the first block share one dropout mask across the batch, here each sample draws its own; (3)
    ``forward_features`` returns the tokens as one NHWC row ``(B, 1, P + H*W, C)``, not ``(B, H, W, C)``.
    """
    bb = model.backbone
    if not isinstance(bb, (vit.VisionTransformer, swin.SwinTransformer)):
        raise UserError(f"method: vpt supports timm VisionTransformer and SwinTransformer, not {type(bb).__name__}")
    if type(num_prompts) is not int or num_prompts < 0:
        raise UserError(f"method: vpt num_prompts must be an integer >= 0, got {num_prompts!r}")
    if type(dropout) not in (int, float) or not 0 <= dropout < 1:
        raise UserError(f"method: vpt dropout must be a number in [0, 1), got {dropout!r}")
    _freeze(model)
    pe = bb.patch_embed.proj
    bound = math.sqrt(6.0 / (pe.in_channels * math.prod(pe.kernel_size) + pe.out_channels))

    def new(i: int, dim: int) -> nn.Parameter | None:  # deep: in every block; shallow: in the first only
        if i and not deep:
            return None
        return nn.Parameter(torch.empty(1, num_prompts, dim, device=pe.weight.device).uniform_(-bound, bound))

    if isinstance(bb, vit.VisionTransformer):
        n, a = len(bb.blocks), bb.num_prefix_tokens
        wrap = [
            Prompted(b, new(i, pe.out_channels), a, num_prompts, i == 0, i == n - 1, dropout)
            for i, b in enumerate(bb.blocks)
        ]
        bb.blocks = nn.Sequential(*wrap)
        return
    blocks = [(s, j, b) for s in bb.layers for j, b in enumerate(s.blocks)]
    for i, (stage, j, b) in enumerate(blocks):
        stage.blocks[j] = SwinPrompted(b, new(i, b.dim), dropout, last=i == len(blocks) - 1)
    for stage in bb.layers[1:]:
        stage.downsample = PromptedMerging(stage.downsample)


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
            lines.append(f"| {label} | not supported | {str(e).split(': ', 1)[-1][:100]} |")
    return "\n".join(lines)
