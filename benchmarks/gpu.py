"""GPU throughput of ViT-B/16 adversarial finetuning, PGD evaluation and the input pipeline (about 3 minutes on an
H100/H200).

    python benchmarks/gpu.py [--json docs/gpu.json] [--batch 128] [--compile]
    python benchmarks/gpu.py --cpu-smoke          # the same code on a tiny ViT on the CPU, in seconds (tests run it)

Measures, each after warm-up steps and with the device synchronised around the timed steps:
- ``train_img_per_s_{bf16,tf32,fp32}``: ``advtransfer.train.train_step`` (PGD-7, ε = 8/255, Full-FT, AdamW) in bf16
  autocast, in fp32 with TF32 matmuls, and in strict fp32; ``--compile`` adds ``train.compile`` in bf16;
- ``train_mfu_*``: model FLOP utilisation: the FLOPs of one training step (``step_flops``, counted by
  ``torch.utils.flop_counter``: 7 forward + input-gradient passes and the forward + backward of the update, about 17
  forwards) times img/s over the GPU's dense peak for that precision (H100/H200 SXM: 989 bf16, 495 TF32, 67 fp32
  TFLOP/s);
- ``pgd10_eval_img_per_s``: ``attacks.pgd_correct`` with PGD-10 in fp32 with TF32 (evaluation never uses bf16);
- ``input_pipeline_img_per_s``: 500x375 JPEGs -> ``data.batches`` (default workers) -> float ``[0,1]`` on the GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

PEAK_TFLOPS = {  # dense, by a substring of the device name, most specific first: (bf16, tf32, fp32)
    "H100 PCIe": (756.0, 378.0, 51.2),
    "H100": (989.4, 494.7, 66.9),
    "H200": (989.4, 494.7, 66.9),
    "A100": (312.0, 156.0, 19.5),
}
EPS = 8 / 255
SMOKE_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)  # --cpu-smoke


def _synced(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _rate(fn, n_images: int, warmup: int, steps: int, dev: torch.device) -> float:
    """Images per second of ``fn`` (one call handles ``n_images``) over ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _synced(dev)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    _synced(dev)
    return n_images * steps / (time.perf_counter() - t)


def _model(spec, dev: torch.device):
    from advtransfer.methods import apply_method
    from advtransfer.models import build

    torch.manual_seed(0)
    return apply_method(build(spec), "full").to(dev)


