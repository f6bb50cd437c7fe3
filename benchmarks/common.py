"""What the benchmark scripts share: the models, their batches, interleaved timing, and a case run in its own process.

Every script in ``benchmarks/`` imports this module (its folder is on ``sys.path`` when a script runs); none imports
another script, so there is no import circle.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

MODELS = {
    # name: (timm name, kwargs, input channels, input px, batch, timed iterations)
    "minivit28": (
        "vit_tiny_patch16_224",
        dict(img_size=28, patch_size=7, in_chans=1, embed_dim=96, depth=4, num_heads=4, mlp_ratio=2.0),
        1,
        28,
        128,
        10,
    ),
    "vit_tiny224": ("vit_tiny_patch16_224", {}, 3, 224, 8, 3),
    "resnet18_32": ("resnet18", {}, 3, 32, 64, 5),
}
EPS, STEPS = 8 / 255, 7


def build(model_name: str, method: str, batch: int = 0):
    """(advtransfer's build of ``model_name`` with ``method`` applied, random images, random labels), seeded."""
    from advtransfer.methods import apply_method
    from advtransfer.models import ModelSpec, build

    timm_name, kwargs, chans, px, default_batch, _ = MODELS[model_name]
    torch.manual_seed(0)
    model = build(ModelSpec(timm_name, dict(kwargs), 10, input_size=[px, px]))
    apply_method(model, method, {"num_prompts": 10} if method == "vpt" else {})
    x = torch.rand(batch or default_batch, chans, px, px)
    return model, x, torch.randint(0, 10, (len(x),))


def as_timm_builds_it(model: torch.nn.Module) -> torch.nn.Module:
    """Undo advtransfer's layout choices in place: the stem a convolution again, weights NCHW-contiguous."""
    from advtransfer.models import patchify_as_matmul

    patchify_as_matmul(model, enable=False)
    return model.to(memory_format=torch.contiguous_format)


def interleaved(fns: dict[str, Callable[[], object]], iters: int) -> tuple[dict[str, float], dict[str, float]]:
    """Time every function of ``fns`` in this process, round-robin (the starting one rotates), so machine noise hits
    all alike. Returns (first-call seconds, median seconds over ``iters`` calls after one warm-up)."""
    first = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        fn()  # the first call holds any compilation and first-touch allocation
        first[name] = time.perf_counter() - t
    for fn in fns.values():
        fn()  # warm-up
    names, ts = list(fns), {name: [] for name in fns}
    for i in range(iters):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t = time.perf_counter()
            fns[name]()
            ts[name].append(time.perf_counter() - t)
    return first, {name: statistics.median(v) for name, v in ts.items()}


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_process(script: str, case: str, *args, threads: int) -> dict:
    """Run ``script --case case args...`` in a fresh Python process; its last stdout line is the case's JSON result
    (with its peak RSS). A fresh process per case keeps memory peaks apart and caches cold alike."""
    cmd = [sys.executable, script, "--case", case, "--threads", str(threads), json.dumps(args)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"case {case}{args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def serve_case(cases: dict[str, Callable[..., dict]], argv: list[str]) -> bool:
    """If ``argv`` asks for one case (``--case NAME --threads N ARGS_JSON``), run it, print its JSON, return True."""
    if "--case" not in argv:
        return False
    import warnings

    warnings.filterwarnings("ignore")
    name, threads, args = argv[argv.index("--case") + 1], int(argv[argv.index("--threads") + 1]), json.loads(argv[-1])
    torch.set_num_threads(threads)
    result = cases[name](*args)
    print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))
    return True


def geomean(xs: list[float]) -> float:
    return statistics.geometric_mean(xs) if xs else float("nan")
