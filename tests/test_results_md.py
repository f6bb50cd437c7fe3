"""scripts/results_md.py on SYNTHETIC benchmark folders (every card written here, numbers chosen so that each verdict
is known), and the committed docs/results.md against what the script writes from the committed docs/embedded/."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
from scipy import stats

from advtransfer.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("results_md", ROOT / "scripts" / "results_md.py")
R = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(R)

NOISE = (0.0, 0.004, -0.006)  # per seed
BASE = {"linear": 0.70, "full": 0.80, "vpt": 0.72, "lora": 0.76, "adapter": 0.75, "bias": 0.74}


def run(
    root: Path,
    name: str,
    clean: float,
    pgd: float,
    *,
    method: str,
    init: str = "ranli",
    objective: str = "at",
    lr: float = 0.001,
    epochs: int = 3,
    aa: float | None = None,
) -> None:
    """One synthetic run folder holding the three committed files."""
    d = root / name
    d.mkdir(parents=True)
    seed = int(name.rsplit("seed", 1)[1])
    card = {
        "name": name,
        "method": method,
        "method_options": {},
        "init": init,
        "objective": objective,
        "seed": seed,
        "clean_acc": clean,
        "pgd_acc": pgd,
        "autoattack_acc": aa,
        "n_autoattack": 250 if aa is not None else None,
        "autoattack_settings": {"standard": True},
        "val_clean": clean,
        "val_pgd": pgd,
        "best_epoch": epochs - 1,
        "seconds": 36.0,
        "flags": [],
        "source": "models/x.safetensors",
        "dataset": "mnist[5-9]",
        "eps": "0.1",
        "norm": "Linf",
        "trainable_params": 1000,
        "total_params": 300000,
    }
    (d / "result.json").write_text(json.dumps(card))
    (d / "config.yaml").write_text(json.dumps({"train": {"lr": lr, "epochs": epochs}}))
    lines = [{"epoch": e, "val_clean": clean - 0.01 * (epochs - 1 - e), "val_pgd": pgd} for e in range(epochs)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def acc(source: str, lab: str, seed: int, roli: dict) -> tuple[float, float]:
    """(clean, PGD-10) of a grid cell: RoLI adds ``roli[method]`` (clean, PGD) to RanLI; natural sources lose PGD."""
    m, init = (lab.split("-") + ["ranli"])[:2]
    clean, pgd = BASE[m] + NOISE[seed], BASE[m] / 2 + 2 * NOISE[seed]
    if init == "roli":
        clean, pgd = clean + roli[m][0] + NOISE[2 - seed], pgd + roli[m][1] - NOISE[2 - seed]
    return clean, pgd if "robust" in source else pgd / 10


def bench(root: Path, roli: dict | None = None) -> Path:
    """A whole synthetic benchmark: the gate (mnist59 passes, fashion59 fails), probe-lr runs, the grid, the
    natural-objective runs and 10 transfer groups. ``roli``: per method, RoLI's (clean, PGD) gain over RanLI."""
    roli = roli or {m: (0.04, 0.03) for m in R.METHODS}
    for s in ("union-robust", "union-natural"):
        for t, pgd in (("mnist59", 0.30), ("fashion59", 0.10)):
            gate_pgd = pgd if "robust" in s else 0.01
            run(
                root,
                f"{s}__{t}__gate-natural-probe__seed0",
                0.9,
                gate_pgd,
                method="linear",
                objective="natural",
                epochs=10,
            )
            for lr, val in ((0.003, 0.20), (0.01, 0.25), (0.03, 0.27), (0.1, 0.27)):
                run(root, f"{s}__{t}__probe-lr{lr}__seed0", 0.8, val, method="linear", lr=lr)
            for seed in range(3):
                for lab in R.ROWS:
                    m, init = (lab.split("-") + ["ranli"])[:2]
                    c, p = acc(s, lab.replace("-6ep", ""), seed, roli)
                    aa = p - 0.02 if seed == 0 and "robust" in s else None
                    lr = 0.03 if t == "mnist59" else 0.01
                    run(root, f"{s}__{t}__{lab}__seed{seed}", c, p, method=m, init=init, lr=lr, aa=aa)
    for t in ("mnist59", "fashion59"):
        for seed in range(3):
            for m in ["linear", *R.METHODS]:
                pgd = 0.30 if m == "linear" else 0.12 + 0.02 * R.METHODS.index(m)
                name = f"union-robust__{t}__{m}-natural__seed{seed}"
                run(root, name, 0.9 + NOISE[seed], pgd + NOISE[seed], method=m, objective="natural")
    targets = ["mnist59", "fashion59", "mixed59", "mnist59-invert", "fashion59-rot90", "mnist59-shuffle"]
    for i, (s, t) in enumerate((s, t) for s in ("union-robust", "mnist-robust") for t in targets):
        if s == "union-robust" and t in ("mnist59", "fashion59"):
            continue  # from the grid
        ta = 0.5 + 0.04 * i
        for seed in range(2):
            run(root, f"{s}__{t}__linear-lr0.01__seed{seed}", 0.8 * ta, 0.4 * (ta + 0.01 * (-1) ** i), method="linear")
            run(root, f"{s}__{t}__full-ranli__seed{seed}", 0.8, 0.4, method="full")
    return root


