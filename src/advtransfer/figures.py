"""Report figures as matplotlib ``Figure`` objects (no pyplot: no global state, no display backend); each ``fig_*``
returns one, or None when it has nothing to draw. Accuracy axes span at least ``MIN_SPAN`` points, so near-equal
values are not blown up over a whole axis; point labels are placed where they overlap no marker and no label."""

from __future__ import annotations

import re
from collections import defaultdict
from functools import partial
from pathlib import Path

from matplotlib import colormaps, rc_context
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from .report import ORDER, base_method, cell_label, mean_std, read_metrics
from .rundir import atomic_write

DPI = 200
MIN_SPAN = 5.0  # points of accuracy: the narrowest an accuracy axis gets
MARKER = {"ranli": "o", "roli": "s"}
_OFFSETS = [(4, 4), (4, -12), (-4, 4), (-4, -12), (4, 14), (-4, 14), (4, -22), (-4, -22)]  # label offsets, points
STALE = re.compile(r"((clean_robust|curves|params)_.*|transfer|sources|eps_sweep)\.(png|pdf)$")  # what we write


def clear(folder: Path) -> None:
    """Make ``folder``, or remove from it the figures of an earlier report (of groups that may be gone now)."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in folder.iterdir():
        if STALE.match(p.name):
            p.unlink()


def save(fig: Figure | None, stem: Path) -> Path | None:
    """Write ``fig`` to ``stem.pdf`` and ``stem.png`` (atomically); return the PNG's path, None for no figure."""
    if fig is None:
        return None
    with rc_context({"pdf.fonttype": 42}):  # TrueType, not Type 3, fonts in the PDF (as publishers ask)
        for fmt, meta in (("pdf", {"CreationDate": None}), ("png", None)):  # no date: same figure, same bytes
            atomic_write(stem.parent / f"{stem.name}.{fmt}", partial(fig.savefig, format=fmt, metadata=meta))
    return stem.parent / f"{stem.name}.png"


def _figure(w: float, h: float, ncols: int = 1, nrows: int = 1) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    return fig, list(fig.subplots(nrows, ncols, squeeze=False).ravel())


def _color(method: str) -> tuple:
    method = base_method(method)
    i = ORDER.index(method) if method in ORDER else len(ORDER) + sum(map(ord, method)) % 3
    return colormaps["tab10"](i % 10)


def _pm(stats: list[tuple]) -> list[float]:
    """Percent ends of ``mean ± std`` of (mean, std, n) fractions: what an axis must show of them."""
    return [100 * (st[0] + s * st[1]) for st in stats for s in (-1, 1)]


def _limits(ax: Axes, axis: str, values: list[float], min_span: float = MIN_SPAN, floor: float | None = 0.0) -> None:
    """Limits around ``values``: at least ``min_span`` wide (centred), not below ``floor``, padded by 8%."""
    if not values:
        return
    lo, hi = min(values), max(values)
    if hi - lo < min_span:
        lo, hi = (lo + hi - min_span) / 2, (lo + hi + min_span) / 2
    if floor is not None and lo < floor:
        lo, hi = floor, hi + floor - lo
    pad = 0.08 * (hi - lo)
    (ax.set_xlim if axis == "x" else ax.set_ylim)(lo - pad, hi + pad)


def _free(box: tuple, taken: list[tuple], frame: tuple) -> bool:
    """Whether ``box`` (x0, y0, x1, y1) lies inside ``frame`` and overlaps no box in ``taken``."""
    inside = frame[0] <= box[0] and box[2] <= frame[2] and frame[1] <= box[1] and box[3] <= frame[3]
    return inside and not any(box[0] < t[2] and t[0] < box[2] and box[1] < t[3] and t[1] < box[3] for t in taken)


def _label_points(ax: Axes, points: list[tuple[str, float, float]], size: float = 7) -> None:
    """Label each point at the first offset where its (estimated) text box stays inside the axes and overlaps no
    marker and no label placed before (greedy); at the first offset when there is no such place."""
    ax.figure.get_layout_engine().execute(ax.figure)  # the final layout, so that data -> pixels is what is drawn
    px = ax.figure.dpi / 72
    centres = [ax.transData.transform((x, y)) for _, x, y in points]
    taken = [(cx - 3 * px, cy - 3 * px, cx + 3 * px, cy + 3 * px) for cx, cy in centres]  # the markers
    for (text, x, y), (cx, cy) in zip(points, centres):
        w, h = 0.62 * size * len(text) * px, 1.3 * size * px
        corners = [(cx + dx * px - (w if dx < 0 else 0), cy + dy * px) for dx, dy in _OFFSETS]
        boxes = [(x0, y0, x0 + w, y0 + h) for x0, y0 in corners]
        i = next((i for i, box in enumerate(boxes) if _free(box, taken, ax.bbox.extents)), 0)
        taken.append(boxes[i])
        (dx, dy), ha = _OFFSETS[i], "right" if _OFFSETS[i][0] < 0 else "left"
        kw = dict(textcoords="offset points", fontsize=size, ha=ha, va="bottom", in_layout=False)
        ax.annotate(text, (x, y), xytext=(dx, dy), **kw)  # in_layout: the place was chosen for this layout


