"""Reports from run directories: tables, figures, transferred accuracy/robustness, sources of robustness.

``write_report(dirs, out)`` collects every finished run (``result.json``) and every ε sweep (``eval.json``
with a ``"sweep"``) under ``dirs`` and writes ``report.md`` (figures as ``figures/*.png``), a self-contained
``report.html`` (the same figures embedded as base64) and ``report.json`` (the aggregated numbers).

Runs are grouped by (source checkpoint, dataset, norm, ε) and, inside a group, into cells by
(method, init, objective); a cell's numbers are the mean ± sample standard deviation over its runs (seeds).
The definitions of every derived quantity are in ``docs/metrics.md``.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path

from .errors import UserError
from .models import atomic_write

ORDER = ["linear", "full", "vpt", "lora", "adapter", "bias"]
INITS = ["ranli", "roli"]
OBJECTIVES = ["at", "trades", "natural"]
ADVERSARIAL = "at"  # the objective of the Linear / Full-FT runs that TA and TR compare (the paper's PGD-AT)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def results_table(cards: list[dict]) -> str:
    """Markdown table, one row per run: method, init, clean, PGD, AutoAttack, trainable params, flags."""
    lines = [
        "| method | init | clean % | PGD-k % | AutoAttack % | n (AA) | trainable params | flags |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in cards:
        k = (c.get("pgd_settings") or {}).get("steps", "")
        aa = _pct(c.get("autoattack_acc"))
        if c.get("autoattack_settings") and not c["autoattack_settings"].get("standard", True):
            aa += " (non-standard)"
        flags = ", ".join(f["flag"] for f in c.get("flags") or []) or "none"
        params = c.get("trainable_params")
        lines.append(
            f"| {c.get('method', '?')} | {c.get('init', '?')} | {_pct(c.get('clean_acc'))} | {_pct(c.get('pgd_acc'))} "
            f"(PGD-{k}) | {aa} | {c.get('n_eval', '—')} ({c.get('n_autoattack', '—')}) | "
            f"{'—' if params is None else f'{params:,}'} | {flags} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- collecting runs


def find_results(dirs: list[Path]) -> list[tuple[Path, dict]]:
    """Top-level result cards under ``dirs`` (a RoLI run's stage folders are part of their run)."""
    found = []
    for d in dirs:
        if not Path(d).exists():
            raise UserError(f"report: no such directory: {d}")
        for p in sorted(Path(d).rglob("result.json")):
            if p.parent.name in ("stage1", "stage2") and (p.parent.parent / "result.json").exists():
                continue
            try:
                card = json.loads(p.read_text())
            except (ValueError, UnicodeDecodeError):
                raise UserError(f"report: {p} is not valid JSON") from None
            if not isinstance(card, dict):
                raise UserError(f"report: {p} does not hold a result card")
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
    for d in dirs:
        for p in sorted(Path(d).rglob("eval.json")):
            try:
                ev = json.loads(p.read_text())
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(ev, dict) and ev.get("sweep"):
                found.append((p.parent, ev))
    return found


# ----------------------------------------------------------------------------- aggregation


def mean_std(values: list) -> tuple[float, float, int] | None:
    """(mean, sample std (ddof=1; 0 for one value), n) of the non-None values, or None if there are none."""
    vs = [float(v) for v in values if v is not None]
    if not vs:
        return None
    m = sum(vs) / len(vs)
    sd = math.sqrt(sum((v - m) ** 2 for v in vs) / (len(vs) - 1)) if len(vs) > 1 else 0.0
    return m, sd, len(vs)


def _ms(stat: tuple[float, float, int] | None, n_total: int) -> str:
    """Percent, ``mean ± std`` when more than one run, ``[k/n]`` when only k of the cell's n runs have it."""
    if stat is None:
        return "—"
    m, sd, n = stat
    s = f"{100 * m:.2f}" + (f" ± {100 * sd:.2f}" if n > 1 else "")
    return s + (f" [{n}/{n_total}]" if n != n_total else "")


def group_key(card: dict) -> tuple[str, str, str, str]:
    return (str(card.get("source", "unknown")), str(card.get("dataset", "?")), str(card.get("norm", "Linf")),
            str(card.get("eps", "?")))  # fmt: skip


def cell_key(card: dict) -> tuple[str, str, str]:
    """(method, init, objective); a method run with options is its own cell, e.g. ``lora(rank=4)``, so
    different ranks or tuners are never averaged together."""
    method, opts = str(card.get("method", "?")), card.get("method_options") or {}
    if opts:
        method += "(" + ",".join(f"{k}={opts[k]}" for k in sorted(opts)) + ")"
    return method, str(card.get("init", "ranli")), str(card.get("objective", ADVERSARIAL))


def _base(method: str) -> str:
    return method.split("(", 1)[0]


def _order(key: tuple[str, str, str]) -> tuple:
    m, i, o = key
    return (ORDER.index(_base(m)) if _base(m) in ORDER else len(ORDER), m, INITS.index(i) if i in INITS else 9,
            OBJECTIVES.index(o) if o in OBJECTIVES else 9, o)  # fmt: skip


def cell_label(key: tuple[str, str, str]) -> str:
    m, i, o = key
    return f"{m}/{i}" + ("" if o == ADVERSARIAL else f" [{o}]")


def aggregate(runs: list[tuple[Path, dict]]) -> dict:
    """{group key: {cell key: cell}}; a cell holds its runs, seeds and mean/std of every accuracy."""
    groups: dict = defaultdict(lambda: defaultdict(list))
    for path, card in runs:
        groups[group_key(card)][cell_key(card)].append((path, card))
    out = {}
    for g in sorted(groups):
        cells = {}
        for k in sorted(groups[g], key=_order):
            members = groups[g][k]
            cards = [c for _, c in members]
            seeds = [c.get("seed") for c in cards]
            cells[k] = {
                "runs": members,
                "n": len(cards),
                "seeds": seeds,
                "clean": mean_std([c.get("clean_acc") for c in cards]),
                "pgd": mean_std([c.get("pgd_acc") for c in cards]),
                "autoattack": mean_std([c.get("autoattack_acc") for c in cards]),
                "trainable_params": mean_std([c.get("trainable_params") for c in cards]),
                "total_params": mean_std([c.get("total_params") for c in cards]),
                "n_flags": sum(len(c.get("flags") or []) for c in cards),
                "notes": _cell_notes(cards),
            }
        out[g] = cells
    return out


def _cell_notes(cards: list[dict]) -> list[str]:
    notes = []
    seeds = [c.get("seed") for c in cards]
    dup = sorted({s for s in seeds if seeds.count(s) > 1}, key=str)
    if dup:
        notes.append(f"seed(s) {dup} appear more than once (identical settings averaged as if independent)")
    n_eval = {c.get("n_eval") for c in cards}
    if len(n_eval) > 1:
        notes.append(f"runs were tested on different numbers of examples {sorted(n_eval, key=str)}")
    return notes


def _mean(cell: dict | None, metric: str) -> float | None:
    return None if cell is None or cell[metric] is None else cell[metric][0]


def transfer_metrics(cells: dict) -> dict:
    """TA = clean(Linear)/clean(Full-FT), TR = robust(Linear)/robust(Full-FT) (docs/metrics.md).

    Linear = (linear, ranli, at), Full-FT = (full, ranli, at); each accuracy is the mean over seeds.
    A value is None when a run is missing or the Full-FT denominator is 0.
    """
    lin, full = cells.get(("linear", "ranli", ADVERSARIAL)), cells.get(("full", "ranli", ADVERSARIAL))

    def ratio(metric: str) -> float | None:
        a, b = _mean(lin, metric), _mean(full, metric)
        return None if a is None or b is None or b == 0 else a / b

    missing = [
        name for name, c in (("Linear (linear/ranli, at)", lin), ("Full-FT (full/ranli, at)", full)) if c is None
    ]
    return {"TA": ratio("clean"), "TR": ratio("pgd"), "TR_autoattack": ratio("autoattack"), "missing": missing}


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson's r; None for fewer than 3 points or a constant coordinate (r would be ±1 or undefined)."""
    if len(xs) < 3:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def robustness_sources(cells: dict) -> dict | None:
    """Inherited robustness (natural linear probe on the frozen backbone, under attack) vs achieved (each
    adversarially trained cell); None when the group has no natural linear probe."""
    nat = cells.get(("linear", "ranli", "natural"))
    if nat is None or nat["pgd"] is None:
        return None
    inherited = nat["pgd"]
    rows = []
    for k, c in cells.items():
        if k[2] == "natural" or c["pgd"] is None:
            continue
        rows.append({"cell": k, "achieved": c["pgd"], "gain": c["pgd"][0] - inherited[0]})
    return {"inherited": inherited, "inherited_clean": nat["clean"], "n": nat["n"], "rows": rows}


# ----------------------------------------------------------------------------- figures (matplotlib, Agg)


def _figure(w: float, h: float, ncols: int = 1, nrows: int = 1):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    return fig, axes


def _color(method: str):
    from matplotlib import colormaps

    method = _base(method)
    i = ORDER.index(method) if method in ORDER else len(ORDER) + sum(map(ord, method)) % 3
    return colormaps["tab10"](i % 10)


MARKER = {"ranli": "o", "roli": "s"}


def _legend(ax, methods: list[str], inits: list[str], star: bool = False) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=_color(m), marker="o", ls="", label=m) for m in methods]
    handles += [Line2D([], [], color="grey", marker=MARKER.get(i, "^"), ls="", label=i) for i in inits]
    if star:
        handles.append(Line2D([], [], color="grey", marker="*", ms=10, ls="", label="linear probe"))
    ax.legend(handles=handles, fontsize=7, loc="best", framealpha=0.8)


