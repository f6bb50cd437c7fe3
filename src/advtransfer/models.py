"""A timm backbone behind its own preprocessing, and safe checkpoint I/O.

``Classifier`` takes ``[0,1]`` images at their native resolution; its first layers repeat grey channels
if the backbone wants RGB, resize to the backbone's input size and normalise with the weights' own
mean/std. So an attack's ε is always in pixel units of the data, never of a normalised or resized copy.

Checkpoints we write are safetensors with a JSON metadata entry ``advtransfer`` (architecture + kwargs,
mean/std, classes, method, how it was trained). Foreign ``.pt/.pth`` state dicts (e.g. ARES-style robust
timm checkpoints) are read only through ``torch.load(weights_only=True)``: a pickle that would run code is
refused. Missing, unexpected and shape-mismatched keys are reported by name, never ignored.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from .errors import UserError
from .rundir import atomic_write  # noqa: F401  (re-exported until every caller imports it from rundir)

META_KEY = "advtransfer"


class Classifier(nn.Module):
    """``[0,1]`` images -> logits: channel repeat, resize, normalise, then an unmodified timm model."""

    def __init__(self, backbone: nn.Module, mean, std, input_size: tuple[int, int], in_chans: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.input_size = tuple(input_size)
        self.in_chans = in_chans

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_chans:
            if x.shape[1] != 1:
                raise UserError(f"model: expects {self.in_chans}-channel images, got {x.shape[1]} channels")
            x = x.expand(-1, self.in_chans, -1, -1)
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        return self.backbone((x - self.mean) / self.std)

    @property
    def head(self) -> nn.Module:
        return self.backbone.get_classifier()

    @property
    def head_name(self) -> str:
        """The head's module name inside ``backbone`` (``head``, ``head.fc``, ``fc``, ...)."""
        return next(n for n, m in self.backbone.named_modules() if m is self.head)


class PatchConv(nn.Conv2d):
    """A patchify convolution (kernel == stride, no padding) computed on CPU as one matrix product.

    Same parameters, state-dict keys and outputs (up to summation order) as the ``nn.Conv2d`` it replaces;
    ``patchify_as_matmul`` swaps the class in place. Every attack step needs the input gradient of the
    image stem, and oneDNN's backward-data for a few-channel patchify conv is slow: forward + input gradient
    as a matrix product is about 7x faster for the mini-ViT stem, 2-3x for ViT-Tiny/16 and ViT-B/16 at 224 px
    (``benchmarks/patch_stem.py``). On other devices the convolution runs unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        (p, q), (b, c, hh, ww) = self.kernel_size, x.shape
        h, w = hh // p, ww // q  # a strided conv drops the remainder rows/columns: so does the crop
        patches = x[..., : h * p, : w * q].reshape(b, c, h, p, w, q).permute(0, 2, 4, 1, 3, 5)
        out = F.linear(patches.reshape(b, h * w, c * p * q), self.weight.reshape(self.out_channels, -1), self.bias)
        return out.view(b, h, w, -1).permute(0, 3, 1, 2)  # NCHW view, like the conv's output


def patchify_as_matmul(model: nn.Module, enable: bool = True) -> int:
    """Turn every image-stem patchify conv (kernel == stride > 1, no padding, dilation or groups, at most 4
    input channels) into a ``PatchConv`` (``enable=False``: back to ``nn.Conv2d``); returns how many.

    Only few-channel stems gain: a ConvNeXt-style 2x2 downsampling of 96 channels is faster as a conv.
    """
    n = 0
    for m in model.modules():
        if enable and type(m) is nn.Conv2d and m.kernel_size == m.stride and min(m.stride) > 1:
            if m.padding in ((0, 0), "valid") and m.dilation == (1, 1) and m.groups == 1 and m.in_channels <= 4:
                m.__class__, n = PatchConv, n + 1
        elif not enable and type(m) is PatchConv:
            m.__class__, n = nn.Conv2d, n + 1
    return n


def is_convnet(model: nn.Module) -> bool:
    """Has a convolution besides a patchify stem (ResNet, ConvNeXt, a hybrid ViT), not a plain ViT/Swin."""
    return any(isinstance(m, nn.Conv2d) and not isinstance(m, PatchConv) for m in model.modules())


@dataclass
class ModelSpec:
    """Everything needed to rebuild a ``Classifier`` (stored as checkpoint metadata)."""

    backbone: str
    kwargs: dict = field(default_factory=dict)
    num_classes: int = 10
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    input_size: list[int] = field(default_factory=list)
    in_chans: int = 3
    classes: list[str] = field(default_factory=list)
    method: dict = field(default_factory=lambda: {"name": "full", "options": {}})
    trained: dict = field(default_factory=dict)  # provenance: dataset, objective, eps, epochs, seed, ...


def create_backbone(name: str, kwargs: dict, num_classes: int, pretrained: bool = False) -> nn.Module:
    """``timm.create_model`` with clear errors for unknown names and bad kwargs."""
    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        raise UserError(f"model: unknown timm backbone {name!r}")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:  # timm asserts on shapes (embed_dim % num_heads, ...)
        why = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model: bad kwargs for {name}: {why}") from None
    except (RuntimeError, OSError) as e:
        if pretrained:
            raise UserError(f"model: cannot load pretrained weights for {name} (needs internet): {e}") from None
        raise


def default_input_size(backbone: nn.Module) -> list[int]:
    pe = getattr(backbone, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None):
        return list(pe.img_size)
    return list(backbone.pretrained_cfg.get("input_size", (3, 224, 224))[-2:])


def build(spec: ModelSpec, pretrained: bool = False) -> Classifier:
    """Build the ``Classifier`` a spec describes, with a fresh head of ``spec.num_classes`` outputs."""
    backbone = create_backbone(spec.backbone, spec.kwargs, spec.num_classes, pretrained)
    in_chans = int(spec.kwargs.get("in_chans", 3))
    if not spec.mean:
        cfg_mean = list(backbone.pretrained_cfg.get("mean", (0.5,) * in_chans))
        cfg_std = list(backbone.pretrained_cfg.get("std", (0.5,) * in_chans))
        spec.mean, spec.std = (cfg_mean, cfg_std) if len(cfg_mean) == in_chans else ([0.5] * in_chans, [0.5] * in_chans)
    if len(spec.mean) != in_chans or len(spec.std) != in_chans:
        raise UserError(
            f"model: mean/std need {in_chans} values for {in_chans}-channel input, got {spec.mean}/{spec.std}"
        )
    spec.input_size = list(spec.input_size or default_input_size(backbone))
    spec.in_chans = in_chans
    patchify_as_matmul(backbone)
    if is_convnet(backbone):  # oneDNN's convolutions are faster on channels-last weights (docs/performance.md)
        backbone.to(memory_format=torch.channels_last)
    return Classifier(backbone, spec.mean, spec.std, tuple(spec.input_size), in_chans)


# ----------------------------------------------------------------------------- writing


def plain_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU tensors that safetensors accepts: one that shares memory with another (tied weights)
    or is a view into a larger storage is cloned; the others are written without a copy."""
    out, seen = {}, set()
    for k, v in state.items():
        v = v.detach().cpu()
        storage = v.untyped_storage()
        whole = v.is_contiguous() and v.storage_offset() == 0 and storage.nbytes() == v.numel() * v.element_size()
        if not whole or (storage.nbytes() and storage.data_ptr() in seen):
            v = v.clone(memory_format=torch.contiguous_format)
        elif storage.nbytes():
            seen.add(storage.data_ptr())
        out[k] = v
    return out


