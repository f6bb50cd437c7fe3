"""Bottleneck adapters after every transformer block's MLP (Houlsby / Pfeiffer placement), up-projection zero."""

import torch
from torch import nn

from ..errors import UserError
from ..models import Classifier


class Adapter(nn.Module):
    """``y = mlp(x); y + scale * up(act(down(y)))``, up zero (identity at init); ``conv``: 1x1 convs on ``NCHW`` maps."""

    def __init__(self, mlp: nn.Module, dim: int, bottleneck: int, scale: float, conv: bool = False) -> None:
        super().__init__()
        self.mlp, self.scale = mlp, scale
        self.down = nn.Conv2d(dim, bottleneck, 1) if conv else nn.Linear(dim, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Conv2d(bottleneck, dim, 1) if conv else nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(x)
        return y + self.scale * self.up(self.act(self.down(y)))


def adapter(model: Classifier, bottleneck: int = 64, scale: float = 1.0, reduction: int = 0) -> None:
    """A bottleneck adapter after every transformer block's MLP; adapters + head train. ``reduction``: a bottleneck
    of ``dim // reduction`` per block instead of a fixed ``bottleneck`` (the paper: 8, Pfeiffer-style)."""
    if bottleneck < 1 or reduction < 0:
        raise UserError(f"method: adapter bottleneck must be >= 1 and reduction >= 0, got {bottleneck}, {reduction}")
    model.freeze()
    mlps = [(n, m) for n, m in model.backbone.named_modules() if n.endswith("mlp") and hasattr(m, "fc2")]
    if not mlps:
        raise UserError(
            f"method: adapter needs transformer blocks with an 'mlp'; {type(model.backbone).__name__} has none"
        )
    for name, mlp in mlps:
        parent, _, attr = name.rpartition(".")
        conv = isinstance(mlp.fc2, nn.Conv2d)
        dim = mlp.fc2.out_channels if conv else mlp.fc2.out_features
        wrapped = Adapter(mlp, dim, max(1, dim // reduction) if reduction else bottleneck, scale, conv=conv)
        setattr(model.backbone.get_submodule(parent), attr, wrapped)
        for p in (*wrapped.down.parameters(), *wrapped.up.parameters()):
            p.requires_grad_(True)