def _legend(ax: Axes, methods: list[str], inits: list[str], star: bool = False) -> None:
    handles = [Line2D([], [], color=_color(m), marker="o", ls="", label=m) for m in methods]
    handles += [Line2D([], [], color="grey", marker=MARKER.get(i, "^"), ls="", label=i) for i in inits]
    if star:
        handles.append(Line2D([], [], color="grey", marker="*", ms=10, ls="", label="linear probe"))
    ax.legend(handles=handles, fontsize=7, loc="best", framealpha=0.8)


def fig_clean_robust(cells: dict, title: str) -> Figure | None:
    """Fig. 1 of the paper: x clean, y robust, one point per method x init, arrows RanLI -> RoLI."""
    adv = {k: c for k, c in cells.items() if k[2] != "natural" and c["clean"] is not None}
    if not adv:
        return None
    metrics = [("pgd", "PGD")] + ([("autoattack", "AutoAttack")] if any(c["autoattack"] for c in adv.values()) else [])
    fig, axes = _figure(5.2 * len(metrics), 4.2, ncols=len(metrics))
    for ax, (metric, name) in zip(axes, metrics):
        pts = {k: c for k, c in adv.items() if c[metric] is not None}
        for k, c in pts.items():
            marker = "*" if k[0] == "linear" else MARKER.get(k[1], "^")
            x, y, xerr, yerr = (100 * v for v in (c["clean"][0], c[metric][0], c["clean"][1], c[metric][1]))
            ms = 11 if marker == "*" else 7
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=marker, color=_color(k[0]), ms=ms, capsize=2, lw=0.8)
            if k[1] == "ranli" and (k[0], "roli", k[2]) in pts:
                c2 = pts[(k[0], "roli", k[2])]
                arrow = dict(arrowstyle="-|>", color=_color(k[0]), lw=1.4, shrinkA=4, shrinkB=4)
                ax.annotate("", xy=(100 * c2["clean"][0], 100 * c2[metric][0]), xytext=(x, y), arrowprops=arrow)
        _limits(ax, "x", _pm([c["clean"] for c in pts.values()]))
        _limits(ax, "y", _pm([c[metric] for c in pts.values()]))
        ax.set(xlabel="clean accuracy (%)", ylabel=f"robust accuracy, {name} (%)")
        ax.set_title(f"{title}\n{name}: arrows RanLI → RoLI", fontsize=9)
        ax.grid(alpha=0.3)
        methods = list(dict.fromkeys(k[0] for k in pts))  # cells come in ORDER
        _legend(ax, methods, sorted({k[1] for k in pts if k[0] != "linear"}), star="linear" in methods)
        _label_points(ax, [(cell_label(k), 100 * c["clean"][0], 100 * c[metric][0]) for k, c in pts.items()])
    return fig


def fig_curves(cells: dict, title: str) -> Figure | None:
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
    fig, axes = _figure(10, 3.8, ncols=2)
    epochs = [e for pts in series.values() for e, _ in pts]
    for j, (ax, name) in enumerate(zip(axes, ("validation clean (%)", "validation PGD (%)"))):
        ys_all = []
        for k, pts in series.items():
            xy = [(e, 100 * st[0]) for e, v in pts if (st := mean_std(v[j]))]
            ls = ":" if k[2] == "natural" else ("-" if k[1] == "roli" else "--")
            ax.plot(*zip(*xy), ls=ls, marker=MARKER.get(k[1], "^"), ms=3, color=_color(k[0]), label=cell_label(k))
            ys_all += [y for _, y in xy]
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        _limits(ax, "y", ys_all)
        ax.set(xlabel="epoch", ylabel=name)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{title}: validation curves (RoLI: stage 2)", fontsize=9, loc="left")
    axes[1].legend(fontsize=6, ncol=2, loc="best")
    return fig


