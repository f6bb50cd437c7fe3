"""Speed and memory of adversarial finetuning and evaluation, each figure against a baseline measured in this run.

    python benchmarks/bench.py [--quick] [--no-compile] [--no-bf16 | --bf16-emulated] [--threads N] [--json J] [--log L]

Every case runs in a fresh process (``common.in_process``); the implementations a ratio compares run in that ONE
process, each on its own copy of the same model and batch, timed round-robin (first call, one warm-up, then the
median), so machine noise hits them alike. Peak memory comes from a process per implementation.

Training (PGD-7, ε = 8/255, step ε/4, best iterate by batch-mean loss on both sides):
- ``reference``: our re-implementation of the paper code's algorithm: ``loss.backward()`` at every PGD step (weight
  gradients computed, then thrown away), best iterate by batch-mean loss, one extra final forward.
- ``ours``: ``advtransfer.train.train_step``: input-only gradients, parameters frozen while crafting.
- ``stock``: timm's model as timm builds it; without it, advtransfer's layout (``models.PatchConv`` stem on CPU,
  channels-last ConvNets). ``bf16``: bf16 autocast (math SDPA on CPU) for attack and step, the reference under the
  very same autocast. ``compile``: ``train.compile`` (torch.compile), against ours eager.

The figures printed last (``name=value``; geometric means over the models of Full-FT steps where per model):
- ``train_step_speedup_fp32_algorithm``: reference / ours, both fp32 on timm's layout (the algorithm alone);
- ``train_step_speedup_layout``: ours on timm's layout / ours on advtransfer's (the layout alone);
- ``train_step_speedup_bf16_vs_bf16_reference``: reference bf16 / ours bf16, both on timm's layout;
- ``train_step_speedup_fp32`` and ``_bf16``: reference fp32 on timm's layout / ours on advtransfer's (what a user of
  the reference gains by switching, bf16 included); ``train_step_speedup_compile_fp32``/``_bf16``: eager / compiled;
- ``pgd_eval_speedup_vs_torchattacks``: torchattacks' PGD-10 / ours on every example, both on timm's layout;
- ``eval_clean_correct_speedup``: clean + PGD-10 on every example / clean + PGD-10 on the clean-correct ones only,
  on a model right on half the examples (``eval_early_exit_speedup``: / PGD-10 with ``eval.early_exit``);
- ``eval_peak_rss_ratio_3k_vs_1k_224``: peak RSS of a streamed clean + PGD-1 evaluation of 3,000 vs 1,000 224-px
  JPEGs from an image folder (tiny ViT at 224, in-process decoding), each in its own process;
- ``input_pipeline_img_per_s_224``: 500x375 JPEGs -> 224-px uint8 batches -> float on the device, default workers;
- ``fast_at_epoch_speedup``: the training pass of an epoch, PGD-7 AT / FGSM-RS (same steps; validation excluded).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import EPS, MODELS, STEPS, as_timm_builds_it, build, geomean, in_process, interleaved, serve_case

METHODS = ("full", "linear", "lora", "vpt")
FULL = ["reference", "ours_stock", "ours", "reference_bf16", "ours_bf16_stock", "ours_bf16"]
TINY224 = dict(img_size=224, patch_size=16, in_chans=3, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def reference_train_step(model, opt, x, y, eps: float, alpha: float, steps: int, bf16: bool = False) -> float:
    """The reference algorithm: full ``.backward()`` per PGD step, best iterate by batch-mean loss, a final forward."""
    from advtransfer.attacks import autocast

    model.eval()
    delta = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1) - x
    best, best_loss = None, -math.inf
    for _ in range(steps):
        delta.requires_grad_(True)
        with autocast(bf16, x.device):
            loss = F.cross_entropy(model(x + delta).float(), y)
        opt.zero_grad()
        loss.backward()  # computes (and wastes) every trainable weight's gradient
        if loss.item() > best_loss:
            best_loss, best = loss.item(), (x + delta).detach()
        with torch.no_grad():
            delta = (delta + alpha * delta.grad.sign()).clamp(-eps, eps)
            delta = (x + delta).clamp(0, 1) - x
    with torch.no_grad(), autocast(bf16, x.device):  # the extra final forward: score the last iterate too
        if F.cross_entropy(model(x + delta).float(), y).item() > best_loss:
            best = (x + delta).detach()
    model.train()
    opt.zero_grad()
    with autocast(bf16, x.device):
        loss = F.cross_entropy(model(best).float(), y)
    loss.backward()
    opt.step()
    return loss.item()


def _train_step_fn(model, x, y, impl: str, objective: str = "at"):
    """One PGD-7 adversarial training step of ``impl`` on its own copy of the model."""
    from advtransfer.attacks import Threat
    from advtransfer.config import TrainConfig
    from advtransfer.models import compiled
    from advtransfer.train import make_optimizer, train_step

    if impl.startswith("reference") or "stock" in impl:
        as_timm_builds_it(model)
    cfg = TrainConfig(lr=1e-4, bf16="bf16" in impl, compile="compile" in impl, objective=objective)
    opt = make_optimizer(model, cfg)
    if impl.startswith("reference"):
        return lambda: reference_train_step(model, opt, x, y, EPS, EPS / 4, STEPS, cfg.bf16)
    runner, threat = compiled(model) if cfg.compile else model, Threat(EPS, "Linf", STEPS, iterate="best")
    return lambda: train_step(runner, opt, x, y, threat, cfg)


# ----------------------------------------------------------------------------- cases (each in its own process)


def case_train(model_name: str, method: str, impls: list[str], iters: int) -> dict:
    model, x, y = build(model_name, method)
    first, sec = interleaved({i: _train_step_fn(copy.deepcopy(model), x, y, i) for i in impls}, iters)
    return {i: {"seconds": sec[i], "img_per_s": len(x) / sec[i], "first_step_s": first[i]} for i in impls}


def case_train_memory(model_name: str, method: str, impl: str) -> dict:
    step = _train_step_fn(*build(model_name, method), impl)
    for _ in range(2):
        step()
    return {}


def case_pgd_eval(model_name: str, iters: int) -> dict:
    """PGD-10 on every example: torchattacks vs ours on timm's layout, and ours on advtransfer's."""
    import torchattacks

    from advtransfer.attacks import Threat, pgd_correct

    model, x, y = build(model_name, "linear")
    stock = as_timm_builds_it(copy.deepcopy(model)).eval()
    atk, threat = torchattacks.PGD(stock, eps=EPS, alpha=EPS / 4, steps=10, random_start=True), Threat(EPS, "Linf", 10)

    def torchattacks_pgd():
        adv = atk(x, y)
        with torch.no_grad():
            return stock(adv).argmax(1) == y

    fns = {"torchattacks": torchattacks_pgd, "ours_stock": lambda: pgd_correct(stock, x, y, threat)}
    _, sec = interleaved({**fns, "ours": lambda: pgd_correct(model.eval(), x, y, threat)}, iters)
    return {k: len(x) / v for k, v in sec.items()}


def case_eval_cheap(iters: int) -> dict:
    """Clean + PGD-10 on the mini-ViT, labels right for half the examples: every example attacked, the clean-correct
    ones only (what evaluation does), and with early exit."""
    from advtransfer.attacks import Threat, clean_correct, pgd_correct

    model, x, _ = build("minivit28", "linear", batch=256)
    model.eval()
    with torch.no_grad():
        y = model(x).argmax(1)
    y[1::2] = (y[1::2] + 1) % 10
    threat, early = Threat(EPS, "Linf", 10), Threat(EPS, "Linf", 10, early_exit=True)
    fns = {
        "every": lambda: pgd_correct(model, x, y, threat, only=None) & clean_correct(model, x, y),
        "clean_correct": lambda: pgd_correct(model, x, y, threat, only=clean_correct(model, x, y)),
        "early_exit": lambda: pgd_correct(model, x, y, early, only=clean_correct(model, x, y)),
    }
    _, sec = interleaved(fns, iters)
    return {**{k: len(x) / v for k, v in sec.items()}, "clean_acc": clean_correct(model, x, y).float().mean().item()}


def _jpeg_split(folder: str, n: int):
    from advtransfer.datasets import Split

    files = sorted(str(p) for p in Path(folder).glob("*.jpg"))[:n]
    return Split(torch.arange(len(files)) % 10, files=files, image_size=224, channels=3)


def case_eval_rss(folder: str, n: int) -> dict:
    """A streamed clean + PGD-1 evaluation of ``n`` JPEGs (tiny ViT at 224 px, decoding in this process)."""
    from advtransfer.attacks import Threat
    from advtransfer.evaluation import evaluate_batches, split_batches
    from advtransfer.models import ModelSpec, build

    split = _jpeg_split(folder, n)
    torch.manual_seed(0)
    model = build(ModelSpec("vit_tiny_patch16_224", TINY224, 10)).eval()
    t = time.perf_counter()
    load = split_batches(split, 64, torch.device("cpu"))
    res = evaluate_batches(model, load, n, Threat(EPS, "Linf", 1), attacks=("clean", "pgd"), checks=False)
    return {"seconds": time.perf_counter() - t, "n": res["n"]}


def case_pipeline(folder: str, n: int) -> dict:
    """Images per second of ``data.batches`` + ``to_device`` over ``n`` JPEGs with the default workers."""
    from advtransfer.config import DataConfig
    from advtransfer.data import batches, to_device, worker_count

    split, workers = _jpeg_split(folder, n), worker_count(DataConfig())
    for xb, yb in batches(split, 64, order=torch.arange(64), workers=workers):  # start the workers
        to_device(xb, yb, "cpu")
    t = time.perf_counter()
    for xb, yb in batches(split, 64, workers=workers):
        to_device(xb, yb, "cpu")
    return {"img_per_s": n / (time.perf_counter() - t), "workers": workers}


def case_fast_at(iters: int) -> dict:
    """One training step of the mini-ViT (Full-FT) per objective: PGD-7 AT (iterate last), FGSM-RS, N-FGSM."""
    model, x, y = build("minivit28", "full")
    fns = {o: _train_step_fn(copy.deepcopy(model), x, y, "ours", o) for o in ("at", "fgsm-rs", "n-fgsm")}
    _, sec = interleaved(fns, iters)
    return {k: len(x) / v for k, v in sec.items()}


def case_eval_batch(model_name: str, iters: int) -> dict:
    from eval_batch import rates

    return {str(b): r for b, r in rates(model_name, iters).items()}


def case_autoattack(n: int) -> dict:
    from advtransfer.evaluation import evaluate

    model, x, y = build("minivit28", "linear", batch=n)
    t = time.perf_counter()
    evaluate(model.eval(), x, y, eps=EPS, attacks=("autoattack",), checks=False)
    return {"img_per_s": n / (time.perf_counter() - t)}


CASES = {f.__name__.removeprefix("case_"): f for f in (case_train, case_train_memory, case_pgd_eval, case_eval_cheap)}
CASES.update({f.__name__.removeprefix("case_"): f for f in (case_eval_rss, case_pipeline, case_fast_at)})
CASES.update({f.__name__.removeprefix("case_"): f for f in (case_eval_batch, case_autoattack)})


# ----------------------------------------------------------------------------- the run


def write_jpegs(folder: Path, n: int) -> None:
    """``n`` smooth 500x375 colour JPEGs (CUB-sized photos that compress like photos: about 10 kB each)."""
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(0)
    for i in range(n):
        small = Image.fromarray(g.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        small.resize((500, 375), Image.BILINEAR).save(folder / f"{i:05d}.jpg", quality=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="mini-ViT only, fewer iterations and images (a few minutes)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", default="", help="also write every figure and row to this JSON file")
    ap.add_argument("--log", default="", help="also write what is printed to this file")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases (they compile for minutes)")
    ap.add_argument("--no-bf16", action="store_true", help="skip bf16 (for CPUs without bf16 units: AVX2-only x86)")
    ap.add_argument(
        "--bf16-emulated", action="store_true", help="run bf16 even without bf16 units (both sides emulate it)"
    )
    args = ap.parse_args()
    bf16_units = torch.cuda.is_available() or torch.cpu._is_avx512_bf16_supported()
    if not args.no_bf16 and not bf16_units and not args.bf16_emulated:
        args.no_bf16 = True  # emulated bf16 times the CPU, not advtransfer (0.14x of fp32 measured on AVX2-only)
        print("no bf16 units on this CPU (AVX512-BF16): the bf16 cases are skipped")
    lines, rows, figures, t_start = [], [], {}, time.time()

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)
        if args.log:
            Path(args.log).write_text("\n".join(lines) + "\n")

    def run(case: str, *a) -> dict:
        return in_process(__file__, case, *a, threads=args.threads)

    models = ["minivit28"] if args.quick else list(MODELS)
    say(f"torch {torch.__version__}, {args.threads} thread(s), eps {EPS:.4f}, PGD-{STEPS} training, PGD-10 eval")
    if not args.no_bf16 and not bf16_units:
        say("bf16 is emulated here (no bf16 units): the bf16 ratios compare two emulations, not bf16 hardware")
    say(f"{'model':<12} {'method':<7} {'impl':<18} {'img/s':>8} {'ms/step':>9} {'peak MB':>8}  vs reference")
    for m in models:
        iters = 3 if args.quick else MODELS[m][5]
        for method in ("full", "linear") if args.quick else METHODS:
            if method == "vpt" and m.startswith("resnet"):
                continue
            impls = FULL if method == "full" else ["reference", "ours_stock", "ours"]
            impls = [i for i in impls if not (args.no_bf16 and "bf16" in i)]
            compile_ = [] if args.no_compile or method != "full" else ["ours_compile", "ours_compile_bf16"]
            impls = impls + [i for i in compile_ if not (args.no_bf16 and "bf16" in i)]
            timed = run("train", m, method, impls, iters)
            for impl in impls:
                r = timed[impl]
                memory = (
                    method == "full" and not args.quick and impl in ("reference", "ours", "reference_bf16", "ours_bf16")
                )
                r["peak_rss_mb"] = run("train_memory", m, method, impl)["peak_rss_mb"] if memory else None
                base = timed["reference"]["seconds"]
                rows.append({"model": m, "method": method, "impl": impl, **r, "speedup": base / r["seconds"]})
                mb = f"{r['peak_rss_mb']:8.0f}" if r["peak_rss_mb"] else f"{'-':>8}"
                note = f"  (first step {r['first_step_s']:.0f} s: compile)" if "compile" in impl else ""
                say(
                    f"{m:<12} {method:<7} {impl:<18} {r['img_per_s']:8.1f} {1000 * r['seconds']:9.1f} {mb}  "
                    f"{base / r['seconds']:.2f}x{note}"
                )

    def ratio(a: str, b: str, method: str = "full") -> list[float]:
        sec = {(r["model"], r["impl"]): r["seconds"] for r in rows if r.get("method") == method}
        return [sec[m, a] / sec[m, b] for m in models if (m, a) in sec and (m, b) in sec]

    figures["train_step_speedup_fp32_algorithm"] = geomean(ratio("reference", "ours_stock"))
    figures["train_step_speedup_layout"] = geomean(ratio("ours_stock", "ours"))
    figures["train_step_speedup_bf16_vs_bf16_reference"] = geomean(ratio("reference_bf16", "ours_bf16_stock"))
    figures["train_step_speedup_fp32"] = geomean(ratio("reference", "ours"))
    figures["train_step_speedup_bf16"] = geomean(ratio("reference", "ours_bf16"))
    figures["train_step_speedup_compile_fp32"] = geomean(ratio("ours", "ours_compile"))
    figures["train_step_speedup_compile_bf16"] = geomean(ratio("ours_bf16", "ours_compile_bf16"))
    for method in METHODS[1:]:
        if ratio("reference", "ours_stock", method):
            figures[f"train_step_speedup_fp32_algorithm_{method}"] = geomean(ratio("reference", "ours_stock", method))

    evals = [m for m in models if m != "vit_tiny224"]
    for m in evals:
        pg = run("pgd_eval", m, 3 if args.quick else 10)
        rows.append({"model": m, "case": "pgd10_eval_img_per_s", **pg})
        figures[f"pgd_eval_speedup_vs_torchattacks_{m}"] = pg["ours_stock"] / pg["torchattacks"]
        say(
            f"PGD-10 eval {m}, img/s: torchattacks {pg['torchattacks']:.0f}, ours on timm's layout "
            f"{pg['ours_stock']:.0f} ({pg['ours_stock'] / pg['torchattacks']:.2f}x), ours on advtransfer's layout "
            f"{pg['ours']:.0f} ({pg['ours'] / pg['torchattacks']:.2f}x)"
        )
    figures["pgd_eval_speedup_vs_torchattacks"] = geomean(
        [figures[f"pgd_eval_speedup_vs_torchattacks_{m}"] for m in evals]
    )

    ev = run("eval_cheap", 3 if args.quick else 5)
    rows.append({"model": "minivit28", "case": "clean_pgd10_eval_img_per_s", **ev})
    figures["eval_clean_correct_speedup"] = ev["clean_correct"] / ev["every"]
    figures["eval_early_exit_speedup"] = ev["early_exit"] / ev["every"]
    say(
        f"clean + PGD-10 eval, minivit28, clean accuracy {ev['clean_acc']:.2f}, img/s: every example "
        f"{ev['every']:.0f}, "
        f"clean-correct only {ev['clean_correct']:.0f}, + early exit {ev['early_exit']:.0f}"
    )

    fa = run("fast_at", 3 if args.quick else 5)
    rows.append({"model": "minivit28", "case": "train_step_img_per_s_by_objective", **fa})
    figures["fast_at_epoch_speedup"] = fa["fgsm-rs"] / fa["at"]
    say(
        f"training pass, minivit28 Full-FT, img/s: PGD-7 {fa['at']:.0f}, FGSM-RS {fa['fgsm-rs']:.0f}, "
        f"N-FGSM {fa['n-fgsm']:.0f}"
    )

    small, large = (200, 600) if args.quick else (1000, 3000)
    with tempfile.TemporaryDirectory() as folder:
        t = time.time()
        write_jpegs(Path(folder), large)
        say(f"wrote {large} JPEGs (500x375) in {time.time() - t:.0f} s")
        rss = {n: run("eval_rss", folder, n) for n in (small, large)}
        pipe = run("pipeline", folder, small)
    rows.append({"case": "streamed_eval_224", **{str(n): r for n, r in rss.items()}})
    rows.append({"case": "input_pipeline_224", **pipe})
    figures["eval_peak_rss_ratio_3k_vs_1k_224"] = rss[large]["peak_rss_mb"] / rss[small]["peak_rss_mb"]
    figures["input_pipeline_img_per_s_224"] = pipe["img_per_s"]
    for n, r in rss.items():
        say(
            f"streamed clean + PGD-1 eval of {n} JPEGs at 224 px: peak RSS {r['peak_rss_mb']:.0f} MB, "
            f"{n / r['seconds']:.0f} img/s"
        )
    say(f"input pipeline, 224-px JPEG batches, {pipe['workers']} workers: {pipe['img_per_s']:.0f} img/s")

    if not args.quick:
        rates = run("eval_batch", "minivit28", 3)
        rows.append({"model": "minivit28", "case": "pgd10_eval_by_batch", "img_per_s": rates})
        best = max((k for k in rates if k != "peak_rss_mb"), key=rates.get)
        say(
            "PGD-10 eval img/s by batch size, minivit28: "
            + "  ".join(f"{k}: {rates[k]:.0f}" for k in rates if k != "peak_rss_mb")
            + f" (best {best})"
        )
        aa = run("autoattack", 64)
        figures["autoattack_img_per_s"] = aa["img_per_s"]
        say(f"AutoAttack (standard) on an untrained mini-ViT: {aa['img_per_s']:.1f} img/s")
    peaks = [r["peak_rss_mb"] for r in rows if "impl" in r and r["peak_rss_mb"]]
    if peaks:
        figures["train_peak_rss_mb_max"] = max(peaks)
    figures = {k: v for k, v in figures.items() if not math.isnan(v)}  # cases this run skipped
    for k, v in figures.items():
        say(f"{k}={v:.3f}")
    say(f"done in {time.time() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"figures": figures, "rows": rows, "bf16_units": bf16_units}, indent=2) + "\n"
        )


if __name__ == "__main__":
    if not serve_case(CASES, sys.argv):
        main()
