"""Reports from run directories: result cards grouped by (source, dataset, norm, ε) into cells by (method, init,
objective), each with mean ± sample std over its seeds, TA/TR and sources of robustness (``docs/metrics.md``).
Reads JSON only (no torch, no matplotlib); ``document.write_report`` writes the files, ``figures.py`` draws."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from .errors import UserError

ORDER = ["linear", "full", "vpt", "lora", "adapter", "bias"]
INITS = ["ranli", "roli"]
OBJECTIVES = ["at", "trades", "natural"]
ADVERSARIAL = "at"  # the objective of the Linear / Full-FT runs that TA and TR compare (the paper's PGD-AT)
Stat = tuple[float, float, int]  # (mean, sample std, number of values)
STATS = {"clean": "clean_acc", "pgd": "pgd_acc", "autoattack": "autoattack_acc"}  # cell key: result-card key
STATS |= {k: k for k in ("trainable_params", "total_params")}
GROUP = (("source", "unknown"), ("dataset", "?"), ("norm", "Linf"), ("eps", "?"))  # result-card key, default


def fmt_pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def md_table(head: list, rows: list[list], align: str = "") -> str:
    """A markdown table; ``align`` has one letter per column, ``r`` right-aligns it; ``|`` in a cell is escaped."""
    lines = ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in [head, *rows]]
    sep = "|" + "".join("---:|" if a == "r" else "---|" for a in align.ljust(len(head), "l"))
    return "\n".join([lines[0], sep, *lines[1:]])


def results_table(cards: list[dict]) -> str:
    """Markdown table, one row per run: method, init, clean, PGD, AutoAttack, trainable params, flags."""
    rows = []
    for c in cards:
        pgd = f"{fmt_pct(c.get('pgd_acc'))} (PGD-{(c.get('pgd_settings') or {}).get('steps', '')})"
        aa = fmt_pct(c.get("autoattack_acc"))
        aa += "" if (c.get("autoattack_settings") or {}).get("standard", True) else " (non-standard)"
        n = f"{c.get('n_eval', '—')} ({c.get('n_autoattack', '—')})"
        params = "—" if c.get("trainable_params") is None else f"{c['trainable_params']:,}"
        flags = ", ".join(f["flag"] for f in c.get("flags") or []) or "none"
        rows.append([c.get("method", "?"), c.get("init", "?"), fmt_pct(c.get("clean_acc")), pgd, aa, n, params, flags])
    head = ["method", "init", "clean %", "PGD-k %", "AutoAttack %", "n (AA)", "trainable params", "flags"]
    return md_table(head, rows, "llrrrrrl")


def find_results(dirs: list[Path]) -> list[tuple[Path, dict]]:
    """Top-level result cards under ``dirs`` (a RoLI run's stage folders are part of their run)."""
    found = []
    for d in dirs:
        if not Path(d).exists():
            raise UserError(f"report: no such directory: {d}")
        for p in sorted(Path(d).rglob("result.json")):
            stage = p.parent.name in ("stage1", "stage2") and (p.parent.parent / "result.json").exists()
            if stage or ".replaced" in p.parts:  # .replaced: the old run a killed --overwrite keeps aside
                continue
            try:
                card = json.loads(p.read_text())
            except (ValueError, UnicodeDecodeError):
                raise UserError(f"report: {p} is not valid JSON") from None
            accs = [card.get(k) for k in ("clean_acc", "pgd_acc", "autoattack_acc")] if isinstance(card, dict) else []
            if not isinstance(card, dict) or any(a is not None and not isinstance(a, int | float) for a in accs):
                raise UserError(f"report: {p} does not hold a result card (accuracies must be numbers)")
            found.append((p.parent, card))
    if not found:
        raise UserError(f"report: no result.json under {', '.join(map(str, dirs))}")
    return found


def read_metrics(run_dir: Path) -> list[dict]:
    """Per-epoch records of a run's final stage (``stage2/`` for RoLI); [] if there are none."""
    for p in (run_dir / "stage2" / "metrics.jsonl", run_dir / "metrics.jsonl"):
        if p.is_file():
            out = []
            for line in p.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue  # a line cut short by an interrupted run
            return out
    return []


def find_sweeps(dirs: list[Path]) -> list[tuple[Path, dict]]:
    """``eval.json`` files holding an ε sweep."""
    found = []
    for p in (p for d in dirs for p in sorted(Path(d).rglob("eval.json"))):
        try:
            ev = json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(ev, dict) and ev.get("sweep"):
            found.append((p.parent, ev))
    return found


def mean_std(values: list) -> Stat | None:
    """(mean, sample std (ddof=1; 0 for one value), n) of the non-None values, or None if there are none."""
    vs = [float(v) for v in values if v is not None]
    return (statistics.mean(vs), statistics.stdev(vs) if len(vs) > 1 else 0.0, len(vs)) if vs else None


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson's r; None for fewer than 3 points or a constant coordinate (r would be ±1 or undefined)."""
    try:
        return statistics.correlation(xs, ys) if len(xs) >= 3 else None
    except statistics.StatisticsError:
        return None


def fmt_stat(stat: Stat | None, n_total: int) -> str:
    """Percent, ``mean ± std`` when more than one run, ``[k/n]`` when only k of the cell's n runs have it."""
    if stat is None:
        return "—"
    m, sd, n = stat
    s = f"{100 * m:.2f}" + (f" ± {100 * sd:.2f}" if n > 1 else "")
    return s + (f" [{n}/{n_total}]" if n != n_total else "")


def cell_key(card: dict) -> tuple[str, str, str]:
    """(method, init, objective); a method run with options is its own cell (``lora(rank=4)``), never averaged."""
    method, opts = str(card.get("method", "?")), card.get("method_options") or {}
    if opts:
        method += "(" + ",".join(f"{k}={opts[k]}" for k in sorted(opts)) + ")"
    return method, str(card.get("init", "ranli")), str(card.get("objective", ADVERSARIAL))


def base_method(method: str) -> str:
    """``lora(rank=4)`` -> ``lora``."""
    return method.split("(", 1)[0]


def _order(key: tuple[str, str, str]) -> tuple:
    m, i, o = key
    rank = [ORDER.index(base_method(m)) if base_method(m) in ORDER else len(ORDER), m]
    return (*rank, INITS.index(i) if i in INITS else 9, OBJECTIVES.index(o) if o in OBJECTIVES else 9, o)


def cell_label(key: tuple[str, str, str]) -> str:
    """``method/init``, with ``[objective]`` unless it is the adversarial one."""
    m, i, o = key
    return f"{m}/{i}" + ("" if o == ADVERSARIAL else f" [{o}]")


def aggregate(runs: list[tuple[Path, dict]]) -> dict:
    """{(source, dataset, norm, ε): {cell key: cell}}; a cell holds its runs, seeds, notes and mean/std of each stat."""
    groups: dict = defaultdict(lambda: defaultdict(list))
    for path, card in runs:  # runs with different sources or threat models are never compared
        groups[tuple(str(card.get(k, d)) for k, d in GROUP)][cell_key(card)].append((path, card))
    out: dict = {g: {} for g in sorted(groups)}
    for g, cells in out.items():
        for k in sorted(groups[g], key=_order):
            cards = [c for _, c in groups[g][k]]
            seeds, n_eval, notes = [c.get("seed") for c in cards], {c.get("n_eval") for c in cards}, []
            if dup := sorted({s for s in seeds if seeds.count(s) > 1}, key=str):
                notes.append(f"seed(s) {dup} appear more than once (identical settings averaged as if independent)")
            if len(n_eval) > 1:
                notes.append(f"runs were tested on different numbers of examples {sorted(n_eval, key=str)}")
            cells[k] = {"runs": groups[g][k], "n": len(cards), "seeds": seeds}
            cells[k].update({m: mean_std([c.get(f) for c in cards]) for m, f in STATS.items()})
            cells[k].update(n_flags=sum(len(c.get("flags") or []) for c in cards), notes=notes)
    return out


def transfer_metrics(cells: dict) -> dict:
    """TA = clean(Linear)/clean(Full-FT), TR = robust(Linear)/robust(Full-FT), each accuracy the mean over seeds;
    Linear = (linear, ranli, at), Full-FT = (full, ranli, at); None when a run is missing or a denominator 0."""
    lin, full = cells.get(("linear", "ranli", ADVERSARIAL)), cells.get(("full", "ranli", ADVERSARIAL))

    def ratio(metric: str) -> float | None:
        a, b = (None if c is None or c[metric] is None else c[metric][0] for c in (lin, full))
        return None if a is None or b is None or b == 0 else a / b

    named = (("Linear (linear/ranli, at)", lin), ("Full-FT (full/ranli, at)", full))
    missing = [name for name, c in named if c is None]
    return {"TA": ratio("clean"), "TR": ratio("pgd"), "TR_autoattack": ratio("autoattack"), "missing": missing}


def robustness_sources(cells: dict) -> dict | None:
    """Inherited robustness (natural linear probe on the frozen backbone, under attack) vs achieved (each
    adversarially trained cell); None when the group has no natural linear probe."""
    nat = cells.get(("linear", "ranli", "natural"))
    if nat is None or nat["pgd"] is None:
        return None
    inherited = nat["pgd"]
    rows = [
        {"cell": k, "achieved": c["pgd"], "gain": c["pgd"][0] - inherited[0]}
        for k, c in cells.items()
        if k[2] != "natural" and c["pgd"] is not None
    ]
    return {"inherited": inherited, "inherited_clean": nat["clean"], "n": nat["n"], "rows": rows}
