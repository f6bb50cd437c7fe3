"""PGD-10 evaluation throughput against the evaluation batch size (what ``eval.batch_size`` should be).

    python benchmarks/eval_batch.py     # also run by benchmarks/bench.py (mini-ViT)

The same 512 test-like images are attacked with every batch size, interleaved in this one process
(``common.interleaved``), on the mini-ViT and ResNet-18 of ``common.MODELS``.
"""

from __future__ import annotations

import torch
from common import EPS, build, interleaved

BATCHES = (32, 64, 128, 256, 512)
N = 512


def rates(model_name: str, iters: int) -> dict[int, float]:
    """Images per second of ``attacks.pgd_correct`` (PGD-10 on every example) at each batch size of ``BATCHES``."""
    from advtransfer.attacks import Threat, pgd_correct

    model, x, y = build(model_name, "linear", batch=N)
    model.eval()
    threat = Threat(EPS, "Linf", 10)

    def attack(b: int) -> None:
        for i in range(0, N, b):
            pgd_correct(model, x[i : i + b], y[i : i + b], threat)

    _, sec = interleaved({b: (lambda b=b: attack(b)) for b in BATCHES}, iters)
    return {b: N / s for b, s in sec.items()}


def main() -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, {N} images, median of 3 interleaved iterations")
    for m in ("minivit28", "resnet18_32"):
        r = rates(m, 3)
        best = max(r, key=r.get)
        cells = "  ".join(f"{b}: {v:6.1f}" for b, v in r.items())
        print(f"PGD-10 eval img/s by batch size, {m}: {cells}  (best {best}; 256 at {r[256] / r[best]:.0%} of it)")


if __name__ == "__main__":
    main()