def step_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """FLOPs of one PGD-``steps`` training step of ``train_step`` (iterate "last"): ``steps`` forward + input-gradient
    passes (parameters frozen) and one forward + backward of the update, counted by ``torch.utils.flop_counter``
    (which cannot count ``autograd.grad`` itself, so the input gradient is taken with ``backward``)."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    flags = [(p, p.requires_grad) for p in model.parameters()]
    counts = []
    for attack in (True, False):
        for p, flag in flags:
            p.requires_grad_(flag and not attack)
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(model(x.clone().requires_grad_(attack)), y).backward()
        counts.append(counter.get_total_flops())
    for p, flag in flags:
        p.requires_grad_(flag)
    model.zero_grad(set_to_none=True)
    return steps * counts[0] + counts[1]


def train_rates(spec, dev, batch: int, px: int, warmup: int, steps: int, compile_: bool) -> dict:
    """Training img/s and MFU per precision."""
    from advtransfer.attacks import Threat
    from advtransfer.config import TrainConfig
    from advtransfer.models import compiled
    from advtransfer.train import make_optimizer, train_step

    peak = next(
        (p for name, p in PEAK_TFLOPS.items() if dev.type == "cuda" and name in torch.cuda.get_device_name()), None
    )
    threat, out = Threat(EPS, "Linf", 7), {}
    x, y = torch.rand(batch, 3, px, px, device=dev), torch.randint(0, 10, (batch,), device=dev)
    cases = [("bf16", True, True, False), ("tf32", False, True, False), ("fp32", False, False, False)]
    for name, bf16, tf32, comp in cases + ([("bf16_compiled", True, True, True)] if compile_ else []):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        model, cfg = _model(spec, dev), TrainConfig(lr=1e-4, bf16=bf16, compile=comp)
        opt, runner = make_optimizer(model, cfg), compiled(model) if comp else model
        out.setdefault("flops_per_image", step_flops(model, x[:2], y[:2], threat.steps) / 2)
        rate = _rate(partial(train_step, runner, opt, x, y, threat, cfg), batch, warmup + 2 * comp, steps, dev)
        out[f"train_img_per_s_{name}"] = rate
        if peak is not None:
            p = peak[0 if bf16 else 1 if tf32 else 2]
            out[f"train_mfu_{name}"] = rate * out["flops_per_image"] / (p * 1e12)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return out


def eval_rate(spec, dev, batch: int, px: int, warmup: int, steps: int) -> float:
    from advtransfer.attacks import Threat, pgd_correct

    model = _model(spec, dev).eval()
    x, y = torch.rand(batch, 3, px, px, device=dev), torch.randint(0, 10, (batch,), device=dev)
    return _rate(lambda: pgd_correct(model, x, y, Threat(EPS, "Linf", 10)), batch, warmup, steps, dev)


def pipeline_rate(dev: torch.device, n: int, size: int) -> tuple[float, int]:
    """(img/s, workers) of image-file batches decoded by the default workers and moved to ``dev`` as floats."""
    import numpy as np
    from PIL import Image

    from advtransfer.config import DataConfig
    from advtransfer.data import batches, to_device, worker_count
    from advtransfer.datasets import Split

    with tempfile.TemporaryDirectory() as folder:
        g, files = np.random.default_rng(0), []
        for i in range(n):
            files.append(f"{folder}/{i:05d}.jpg")
            small = Image.fromarray(g.integers(0, 256, (6, 8, 3), dtype=np.uint8))
            small.resize((500, 375), Image.BILINEAR).save(files[-1], quality=90)
        split, workers = (
            Split(torch.arange(n) % 10, files=files, image_size=size, channels=3),
            worker_count(DataConfig()),
        )
        for xb, yb in batches(split, 64, order=torch.arange(min(n, 64)), workers=workers):  # start the workers
            to_device(xb, yb, dev)
        _synced(dev)
        t = time.perf_counter()
        for xb, yb in batches(split, 64, workers=workers):
            to_device(xb, yb, dev)
        _synced(dev)
        return n / (time.perf_counter() - t), workers


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="a tiny ViT on the CPU: checks the script, not a GPU")
    ap.add_argument("--batch", type=int, default=128, help="training batch (evaluation uses twice this)")
    ap.add_argument("--compile", action="store_true", help="also time train.compile in bf16 (compiles for minutes)")
    ap.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    from advtransfer.models import ModelSpec

    if args.cpu_smoke:
        dev, px, batch, warmup, steps, n_jpeg, kwargs = torch.device("cpu"), 32, 4, 1, 2, 16, SMOKE_VIT
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu.py: no CUDA device (use --cpu-smoke to check the script on the CPU)")
        dev, px, batch, warmup, steps, n_jpeg, kwargs = torch.device("cuda"), 224, args.batch, 3, 10, 4000, {}
    spec = ModelSpec("vit_base_patch16_224", kwargs, 10)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke test)"
    res = {"device": name, "torch": torch.__version__, "model": "vit_base_patch16_224" + (" (tiny)" * args.cpu_smoke)}
    res.update(batch=batch, px=px, pgd_train_steps=7, eps=EPS)
    t0 = time.time()
    res.update(train_rates(spec, dev, batch, px, warmup, steps, args.compile))
    res["pgd10_eval_img_per_s"] = eval_rate(spec, dev, 2 * batch, px, warmup, steps)
    res["input_pipeline_img_per_s"], res["input_pipeline_workers"] = pipeline_rate(dev, n_jpeg, px)
    res["seconds"] = round(time.time() - t0, 1)
    for k, v in res.items():
        print(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
