"""The report document of every finished run (``result.json``) and ε sweep (``eval.json``) under some directories:
``report.md`` (figures in ``figures/``, PDF and PNG), ``report.html`` (that markdown rendered by markdown-it, PNGs
inlined), ``report.tex`` (each group's cells as a booktabs table) and ``report.json`` (the numbers)."""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from markdown_it import MarkdownIt

from . import figures as F
from . import report as R
from .rundir import atomic_write

_TEX = {c: "\\" + c for c in "_%&#${}"} | {"\\": r"\textbackslash{}", "~": r"\textasciitilde{}"}
_TEX = str.maketrans(_TEX | {"^": r"\^{}", "±": r"$\pm$", "—": "--", "→": r"$\to$", "ε": r"$\varepsilon$"})


def latex_table(caption: str, label: str, head: list, rows: list[list], align: str) -> str:
    """A booktabs ``table`` float (needs booktabs); the caption and every cell escaped for LaTeX."""

    def line(cells: list) -> str:
        return " & ".join(str(c).translate(_TEX) for c in cells) + r" \\"

    top = [r"\begin{table}[t]", r"\centering", rf"\caption{{{caption.translate(_TEX)}}}", rf"\label{{tab:{label}}}"]
    body = [rf"\begin{{tabular}}{{{align}}}", r"\toprule", line(head), r"\midrule", *map(line, rows), r"\bottomrule"]
    return "\n".join([*top, *body, r"\end{tabular}", r"\end{table}"]) + "\n"


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px}
th{background:#f0f0f0}img{max-width:100%}code{background:#f4f4f4;padding:0 3px}h2{border-bottom:1px solid #ddd}"""


def markdown_html(text: str, root: Path, title: str) -> str:
    """A self-contained HTML page of markdown ``text`` (markdown-it); images (paths from ``root``) inlined as base64."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")  # raw HTML in a name or detail is shown as text
    tokens = md.parse(text)
    for tok in (c for t in tokens for c in t.children or []):
        if tok.type == "image":
            data = base64.b64encode((root / str(tok.attrGet("src"))).read_bytes()).decode("ascii")
            tok.attrSet("src", f"data:image/png;base64,{data}")
    head = f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{title}</title><style>{CSS}</style></head>"
    return f"{head}<body>\n{md.renderer.render(tokens, md.options, {})}</body></html>\n"


def _source_name(source: str) -> str:
    return Path(source).stem if source not in ("scratch", "timm-pretrained", "unknown") else source


def _rel(path: Path, root: Path) -> str:
    try:
        rel = os.path.relpath(path, root)
    except ValueError:
        return str(path)
    return path.name if rel == "." else rel


CELL_HEAD = "method|init|objective|runs|seeds|clean %|PGD %|AutoAttack %|trainable params|flags".split("|")
CELL_ALIGN = "lllrlrrrrr"  # markdown and LaTeX


def _cell_row(k: tuple, c: dict) -> list:
    tp, tot = c["trainable_params"], c["total_params"]
    share = f" ({100 * tp[0] / tot[0]:.2f}%)" if tp and tot and tot[0] else ""
    params = ("—" if tp is None else f"{round(tp[0]):,}") + share
    accs = (R.fmt_stat(c[m], c["n"]) for m in ("clean", "pgd", "autoattack"))
    return [*k, c["n"], ",".join(str(s) for s in c["seeds"]), *accs, params, c["n_flags"]]


def _group(key: tuple, cells: dict, img: Callable) -> tuple[list[str], str, dict, dict | None]:
    """One group's markdown blocks, LaTeX table, report.json entry and robustness sources (figures by ``img``)."""
    source, dataset, norm, eps = key
    title = f"{_source_name(source)} → {dataset} (ε={eps} {norm})"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{_source_name(source)}_{dataset}_{norm}_{eps}").strip("-")[:80] or "x"
    rows = [_cell_row(k, c) for k, c in cells.items()]
    notes = [f"{R.cell_label(k)}: {n}" for k, c in cells.items() for n in c["notes"]]
    md = [f"## {title}", f"Source checkpoint: `{source}`.", "### Accuracy (clean, PGD, AutoAttack)"]
    md += [R.md_table(CELL_HEAD, rows, CELL_ALIGN), *(["Notes: " + "; ".join(notes) + "."] if notes else [])]
    md += img(F.fig_clean_robust(cells, title), f"clean_robust_{slug}", f"clean vs robust, {title}")
    tm, src = R.transfer_metrics(cells), R.robustness_sources(cells)
    head = ["TA = clean(Linear)/clean(Full-FT)", "TR (PGD)", "TR (AutoAttack)", "missing runs"]
    ratios = ["—" if tm[m] is None else f"{tm[m]:.3f}" for m in ("TA", "TR", "TR_autoattack")]
    md += ["### Transferred accuracy and robustness", R.md_table(head, [[*ratios, ", ".join(tm["missing"]) or "none"]])]
    md.append("### Sources of robustness")
    if src is None:
        md.append(
            "No natural-objective linear probe (method linear, init ranli, train.objective natural) in this group, "
            "so inherited robustness is not measured."
        )
    else:
        inh, clean = (R.fmt_stat(src[k], src["n"]) for k in ("inherited", "inherited_clean"))
        md.append(f"Inherited (natural linear probe on the frozen source, n={src['n']}): PGD {inh} %, clean {clean} %.")
        gains = [
            [R.cell_label(r["cell"]), R.fmt_stat(r["achieved"], r["achieved"][2]), inh, f"{100 * r['gain']:+.2f}"]
            for r in src["rows"]
        ]
        md.append(R.md_table(["method/init", "achieved PGD %", "inherited PGD %", "gain (pp)"], gains))
    md.append("### Validation curves and cost")
    md += img(F.fig_curves(cells, title), f"curves_{slug}", f"validation curves, {title}")
    md += img(F.fig_params(cells, title), f"params_{slug}", f"trainable parameters vs PGD, {title}")
    gains = {r["cell"]: r["gain"] for r in src["rows"]} if src else {}
    entry = {"source": source, "dataset": dataset, "norm": norm, "eps": eps, "transfer": tm}
    entry["inherited_pgd"] = src and src["inherited"]
    entry["cells"] = [
        {"method": k[0], "init": k[1], "objective": k[2], "n": c["n"], "seeds": c["seeds"]}
        | {m: c[m] for m in ("clean", "pgd", "autoattack", "trainable_params")}
        | {"achieved_minus_inherited": gains.get(k)}
        for k, c in cells.items()
    ]
    return md, latex_table(title, slug, CELL_HEAD, rows, CELL_ALIGN), entry, src and (title, src)


def write_report(dirs: list[Path], out: Path | None = None) -> Path:
    """Write the report of the runs under ``dirs`` to ``out`` (default ``dirs[0]``); return the report.md path."""
    results = R.find_results(dirs)
    out = Path(out or dirs[0])
    F.clear(out / "figures")
    root = Path(os.path.commonpath([str(d.resolve()) for d in dirs]))
    groups = R.aggregate([(p.resolve(), c) for p, c in results])

    def img(fig: F.Figure | None, name: str, alt: str) -> list[str]:
        return [] if F.save(fig, out / "figures" / name) is None else [f"![{alt}](figures/{name}.png)"]

    n_roli = sum(c.get("init") == "roli" for _, c in results)
    md = ["# advtransfer report"]
    md.append(
        f"{len(results)} finished run(s) ({n_roli} RoLI) in {len(groups)} group(s) of (source, dataset, threat model), "
        f"from {', '.join(f'`{d}`' for d in dirs)}. Accuracies in %, mean ± sample std over the runs (seeds) of a "
        "cell; [k/n] = only k of n runs have the value. Definitions: `docs/metrics.md`."
    )
    tex = ["% advtransfer report: each group's cells (accuracies in %); needs \\usepackage{booktabs}\n"]
    summary: dict = {"groups": [], "n_runs": len(results)}
    points, sources, flags = [], [], []
    for key, cells in groups.items():
        group_md, group_tex, entry, src = _group(key, cells, img)
        md += group_md
        tex.append(group_tex)
        sources += [src] if src else []
        summary["groups"].append(entry)
        if entry["transfer"]["TA"] is not None and entry["transfer"]["TR"] is not None:
            points.append((f"{_source_name(key[0])}→{key[1]}", entry["transfer"]["TA"], entry["transfer"]["TR"]))
        runs = [(p, f) for c in cells.values() for p, card in c["runs"] for f in card.get("flags") or []]
        flags += [[_rel(p, root), f.get("flag", "?"), f.get("detail", "")] for p, f in runs]
    r = R.pearson([p[1] for p in points], [p[2] for p in points])
    summary |= {"transfer_points": points, "pearson_TR_TA": r}
    md += _tail(dirs, root, results, (points, r, sources, flags), img)
    text = "\n\n".join(md) + "\n"
    files = {
        "report.md": text,
        "report.html": markdown_html(text, out, "advtransfer report"),
        "report.tex": "\n".join(tex),
        "report.json": json.dumps(summary, indent=2, default=str) + "\n",
    }
    for name, content in files.items():
        atomic_write(out / name, lambda tmp, content=content: Path(tmp).write_text(content))
    return out / "report.md"


def _tail(dirs: list[Path], root: Path, results: list, across: tuple, img: Callable) -> list[str]:
    """The sections after the groups: TR vs TA, sources of robustness, ε sweeps, sanity flags and all runs."""
    points, r, sources, flags = across
    rs = "n/a (needs at least 3 groups)" if r is None else f"{r:.3f}"
    md = ["## Transferred robustness vs transferred accuracy"]
    md += [f"{len(points)} group(s) with both TA and TR; Pearson r(TR, TA) = {rs}."]
    md += img(F.fig_transfer(points, r), "transfer", "TR vs TA") + ["## Robustness inherited vs achieved"]
    md += img(F.fig_sources(sources), "sources", "inherited vs achieved robustness") if sources else []
    md += [] if sources else ["No group has a natural-objective linear probe."]
    sweeps = [(_rel(p.resolve(), root), ev) for p, ev in R.find_sweeps(dirs)]
    sweeps = [(f"{p}: {_source_name(str(ev.get('checkpoint', '?')))} on {ev.get('data', '?')}", ev) for p, ev in sweeps]
    md.append("## ε sweeps")
    if sweeps:
        md += img(F.fig_sweeps(sweeps), "eps_sweep", "accuracy vs eps")
        pts = [(lab, p) for lab, ev in sweeps for p in sorted(ev["sweep"], key=lambda q: q["eps"])]
        rows = [
            [lab, f"{p['eps']:.4g}", *(R.fmt_pct(p.get(m)) for m in ("clean", "pgd", "autoattack"))] for lab, p in pts
        ]
        md.append(R.md_table(["eval", "ε", "clean %", "PGD %", "AutoAttack %"], rows, "lrrrr"))
        flags += [[lab, f.get("flag", "?"), f.get("detail", "")] for lab, ev in sweeps for f in ev.get("flags") or []]
    else:
        md.append("No eval.json with a sweep (`advtransfer eval --eps a,b,c --out DIR`).")
    md.append("## Sanity flags")
    md.append(
        R.md_table(["run", "flag", "detail"], flags) if flags else "No sanity flag was raised by any run or evaluation."
    )
    head = ["run", "method", "init", "objective", "seed", "clean %", "PGD %", "AutoAttack %", "best epoch"]
    rows = [
        [_rel(p.resolve(), root), c.get("method"), c.get("init"), c.get("objective", R.ADVERSARIAL), c.get("seed")]
        + [R.fmt_pct(c.get(f)) for f in ("clean_acc", "pgd_acc", "autoattack_acc")]
        + ["—" if c.get("best_epoch") is None else c["best_epoch"] + 1]
        for p, c in results
    ]
    return md + ["## All runs", R.md_table(head, rows, "lllllrrrr")]
