"""Packaging: pyproject.toml declares compatible ranges (``pip install advtransfer`` keeps a user's torch), and
constraints.txt pins the exact tested set inside them, which the Makefile passes to every pip install."""

from __future__ import annotations

import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
REQUIREMENTS = [
    Requirement(r) for r in PROJECT["dependencies"] + [r for e in PROJECT["optional-dependencies"].values() for r in e]
]


def constraints() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_dependencies_are_ranges_not_pins():
    for req in REQUIREMENTS:
        assert not any(s.operator in ("==", "===") for s in req.specifier), f"{req} pins: use a range"
    ranged = {canonicalize_name(r.name): r for r in REQUIREMENTS}
    for core in ("torch", "torchvision", "timm", "peft", "pyautoattack", "pydantic"):
        assert ranged[core].specifier and any(s.operator == "<" for s in ranged[core].specifier), core
    assert "wandb" in {canonicalize_name(r.name) for r in map(Requirement, PROJECT["optional-dependencies"]["wandb"])}
    assert "wandb" in {canonicalize_name(Requirement(r).name) for r in PROJECT["optional-dependencies"]["test"]}


def test_constraints_pin_every_dependency_inside_its_range():
    pins = constraints()
    for req in REQUIREMENTS:
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt has no pin for {name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req}"


def test_the_tested_set_is_installed():
    """The environment running the tests is the pinned set (a local build tag such as +cu124 aside)."""
    for name, pin in constraints().items():
        try:
            got = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            continue  # an optional tool (e.g. torchattacks for the benchmarks) not installed here
        assert Version(got.base_version) == pin, f"{name} {got} installed, constraints.txt says {pin}"


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_makefile_installs_through_the_constraints():
    p = subprocess.run(["make", "-n", "-B", "install"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    installs = [line for line in p.stdout.splitlines() if re.search(r"\bpip install\b", line)]
    assert p.returncode == 0 and len(installs) >= 2, p.stdout + p.stderr
    assert all("-c constraints.txt" in line and "==" not in line for line in installs), installs
