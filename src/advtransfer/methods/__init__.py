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

The peft tuners, the adapter and VPT live in ``peft_tuners.py``, ``adapters.py`` and ``prompts.py`` beside this file.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from ..errors import UserError
from ..models import Classifier, ModelSpec, build
from .adapters import adapter
from .peft_tuners import TUNERS, lora, peft_tuner
from .prompts import vpt


def linear(model: Classifier) -> None:
    """Linear probing: only the head trains."""
    model.freeze()


def full(model: Classifier) -> None:
    """Full finetuning: every parameter trains."""
    for p in model.parameters():
        p.requires_grad_(True)


def bias(model: Classifier, contains: bool = False) -> None:
    """Bias tuning (BitFit): every bias term and the head train. ``contains``: every parameter whose name contains
    "bias", e.g. Swin's ``relative_position_bias_table`` too (the paper's code: 200,760 on Swin-B)."""
    model.freeze()
    for name, p in model.backbone.named_parameters():
        if name.endswith("bias") or (contains and "bias" in name):
            p.requires_grad_(True)


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


def method_table(backbone: str, kwargs: dict, num_classes: int, options: dict | None = None) -> str:
    """Markdown table of each method's (and each peft tuner's) trainable parameters on ``backbone``. ``options`` are
    method options given to every method that takes them (e.g. ``rank`` for lora, ``num_prompts`` for vpt)."""
    unknown = set(options or {}) - {k for fn in METHODS.values() for k in inspect.signature(fn).parameters}
    if unknown:
        raise UserError(f"methods: no method takes the option(s) {sorted(unknown)}")
    rows = [(name, name, {}) for name in METHODS if name != "peft"]
    rows += [(f"peft:{t}", "peft", {"tuner": t}) for t in TUNERS if t != "lora"]
    base = count(build(ModelSpec(backbone, dict(kwargs), num_classes)), only_trainable=False)
    lines = [
        f"Trainable parameters on {backbone} {kwargs or ''} with a {num_classes}-class head (backbone + head: "
        f"{base:,} parameters; options {options or 'default'})",
        "",
        "| method | trainable | % of model |",
        "|---|---:|---:|",
    ]
    for label, name, opts in rows:
        takes = inspect.signature(METHODS[name]).parameters
        opts = {**opts, **{k: v for k, v in (options or {}).items() if k in takes}}
        torch.manual_seed(0)
        model = build(ModelSpec(backbone, dict(kwargs), num_classes))
        try:
            n = count(apply_method(model, name, opts))
            lines.append(f"| {label} | {n:,} | {100 * n / base:.3f} |")
        except UserError as e:
            lines.append(f"| {label} | not supported | {str(e).split(': ', 1)[-1][:100]} |")
    return "\n".join(lines)
