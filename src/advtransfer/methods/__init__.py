"""Finetuning methods as module surgery on one unmodified timm model: ``fn(model, **options)`` changes a ``Classifier``
in place and sets ``requires_grad`` on exactly what it trains (the head always trains). Every method but ``vpt`` is
the identity at init; where a method does not apply (``vpt`` off ViT/Swin, ``adapter`` without MLPs) it is a
``UserError``. The peft tuners, the adapter and VPT live in ``peft_tuners.py``, ``adapters.py`` and ``prompts.py``."""

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


METHODS: dict[str, Callable[..., None]] = dict(
    linear=linear, full=full, bias=bias, lora=lora, peft=peft_tuner, adapter=adapter, vpt=vpt
)


def apply_method(model: Classifier, name: str, options: dict | None = None) -> Classifier:
    """Apply method ``name`` with ``options`` to ``model`` in place; unknown names/options are ``UserError``."""
    if name not in METHODS:
        raise UserError(f"method: unknown method {name!r}; known: {', '.join(METHODS)}")
    try:
        inspect.signature(METHODS[name]).bind(model, **(options or {}))
    except TypeError as e:
        raise UserError(f"method: bad options for {name}: {e}") from None
    METHODS[name](model, **(options or {}))
    return model


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count(model: nn.Module, only_trainable: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not only_trainable)


def method_table(backbone: str, kwargs: dict, num_classes: int, options: dict | None = None) -> str:
    """Markdown table of each method's (and each peft tuner's) trainable parameters on ``backbone``; ``options`` go to
    every method that takes them (e.g. ``rank`` for lora, ``num_prompts`` for vpt)."""
    takes = {name: inspect.signature(fn).parameters for name, fn in METHODS.items()}
    unknown = set(options or {}) - {k for params in takes.values() for k in params}
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
        opts = {**opts, **{k: v for k, v in (options or {}).items() if k in takes[name]}}
        torch.manual_seed(0)
        model = build(ModelSpec(backbone, dict(kwargs), num_classes))
        try:
            n = count(apply_method(model, name, opts))
            lines.append(f"| {label} | {n:,} | {100 * n / base:.3f} |")
        except UserError as e:
            lines.append(f"| {label} | not supported | {str(e).split(': ', 1)[-1][:100]} |")
    return "\n".join(lines)
