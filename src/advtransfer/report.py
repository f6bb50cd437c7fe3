"""Reports from run directories: tables of result cards (figures and analyses build on these)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def results_table(cards: list[dict]) -> str:
    """Markdown table: method, init, clean, PGD, AutoAttack, trainable params, flags."""
    lines = [
        "| method | init | clean % | PGD-k % | AutoAttack % | n (AA) | trainable params | flags |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in cards:
        k = c.get("pgd_settings", {}).get("steps", "")
        aa = _pct(c.get("autoattack_acc"))
        if c.get("autoattack_settings") and not c["autoattack_settings"].get("standard", True):
            aa += " (non-standard)"
        flags = ", ".join(f["flag"] for f in c.get("flags", [])) or "none"
        lines.append(
            f"| {c['method']} | {c['init']} | {_pct(c['clean_acc'])} | {_pct(c['pgd_acc'])} (PGD-{k}) | {aa} | "
            f"{c['n_eval']} ({c.get('n_autoattack', '—')}) | {c['trainable_params']:,} | {flags} |"
        )
    return "\n".join(lines)


def find_results(dirs: list[Path]) -> list[tuple[Path, dict]]:
    """Top-level result cards under ``dirs`` (a RoLI run's stage folders are part of their run)."""
    found = []
    for d in dirs:
        if not Path(d).exists():
            raise UserError(f"report: no such directory: {d}")
        for p in sorted(Path(d).rglob("result.json")):
            if p.parent.name in ("stage1", "stage2") and (p.parent.parent / "result.json").exists():
                continue
            found.append((p.parent, json.loads(p.read_text())))
    if not found:
        raise UserError(f"report: no result.json under {', '.join(map(str, dirs))}")
    return found


def write_report(dirs: list[Path], out: Path | None = None) -> Path:
    results = find_results(dirs)
    out = Path(out or dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    text = "# advtransfer report\n\n" + results_table([c for _, c in results]) + "\n"
    path = out / "report.md"
    path.write_text(text)
    return path