def fig_params(cells: dict, title: str) -> Figure | None:
    """Trainable-parameter cost (log x) vs robust (PGD) accuracy."""
    pts = {k: c for k, c in cells.items() if k[2] != "natural" and c["pgd"] and (c["trainable_params"] or [0])[0] > 0}
    if not pts:
        return None
    fig, (ax,) = _figure(5.5, 4.2)
    for k, c in pts.items():
        x, y = c["trainable_params"][0], 100 * c["pgd"][0]
        ax.errorbar(x, y, yerr=100 * c["pgd"][1], fmt=MARKER.get(k[1], "^"), color=_color(k[0]), capsize=2, ms=7)
    ax.set_xscale("log")
    params = [c["trainable_params"][0] for c in pts.values()]
    ax.set_xlim(min(params) / 3, max(params) * 3)  # a factor of 3 either side: never a degenerate log axis
    _limits(ax, "y", _pm([c["pgd"] for c in pts.values()]))
    ax.set(xlabel="trainable parameters (log scale)", ylabel="robust accuracy, PGD (%)")
    ax.set_title(f"{title}: cost vs robustness", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    _legend(ax, list(dict.fromkeys(k[0] for k in pts)), sorted({k[1] for k in pts}))
    _label_points(ax, [(cell_label(k), c["trainable_params"][0], 100 * c["pgd"][0]) for k, c in pts.items()])
    return fig


def fig_sources(sources: list[tuple[str, dict]]) -> Figure | None:
    """Bar chart per group: inherited robustness (natural linear probe) vs achieved (adversarial finetuning)."""
    if not sources:
        return None
    width = max(6.0, 0.55 * max(len(s["rows"]) + 1 for _, s in sources) + 2)
    fig, axes = _figure(width, 3.4 * len(sources), nrows=len(sources))
    for ax, (title, s) in zip(axes, sources):
        labels = ["inherited\n(natural linear)"] + [cell_label(r["cell"]).replace("/", "\n") for r in s["rows"]]
        vals = [s["inherited"]] + [r["achieved"] for r in s["rows"]]
        colors = ["0.55"] + [_color(r["cell"][0]) for r in s["rows"]]
        hatches = [""] + ["//" if r["cell"][1] == "roli" else "" for r in s["rows"]]
        for i, (v, col, h) in enumerate(zip(vals, colors, hatches)):
            err = 100 * v[1] if v[2] > 1 else None
            ax.bar(i, 100 * v[0], yerr=err, color=col, hatch=h, edgecolor="k", lw=0.5, capsize=2)
        ax.axhline(100 * s["inherited"][0], color="0.3", ls="--", lw=1, label="inherited level")
        ax.set_ylim(0, max(MIN_SPAN, 1.12 * max(_pm(vals))))
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_ylabel("PGD accuracy (%)")
        ax.set_title(f"{title}\nrobustness inherited vs achieved (hatched = RoLI)", fontsize=9, loc="left")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    return fig


def fig_transfer(points: list[tuple[str, float, float]], r: float | None) -> Figure | None:
    """Transferred robustness vs transferred accuracy, one point per group, Pearson r in the title."""
    if not points:
        return None
    fig, (ax,) = _figure(5.2, 4.4)
    ax.plot([p[1] for p in points], [p[2] for p in points], "o", color="C0")
    values = [v for p in points for v in p[1:]]
    lo, hi = min(values) - 1, max(values) + 1
    ax.plot([lo, hi], [lo, hi], ls="--", color="0.6", lw=1, label="TR = TA")
    for axis in "xy":  # the same limits on both axes, so that the diagonal is at 45 degrees
        _limits(ax, axis, values, min_span=0.1, floor=None)
    ax.set_xlabel("transferred accuracy TA = clean(Linear) / clean(Full-FT)")
    ax.set_ylabel("transferred robustness TR = PGD(Linear) / PGD(Full-FT)")
    rs = "n/a (needs ≥ 3 groups)" if r is None else f"{r:.3f}"
    ax.set_title(f"TR vs TA across {len(points)} group(s); Pearson r = {rs}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _label_points(ax, points)
    return fig


def fig_sweeps(sweeps: list[tuple[str, dict]]) -> Figure | None:
    """Accuracy vs ε for every eval.json with a sweep (PGD solid, AutoAttack dashed)."""
    if not sweeps:
        return None
    fig, (ax,) = _figure(6, 4.2)
    ys = []
    for i, (label, ev) in enumerate(sweeps):
        pts = sorted(ev["sweep"], key=lambda p: p["eps"])
        pgd = [(p["eps"], 100 * p.get("pgd", p.get("clean", 0))) for p in pts]
        aa = [(p["eps"], 100 * p["autoattack"]) for p in pts if p.get("autoattack") is not None]
        ax.plot(*zip(*pgd), "-o", ms=4, color=f"C{i % 10}", label=f"{label} PGD")
        if aa:
            ax.plot(*zip(*aa), "--s", ms=4, color=f"C{i % 10}", label=f"{label} AutoAttack")
        ys += [y for _, y in pgd + aa]
    _limits(ax, "y", ys)
    ax.set(xlabel="ε (pixel units, [0,1] images)", ylabel="accuracy (%)")
    ax.set_title("ε sweeps (eval.json)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return fig
