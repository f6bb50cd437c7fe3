"""Speed and memory of adversarial finetuning: advtransfer vs a re-implementation of the reference algorithm.

    python benchmarks/bench.py [--quick] [--json docs/bench.json]

Everything is measured in this run, on the same model, batch and data, so the ratios are like for like.
The implementations compared in a ratio run in ONE process, each on its own copy of the model, timed
round-robin (first call, one warm-up, then the median of repeated iterations), so machine noise hits
them alike. Peak memory (RSS) cannot be told apart inside one process, so it comes from a short run of
each implementation in a fresh spawned process (not for the compiled cases: they would compile again).

The *reference algorithm* (our own re-implementation of what the paper's code does): fp32; every PGD
step calls ``loss.backward()`` (weight gradients included, then thrown away); the best iterate is picked
by batch-mean loss; one extra final forward scores the last iterate; then the training step.
The reference (and torchattacks) run timm's model as timm builds it; ours runs advtransfer's build of the
same weights and function: a few-channel patchify stem computed as a matrix product on CPU
(``models.PatchConv``) and ConvNets in channels-last layout. ``ours_fp32_stock`` is ours on timm's layout,
to separate the model-layout gain from the algorithm's.
Ours: input-only gradients (``torch.autograd.grad`` w.r.t. δ), frozen parameters outside autograd,
optionally bf16 autocast for attack + step (``train.bf16``), and
torch.compile (``train.compile``; Full-FT only, its compile time is printed apart from the step time).

The last lines printed are ``name=value`` figures (geometric means over the models for Full-FT).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import resource
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

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
METHODS = ("full", "linear", "lora", "vpt")
EPS, STEPS = 8 / 255, 7


def reference_train_step(model, opt, x, y, eps: float, alpha: float, steps: int) -> float:
    """The reference algorithm: fp32, full .backward() per PGD step, best iterate by batch-mean loss."""
    model.eval()
    delta = torch.empty_like(x).uniform_(-eps, eps)
    delta = (x + delta).clamp(0, 1) - x
    best, best_loss = None, -math.inf
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        opt.zero_grad()
        loss.backward()  # computes (and wastes) every trainable weight's gradient
        if loss.item() > best_loss:
            best_loss, best = loss.item(), (x + delta).detach()
        with torch.no_grad():
            delta = (delta + alpha * delta.grad.sign()).clamp(-eps, eps)
            delta = (x + delta).clamp(0, 1) - x
    with torch.no_grad():  # the extra final forward: score the last iterate too
        if F.cross_entropy(model(x + delta), y).item() > best_loss:
            best = (x + delta).detach()
    model.train()
    opt.zero_grad()
    loss = F.cross_entropy(model(best), y)
    loss.backward()
    opt.step()
    return loss.item()


def _build(model_name: str, method: str):
    from advtransfer.methods import apply_method
    from advtransfer.models import ModelSpec, build

    timm_name, kwargs, chans, px, *_ = MODELS[model_name]
    torch.manual_seed(0)
    spec = ModelSpec(timm_name, dict(kwargs), 10, input_size=[px, px])
    model = build(spec)
    opts = {"num_prompts": 10} if method == "vpt" else {}
    apply_method(model, method, opts)
    x = torch.rand(MODELS[model_name][4], chans, px, px)
    y = torch.randint(0, 10, (len(x),))
    return model, x, y


def as_timm_builds_it(model: torch.nn.Module) -> torch.nn.Module:
    """Undo advtransfer's layout choices in place: the stem a convolution again, weights NCHW-contiguous."""
    from advtransfer.models import patchify_as_matmul

    patchify_as_matmul(model, enable=False)
    return model.to(memory_format=torch.contiguous_format)


def _interleaved(fns: dict, iters: int) -> tuple[dict[str, float], dict[str, float]]:
    """Time every function of ``fns`` in this process, round-robin (the starting one rotates), so machine
    noise hits all alike. Returns (first-call seconds, median seconds over ``iters`` after one warm-up)."""
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


