"""A patchify convolution as oneDNN's conv vs as one matrix product (``advtransfer.models.PatchConv``).

    python benchmarks/patch_stem.py     # docs/patch_stem.log

Times forward + input gradient (what every attack step asks of the image stem) and forward alone, for the
stems of the shipped mini-ViT, ViT-Tiny/16 and ViT-B/16 at 224 px, and for a ConvNeXt-style 2x2
downsampling of many channels (why ``patchify_as_matmul`` only converts stems of at most 4 input channels).
Both forms run in this process, interleaved (``common.interleaved``), on the same weights and input.
"""

from __future__ import annotations

import copy

import torch
from common import interleaved  # benchmarks/ is on sys.path: this script's own folder

from advtransfer.models import PatchConv, patchify_as_matmul

CASES = {
    # name: (batch, in channels, px, patch, out channels)
    "minivit28 stem": (128, 1, 28, 7, 96),
    "vit_tiny224 stem": (8, 3, 224, 16, 192),
    "vit_base224 stem": (16, 3, 224, 16, 768),
    "convnext 2x2 downsample": (8, 96, 56, 2, 192),
}


def _grad(m: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    xi = x.clone().requires_grad_(True)
    out = m(xi)
    return torch.autograd.grad(out, xi, torch.ones_like(out))


def _fwd(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(x)


def main() -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; median ms over 10 interleaved iterations")
    print(f"{'case':<24} {'form':<7} {'fwd+input-grad':>15} {'fwd':>9}")
    for name, (b, c, px, p, d) in CASES.items():
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(c, d, p, stride=p)
        rule = "converts" if patchify_as_matmul(copy.deepcopy(conv)) else "leaves a conv"
        mat = copy.deepcopy(conv)
        mat.__class__ = PatchConv  # forced, also where the rule leaves a conv, to show what it would cost
        x = torch.rand(b, c, px, px)
        torch.testing.assert_close(mat(x), conv(x), atol=2e-4, rtol=1e-4)

        _, g = interleaved({"conv": lambda m=conv, x=x: _grad(m, x), "matmul": lambda m=mat, x=x: _grad(m, x)}, 10)
        _, f = interleaved({"conv": lambda m=conv, x=x: _fwd(m, x), "matmul": lambda m=mat, x=x: _fwd(m, x)}, 10)
        for form in ("conv", "matmul"):
            print(f"{name:<24} {form:<7} {1000 * g[form]:12.2f} ms {1000 * f[form]:6.2f} ms", flush=True)
        print(
            f"{name:<24} ratio   {g['conv'] / g['matmul']:12.2f}x {f['conv'] / f['matmul']:7.2f}x   (the rule {rule})"
        )


if __name__ == "__main__":
    main()
