"""Reports from SYNTHETIC run directories: every result.json / metrics.jsonl here is written by the test with
made-up numbers chosen so that means, standard deviations, TA/TR and Pearson r can be computed by hand."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import advtransfer
from advtransfer import figures
from advtransfer.cli import main
from advtransfer.document import write_report
from advtransfer.errors import UserError
from advtransfer.report import aggregate, find_results, mean_std, pearson, results_table

ROBUST = "models/fake_robust.safetensors"
NATURAL = "models/fake_natural.safetensors"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(
    root: Path,
    name: str,
    *,
    method: str,
    init: str = "ranli",
    seed: int = 0,
    clean: float,
    pgd: float,
    aa: float | None = None,
    objective: str = "at",
    source: str = ROBUST,
    dataset: str = "fashion-mnist",
    flags: list | None = None,
    params: int = 1000,
    epochs: int = 3,
    options: dict | None = None,
) -> Path:
    """A schema-correct, clearly synthetic run directory (RoLI runs get stage1/ and stage2/ like the pipeline)."""
    d = root / name
    final = d / "stage2" if init == "roli" else d
    final.mkdir(parents=True)
    card = {
        "name": name,
        "method": method,
        "method_options": options or {},
        "init": init,
        "backbone": "vit_tiny_patch16_224",
        "source": source,
        "dataset": dataset,
        "seed": seed,
        "eps": "0.1",
        "eps_value": 0.1,
        "norm": "Linf",
        "objective": objective,
        "clean_acc": clean,
        "pgd_acc": pgd,
        "n_eval": 100,
        "pgd_settings": {"steps": 10},
        "flags": flags or [],
        "autoattack_acc": aa,
        "n_autoattack": 50 if aa is not None else None,
        "best_epoch": epochs - 1,
        "val_clean": clean,
        "val_pgd": pgd,
        "trainable_params": params,
        "total_params": 100_000,
        "n_train": None,
        "seconds": 1.0,
    }
    with open(final / "metrics.jsonl", "w") as f:
        for e in range(epochs):
            rec = {
                "epoch": e,
                "train_loss": 2.0 - e * 0.1,
                "train_acc": 0.1 * e,
                "lr": 1e-3,
                "val_clean": clean * (e + 1) / epochs,
                "val_pgd": pgd * (e + 1) / epochs,
                "seconds": 0.1,
            }
            f.write(json.dumps(rec) + "\n")
    (d / "result.json").write_text(json.dumps(card))
    (d / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "method": {"name": method, "init": init}}))
    if init == "roli":
        (final / "result.json").write_text(json.dumps(card))
        (d / "stage1").mkdir()
        (d / "stage1" / "result.json").write_text(json.dumps({**card, "method": "linear", "init": "roli"}))
    return d


@pytest.fixture
def runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    # group A: robust source -> fashion-mnist, 3 seeds of Linear and Full-FT (RanLI), RoLI full, natural probe
    for s, (c, p) in enumerate([(0.70, 0.40), (0.72, 0.42), (0.74, 0.44)]):
        fake_run(root, f"a-linear-s{s}", method="linear", seed=s, clean=c, pgd=p, aa=p - 0.02, params=330)
    for s, (c, p) in enumerate([(0.80, 0.48), (0.80, 0.50), (0.80, 0.52)]):
        fake_run(root, f"a-full-ranli-s{s}", method="full", seed=s, clean=c, pgd=p, aa=p - 0.03, params=90_000)
    for s, (c, p) in enumerate([(0.84, 0.54), (0.86, 0.56)]):
        fake_run(root, f"a-full-roli-s{s}", method="full", init="roli", seed=s, clean=c, pgd=p, params=90_000)
    fake_run(
        root,
        "a-lora-ranli-s0",
        method="lora",
        clean=0.78,
        pgd=0.45,
        params=5000,
        flags=[{"flag": "robust_above_clean", "detail": "synthetic flag for the test"}],
    )
    fake_run(root, "a-lora-roli-s0", method="lora", init="roli", clean=0.82, pgd=0.50, params=5000)
    fake_run(root, "a-linear-natural-s0", method="linear", objective="natural", clean=0.75, pgd=0.10, params=330)
    # group B: natural source -> fashion-mnist; group C: robust source -> mnist (no natural probe)
    fake_run(root, "b-linear", method="linear", source=NATURAL, clean=0.60, pgd=0.05)
    fake_run(root, "b-full", method="full", source=NATURAL, clean=0.80, pgd=0.40)
    fake_run(root, "c-linear", method="linear", dataset="mnist", clean=0.90, pgd=0.60)
    fake_run(root, "c-full", method="full", dataset="mnist", clean=0.95, pgd=0.80)
    fake_run(root, "c-bias", method="bias", dataset="mnist", clean=0.93, pgd=0.70)
    # an eps sweep written by `advtransfer eval --out`
    (root / "eval-sweep").mkdir()
    (root / "eval-sweep" / "eval.json").write_text(
        json.dumps(
            {
                "checkpoint": "runs/x/best.safetensors",
                "data": "fashion-mnist",
                "eps_arg": "0,0.05,0.1",
                "clean": 0.8,
                "pgd": 0.4,
                "n": 100,
                "flags": [],
                "sweep": [
                    {"eps": 0.0, "clean": 0.8, "pgd": 0.8},
                    {"eps": 0.05, "clean": 0.8, "pgd": 0.6, "autoattack": 0.58},
                    {"eps": 0.1, "clean": 0.8, "pgd": 0.4, "autoattack": 0.37},
                ],
            }
        )
    )
    return root


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_mean_std_and_pearson_by_hand():
    m, sd, n = mean_std([0.70, 0.72, None, 0.74])
    assert n == 3 and m == pytest.approx(0.72) and sd == pytest.approx(0.02)
    assert mean_std([0.5]) == (0.5, 0.0, 1) and mean_std([None]) is None
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2], [1, 2]) is None  # two points: r = ±1 says nothing
    assert pearson([1, 1, 1], [1, 2, 3]) is None


def test_report_numbers_tables_and_figures(runs, tmp_path):
    out = tmp_path / "report"
    md_path = write_report([runs], out)
    md = md_path.read_text()
    summary = json.loads((out / "report.json").read_text())
    groups = {(g["source"], g["dataset"]): g for g in summary["groups"]}
    assert set(groups) == {(ROBUST, "fashion-mnist"), (NATURAL, "fashion-mnist"), (ROBUST, "mnist")}

    # means ± std over seeds: Linear in group A is 72.00 ± 2.00 clean, 42.00 ± 2.00 PGD, 40.00 ± 2.00 AA
    assert re.search(
        r"\| linear \| ranli \| at \| 3 \| 0,1,2 \| 72\.00 ± 2\.00 \| 42\.00 ± 2\.00 \| 40\.00 ± 2\.00 \|", md
    )
    assert re.search(r"\| full \| roli \| at \| 2 \| 0,1 \| 85\.00 ± 1\.41 \| 55\.00 ± 1\.41 \| — \|", md)

    # TA = clean(Linear)/clean(Full-FT), TR = PGD(Linear)/PGD(Full-FT), from seed means
    a = groups[(ROBUST, "fashion-mnist")]["transfer"]
    assert a["TA"] == pytest.approx(0.72 / 0.80) and a["TR"] == pytest.approx(0.42 / 0.50)
    assert a["TR_autoattack"] == pytest.approx(0.40 / 0.47)
    b = groups[(NATURAL, "fashion-mnist")]["transfer"]
    assert b["TA"] == pytest.approx(0.75) and b["TR"] == pytest.approx(0.125) and b["TR_autoattack"] is None
    c = groups[(ROBUST, "mnist")]["transfer"]
    assert c["TA"] == pytest.approx(0.90 / 0.95) and c["TR"] == pytest.approx(0.75)
    tas, trs = [0.9, 0.75, 0.90 / 0.95], [0.84, 0.125, 0.75]
    mx, my = sum(tas) / 3, sum(trs) / 3
    r = sum((x - mx) * (y - my) for x, y in zip(tas, trs)) / (
        sum((x - mx) ** 2 for x in tas) ** 0.5 * sum((y - my) ** 2 for y in trs) ** 0.5
    )
    assert summary["pearson_TR_TA"] == pytest.approx(r)
    assert f"Pearson r(TR, TA) = {r:.3f}" in md
    assert "| 0.900 | 0.840 | 0.851 | none |" in md

    # sources of robustness: inherited = natural linear probe's PGD (10 %), achieved - inherited per cell
    assert groups[(ROBUST, "fashion-mnist")]["inherited_pgd"][0] == pytest.approx(0.10)
    cells = {(x["method"], x["init"], x["objective"]): x for x in groups[(ROBUST, "fashion-mnist")]["cells"]}
    assert cells[("full", "roli", "at")]["achieved_minus_inherited"] == pytest.approx(0.45)
    assert "| full/roli | 55.00 ± 1.41 | 10.00 | +45.00 |" in md
    assert groups[(ROBUST, "mnist")]["inherited_pgd"] is None
    assert "inherited robustness is not measured" in md

    # RoLI stage folders are part of their run, not runs of their own; flags table; sweep table
    assert summary["n_runs"] == 16
    assert "| a-lora-ranli-s0 | robust_above_clean | synthetic flag for the test |" in md
    assert "| 0.05 | 80.00 | 60.00 | 58.00 |" in md

    # figures exist, are valid PNGs of a sensible size, and are referenced by the markdown
    pngs = sorted((out / "figures").glob("*.png"))
    names = {p.name.split("_")[0].split(".")[0] for p in pngs}
    assert {"clean", "curves", "params", "transfer", "sources", "eps"} <= names, names
    for p in pngs:
        w, h = _png_size(p)
        assert 300 < w < 3000 and 200 < h < 3000, (p, w, h)
        assert f"figures/{p.name}" in md


def test_html_is_self_contained(runs, tmp_path):
    write_report([runs], tmp_path / "r")
    page = (tmp_path / "r" / "report.html").read_text()
    srcs = re.findall(r"""src=['"]([^'"]*)['"]""", page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:
        assert base64.b64decode(s.split(",", 1)[1])[:8] == PNG_MAGIC
    assert "<link" not in page and "<script" not in page and "http" not in page
    assert len(srcs) == len(list((tmp_path / "r" / "figures").glob("*.png")))
    assert "<table>" in page and "85.00 ± 1.41" in page


def test_missing_runs_are_reported_not_fatal(tmp_path):
    fake_run(tmp_path / "r", "only-full", method="full", clean=0.8, pgd=0.4)
    md = write_report([tmp_path / "r"], tmp_path / "o").read_text()
    assert "| — | — | — | Linear (linear/ranli, at) |" in md
    summary = json.loads((tmp_path / "o" / "report.json").read_text())
    assert summary["groups"][0]["transfer"]["TA"] is None and summary["pearson_TR_TA"] is None
    assert "No eval.json with a sweep" in md and "No sanity flag" in md


def test_full_ft_with_zero_robustness_gives_no_tr(tmp_path):
    fake_run(tmp_path / "r", "lin", method="linear", clean=0.5, pgd=0.1)
    fake_run(tmp_path / "r", "full", method="full", clean=0.8, pgd=0.0)
    summary_path = write_report([tmp_path / "r"]).parent / "report.json"
    t = json.loads(summary_path.read_text())["groups"][0]["transfer"]
    assert t["TA"] == pytest.approx(0.625) and t["TR"] is None


def test_method_options_are_separate_cells(tmp_path):
    """LoRA rank 4 and rank 16 are different methods: never averaged into one mean ± std."""
    fake_run(tmp_path / "r", "r4", method="lora", clean=0.5, pgd=0.2, options={"rank": 4})
    fake_run(tmp_path / "r", "r16", method="lora", clean=0.7, pgd=0.4, options={"rank": 16})
    md = write_report([tmp_path / "r"], tmp_path / "o").read_text()
    assert "lora(rank=4)" in md and "lora(rank=16)" in md
    assert "50.00" in md and "70.00" in md and "60.00" not in md


def test_no_results_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no result.json"):
        write_report([tmp_path])
    with pytest.raises(UserError, match="no such directory"):
        write_report([tmp_path / "nope"])
    assert main(["report", str(tmp_path)]) == 2


def test_results_table_keeps_its_format():
    card = {
        "method": "full",
        "init": "roli",
        "clean_acc": 0.5,
        "pgd_acc": 0.25,
        "autoattack_acc": None,
        "n_eval": 10,
        "pgd_settings": {"steps": 10},
        "flags": [],
        "trainable_params": 1234,
    }
    table = results_table([card])
    assert table.splitlines()[0].startswith("| method | init | clean % | PGD-k % |")
    assert "| full | roli | 50.00 | 25.00 (PGD-10) | — | 10 (—) | 1,234 | none |" in table


def test_cli_report(runs, tmp_path, capsys):
    assert main(["report", str(runs), "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "report.md").is_file() and (tmp_path / "cli" / "report.html").is_file()


# ----------------------------------------------------------------------------- figures, LaTeX, HTML, imports


@pytest.fixture(scope="module")
def small_report(tmp_path_factory) -> Path:
    """One group whose names need escaping in LaTeX and HTML, reported once for the tests that read it."""
    root = tmp_path_factory.mktemp("small")
    data, flag = "cub_200 & co #1 50%", {"flag": "odd_flag", "detail": "<script>alert(1)</script>"}
    fake_run(root / "runs", "lin", method="linear", dataset=data, clean=0.6, pgd=0.3)
    fake_run(root / "runs", "full", method="full", dataset=data, clean=0.8, pgd=0.4, flags=[flag])
    fake_run(
        root / "runs",
        "lora",
        method="lora",
        init="roli",
        dataset=data,
        clean=0.7,
        pgd=0.35,
        options={"target_modules": "qkv_proj"},
    )
    fake_run(root / "runs", "nat", method="linear", objective="natural", dataset=data, clean=0.65, pgd=0.05)
    write_report([root / "runs"], root / "out")
    return root / "out"


def _cells(root: Path) -> dict:
    (cells,) = aggregate(find_results([root])).values()
    return cells


def _png_dpi(path: Path) -> float:
    data, i = path.read_bytes(), 8
    while i < len(data):
        n, kind = struct.unpack(">I4s", data[i : i + 8])
        if kind == b"pHYs":
            ppm_x, _, unit = struct.unpack(">IIB", data[i + 8 : i + 17])
            return ppm_x * 0.0254 if unit == 1 else 0.0
        i += 12 + n
    return 0.0


def test_every_figure_is_a_pdf_and_a_png_at_print_resolution(small_report):
    figs = small_report / "figures"
    pngs, pdfs = sorted(figs.glob("*.png")), sorted(figs.glob("*.pdf"))
    assert len(pngs) == 5 and [p.stem for p in pngs] == [p.stem for p in pdfs]  # 3 of the group, transfer, sources
    for pdf in pdfs:
        data = pdf.read_bytes()
        assert data[:5] == b"%PDF-" and b"/FontFile2" in data and b"/Type3" not in data  # TrueType, no Type 3
    for png in pngs:
        assert _png_dpi(png) == pytest.approx(figures.DPI, abs=1) and figures.DPI >= 200


def test_axes_keep_a_minimum_span_for_near_equal_values(tmp_path):
    fake_run(tmp_path, "a", method="full", clean=0.800, pgd=0.5000, epochs=1)
    fake_run(tmp_path, "b", method="lora", clean=0.801, pgd=0.5005, epochs=1)
    fake_run(tmp_path, "c", method="lora", init="roli", clean=0.8005, pgd=0.5002, epochs=1)
    cells = _cells(tmp_path)
    robust, curves = figures.fig_clean_robust(cells, "t"), figures.fig_curves(cells, "t")
    limits = [robust.axes[0].get_xlim(), robust.axes[0].get_ylim(), figures.fig_params(cells, "t").axes[0].get_ylim()]
    limits += [ax.get_ylim() for ax in curves.axes]
    sweep = {"sweep": [{"eps": 0.1, "clean": 0.9, "pgd": 0.5}, {"eps": 0.2, "clean": 0.9, "pgd": 0.5001}]}
    limits.append(figures.fig_sweeps([("e", sweep)]).axes[0].get_ylim())
    for lo, hi in limits:
        assert hi - lo >= figures.MIN_SPAN and (lo < 50.0 < hi or lo < 80.0 < hi)
    for ax in curves.axes:  # one epoch: the tick is the integer 1, nothing else in view
        lo, hi = ax.get_xlim()
        assert [t for t in ax.get_xticks() if lo <= t <= hi] == [1.0]
    transfer = figures.fig_transfer([("a", 0.9, 0.901), ("b", 0.9004, 0.9)], None).axes[0]
    for lo, hi in (transfer.get_xlim(), transfer.get_ylim()):
        assert hi - lo >= 0.1 and lo < 0.9 < hi


def test_point_labels_do_not_overlap(tmp_path):
    for name, method, clean, pgd in [
        ("a", "full", 0.800, 0.500),
        ("b", "lora", 0.801, 0.5005),
        ("c", "bias", 0.8005, 0.4995),
        ("d", "adapter", 0.7995, 0.5003),
    ]:
        fake_run(tmp_path, name, method=method, clean=clean, pgd=pgd)
    fig = figures.fig_clean_robust(_cells(tmp_path), "t")
    fig.draw_without_rendering()
    ax = fig.axes[0]
    boxes = [t.get_window_extent() for t in ax.texts if t.get_text()]
    assert len(boxes) == 4
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    frame = ax.get_window_extent()
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)


def test_latex_table_is_well_formed_and_escaped(small_report):
    tex = (small_report / "report.tex").read_text()
    envs = re.findall(r"\\(begin|end)\{(\w+)\}", tex)
    assert envs == [("begin", "table"), ("begin", "tabular"), ("end", "tabular"), ("end", "table")]
    depth = 0
    for ch in re.sub(r"\\[{}]", "", tex):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0
    lines = tex.splitlines()
    top, mid, bottom = (lines.index(rule) for rule in (r"\toprule", r"\midrule", r"\bottomrule"))
    assert top < mid < bottom and all(tex.count(rule) == 1 for rule in (r"\toprule", r"\midrule", r"\bottomrule"))
    ncols = len(re.search(r"\\begin\{tabular\}\{(\w+)\}", tex).group(1))
    rows = [lines[top + 1], *lines[mid + 1 : bottom]]
    assert len(rows) == 5  # header + 4 cells
    for row in rows:
        assert row.endswith(r" \\") and len(re.findall(r"(?<!\\)&", row)) == ncols - 1
    text = "\n".join(line for line in lines if not line.startswith(("%", r"\label")))
    assert not re.search(r"(?<!\\)[_%#]", text) and len(re.findall(r"(?<!\\)\$", text)) % 2 == 0
    assert r"\caption{fake\_robust $\to$ cub\_200 \& co \#1 50\% ($\varepsilon$=0.1 Linf)}" in tex
    assert r"lora(target\_modules=qkv\_proj) & roli & at" in tex


def test_html_is_the_markdown_rendered_with_embedded_figures(small_report):
    md, page = (small_report / "report.md").read_text(), (small_report / "report.html").read_text()
    tables = re.findall(r"^\|(?:-{3}:?\|)+$", md, re.M)
    assert len(tables) >= 5 and page.count("<table>") == len(tables)
    images = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", md)
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(embedded) == 5
    for name, data in zip(images, embedded):
        assert base64.b64decode(data) == (small_report / name).read_bytes()
    for heading in re.findall(r"^#+ (.*)$", md, re.M):
        assert html.escape(heading, quote=False) in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script" not in page  # raw HTML is shown as text


def test_report_modules_load_no_torch():
    code = (
        "import sys, advtransfer.report; assert 'matplotlib' not in sys.modules; "
        "import advtransfer.document; loaded = {'torch', 'timm'} & set(sys.modules); assert not loaded, loaded"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(advtransfer.__file__).parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
