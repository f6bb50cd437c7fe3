"""peft tuners injected in place into one unmodified timm model (``peft.inject_adapter_in_model``), each checked to be
the identity at init and to survive a safetensors round trip (``tests/test_methods.py``), and LoRA on slices of a
fused ``qkv`` projection (the paper's LoRA on q and v), which peft cannot target."""

import math
import re

import torch
from torch import nn

from ..errors import UserError
from ..models import Classifier

DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # transformer linears
CONV_TARGETS = ("conv1", "conv2", "conv3")  # ResNet-style blocks, used when no transformer linear exists
TUNERS = ("lora", "loha", "lokr", "ia3", "oft", "boft", "fourierft", "hra", "randlora")
UNSUPPORTED_TUNERS = {
    "vera": "peft refuses to inject VeRA in place (its shared random projections live on the tuner object, "
    "which only get_peft_model keeps); wrapping the model in a PeftModel would break the one-model contract",
}
LINEAR_ONLY = ("fourierft", "randlora")  # peft implements these for nn.Linear only


def _target_regex(model: Classifier, targets: tuple[str, ...] | list[str] | None) -> str:
    """A full-match regex over module names; by default the transformer linears, else ResNet convs."""
    names = [n for n, _ in model.backbone.named_modules()]
    for cand in [targets] if targets else [DEFAULT_TARGETS, CONV_TARGETS]:
        rx = rf"(?!{re.escape(model.head_name)}$)(.*\.)?({'|'.join(re.escape(t) for t in cand)})"
        if any(re.fullmatch(rx, n) for n in names):
            return rx
    raise UserError(
        f"method: no module of {type(model.backbone).__name__} matches targets {list(targets or DEFAULT_TARGETS)}"
    )


def _tuner_defaults(tuner: str, layers: dict[str, nn.Module], options: dict) -> dict:
    """Default options that make ``tuner`` valid on these layers and the identity at init (user options win)."""
    if tuner == "ia3":  # the MLP's second linear is the feed-forward layer whose *input* is scaled (as in the paper)
        return {"feedforward_modules": r"(.*\.)?mlp\.fc2"}
    if tuner == "oft" and "r" in options and "oft_block_size" not in options:  # peft wants exactly one of the two
        return {"oft_block_size": 0}
    if tuner == "boft" and "boft_block_num" not in options:  # the largest divisor (<= 4, peft's) of every fan-in
        fan_ins = [
            m.in_channels * math.prod(m.kernel_size) if isinstance(m, nn.Conv2d) else m.in_features
            for m in layers.values()
        ]
        g = math.gcd(*fan_ins)
        return {"boft_block_size": max(b for b in (1, 2, 3, 4) if g % b == 0)}
    if tuner == "fourierft":  # peft's random spectrum is not the identity; at most one frequency per weight entry
        return {"init_weights": True, "n_frequency": min(1000, min(m.weight.numel() for m in layers.values()))}
    if tuner == "randlora":  # peft saves one basis shared by every layer (safetensors refuses); regenerated on load
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
    """Inject a peft tuner into the backbone's ``targets``; ``options`` go to its peft config (over our defaults)."""
    import peft  # slow to import: only when a tuner is used

    if tuner in UNSUPPORTED_TUNERS:
        raise UserError(f"method: peft tuner {tuner} is not supported: {UNSUPPORTED_TUNERS[tuner]}")
    if tuner not in TUNERS:
        raise UserError(f"method: unknown peft tuner {tuner!r}; known: {', '.join(TUNERS)}")
    rx = _target_regex(model, targets)
    layers = {n: m for n, m in model.backbone.named_modules() if re.fullmatch(rx, n)}
    _check_layers(tuner, layers)
    options = {**_tuner_defaults(tuner, layers, options), **options}
    try:
        config = peft.PEFT_TYPE_TO_CONFIG_MAPPING[tuner.upper()](target_modules=rx, **options)
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
    model.freeze()
    for p in model.parameters():
        if id(p) not in before:
            p.requires_grad_(True)


def lora(
    model: Classifier,
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    targets: list[str] | None = None,
    parts: str = "",
) -> None:
    """LoRA: ``W + (alpha/rank) B A``, A random (Kaiming), B zero, on ``targets`` through peft. ``parts`` (e.g. "qv")
    instead puts one LoRA per named slice of every fused ``attn.qkv`` projection (the paper's LoRA on q and v)."""
    if not parts:
        peft_tuner(model, "lora", targets, r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=True)
        return
    if set(parts) - set("qkv") or rank < 1:
        raise UserError(f"method: lora parts must be letters of 'qkv' and rank >= 1, got {parts!r}, {rank}")
    fused = [(n, m) for n, m in model.backbone.named_modules() if n.endswith("attn.qkv") and isinstance(m, nn.Linear)]
    if not fused:
        raise UserError(
            f"method: lora parts={parts!r} needs fused attn.qkv projections; {type(model.backbone).__name__} has none"
        )
    model.freeze()
    for name, layer in fused:
        parent, _, attr = name.rpartition(".")
        setattr(model.backbone.get_submodule(parent), attr, SliceLoRA(layer, parts, rank, alpha / rank, dropout))


class SliceLoRA(nn.Module):
    """A frozen fused ``qkv`` linear plus a LoRA update on some of its thirds: ``y[part] += s B_p A_p dropout(x)``."""

    def __init__(self, base: nn.Linear, parts: str, rank: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.base, self.parts, self.scale, self.drop = base, parts, scale, nn.Dropout(dropout)
        dim = base.out_features // 3
        self.lora_A = nn.ParameterDict({p: nn.Parameter(torch.empty(rank, base.in_features)) for p in parts})
        self.lora_B = nn.ParameterDict({p: nn.Parameter(torch.zeros(dim, rank)) for p in parts})
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # peft's (and nn.Linear's) default for A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, h = self.base(x), self.drop(x)
        thirds = list(y.chunk(3, dim=-1))
        for p in self.parts:
            i = "qkv".index(p)
            thirds[i] = thirds[i] + self.scale * (h @ self.lora_A[p].t().to(h.dtype)) @ self.lora_B[p].t().to(h.dtype)
        return torch.cat(thirds, dim=-1)


def merge_tuners(model: Classifier) -> Classifier:
    """Fold peft tuner weights into the base layers (identical logits) and remove the wrappers in place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.backbone.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, attr = name.rpartition(".")
            setattr(model.backbone.get_submodule(parent), attr, module.get_base_layer())
    return model
