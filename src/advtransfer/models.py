"""A timm backbone behind its own preprocessing: ``Classifier`` takes ``[0,1]`` images at their native resolution
(so an attack's ε is in pixel units of the data), repeats grey channels, resizes and normalises with the weights'
mean/std; ``ModelSpec`` is what rebuilds it, ``build`` builds it."""

import math
import shutil

import timm
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from torch import nn

from .errors import UserError


class Classifier(nn.Module):
    """``[0,1]`` images -> logits: channel repeat, resize, normalise, then an unmodified timm model."""

    def __init__(self, backbone: nn.Module, mean, std, input_size: tuple[int, int], in_chans: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.input_size, self.in_chans = tuple(input_size), in_chans

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_chans:
            if x.shape[1] != 1:
                raise UserError(f"model: expects {self.in_chans}-channel images, got {x.shape[1]} channels")
            x = x.expand(-1, self.in_chans, -1, -1)
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        return self.backbone((x - self.mean) / self.std)

    def freeze(self) -> None:
        """Every parameter frozen but the head's (what linear probing trains; other methods add theirs)."""
        head = set(self.head.parameters())
        for p in self.parameters():
            p.requires_grad_(p in head)

    @property
    def head(self) -> nn.Module:
        return self.backbone.get_classifier()

    @property
    def head_prefix(self) -> str:
        """The head's key prefix in this model's state dict (``backbone.head.``)."""
        return f"backbone.{self.head_name}."

    @property
    def head_name(self) -> str:
        """The head's module name inside ``backbone`` (``head``, ``head.fc``, ``fc``, ...)."""
        return next(n for n, m in self.backbone.named_modules() if m is self.head)


class PatchConv(nn.Conv2d):
    """A patchify conv (kernel == stride, no padding) run on CPU as one matrix product: same parameters and outputs.

    oneDNN's input gradient for a few-channel patchify conv is slow, and every attack step needs it: as a matmul it
    is 2-7x faster (``benchmarks/patch_stem.py``). On other devices the convolution runs unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        (p, q), (b, c, hh, ww) = self.kernel_size, x.shape
        h, w = hh // p, ww // q  # a strided conv drops the remainder rows/columns: so does the crop
        patches = x[..., : h * p, : w * q].reshape(b, c, h, p, w, q).permute(0, 2, 4, 1, 3, 5)
        out = F.linear(patches.reshape(b, h * w, c * p * q), self.weight.reshape(self.out_channels, -1), self.bias)
        return out.view(b, h, w, -1).permute(0, 3, 1, 2)  # NCHW view, like the conv's output


def patchify_as_matmul(model: nn.Module, enable: bool = True) -> int:
    """Make every patchify conv of <= 4 input channels (only stems gain) a ``PatchConv``, or undo; returns how many."""
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


PREPROCESS = {  # named mean/std a config may declare for a source checkpoint (model.preprocess)
    "imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "ares": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),  # ARES 2.0 robust models are trained on ImageNet's
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
}


class ModelSpec(BaseModel):
    """Everything needed to rebuild a ``Classifier`` (stored as checkpoint metadata)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    backbone: str
    kwargs: dict = {}
    num_classes: int = 10
    mean: list[float] = []
    std: list[float] = []
    input_size: list[int] = []
    in_chans: int = 3
    classes: list[str] = []
    method: dict = {"name": "full", "options": {}}
    trained: dict = {}  # provenance: dataset, objective, eps, epochs, seed, source (+ SHA-256 if compact)

    def __init__(
        self, backbone: str, kwargs: dict | None = None, num_classes: int = 10, mean=(), std=(), **rest
    ) -> None:
        super().__init__(backbone=backbone, kwargs=kwargs or {}, num_classes=num_classes, mean=mean, std=std, **rest)

    @field_validator("mean", "std")
    @classmethod
    def _finite(cls, v: list[float], info) -> list[float]:
        is_std = info.field_name == "std"
        if any(not math.isfinite(x) or (is_std and x <= 0) for x in v):
            raise ValueError(f"{info.field_name} must be finite{' and > 0' if is_std else ''}, got {v}")
        return v

    @field_validator("method")
    @classmethod
    def _method(cls, v: dict) -> dict:
        if not isinstance(v.get("name"), str) or not isinstance(v.get("options", {}), dict):
            raise ValueError(f"must be a mapping {{name: str, options: mapping}}, got {v!r}")
        return v

    @classmethod
    def parse(cls, text: str, where: str) -> "ModelSpec":
        """A spec from its JSON; a malformed field is a one-line ``UserError`` naming it."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            field = ".".join(str(p) for p in err["loc"]) or "spec"
            raise UserError(f"{where} has unreadable advtransfer metadata (field '{field}': {err['msg']})") from None


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


def build(spec: ModelSpec, pretrained: bool = False) -> Classifier:
    """Build the ``Classifier`` a spec describes (filling in timm's mean/std and input size if it has none)."""
    backbone = create_backbone(spec.backbone, spec.kwargs, spec.num_classes, pretrained)
    in_chans, cfg = int(spec.kwargs.get("in_chans", 3)), backbone.pretrained_cfg
    if not spec.mean:
        cfg_mean, cfg_std = list(cfg.get("mean", (0.5,) * in_chans)), list(cfg.get("std", (0.5,) * in_chans))
        spec.mean, spec.std = (cfg_mean, cfg_std) if len(cfg_mean) == in_chans else ([0.5] * in_chans, [0.5] * in_chans)
    if len(spec.mean) != in_chans or len(spec.std) != in_chans:
        raise UserError(
            f"model: mean/std need {in_chans} values for {in_chans}-channel input, got {spec.mean}/{spec.std}"
        )
    stem_size = getattr(getattr(backbone, "patch_embed", None), "img_size", None)
    spec.input_size = list(spec.input_size or stem_size or cfg.get("input_size", (3, 224, 224))[-2:])
    spec.in_chans = in_chans
    patchify_as_matmul(backbone)
    if is_convnet(backbone):  # oneDNN's convolutions are faster on channels-last weights (docs/performance.md)
        backbone.to(memory_format=torch.channels_last)
    return Classifier(backbone, spec.mean, spec.std, tuple(spec.input_size), in_chans)


def compiled(net: nn.Module) -> nn.Module:
    """``torch.compile(net)`` sharing its parameters; on CPU inductor needs a C++ compiler, so say so up front."""
    on_cpu = next(net.parameters()).device.type == "cpu"
    if on_cpu and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise UserError("train.compile: torch.compile on CPU needs a C++ compiler (g++); install one or set it false")
    return torch.compile(net)