def fig_clean_robust(cells: dict, title: str, path: Path) -> Path | None:
    """Fig. 1 of the paper: x clean, y robust, one point per method x init, arrows RanLI -> RoLI."""
    adv = {k: c for k, c in cells.items() if k[2] != "natural" and c["clean"] is not None}
    if not adv:
        return None
    metrics = [("pgd", "PGD")] + ([("autoattack", "AutoAttack")] if any(c["autoattack"] for c in adv.values()) else [])
    fig, axes = _figure(5.2 * len(metrics), 4.2, ncols=len(metrics))
    for ax, (metric, name) in zip(axes, metrics):
        pts = {}
        for k, c in adv.items():
            if c[metric] is None:
                continue
            x, y = 100 * c["clean"][0], 100 * c[metric][0]
            pts[k] = (x, y)
            marker = "*" if k[0] == "linear" else MARKER.get(k[1], "^")
            ax.errorbar(x, y, xerr=100 * c["clean"][1], yerr=100 * c[metric][1], fmt=marker, color=_color(k[0]),
                        ms=11 if marker == "*" else 7, capsize=2, lw=0.8)  # fmt: skip
            ax.annotate(cell_label(k), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        for (m, i, o), (x, y) in pts.items():
            if i == "ranli" and (m, "roli", o) in pts:
                x2, y2 = pts[(m, "roli", o)]
                ax.annotate("", xy=(x2, y2), xytext=(x, y),
                            arrowprops=dict(arrowstyle="-|>", color=_color(m), lw=1.4, shrinkA=4, shrinkB=4))  # fmt: skip
        ax.set_xlabel("clean accuracy (%)")
        ax.set_ylabel(f"robust accuracy, {name} (%)")
        ax.set_title(f"{title}\n{name}: arrows RanLI → RoLI", fontsize=9)
        ax.grid(alpha=0.3)
        methods = sorted({k[0] for k in pts}, key=lambda m: _order((m, "", "")))
        _legend(ax, methods, sorted({k[1] for k in pts if k[0] != "linear"}), star="linear" in methods)
    fig.savefig(path)
    return path


def fig_curves(cells: dict, title: str, path: Path) -> Path | None:
    """Per-epoch validation clean and PGD accuracy (mean over seeds) of each cell's final stage."""
    series = {}
    for k, c in cells.items():
        per_epoch: dict = defaultdict(lambda: ([], []))
        for run_dir, _ in c["runs"]:
            for r in read_metrics(run_dir):
                if "epoch" in r:
                    per_epoch[int(r["epoch"]) + 1][0].append(r.get("val_clean"))
                    per_epoch[int(r["epoch"]) + 1][1].append(r.get("val_pgd"))
        if per_epoch:
            series[k] = sorted(per_epoch.items())
    if not series:
        return None
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(10, 3.8, ncols=2)
    for j, (ax, name) in enumerate(zip(axes, ("validation clean (%)", "validation PGD (%)"))):
        for k, pts in series.items():
            xs = [e for e, v in pts if mean_std(v[j])]
            ys = [100 * mean_std(v[j])[0] for e, v in pts if mean_std(v[j])]
            ls = ":" if k[2] == "natural" else ("-" if k[1] == "roli" else "--")
            ax.plot(xs, ys, ls=ls, marker=MARKER.get(k[1], "^"), ms=3, color=_color(k[0]), label=cell_label(k))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{title}: validation curves (RoLI: stage 2)", fontsize=9, loc="left")
    axes[1].legend(fontsize=6, ncol=2, loc="best")
    fig.savefig(path)
    return path


def fig_params(cells: dict, title: str, path: Path) -> Path | None:
    """Trainable-parameter cost (log x) vs robust (PGD) accuracy."""
    pts = {k: c for k, c in cells.items() if k[2] != "natural" and c["pgd"] and c["trainable_params"]}
    if not pts:
        return None
    fig, axes = _figure(5.5, 4.2)
    ax = axes[0]
    for k, c in pts.items():
        x, y = c["trainable_params"][0], 100 * c["pgd"][0]
        ax.errorbar(x, y, yerr=100 * c["pgd"][1], fmt=MARKER.get(k[1], "^"), color=_color(k[0]), capsize=2, ms=7)
        ax.annotate(cell_label(k), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("robust accuracy, PGD (%)")
    ax.set_title(f"{title}: cost vs robustness", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    _legend(ax, sorted({k[0] for k in pts}, key=lambda m: _order((m, "", ""))), sorted({k[1] for k in pts}))
    fig.savefig(path)
    return path


def fig_sources(sources: list[tuple[str, dict]], path: Path) -> Path | None:
    """Bar chart per group: inherited robustness (natural linear probe) vs achieved (adversarial finetuning)."""
    if not sources:
        return None
    fig, axes = _figure(max(6.0, 0.55 * max(len(s["rows"]) + 1 for _, s in sources) + 2), 3.4 * len(sources),
                        nrows=len(sources))  # fmt: skip
    for ax, (title, s) in zip(axes, sources):
        labels = ["inherited\n(natural linear)"] + [cell_label(r["cell"]).replace("/", "\n") for r in s["rows"]]
        vals = [s["inherited"]] + [r["achieved"] for r in s["rows"]]
        colors = ["0.55"] + [_color(r["cell"][0]) for r in s["rows"]]
        hatches = [""] + ["//" if r["cell"][1] == "roli" else "" for r in s["rows"]]
        for i, (v, col, h) in enumerate(zip(vals, colors, hatches)):
            ax.bar(i, 100 * v[0], yerr=100 * v[1] if v[2] > 1 else None, color=col, hatch=h, edgecolor="k", lw=0.5,
                   capsize=2)  # fmt: skip
        ax.axhline(100 * s["inherited"][0], color="0.3", ls="--", lw=1, label="inherited level")
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_ylabel("PGD accuracy (%)")
        ax.set_title(f"{title}\nrobustness inherited vs achieved (hatched = RoLI)", fontsize=9, loc="left")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.savefig(path)
    return path


def fig_transfer(points: list[tuple[str, float, float]], r: float | None, path: Path) -> Path | None:
    """Transferred robustness vs transferred accuracy, one point per group, Pearson r in the title."""
    if not points:
        return None
    fig, axes = _figure(5.2, 4.4)
    ax = axes[0]
    for label, ta, tr in points:
        ax.plot(ta, tr, "o", color="C0")
        ax.annotate(label, (ta, tr), textcoords="offset points", xytext=(4, 4), fontsize=7)
    lo = min(min(p[1], p[2]) for p in points) - 0.05
    hi = max(max(p[1], p[2]) for p in points) + 0.05
    ax.plot([lo, hi], [lo, hi], ls="--", color="0.6", lw=1, label="TR = TA")
    ax.margins(0.15)
    ax.set_xlabel("transferred accuracy TA = clean(Linear) / clean(Full-FT)")
    ax.set_ylabel("transferred robustness TR = PGD(Linear) / PGD(Full-FT)")
    rs = "n/a (needs ≥ 3 groups)" if r is None else f"{r:.3f}"
    ax.set_title(f"TR vs TA across {len(points)} group(s); Pearson r = {rs}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path)
    return path


def fig_sweeps(sweeps: list[tuple[str, dict]], path: Path) -> Path | None:
    """Accuracy vs ε for every eval.json with a sweep (PGD solid, AutoAttack dashed)."""
    if not sweeps:
        return None
    fig, axes = _figure(6, 4.2)
    ax = axes[0]
    for i, (label, ev) in enumerate(sweeps):
        pts = sorted(ev["sweep"], key=lambda p: p["eps"])
        eps = [p["eps"] for p in pts]
        ax.plot(
            eps,
            [100 * p.get("pgd", p.get("clean", 0)) for p in pts],
            "-o",
            ms=4,
            color=f"C{i % 10}",
            label=f"{label} PGD",
        )
        aa = [(p["eps"], p["autoattack"]) for p in pts if p.get("autoattack") is not None]
        if aa:
            ax.plot(*zip(*[(e, 100 * a) for e, a in aa]), "--s", ms=4, color=f"C{i % 10}", label=f"{label} AutoAttack")
    ax.set_xlabel("ε (pixel units, [0,1] images)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("ε sweeps (eval.json)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.savefig(path)
    return path


# ----------------------------------------------------------------------------- document blocks -> md / html


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:80] or "x"


def _source_name(source: str) -> str:
    return Path(source).stem if source not in ("scratch", "timm-pretrained", "unknown") else source


def _rel(path: Path, root: Path) -> str:
    try:
        rel = os.path.relpath(path, root)
    except ValueError:
        return str(path)
    return path.name if rel == "." else rel


def _md(blocks: list[tuple]) -> str:
    out = []
    for b in blocks:
        if b[0] == "h":
            out.append("#" * b[1] + " " + b[2])
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "table":
            _, head, rows = b
            esc = [[str(c).replace("|", "\\|") for c in r] for r in [head, *rows]]
            out.append("\n".join(["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(head)]
                                 + ["| " + " | ".join(r) + " |" for r in esc[1:]]))  # fmt: skip
        elif b[0] == "img":
            out.append(f"![{b[2]}]({b[3]})")
    return "\n\n".join(out) + "\n"


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px}
th{background:#f0f0f0}td{text-align:right}td:first-child{text-align:left}img{max-width:100%}
code{background:#f4f4f4;padding:0 3px}h2{border-bottom:1px solid #ddd}"""


def _inline(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _html(blocks: list[tuple], title: str) -> str:
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           f"<style>{CSS}</style></head><body>"]  # fmt: skip
    for b in blocks:
        if b[0] == "h":
            out.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            out.append(f"<p>{_inline(b[1])}</p>")
        elif b[0] == "table":
            _, head, rows = b
            out.append("<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in head) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows]
            out.append("</table>")
        elif b[0] == "img":
            data = base64.b64encode(Path(b[1]).read_bytes()).decode("ascii")
            out.append(f"<p><img alt='{html.escape(b[2], quote=True)}' src='data:image/png;base64,{data}'></p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- the report


def _fmt_ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def write_report(dirs: list[Path], out: Path | None = None) -> Path:
    """Write ``report.md``, ``report.html``, ``report.json`` and ``figures/*.png`` to ``out``; return report.md."""
    dirs = [Path(d) for d in dirs]
    results = find_results(dirs)
    out = Path(out or dirs[0])
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    for stale in figs.glob("*.png"):  # figures of an earlier report of groups that may be gone now
        if re.match(r"(clean_robust_|curves_|params_).*|(transfer|sources|eps_sweep)\.png$", stale.name):
            stale.unlink()
    root = Path(os.path.commonpath([str(d.resolve()) for d in dirs]))
    groups = aggregate([(p.resolve(), c) for p, c in results])

    def img(path: Path | None, alt: str) -> list[tuple]:
        return [] if path is None else [("img", path, alt, path.relative_to(out).as_posix())]

    blocks: list[tuple] = [("h", 1, "advtransfer report")]
    n_roli = sum(1 for _, c in results if c.get("init") == "roli")
    blocks.append(("p", f"{len(results)} finished run(s) ({n_roli} RoLI) in {len(groups)} group(s) of (source, "
                        f"dataset, threat model), from {', '.join(f'`{d}`' for d in dirs)}. Accuracies in %, "
                        "mean ± sample std over the runs (seeds) of a cell; [k/n] = only k of n runs have the value. "
                        "Definitions: `docs/metrics.md`."))  # fmt: skip
    summary: dict = {"groups": [], "n_runs": len(results)}
    transfer_points, sources_for_fig, flags_rows = [], [], []
    for g, cells in groups.items():
        source, dataset, norm, eps = g
        title = f"{_source_name(source)} → {dataset} (ε={eps} {norm})"
        slug = _slug(f"{_source_name(source)}_{dataset}_{norm}_{eps}")
        blocks += [("h", 2, title), ("p", f"Source checkpoint: `{source}`.")]
        rows = []
        for k, c in cells.items():
            tp, tot = c["trainable_params"], c["total_params"]
            share = f" ({100 * tp[0] / tot[0]:.2f}%)" if tp and tot and tot[0] else ""
            rows.append([k[0], k[1], k[2], c["n"], ",".join(str(s) for s in c["seeds"]), _ms(c["clean"], c["n"]),
                         _ms(c["pgd"], c["n"]), _ms(c["autoattack"], c["n"]),
                         ("—" if tp is None else f"{round(tp[0]):,}") + share, c["n_flags"]])  # fmt: skip
        blocks += [("h", 3, "Accuracy (clean, PGD, AutoAttack)"),
                   ("table", ["method", "init", "objective", "runs", "seeds", "clean %", "PGD %", "AutoAttack %",
                              "trainable params", "flags"], rows)]  # fmt: skip
        notes = [f"{cell_label(k)}: {n}" for k, c in cells.items() for n in c["notes"]]
        if notes:
            blocks.append(("p", "Notes: " + "; ".join(notes) + "."))
        blocks += img(fig_clean_robust(cells, title, figs / f"clean_robust_{slug}.png"), f"clean vs robust, {title}")

        tm = transfer_metrics(cells)
        blocks += [("h", 3, "Transferred accuracy and robustness"),
                   ("table", ["TA = clean(Linear)/clean(Full-FT)", "TR (PGD)", "TR (AutoAttack)", "missing runs"],
                    [[_fmt_ratio(tm["TA"]), _fmt_ratio(tm["TR"]), _fmt_ratio(tm["TR_autoattack"]),
                      ", ".join(tm["missing"]) or "none"]])]  # fmt: skip
        if tm["TA"] is not None and tm["TR"] is not None:
            transfer_points.append((f"{_source_name(source)}→{dataset}", tm["TA"], tm["TR"]))

        src = robustness_sources(cells)
        blocks.append(("h", 3, "Sources of robustness"))
        if src is None:
            blocks.append(("p", "No natural-objective linear probe (method linear, init ranli, train.objective "
                                "natural) in this group, so inherited robustness is not measured."))  # fmt: skip
        else:
            blocks.append(("p", f"Inherited (natural linear probe on the frozen source, n={src['n']}): PGD "
                                f"{_ms(src['inherited'], src['n'])} %, clean {_ms(src['inherited_clean'], src['n'])} %."))  # fmt: skip
            blocks.append(("table", ["method/init", "achieved PGD %", "inherited PGD %", "gain (pp)"],
                           [[cell_label(r["cell"]), _ms(r["achieved"], r["achieved"][2]), _ms(src["inherited"], src["n"]),
                             f"{100 * r['gain']:+.2f}"] for r in src["rows"]]))  # fmt: skip
            sources_for_fig.append((title, src))
        blocks.append(("h", 3, "Validation curves and cost"))
        blocks += img(fig_curves(cells, title, figs / f"curves_{slug}.png"), f"validation curves, {title}")
        blocks += img(fig_params(cells, title, figs / f"params_{slug}.png"), f"trainable parameters vs PGD, {title}")
        summary["groups"].append({
            "source": source, "dataset": dataset, "norm": norm, "eps": eps, "transfer": tm,
            "inherited_pgd": None if src is None else src["inherited"],
            "cells": [{"method": k[0], "init": k[1], "objective": k[2], "n": c["n"], "seeds": c["seeds"],
                       **{m: c[m] for m in ("clean", "pgd", "autoattack", "trainable_params")},
                       "achieved_minus_inherited": None if src is None or c["pgd"] is None or k[2] == "natural"
                       else c["pgd"][0] - src["inherited"][0]} for k, c in cells.items()],
        })  # fmt: skip
        for c in cells.values():
            for p, card in c["runs"]:
                flags_rows += [
                    [_rel(p, root), f.get("flag", "?"), f.get("detail", "")] for f in card.get("flags") or []
                ]

    r = pearson([p[1] for p in transfer_points], [p[2] for p in transfer_points])
    summary["transfer_points"] = transfer_points
    summary["pearson_TR_TA"] = r
    blocks += [("h", 2, "Transferred robustness vs transferred accuracy"),
               ("p", f"{len(transfer_points)} group(s) with both TA and TR; Pearson r(TR, TA) = "
                     f"{'n/a (needs at least 3 groups)' if r is None else f'{r:.3f}'}.")]  # fmt: skip
    blocks += img(fig_transfer(transfer_points, r, figs / "transfer.png"), "TR vs TA")
    blocks.append(("h", 2, "Robustness inherited vs achieved"))
    if sources_for_fig:
        blocks += img(fig_sources(sources_for_fig, figs / "sources.png"), "inherited vs achieved robustness")
    else:
        blocks.append(("p", "No group has a natural-objective linear probe."))

    sweeps = [(f"{_rel(p.resolve(), root)}: {_source_name(str(ev.get('checkpoint', '?')))} on {ev.get('data', '?')}", ev)
              for p, ev in find_sweeps(dirs)]  # fmt: skip
    blocks.append(("h", 2, "ε sweeps"))
    if sweeps:
        blocks += img(fig_sweeps(sweeps, figs / "eps_sweep.png"), "accuracy vs eps")
        rows = [[lab, f"{p['eps']:.4g}", _pct(p.get("clean")), _pct(p.get("pgd")), _pct(p.get("autoattack"))]
                for lab, ev in sweeps for p in sorted(ev["sweep"], key=lambda q: q["eps"])]  # fmt: skip
        blocks.append(("table", ["eval", "ε", "clean %", "PGD %", "AutoAttack %"], rows))
        flags_rows += [
            [lab, f.get("flag", "?"), f.get("detail", "")] for lab, ev in sweeps for f in ev.get("flags") or []
        ]
    else:
        blocks.append(("p", "No eval.json with a sweep (`advtransfer eval --eps a,b,c --out DIR`)."))

    blocks.append(("h", 2, "Sanity flags"))
    if flags_rows:
        blocks.append(("table", ["run", "flag", "detail"], flags_rows))
    else:
        blocks.append(("p", "No sanity flag was raised by any run or evaluation."))
    blocks += [("h", 2, "All runs"),
               ("table", ["run", "method", "init", "objective", "seed", "clean %", "PGD %", "AutoAttack %", "best epoch"],
                [[_rel(p.resolve(), root), c.get("method"), c.get("init"), c.get("objective", ADVERSARIAL), c.get("seed"),
                  _pct(c.get("clean_acc")), _pct(c.get("pgd_acc")), _pct(c.get("autoattack_acc")),
                  "—" if c.get("best_epoch") is None else c["best_epoch"] + 1] for p, c in results])]  # fmt: skip

    for name, text in (("report.md", _md(blocks)), ("report.html", _html(blocks, "advtransfer report")),
                       ("report.json", json.dumps(summary, indent=2, default=str) + "\n")):  # fmt: skip
        atomic_write(out / name, lambda tmp, text=text: Path(tmp).write_text(text))
    return out / "report.md"
