"""Visual prompt tuning (Jia et al. 2022) by module surgery on timm's VisionTransformer and SwinTransformer."""

import math

import torch
import torch.nn.functional as F
from timm.models import swin_transformer as swin
from timm.models import vision_transformer as vit
from torch import nn

from ..errors import UserError
from ..models import Classifier


class _Prompted(nn.Module):
    """A wrapped block that owns (or passes on) prompt tokens; prompt dropout is per sample, in training only."""

    def __init__(self, block: nn.Module, prompts: nn.Parameter | None, dropout: float) -> None:
        super().__init__()
        self.block, self.prompts, self.dropout = block, prompts, dropout

    def draw(self, x: torch.Tensor) -> torch.Tensor:
        """This block's prompts for the batch ``x``: ``(B, P, C)``."""
        return F.dropout(self.prompts.to(x.dtype).expand(x.shape[0], -1, -1), self.dropout, self.training)


class Prompted(_Prompted):
    """A ViT block with prompts after the prefix tokens: ``insert`` adds them (else they replace the previous block's;
    ``prompts=None`` passes those on: shallow), ``drop`` removes them after the block."""

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
    """timm's window attention (class swapped in place) with ``prompts`` ``(B, P, C)`` prepended to each of sample b's
    windows (zero relative-position bias and shift mask); then ``prompts`` holds their window-averaged outputs."""

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
    """A timm Swin block (NHWC) carrying prompts, ``(x, prompts) -> (x, prompts)``, the first block takes ``x`` alone;
    prompts get the block's residual attention + MLP update. ``last``: all tokens as one NHWC row ``(B, 1, P + H*W, C)``
    so the final norm and pool include the prompts."""

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

    ``num_prompts`` per block (``deep``) or in all (shallow, carried on from the first block); ``dropout`` per sample,
    in training only. Init uniform ±sqrt(6 / (in_chans·patch² + embed_dim)). ViT: prompts after the prefix tokens,
    dropped after the last block. Swin follows the official VPT-Swin (KMnP/vpt): prompts join every window's
    attention with zero bias and mask, carried through patch merging, into the final norm and pool (120,320 deep
    prompts on Swin-B). It differs only where the official code mixes samples: prompt outputs are averaged over each
    sample's own windows, and each sample draws its own dropout mask.
    """
    bb = model.backbone
    if not isinstance(bb, (vit.VisionTransformer, swin.SwinTransformer)):
        raise UserError(f"method: vpt supports timm VisionTransformer and SwinTransformer, not {type(bb).__name__}")
    if type(num_prompts) is not int or num_prompts < 0:
        raise UserError(f"method: vpt num_prompts must be an integer >= 0, got {num_prompts!r}")
    if type(dropout) not in (int, float) or not 0 <= dropout < 1:
        raise UserError(f"method: vpt dropout must be a number in [0, 1), got {dropout!r}")
    model.freeze()
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