def verdicts(text: str) -> dict[str, str]:
    """Finding number -> verdict, from the verdict table."""
    return {m[1]: m[2] for m in re.finditer(r"^\| (\w+)\. .*? \| \*\*(.+?)\*\* \|", text, re.M)}


@pytest.fixture
def no_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    """Placeholder figures: the text tests skip matplotlib's layouts (test_figures_written_and_linked draws)."""
    for name in ("fig_clean_robust", "fig_curves", "fig_sources", "fig_transfer"):
        monkeypatch.setattr(R.F, name, lambda *a: "figure")


def test_t_quantiles_and_interval_match_scipy() -> None:
    assert R.T975 == pytest.approx([stats.t.ppf(0.975, df) for df in range(1, 31)], abs=1e-3)
    d = [0.01, 0.035, 0.02, 0.05, -0.004]
    m, lo, hi, n = R.interval(d)
    assert (lo, hi, n) == pytest.approx((*stats.t.interval(0.95, 4, loc=m, scale=stats.sem(d)), 5), abs=1e-5)
    assert R.interval([0.1]) is None


def test_verdict_rules() -> None:
    assert R.verdict((0.02, 0.005, 0.035, 3)) == R.YES
    assert R.verdict((0.005, 0.001, 0.009, 3)) == R.UNSURE  # interval above 0, but under 1 point: noise
    assert R.verdict((0.02, -0.001, 0.041, 3)) == R.UNSURE  # covers 0
    assert R.verdict((-0.02, -0.03, -0.01, 3)) == R.NO
    assert R.verdict(None) == R.UNSURE
    assert R.verdict((0.3, 0.1, 0.5, 12), 0.0) == R.YES
    assert R.overall([R.YES, R.YES]) == R.YES and R.overall([]) == R.UNSURE
    assert R.overall([R.YES, R.UNSURE]) == R.UNSURE and R.overall([R.YES, R.NO, R.UNSURE]) == R.NO