def save_checkpoint(model: Classifier, spec: ModelSpec, path: Path) -> None:
    """Model weights + spec metadata as one safetensors file, written atomically."""
    state = plain_tensors(model.state_dict())
    meta = {META_KEY: json.dumps(spec.__dict__)}
    atomic_write(Path(path), lambda tmp: save_file(state, tmp, metadata=meta))


# ----------------------------------------------------------------------------- reading


def read_spec(path: Path) -> ModelSpec:
    """The metadata of one of our checkpoints."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise UserError(f"checkpoint: {path} is not a readable safetensors file ({e})") from None
    if META_KEY not in meta:
        raise UserError(f"checkpoint: {path} has no advtransfer metadata (not written by advtransfer)")
    try:
        fields = json.loads(meta[META_KEY])
        return ModelSpec(**fields)
    except (ValueError, TypeError) as e:  # not JSON, not a mapping, or keys ModelSpec does not have
        raise UserError(f"checkpoint: {path} has unreadable advtransfer metadata ({e})") from None


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or, safely, ``.pt/.pth`` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint: file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise UserError(f"checkpoint: {path} is truncated or not safetensors ({e})") from None
    if path.suffix not in (".pt", ".pth", ".bin", ".ckpt"):
        raise UserError(f"checkpoint: unsupported file type {path.suffix!r} (use .safetensors, .pt or .pth)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe pickle"
        raise UserError(f"checkpoint: {path} refused: it needs unsafe unpickling ({first[:120]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"checkpoint: {path} is truncated or corrupt ({str(e).splitlines()[0][:120]})") from None
    return unwrap_state_dict(obj, path)


def unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside common wrappers ({'state_dict': ...}, {'model': ...}, DDP 'module.')."""
    for key in ("state_dict", "model", "model_state_dict", "state_dict_ema", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint: {path} holds no state dict of tensors")
    for prefix in ("module.", "model.", "backbone."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def _names(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_keys(target: dict[str, torch.Tensor], source: dict[str, torch.Tensor], path: Path, skip: set[str]) -> None:
    """Raise ``UserError`` naming missing, unexpected and shape-mismatched keys (``skip`` is exempt)."""
    missing = [k for k in target if k not in source and k not in skip]
    unexpected = [k for k in source if k not in target and k not in skip]
    shapes = [
        f"{k} {tuple(source[k].shape)} vs {tuple(target[k].shape)}"
        for k in target
        if k in source and k not in skip and source[k].shape != target[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {_names(shapes, 3)}")
    if problems:
        raise UserError(f"checkpoint: {path} does not fit the model — " + "; ".join(problems))


def load_backbone_weights(model: Classifier, path: Path) -> None:
    """Load source weights into ``model.backbone``, except the classifier head (it belongs to the target task)."""
    source = read_state(path)
    if any(k.startswith("backbone.") for k in source):  # one of ours: drop the preprocessing buffers
        source = {k[len("backbone.") :]: v for k, v in source.items() if k.startswith("backbone.")}
    target = model.backbone.state_dict()
    head_prefix = model.head_name + "."
    head = {k for k in (*target, *source) if k.startswith(head_prefix)}
    check_keys(target, source, path, skip=head)
    state = {k: v for k, v in source.items() if k not in head}
    model.backbone.load_state_dict(state, strict=False)


def load_classifier(path: Path) -> tuple[Classifier, ModelSpec]:
    """Rebuild a whole trained model (backbone, method, head) from one of our checkpoints."""
    from .methods import apply_method

    spec = read_spec(path)
    model = build(spec)
    apply_method(model, spec.method["name"], spec.method.get("options", {}))
    state = read_state(path)
    check_keys(model.state_dict(), state, Path(path), skip=set())
    model.load_state_dict(state)
    return model.eval(), spec
