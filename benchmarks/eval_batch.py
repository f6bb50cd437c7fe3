"""PGD-10 evaluation throughput against the evaluation batch size (what ``eval.batch_size`` should be).

    python benchmarks/eval_batch.py     # docs/eval_batch.log; also run by benchmarks/bench.py

The same 512 test-like images are attacked with every batch size, interleaved in this one process
(``bench._interleaved``), on the mini-ViT and ResNet-18 of ``bench.MODELS``.
"""

from __future__ import annotations

import torch

BATCHES = (32, 64, 128, 256, 512)
N = 512


def case_eval_batch(model_name: str, iters: int) -> dict[int, float]:
    """Images per second of ``evaluate.pgd_correct`` (PGD-10) at each batch size of ``BATCHES``."""
    from bench import EPS, _build, _interleaved

    from advtransfer.attacks import Threat
    from advtransfer.evaluation import pgd_correct

    model, _, _ = _build(model_name, "linear")
    model.eval()
    chans, px = (1, 28) if model_name.startswith("minivit") else (3, 32)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(N, chans, px, px, generator=g), torch.randint(0, 10, (N,), generator=g)
    threat = Threat(EPS, "Linf", 10)
    fns = {b: (lambda b=b: pgd_correct(model, x, y, threat, batch_size=b)) for b in BATCHES}
    _, sec = _interleaved(fns, iters)
    return {b: N / s for b, s in sec.items()}


def report(model_name: str, rates: dict[int, float]) -> str:
    best = max(rates, key=rates.get)
    cells = "  ".join(f"{b}: {r:6.1f}" for b, r in rates.items())
    return f"PGD-10 eval img/s by batch size, {model_name}: {cells}  (best {best}; 256 at {rates[256] / rates[best]:.0%} of it)"


def main() -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, {N} images, median of 3 interleaved iterations")
    for m in ("minivit28", "resnet18_32"):
        print(report(m, case_eval_batch(m, 3)), flush=True)


if __name__ == "__main__":
    main()