def test_synthetic_benchmark(tmp_path: Path, no_draw: None) -> None:
    text = R.render(bench(tmp_path))
    assert verdicts(text) == {"1": R.YES, "2": R.YES, "3": R.YES, "4": R.YES, "4b": R.YES}
    assert "Gate: fashion59 fail, mnist59 pass." in text
    assert "Grid cells with fewer than 3 seeds: none." in text and "| total | 252 | 2.52 |" in text
    assert "### union-robust → fashion59 (excluded from the findings: gate fail)" in text
    assert "| union-robust → mnist59 | 0.03 | 80.00 | 27.00 | **chosen** | yes |" in text  # tie 0.03/0.1: smaller
    assert "| union-robust → fashion59 | 0.03 | 80.00 | 27.00 | **chosen** | no: 0.01 |" in text
    assert "Groups left out: mnist-robust → fashion59 (gate: fail), union-robust → fashion59 (gate: fail)." in text
    # Finding 4, Full-FT: RoLI − RanLI on mnist59 (fashion59 failed the gate), by hand with scipy
    for gain, noise in ((0.04, [NOISE[2 - s] for s in range(3)]), (0.03, [-NOISE[2 - s] for s in range(3)])):
        d = [100 * (gain + e) for e in noise]
        lo, hi = stats.t.interval(0.95, 2, loc=sum(d) / 3, scale=stats.sem(d))
        assert f"{sum(d) / 3:+.2f} [{lo:+.2f}, {hi:+.2f}] (n=3)" in text
    # Finding 3: r over the 10 groups, as scipy computes it from the table's TA and TR
    ta_tr = [
        (float(a), float(b)) for a, b in re.findall(r"\| ([01]\.\d{3}) \| [\d.]+ \| [\d.]+ \| ([01]\.\d{3}) \|", text)
    ]
    assert len(ta_tr) == 10 and f"r = {stats.pearsonr(*zip(*ta_tr))[0]:.3f} [" in text
    # every rule comes before its numbers
    for head, rule in [("## The gate", "Rule:"), ("### The probe", "Rule:"), ("## Main tables", "Every method")]:
        section = text[text.index(head) :]
        assert section.index(rule) < section.index("\n|")
    for n in "1234":
        section = text[text.index(f"## Finding {n}") :]
        assert section.index("Claim:") < section.index("\n|")
    assert text.index("## How verdicts are decided") < text.index("## Verdicts") < text.index("## The gate")
    idx = R.load(tmp_path)  # the bootstrap is seeded: the same text every time
    status = R.gate(idx)[1]
    assert R.finding3(idx, status, lambda *a: [])[1] == R.finding3(idx, status, lambda *a: [])[1]


@pytest.mark.parametrize(
    ("roli", "want"),
    [
        ({**{m: (0.04, 0.03) for m in R.METHODS}, "bias": (0.04, -0.03)}, R.NO),  # RoLI hurts Bias's PGD-10
        ({m: (0.003, 0.002) for m in R.METHODS}, R.UNSURE),  # gains within the seeds' noise
        ({**{m: (0.04, 0.03) for m in R.METHODS}, "vpt": (-0.05, -0.05)}, R.YES),  # RoLI-VPT is not in the verdict
    ],
)
def test_finding4_follows_the_numbers(tmp_path: Path, no_draw: None, roli: dict, want: str) -> None:
    assert verdicts(R.render(bench(tmp_path, roli)))["4"] == want


def test_finding4_needs_every_paper_method(tmp_path: Path, no_draw: None) -> None:
    """A method of the paper with no RoLI/RanLI pair yet (a partial grid) leaves the finding inconclusive."""
    bench(tmp_path)
    for d in [*tmp_path.glob("*__bias-roli__*"), *tmp_path.glob("*__lora-ranli-6ep__*")]:
        shutil.rmtree(d)
    text = R.render(tmp_path)
    assert verdicts(text)["4"] == R.UNSURE and "RoLI ahead for 3 of 4 methods (no pairs yet: bias)" in text
    assert verdicts(text)["4b"] == R.UNSURE and "(no pairs yet: lora)" in text


