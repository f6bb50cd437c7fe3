"""Why ``train.bf16`` on CPU runs attention on PyTorch's math SDPA path: one attack step, timed three ways.

    python benchmarks/bf16_attention.py [--threads 1]

One PGD step's work (forward + gradient w.r.t. the input, parameters frozen) on the benchmark models of
``common.MODELS``: fp32; bf16 autocast with the fused CPU attention kernel; bf16 autocast with the math path
(what ``advtransfer.attacks.autocast`` does on CPU). Prints the median time of each and its speed
relative to fp32, all in this process, interleaved so machine noise hits all three alike.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from common import MODELS, build
from torch.nn.attention import SDPBackend, sdpa_kernel


def attack_step(model, x, y, bf16: bool, math_attention: bool) -> None:
    delta = torch.zeros_like(x, requires_grad=True)
    backend = sdpa_kernel([SDPBackend.MATH]) if math_attention else contextlib.nullcontext()
    with backend, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(x + delta)
    torch.autograd.grad(F.cross_entropy(logits.float(), y, reduction="sum"), delta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ways = {"fp32": (False, False), "bf16_fused": (True, False), "bf16_math": (True, True)}
    print(f"torch {torch.__version__}, {args.threads} thread(s); one attack step (forward + input gradient)")
    print(f"{'model':<12} " + " ".join(f"{w:>18}" for w in ways))
    for name in MODELS:
        model, x, y = build(name, "full")
        model.eval().requires_grad_(False)
        times: dict[str, list[float]] = {w: [] for w in ways}
        for i in range(args.iters + 1):
            for w, (bf16, math_attention) in ways.items():
                t = time.perf_counter()
                attack_step(model, x, y, bf16, math_attention)
                if i:  # the first round warms up
                    times[w].append(time.perf_counter() - t)
        med = {w: statistics.median(ts) for w, ts in times.items()}
        cells = [f"{1000 * med[w]:8.1f} ms {med['fp32'] / med[w]:5.2f}x" for w in ways]
        print(f"{name:<12} " + " ".join(f"{c:>18}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