def _train_step_fn(model, x, y, impl: str):
    """One PGD-7 adversarial training step of ``impl`` on its own copy of the model."""
    from advtransfer.attacks import Threat
    from advtransfer.config import TrainConfig
    from advtransfer.train import make_optimizer, train_step

    if impl in ("reference", "ours_fp32_stock"):
        as_timm_builds_it(model)
    cfg = TrainConfig(lr=1e-4, bf16=impl.endswith("bf16"), compile=impl.startswith("ours_compile"))
    opt = make_optimizer(model, cfg)
    if impl == "reference":
        return lambda: reference_train_step(model, opt, x, y, EPS, EPS / 4, STEPS)
    runner = torch.compile(model) if cfg.compile else model  # what fit() does with train.compile
    threat = Threat(EPS, "Linf", STEPS)
    return lambda: train_step(runner, opt, x, y, threat, cfg)


def case_train(model_name: str, method: str, impls: list[str], iters: int) -> dict:
    """All implementations on copies of one model, same batch, timed interleaved in this one process."""
    model, x, y = _build(model_name, method)
    fns = {impl: _train_step_fn(copy.deepcopy(model), x, y, impl) for impl in impls}
    first, sec = _interleaved(fns, iters)
    return {
        impl: {"seconds": sec[impl], "img_per_s": len(x) / sec[impl], "first_step_s": first[impl]} for impl in impls
    }


def case_train_memory(model_name: str, method: str, impl: str) -> dict:
    """Peak RSS of two steps of one implementation (its own process: RSS peaks cannot be told apart in one)."""
    model, x, y = _build(model_name, method)
    step = _train_step_fn(model, x, y, impl)
    step()
    step()
    return {}


def case_pgd_eval(model_name: str, iters: int) -> dict:
    """PGD-10 evaluation, torchattacks vs ours, interleaved in this one process."""
    import torchattacks

    from advtransfer.attacks import Threat
    from advtransfer.evaluation import pgd_correct

    model, x, y = _build(model_name, "linear")
    model.eval()
    stock = as_timm_builds_it(copy.deepcopy(model))  # what a torchattacks user has
    atk = torchattacks.PGD(stock, eps=EPS, alpha=EPS / 4, steps=10, random_start=True)
    threat = Threat(EPS, "Linf", 10)

    def torchattacks_pgd():
        adv = atk(x, y)
        with torch.no_grad():
            return stock(adv).argmax(1) == y

    fns = {
        "torchattacks": torchattacks_pgd,
        "ours": lambda: pgd_correct(model, x, y, threat, batch_size=len(x)),
        "ours_stock": lambda: pgd_correct(stock, x, y, threat, batch_size=len(x)),  # the attack alone
    }
    _, sec = _interleaved(fns, iters)
    return {k: len(x) / v for k, v in sec.items()}


def case_autoattack(n: int) -> dict:
    from advtransfer.evaluation import autoattack_correct

    model, x, y = _build("minivit28", "linear")
    model.eval()
    t = time.perf_counter()
    autoattack_correct(model, x[:n], y[:n], eps=EPS, seed=0, batch_size=n)
    sec = time.perf_counter() - t
    return {"seconds": sec, "img_per_s": n / sec}


def _worker(kind: str, args: tuple, q) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args[-1])
    from eval_batch import case_eval_batch

    fn = {
        "train": case_train,
        "memory": case_train_memory,
        "pgd": case_pgd_eval,
        "aa": case_autoattack,
        "eval_batch": case_eval_batch,
    }[kind]
    res = fn(*args[:-1])
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    q.put(res)