def test_gate_without_both_sources_excludes_the_target(tmp_path: Path, no_draw: None) -> None:
    bench(tmp_path)
    for p in tmp_path.glob("union-natural__mnist59__gate-natural-probe__seed0/*"):
        p.unlink()
    (tmp_path / "union-natural__mnist59__gate-natural-probe__seed0").rmdir()
    text = R.render(tmp_path)
    assert "mnist59 incomplete: no gate run of both sources" in text
    assert set(verdicts(text).values()) == {R.UNSURE}  # no target left for any finding


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no result.json"):
        R.render(tmp_path)
    run(tmp_path, "robust__mnist59__linear__seed0", 0.9, 0.3, method="linear")
    (tmp_path / "robust__mnist59__linear__seed0").rename(tmp_path / "robust__linear__seed0")
    with pytest.raises(UserError, match="robust__linear__seed0 is not named source__target__method__seedN"):
        R.render(tmp_path)
    (tmp_path / "robust__linear__seed0").rename(tmp_path / "robust__mnist59__linear__seed0")
    card = tmp_path / "robust__mnist59__linear__seed0" / "result.json"
    card.write_text(json.dumps({k: v for k, v in json.loads(card.read_text()).items() if k != "pgd_acc"}))
    with pytest.raises(UserError, match="lacks pgd_acc"):
        R.render(tmp_path)


def test_figures_written_and_linked(tmp_path: Path) -> None:
    """Real figures (PDF + PNG) for a small benchmark, every link of the page resolving to one."""
    runs = tmp_path / "runs"
    for s, pgd in (("robust", 0.3), ("natural", 0.01)):
        run(runs, f"{s}__mnist59__gate-natural-probe__seed0", 0.9, pgd, method="linear", objective="natural")
    for seed in range(2):
        for lab, c, p in (("linear", 0.7, 0.3), ("full-ranli", 0.8, 0.35), ("full-roli", 0.84, 0.4)):
            m, init = (lab.split("-") + ["ranli"])[:2]
            run(runs, f"robust__mnist59__{lab}__seed{seed}", c + NOISE[seed], p, method=m, init=init)
        for m, p in (("linear", 0.3), ("full", 0.1)):
            run(runs, f"robust__mnist59__{m}-natural__seed{seed}", 0.9, p + NOISE[seed], method=m, objective="natural")
    text = R.render(runs, tmp_path / "figures")
    links = re.findall(r"\]\(figures/(.+?)\.png\)", text)
    assert {"embedded_clean_robust_robust_mnist59", "embedded_curves_robust_mnist59", "embedded_natural_ft"} <= set(
        links
    )
    for name in links:
        assert (tmp_path / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert (tmp_path / "figures" / f"{name}.pdf").read_bytes()[:4] == b"%PDF"


def test_committed_results_md_is_current() -> None:
    """docs/results.md is exactly what the script writes from the committed cards (once they exist)."""
    cards = ROOT / "docs" / "embedded"
    if not cards.is_dir():
        pytest.skip("docs/embedded/ does not exist yet (the benchmark's cards are not committed)")
    assert (ROOT / "docs" / "results.md").read_text() == R.render(cards)


def test_keep_runs_copies_the_small_files_of_finished_runs_only(tmp_path):
    spec = importlib.util.spec_from_file_location("keep_runs", ROOT / "scripts" / "keep_runs.py")
    K = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(K)
    runs, dest = tmp_path / "runs", tmp_path / "kept"
    roli = runs / "s__t__full-roli__seed0"
    (roli / "stage2").mkdir(parents=True)
    for name in ("result.json", "config.yaml", "best.safetensors", "log.txt", "stage2/metrics.jsonl"):
        (roli / name).write_text(name)
    (runs / "s__t__linear__seed0").mkdir()  # unfinished: no result.json
    (runs / "s__t__linear__seed0" / "config.yaml").write_text("x")
    (runs / "_sweep").mkdir()
    assert K.keep(runs, dest) == (1, 1)
    kept = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert kept == [
        "s__t__full-roli__seed0/config.yaml",
        "s__t__full-roli__seed0/result.json",
        "s__t__full-roli__seed0/stage2/metrics.jsonl",
    ]
    assert K.keep(runs, dest) == (1, 0)  # unchanged: not copied again
    (roli / "result.json").write_text("new")
    assert K.keep(runs, dest) == (1, 1) and (dest / roli.name / "result.json").read_text() == "new"
