"""``python scripts/results_md.py docs/embedded``: docs/results.md and docs/figures/embedded_* from the committed
``<source>__<target>__<method>__seed<N>/`` folders (result.json, config.yaml, metrics.jsonl) alone. A ``*robust*``
source pairs with the same name with ``natural``. Each rule is written before its numbers and applied mechanically."""

from __future__ import annotations

import math
import random
import statistics
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from advtransfer import figures as F
from advtransfer.configfile import read_yaml
from advtransfer.errors import UserError
from advtransfer.grid import expand, load_grid
from advtransfer.report import find_results, fmt_pct, fmt_stat, md_table, mean_std, pearson, read_metrics

ROOT = Path(__file__).resolve().parents[1]
GATE, GATE_ROBUST, GATE_NATURAL = "gate-natural-probe", 0.15, 0.05  # robust PGD-10 >= 15 %, natural <= 5 %
MIN_EFFECT, MIN_GROUPS, N_BOOT, BOOT_SEED = 0.01, 10, 2000, 0  # < 1 point is test-set noise; Finding 3's bootstrap
METHODS = ["full", "vpt", "lora", "adapter", "bias"]
PAPER = {"full": (7.75, 6.21), "adapter": (2.08, 0.91), "lora": (3.71, 2.21), "bias": (2.00, 0.44)}  # Fig. 1
SWEEPS = ("gate", "grid", "natural_ft", "transfer")  # configs/embedded/*.yaml, in the order they run
CONTROL = "-6ep"  # compute-matched RanLI controls: 6 epochs = the probe's 3 + RoLI's 3
ROWS = ["linear", *(f"{m}-{i}" for m in METHODS for i in ("ranli", "roli")), "full-ranli-6ep", "lora-ranli-6ep"]
ACCS = ("clean_acc", "pgd_acc")
YES, NO, UNSURE = "reproduced", "not reproduced", "inconclusive"
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131]
T975 += [2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def load(root: Path) -> dict[tuple[str, str, str], dict[int, dict]]:
    """{(source, target, cell): {seed: result card + "_dir", "_kept", "_lr"}} of every run under ``root``; the cell is
    the run's tag for gate, probe-lr and control runs, else ``method[-init|-objective]`` from its card."""
    idx: dict = {}
    for path, card in find_results([root]):
        parts = path.name.split("__")
        if len(parts) != 4 or not parts[3].startswith("seed") or not parts[3][4:].isdigit():
            raise UserError(f"results: run folder {path.name} is not named source__target__method__seedN")
        missing = [k for k in ("method", "init", "objective", "clean_acc", "pgd_acc", "seconds") if k not in card]
        if missing:
            raise UserError(f"results: {path / 'result.json'} lacks {', '.join(missing)}")
        tag, m, init, obj = parts[2], card["method"], card["init"], card["objective"]
        own = tag == GATE or tag.startswith("probe-lr") or tag.endswith(CONTROL)  # else method[-init|-objective]
        lab = tag if own else f"{m}-{obj}" if obj != "at" else m if m == "linear" else f"{m}-{init}"
        lr = read_yaml(path / "config.yaml")["train"]["lr"] if lab == "linear" or lab.startswith("probe-") else None
        kept = card["pgd_acc"] / card["clean_acc"] if card["clean_acc"] else 0.0  # robustness retained (Finding 2)
        idx.setdefault((parts[0], parts[1], lab), {})[int(parts[3][4:])] = card | dict(_dir=path, _kept=kept, _lr=lr)
    return idx


def interval(d: list[float]) -> tuple[float, float, float, int] | None:
    """(mean, low, high, n): the 95 % t-interval of the mean of paired differences ``d``; None for fewer than 2.
    ``T975`` holds Student's 97.5 % quantiles for df = 1..30; a larger df uses df = 30's (slightly conservative)."""
    if len(d) < 2:
        return None
    m, half = statistics.mean(d), T975[min(len(d) - 1, 30) - 1] * statistics.stdev(d) / math.sqrt(len(d))
    return m, m - half, m + half, len(d)


def verdict(ci: tuple | None, min_effect: float = MIN_EFFECT) -> str:
    """Reproduced: (mean, low, high) above 0, mean >= ``min_effect``; not reproduced: the mirror; else inconclusive."""
    if ci is not None and ci[1] > 0 and ci[0] >= min_effect:
        return YES
    return NO if ci is not None and ci[2] < 0 and ci[0] <= -min_effect else UNSURE


def overall(vs: Iterable[str]) -> str:
    """All reproduced -> reproduced; any not reproduced -> not reproduced; otherwise (or none) inconclusive."""
    vs = list(vs)
    return YES if vs and all(v == YES for v in vs) else NO if NO in vs else UNSURE


def vals(cell: dict, key: str) -> list:
    return [c[key] for c in cell.values()]


def ms(values: list) -> str:
    """Percent ``mean ± std`` of the values."""
    st = mean_std(values)
    return fmt_stat(st, st[2] if st else 0)


def pool(idx: dict, source: str, lab: str, targets: list[str]) -> dict:
    """{(target, seed): card} of one cell over ``targets``."""
    return {(t, s): c for t in targets for s, c in idx.get((source, t, lab), {}).items()}


def compare(a: dict, b: dict, *diffs: str | Callable) -> tuple[list[str], str]:
    """Each difference (key k: a[k] − b[k]) over the (target, seed) keys of both, as ``mean [95 % CI]``; the verdict."""
    fs = [(lambda x, y, k=f: x[k] - y[k]) if isinstance(f, str) else f for f in diffs]
    cis = [interval([v for k in sorted(set(a) & set(b)) if (v := f(a[k], b[k])) is not None]) for f in fs]
    fmt = "{:+.2f} [{:+.2f}, {:+.2f}] (n={})"  # points
    return ["—" if c is None else fmt.format(*(100 * v for v in c[:3]), c[3]) for c in cis], overall(map(verdict, cis))


def main_groups(idx: dict) -> list[tuple[str, str]]:
    """(source, target) pairs of the grid (those with RoLI runs), robust sources first."""
    return sorted({(s, t) for s, t, lab in idx if lab.endswith("-roli")}, key=lambda g: ("natural" in g[0], g))


def gate(idx: dict) -> tuple[list[str], dict[str, str]]:
    """The gate's and the probe learning rate's markdown; {target: pass | fail | incomplete ...}."""
    rows, status = [], {}
    for t in sorted({t for _, t, lab in idx if lab == GATE} | {t for _, t in main_groups(idx)}):
        runs = [(s, c) for (s, tt, lab), by in sorted(idx.items()) if (tt, lab) == (t, GATE) for c in by.values()]
        rob, nat = ([c["pgd_acc"] for s, c in runs if kind in s] for kind in ("robust", "natural"))
        ok = rob and nat and min(rob) >= GATE_ROBUST and max(nat) <= GATE_NATURAL
        status[t] = ("pass" if ok else "fail") if rob and nat else "incomplete: no gate run of both sources"
        for s, c in runs:
            val = [e["val_clean"] for e in read_metrics(c["_dir"]) if "val_clean" in e]
            spread = f"{100 * (max(val[-3:]) - min(val[-3:])):.2f}" if val else "—"
            best = f"{c.get('best_epoch', -1) + 1} of {len(val)}"
            rows.append([t, s, fmt_pct(c["clean_acc"]), fmt_pct(c["pgd_acc"]), best, spread, status[t]])
    head = ["target", "source", "clean %", "PGD-10 %", "best epoch", "val clean spread, last 3 epochs", "gate"]
    md = ["## The gate", GATE_RULE, md_table(head, rows, "llrrrrl"), "### The probe learning rate", LR_RULE]
    rows = []
    for s, t in sorted({(s, t) for s, t, lab in idx if lab.startswith("probe-lr")}):
        cells = [(lab, c) for (ss, tt, lab), by in idx.items() if (ss, tt) == (s, t) for c in by.values()]
        lrs = sorted(((c["_lr"], c) for lab, c in cells if lab.startswith("probe-lr")), key=lambda p: p[0])
        best = max(lrs, key=lambda p: (p[1].get("val_pgd") or 0.0, -p[0]))[0]
        used = {c["_lr"] for lab, c in cells if lab == "linear"}
        check = "—" if not used else "yes" if used == {best} else "no: " + ", ".join(map(str, sorted(used)))
        for lr, c in lrs:
            mark = ["**chosen**", check] if lr == best else ["", ""]
            rows.append([f"{s} → {t}", f"{lr:g}", fmt_pct(c.get("val_clean")), fmt_pct(c.get("val_pgd")), *mark])
    head = ["source → target", "probe lr", "val clean %", "val PGD-10 %", "choice", "grid's linear runs used it"]
    return md + [md_table(head, rows, "lrrrll") if rows else "No `probe-lr*` run."], status


def main_tables(idx: dict, status: dict, img: Callable) -> list[str]:
    """Per (source, target) of the grid: every cell's clean, PGD-10 and AutoAttack; Fig. 1 and validation curves."""
    md = ["## Main tables", MAIN_RULE]
    for s, t in main_groups(idx):
        rows, cells = [], {}
        for lab in (lab for lab in ROWS if (s, t, lab) in idx):
            by, c0 = idx[(s, t, lab)], idx[(s, t, lab)].get(0, {})
            aa, std = c0.get("autoattack_acc"), (c0.get("autoattack_settings") or {}).get("standard", True)
            aa_s = "—" if aa is None else f"{100 * aa:.2f} (n={c0.get('n_autoattack')}{'' if std else ', custom'})"
            rows.append([lab, ",".join(map(str, sorted(by))), ms(vals(by, "clean_acc")), ms(vals(by, "pgd_acc")), aa_s])
            c = next(iter(by.values()))
            key = (c["method"] + ("(6ep)" if lab.endswith(CONTROL) else ""), c["init"], c["objective"])
            cells[key] = {k: mean_std(vals(by, f"{k}_acc")) for k in ("clean", "pgd")} | {"autoattack": mean_std([aa])}
            cells[key]["runs"] = [(c["_dir"], c) for c in by.values()]
        title = f"{s} → {t}"
        note = "" if status.get(t) == "pass" else f" (excluded from the findings: gate {status[t]})"
        md += [f"### {title}{note}", md_table(["cell", "seeds", "clean %", "PGD-10 %", "AutoAttack %"], rows, "llrrr")]
        md += img(F.fig_clean_robust(cells, title), f"embedded_clean_robust_{s}_{t}", f"clean vs robust, {title}")
        md += img(F.fig_curves(cells, title), f"embedded_curves_{s}_{t}", f"validation curves, {title}")
    return md


def finding1(idx: dict, ok: list[str]) -> tuple[list[str], list]:
    """Robust vs natural source: PGD-10 per cell, paired by (target, seed)."""
    md, vs = ["## Finding 1: a robust source is necessary", F1_RULE], []
    for s in sorted({s for s, _ in main_groups(idx) if "robust" in s}):
        nat, rows = s.replace("robust", "natural"), []
        for lab, a, b in ((lab, pool(idx, s, lab, ok), pool(idx, nat, lab, ok)) for lab in ROWS):
            if a and b:
                (ci,), v = compare(a, b, "pgd_acc")
                rows.append([lab, ms(vals(a, "pgd_acc")), ms(vals(b, "pgd_acc")), ci, v])
                vs.append(v)
        head = ["cell", f"PGD-10 %, {s}", f"PGD-10 %, {nat}", "robust − natural, points [95 % CI]", "verdict"]
        md.append(md_table(head, rows, "lrrrl") if rows else f"No cell of both {s} and {nat} on a passing target.")
    return md, [["1. A robust source is necessary", overall(vs), f"robust ahead in {vs.count(YES)} of {len(vs)} cells"]]


def relative(x: dict, y: dict) -> float | None:
    """1 − PGD(y) / PGD(x): how much less of x's robustness y keeps; None when x has none."""
    return 1 - y["pgd_acc"] / x["pgd_acc"] if x["pgd_acc"] else None


def finding2(idx: dict, ok: list[str], img: Callable) -> tuple[list[str], list]:
    """Natural-objective finetuning of a robust source: the robustness each method keeps vs the linear probe."""
    md, vs, rows, bars = ["## Finding 2: linear probing best preserves inherited robustness", F2_RULE], [], [], []
    for s in sorted({s for s, _, lab in idx if lab == "linear-natural"}):
        lin = pool(idx, s, "linear-natural", ok)
        for m, cell in ((m, pool(idx, s, f"{m}-natural", ok)) for m in ["linear", *METHODS]):
            if not (lin and cell):
                continue
            cis, v = compare(lin, cell, "_kept", relative) if m != "linear" else (["", ""], "")
            rel = [1 - relative(lin[k], c) for k, c in cell.items() if lin.get(k, {}).get("pgd_acc")]
            rows.append([s, m, *(ms(vals(cell, k)) for k in ("clean_acc", "pgd_acc", "_kept")), ms(rel), *cis, v])
            vs += [v] if v else []
        for t in ok:
            by = {m: idx[k] for m in ["linear", *METHODS] if (k := (s, t, f"{m}-natural")) in idx}
            bar = [{"cell": (m, "ranli", "natural"), "achieved": mean_std(vals(c, "pgd_acc"))} for m, c in by.items()]
            if "linear" in by:
                bars.append((f"{s} → {t}, natural objective", {"inherited": bar[0]["achieved"], "rows": bar[1:]}))
    head = ["source", "method", "clean %", "PGD-10 %", "PGD/clean %", "PGD ÷ probe's PGD %", "d₁ retained [95 % CI]"]
    md.append(md_table([*head, "d₂ relative [95 % CI]", "verdict"], rows, "llrrrrrrl") if rows else "No run.")
    md += img(F.fig_sources(bars), "embedded_natural_ft", "PGD-10 kept by natural-objective finetuning")
    ev = f"linear keeps more than {vs.count(YES)} of {len(vs)} methods"
    return md, [["2. Linear probing best preserves inherited robustness", overall(vs), ev]]


def finding3(idx: dict, status: dict, img: Callable) -> tuple[list[str], list]:
    """TA and TR per (robust source, target) group; Pearson r with a bootstrap interval over groups."""
    md = ["## Finding 3: transferred robustness correlates with transferred accuracy", F3_RULE]
    pts, rows, out = [], [], []
    for s, t in sorted({(s, t) for s, t, lab in idx if lab == "linear" and "robust" in s}):
        lin, full, gated = idx[(s, t, "linear")], idx.get((s, t, "full-ranli")), status.get(t, "pass")
        if gated != "pass" or not full:
            out.append(f"{s} → {t} ({'no Full-FT run' if gated == 'pass' else 'gate: ' + gated})")
            continue
        m = {k: [statistics.mean(vals(by, f"{k}_acc")) for by in (lin, full)] for k in ("clean", "pgd")}
        ta, tr = (a / b if b else math.nan for a, b in m.values())
        pts.append((f"{s}→{t}", ta, tr))
        rows.append([f"{s} → {t}", f"{len(lin)}, {len(full)}", *map(fmt_pct, m["clean"]), f"{ta:.3f}"])
        rows[-1] += [*map(fmt_pct, m["pgd"]), f"{tr:.3f}"]
    r, rng, boot = pearson([p[1] for p in pts], [p[2] for p in pts]), random.Random(BOOT_SEED), []
    for _ in range(N_BOOT if r is not None else 0):
        res = [rng.choice(pts) for _ in pts]
        boot += [b for b in [pearson([p[1] for p in res], [p[2] for p in res])] if b is not None]
    q = statistics.quantiles(boot, n=40, method="inclusive") if len(boot) > 1 else None
    v = verdict(None if q is None else (r, q[0], q[-1]), 0.0) if len(pts) >= MIN_GROUPS else UNSURE
    head = ["group", "seeds (Linear, Full-FT)", "clean Linear %", "clean Full-FT %", "TA", "PGD Linear %"]
    md += [md_table([*head, "PGD Full-FT %", "TR"], rows, "llrrrrrr") if rows else "No group with Linear and Full-FT."]
    md += [f"Groups left out: {', '.join(out)}."] if out else []
    ev = f"r = {'n/a' if r is None else f'{r:.3f}'}" + ("" if q is None else f" [{q[0]:.3f}, {q[-1]:.3f}]")
    ev += f" over {len(pts)} groups" + (f"; {N_BOOT - len(boot)} resamples had no r" if 0 < len(boot) < N_BOOT else "")
    md += [f"Pearson {ev}{'' if len(pts) >= MIN_GROUPS else f' (< {MIN_GROUPS})'}: **{v}**."]
    return md + img(F.fig_transfer(pts, r), "embedded_transfer", "TR vs TA"), [["3. TR correlates with TA", v, ev]]


def finding4(idx: dict, ok: list[str]) -> tuple[list[str], list]:
    """RoLI − RanLI per method (and vs the compute-matched RanLI), paired by (target, seed); the paper's average."""
    md, rows, found = ["## Finding 4: RoLI improves every method", F4_RULE], [], {}  # (method, base) -> verdicts
    for s in sorted({s for s, _ in main_groups(idx) if "robust" in s}):
        for m, base in [*((m, "ranli") for m in METHODS), ("full", "ranli-6ep"), ("lora", "ranli-6ep")]:
            ro, ra = pool(idx, s, f"{m}-roli", ok), pool(idx, s, f"{m}-{base}", ok)
            if ro and ra:
                cis, v = compare(ro, ra, *ACCS)
                paper = "{:+.2f} / {:+.2f}".format(*PAPER[m]) if m in PAPER and base == "ranli" else "—"
                name = m if m in PAPER else f"{m} (RoLI-VPT is ours: not in the verdict)"
                rows.append([s, name, "RanLI" if base == "ranli" else "RanLI, 6 epochs", *cis, paper, v])
                found.setdefault((m, base), []).append(v)
        cells = {i: [pool(idx, s, f"{m}-{i}", ok) for m in PAPER] for i in ("roli", "ranli")}  # mean over methods:
        keys = set.intersection(*map(set, cells["roli"] + cells["ranli"]))
        ro, ra = ({k: {a: statistics.mean(c[k][a] for c in cells[i]) for a in ACCS} for k in keys} for i in cells)
        cis, v = compare(ro, ra, *ACCS)
        rows.append([s, "mean of full, adapter, lora, bias", "RanLI", *cis, "+3.88 / +2.44", v])
    head = ["source", "method", "RoLI vs", "Δ clean, points [95 % CI]", "Δ PGD-10, points [95 % CI]", "paper Δ"]
    md.append(md_table([*head, "verdict"], rows, "lllrrrl") if rows else "No RoLI/RanLI pair on a passing target.")
    verdicts = []  # a method of the paper (or a control) with no pair yet counts as inconclusive
    for title, keys in [
        ("4. RoLI improves every method", [(m, "ranli") for m in PAPER]),
        ("4b. … compute-matched", [(m, "ranli-6ep") for m in ("full", "lora")]),
    ]:
        vs, missing = [v for k in keys for v in found.get(k, [UNSURE])], [m for m, b in keys if (m, b) not in found]
        ev = f"RoLI ahead for {vs.count(YES)} of {len(vs)} methods"
        verdicts.append([title, overall(vs), ev + (f" (no pairs yet: {', '.join(missing)})" if missing else "")])
    return md, verdicts


def compute_and_doubts(idx: dict, status: dict, sweeps: dict[str, set[str]]) -> list[str]:
    """Total compute by sweep (sum of the cards' ``seconds``) and what stays uncertain."""
    grid, secs = set(main_groups(idx)), {}
    for by in idx.values():
        for c in by.values():
            block = next((f"{k}.yaml" for k, names in sweeps.items() if c["_dir"].name in names), "other")
            secs.setdefault(block, []).append(c["seconds"])
    total = [x for v in secs.values() for x in v]
    rows = [[b, len(v), f"{sum(v) / 3600:.2f}"] for b, v in [*sorted(secs.items()), ("total", total)]]
    few = [f"{' '.join(k)} ({len(by)})" for k, by in idx.items() if k[:2] in grid and k[2] in ROWS and len(by) < 3]
    excluded = ", ".join(t for t, v in status.items() if v != "pass")
    flags = sorted(f"{c['_dir'].name}: {f.get('flag')}" for by in idx.values() for c in by.values() for f in c["flags"])
    facts = [f"Grid cells with fewer than 3 seeds: {'; '.join(sorted(few)) or 'none'}."]
    facts += [f"Sanity flags: {'; '.join(flags) or 'none'}.", f"Targets excluded by the gate: {excluded or 'none'}."]
    md = ["## Compute", COMPUTE_RULE, md_table(["block", "runs", "hours"], rows, "lrr"), "## What stays uncertain"]
    return md + ["\n".join(f"- {x}" for x in facts + DOUBTS)]


def render(root: Path, fig_dir: Path | None = None) -> str:
    """The text of results.md from the run files under ``root``; the figures are saved to ``fig_dir`` when given."""
    idx = load(Path(root))
    for p in fig_dir.glob("embedded_*") if fig_dir else []:
        p.unlink()  # an earlier page's figures (of groups that may be gone)

    def img(fig: F.Figure | None, name: str, alt: str) -> list[str]:
        if fig is not None and fig_dir is not None:
            F.save(fig, fig_dir / name)
        return [] if fig is None else [f"![{alt}](figures/{name}.png)"]

    gate_md, status = gate(idx)
    ok = sorted(t for t, v in status.items() if v == "pass")
    (f1, v1), (f2, v2), (f4, v4) = finding1(idx, ok), finding2(idx, ok, img), finding4(idx, ok)
    f3, v3 = finding3(idx, status, img)
    sweeps = planned(Path(root))
    top = [INTRO.format(n=sum(map(len, idx.values()))), *progress(Path(root), sweeps), "## How verdicts are decided"]
    top += [RULES]
    top += ["## Verdicts"]
    top += [f"Gate: {', '.join(f'{t} {v}' for t, v in status.items()) or 'no target'}."]
    top += [md_table(["finding", "verdict", "evidence"], [[a, f"**{v}**", e] for a, v, e in v1 + v2 + v3 + v4])]
    parts = [top, gate_md, main_tables(idx, status, img), f1, f2, f3, f4, compute_and_doubts(idx, status, sweeps)]
    return "\n\n".join(line for p in parts for line in p) + "\n"


def planned(root: Path) -> dict[str, set[str]]:
    """The run names each sweep of configs/embedded/ plans (a run in two sweeps counts in the first)."""
    out: dict[str, set[str]] = {}
    for name in SWEEPS:
        names = {e.name for e in expand(load_grid(ROOT / "configs" / "embedded" / f"{name}.yaml"), root)}
        out[name] = names - set().union(*out.values())
    return out


def progress(root: Path, sweeps: dict[str, set[str]]) -> list[str]:
    """A PARTIAL banner naming how many of each sweep's planned runs (``planned``) are under ``root``."""
    have = {p.name for p in root.iterdir() if (p / "result.json").is_file()}
    counts = [(name, len(names & have), len(names)) for name, names in sweeps.items()]
    if all(done == total for _, done, total in counts):
        return []
    parts = ", ".join(f"`{name}.yaml` {done} of {total}" for name, done, total in counts)
    return [f"**PARTIAL**: {parts} planned runs are in; every verdict below uses only the runs that exist."]


def main(argv: list[str]) -> None:
    """Write docs/results.md and docs/figures/embedded_* from the run folders under argv[0]; bad input: exit 2."""
    try:
        if len(argv) != 1:
            raise UserError("usage: python scripts/results_md.py docs/embedded")
        (figs := ROOT / "docs" / "figures").mkdir(parents=True, exist_ok=True)
        text = render(Path(argv[0]), figs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    (ROOT / "docs" / "results.md").write_text(text)


INTRO = """# Results: the embedded benchmark

The paper's findings tested on 28-px mini-ViT sources trained adversarially (robust) or naturally on MNIST 0-4 + \
Fashion-MNIST 0-4 (`models/union_minivit_*.md`), transferred to held-out classes (`mnist59`, `fashion59`; variants \
for Finding 3): ε = 0.1 L∞ in [0, 1] pixels, PGD-7 adversarial training, 2,000 training images per seed, 500 for \
validation, clean and PGD-10 on 1,000 test images (`configs/embedded/`). {n} runs; `python scripts/results_md.py \
docs/embedded` writes this page from their files in `docs/embedded/` alone (`tests/test_results_md.py` checks it)."""
RULES = """Fixed before the runs, applied by the script (definitions: `docs/metrics.md`); accuracies in %, \
`mean ± std` over seeds. A **comparison** is a difference d (claimed-better minus other) between runs of the same \
(target, seed), which share the training subset and the test set, pooled over the targets that passed the gate, \
with Student's 95 % interval mean(d) ± t(0.975, n−1)·sd(d)/√n. It is **reproduced** when the interval lies above 0 \
and mean(d) ≥ 1 point (less is test-set noise: an accuracy on 1,000 images has a standard error up to 1.6 points), \
**not reproduced** when it lies below 0 and mean(d) ≤ −1 point, else **inconclusive** (also with < 2 pairs). A \
finding of several comparisons is reproduced when all are, not reproduced when any is not, else inconclusive."""
GATE_RULE = f"""Rule: a natural-objective linear probe trained to convergence (`{GATE}`: 10 epochs, seed 0) measures \
the robustness a target inherits from each source. A target **passes** when the robust source's PGD-10 accuracy is \
≥ {100 * GATE_ROBUST:.0f} % and the natural source's ≤ {100 * GATE_NATURAL:.0f} %; one that fails, or lacks a run of \
either source, is **excluded from every finding** (its main tables stay, marked). The spread (points) of validation \
clean accuracy over the last 3 epochs shows whether the probe converged."""
LR_RULE = """Rule: adversarial linear probes at four learning rates (`probe-lr*`: seed 0, 3 epochs) per (source, \
target); the chosen one has the highest **validation** PGD-10 accuracy (ties: the smaller rate), so no test number \
takes part. The last column checks the learning rate of the grid's linear runs (RoLI's stage 1)."""
MAIN_RULE = """Every method × {RanLI, RoLI} and the compute-matched RanLI controls (`-6ep`: the probe's 3 + RoLI's 3 \
epochs). Clean, PGD-10: mean ± std over seeds; AutoAttack: standard, first n test images of seed 0 (robust source; \
standard error up to 3.2 points at n = 250). Figures: Fig. 1 of the paper (arrows RanLI → RoLI), validation curves."""
F1_RULE = """Claim: adversarial finetuning from the robust source ends more robust than from the natural one. Per \
cell, paired by (target, seed): d = PGD-10(robust source) − PGD-10(natural source)."""
F2_RULE = """Claim: linear probing best preserves the robustness inherited from pretraining. `natural_ft.yaml` \
finetunes the robust source by every method with the natural objective (no attack), so any PGD-10 accuracy is \
inherited. Per method M, paired by (target, seed): d₁ = retained(linear) − retained(M), retained = PGD-10 / clean, \
and d₂ = 1 − PGD(M) / PGD(linear), the share of the probe's (inherited) PGD-10 that M loses; M's verdict joins both."""
F3_RULE = f"""Claim: transferred robustness (TR) correlates with transferred accuracy (TA). Per (robust source, \
target) group of `grid.yaml` and `transfer.yaml`, from means over seeds: TA = clean(Linear) / clean(Full-FT), \
TR = PGD-10(Linear) / PGD-10(Full-FT) (adversarial probe, and full finetuning from a random head; the project's own \
formula: `docs/metrics.md`). Pearson's r over the groups, 95 % percentile bootstrap interval ({N_BOOT:,} resamples, \
seed {BOOT_SEED}): reproduced above 0 with ≥ {MIN_GROUPS} groups, not reproduced below 0, else inconclusive."""
F4_RULE = """Claim: RoLI improves every method. Per method, paired by (target, seed): d = RoLI − RanLI, clean and \
PGD-10, joined; the verdict covers the methods with a RoLI result in the paper (RoLI-VPT is ours). 4b compares RoLI \
with 6-epoch RanLI (RoLI's probe costs 3 epochs). The paper's headline, the mean gain over Full-FT, Adapter, LoRA and \
Bias on its five datasets, is +3.88 clean / +2.44 PGD-10 (its Fig. 1); ours is that mean per (target, seed)."""
COMPUTE_RULE = """Rule: the sum of the runs' own `seconds` (training, every resume, test evaluation; a RoLI run \
reusing its linear run counts its finetuning only)."""
DOUBTS = """Scale: 307k-parameter ViTs, 28-px digits and clothes, 2,000 training images, 3 epochs, against the \
paper's ImageNet Swin-B on natural images: directions may carry over, magnitudes do not.
Comparisons use PGD-10; AutoAttack covers seed 0 of the robust source on 250 images, so PGD may overstate.
Pooling targets widens the intervals by their difference; a small real effect can read as inconclusive.
Finding 3's groups share sources and targets: not independent, so its bootstrap interval is optimistic.""".split("\n")

if __name__ == "__main__":
    main(sys.argv[1:])