def run_case(kind: str, *args, threads: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_worker, args=(kind, (*args, threads), q))
    p.start()
    res = q.get()
    p.join()
    return res


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in xs) / len(xs)) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="mini-ViT only, fewer iterations")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", default="", help="also write all figures to this JSON file")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases (they compile for minutes)")
    args = ap.parse_args()
    models = ["minivit28"] if args.quick else list(MODELS)
    rows, figures = [], {}
    print(f"torch {torch.__version__}, {args.threads} threads, eps {EPS:.4f}, PGD-{STEPS} training, PGD-10 eval")
    print(f"{'model':<12} {'method':<7} {'impl':<17} {'img/s':>8} {'ms/step':>9} {'peak MB':>8}  ratio vs reference")
    for m in models:
        iters = 3 if args.quick else MODELS[m][5]
        for method in METHODS:
            if method == "vpt" and m.startswith("resnet"):
                continue
            impls = ["reference", "ours_fp32", "ours_bf16"]
            impls += ["ours_fp32_stock"] if method == "full" else []
            if method == "full" and not args.no_compile:  # compile time (~1 min per graph here): Full-FT only
                impls += ["ours_compile", "ours_compile_bf16"]
            timed = run_case("train", m, method, impls, iters, threads=args.threads)
            for impl in impls:
                r = timed[impl]
                # peak memory: a short run of this implementation alone (compiling again would take minutes)
                mem = (
                    None
                    if impl.startswith("ours_compile")
                    else run_case("memory", m, method, impl, threads=args.threads)
                )
                r["peak_rss_mb"] = mem["peak_rss_mb"] if mem else float("nan")
                ratio = timed["reference"]["seconds"] / r["seconds"]
                rows.append({"model": m, "method": method, "impl": impl, **r, "speedup": ratio})
                first = f"  (first step {r['first_step_s']:.0f} s: compile)" if impl.startswith("ours_compile") else ""
                print(
                    f"{m:<12} {method:<7} {impl:<17} {r['img_per_s']:8.1f} {1000 * r['seconds']:9.1f} {r['peak_rss_mb']:8.0f}  {ratio:.2f}x{first}",
                    flush=True,
                )
    for m in models:
        if m == "vit_tiny224":
            continue
        pg = run_case("pgd", m, 3 if args.quick else 10, threads=args.threads)
        r = pg["ours"] / pg["torchattacks"]
        figures[f"pgd_eval_speedup_{m}"] = r
        rows.append(
            {
                "model": m,
                "case": "pgd10_eval",
                "torchattacks_img_s": pg["torchattacks"],
                "ours_img_s": pg["ours"],
                "ours_stock_model_img_s": pg["ours_stock"],
                "speedup": r,
            }
        )
        print(
            f"PGD-10 eval {m}: torchattacks {pg['torchattacks']:.0f} img/s, ours {pg['ours']:.0f} img/s -> {r:.2f}x"
            f" (ours on timm's layout {pg['ours_stock']:.0f} img/s -> {pg['ours_stock'] / pg['torchattacks']:.2f}x)"
        )
    from eval_batch import report

    for m in models:
        if m == "vit_tiny224":
            continue
        rates = run_case("eval_batch", m, 2 if args.quick else 3, threads=args.threads)
        rates = {int(k): v for k, v in rates.items() if k != "peak_rss_mb"}
        rows.append({"model": m, "case": "pgd10_eval_by_batch", "img_per_s": rates})
        print(report(m, rates), flush=True)
    aa = run_case("aa", 64 if not args.quick else 16, threads=args.threads)
    print(f"AutoAttack (standard) on an untrained mini-ViT: {aa['img_per_s']:.1f} img/s")

    def sp(impl: str, method: str = "full") -> list[float]:
        return [r["speedup"] for r in rows if r.get("impl") == impl and r.get("method") == method]

    figures["train_step_speedup_fp32"] = geomean(sp("ours_fp32"))
    figures["train_step_speedup_bf16"] = geomean(sp("ours_bf16"))
    figures["train_step_speedup_best"] = geomean([max(a, b) for a, b in zip(sp("ours_fp32"), sp("ours_bf16"))])
    if not args.no_compile:
        figures["train_step_speedup_fp32_compiled"] = geomean(sp("ours_compile"))
        figures["train_step_speedup_bf16_compiled"] = geomean(sp("ours_compile_bf16"))
        figures["train_step_speedup_best_any"] = geomean(
            [max(r["speedup"] for r in rows if r.get("model") == m and r.get("method") == "full") for m in models]
        )
    for method in METHODS:
        figures[f"train_step_speedup_fp32_{method}"] = geomean(sp("ours_fp32", method))
    figures["pgd_eval_speedup_vs_torchattacks"] = geomean(
        [v for k, v in figures.items() if k.startswith("pgd_eval_speedup_")]
    )
    figures["autoattack_img_per_s"] = aa["img_per_s"]
    figures["peak_rss_mb_max"] = max(r["peak_rss_mb"] for r in rows if not math.isnan(r.get("peak_rss_mb", math.nan)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "figures": figures}, f, indent=2)
    for k, v in figures.items():
        print(f"{k}={v:.3f}")


if __name__ == "__main__":
    main()
