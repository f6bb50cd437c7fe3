"""Raw datasets -> ``Splits`` with labels in ``[0, K)``, the ``DATASETS`` registry: embedded MNIST / Fashion-MNIST
(checksum-verified IDX files from ``embedded.py``) and CIFAR-10/100 held in memory as uint8; image-file datasets
(layouts of ``imagefiles.py``) read when indexed. ``data.load_splits`` builds the run's splits on top."""

from __future__ import annotations

import gzip
import io
import pickle
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig
from .embedded import data_dir, install
from .errors import UserError
from .imagefiles import LAYOUTS, Layout, need, why

SPLIT_SEED = 1234  # fixed: the val carve-out and subsamples do not move with the run seed

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]


def permutation(n: int, seed: int = SPLIT_SEED) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


@dataclass(eq=False)
class Split:
    """One split: uint8 images held in memory, or image files decoded when read (``data.py`` transforms them)."""

    labels: torch.Tensor  # int64 [N]
    pixels: torch.Tensor | None = None  # uint8 [N,C,H,W] (in-memory datasets)
    files: list[str] | None = None  # image paths (image-file datasets)
    image_size: int = 224  # image files: side of the square crop the transforms produce
    augment: bool = False  # image files: random crop + flip when read for training
    variant: str = "none"  # image files: applied after the transforms (in-memory pixels are stored with it applied)
    channels: int = 3
    loaders: dict = field(init=False, repr=False, default_factory=dict)  # data.batches' DataLoaders, built once each

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
        """Image ``i`` as stored: uint8 ``[C,H,W]``; an image file at its own size, grey if 1 channel, else RGB."""
        if self.pixels is not None:
            return self.pixels[i]
        from PIL import Image, UnidentifiedImageError
        from torchvision.transforms.v2.functional import pil_to_tensor

        try:
            with Image.open(self.files[i]) as im:
                return pil_to_tensor(im.convert("L" if self.channels == 1 else "RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise UserError(f"data: cannot read image {self.files[i]}: {e.__class__.__name__}") from None


@dataclass
class Splits:
    """A dataset's splits and class names. ``val`` is None where a loader has no official validation split."""

    train: Split
    val: Split | None
    test: Split
    classes: list[str]
    notes: list[str] = field(default_factory=list)  # how the splits were made, for the run log

    @property
    def num_classes(self) -> int:
        return len(self.classes)


Loader = Callable[[DataConfig], Splits]


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX file (gzipped if ``.gz``) as uint8, checked here (torchvision's reader only asserts)."""
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"data: cannot read IDX file {path}: {e}") from None
    if len(data) < 8 or data[:3] != b"\x00\x00\x08":
        raise UserError(f"data: {path} is not an unsigned-byte IDX file (bad magic number)")
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(data[3])]
    need_bytes = 4 + 4 * len(shape) + int(np.prod(shape))
    if len(data) != need_bytes or not 1 <= len(shape) <= 3:
        raise UserError(f"data: {path} is truncated or corrupt: header says {need_bytes} bytes, file has {len(data)}")
    if path.suffix != ".gz":
        return read_sn3_pascalvincent_tensor(str(path)).numpy()
    with tempfile.NamedTemporaryFile() as tmp:  # torchvision reads paths, not bytes
        tmp.write(data)
        tmp.flush()
        return read_sn3_pascalvincent_tensor(tmp.name).numpy()


def _embedded(name: str, classes: list[str], cfg: DataConfig) -> Splits:
    folder, ext = install(name), ".gz" if name == "fashion-mnist" else ""

    def split(prefix: str) -> Split:
        x = read_idx(folder / f"{prefix}-images-idx3-ubyte{ext}")
        y = read_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}")
        if len(x) != len(y):
            raise UserError(f"data: {name} {prefix}: {len(x)} images but {len(y)} labels")
        if y.max() >= len(classes):
            raise UserError(f"data: {name} {prefix}: label {int(y.max())} out of range for {len(classes)} classes")
        return Split(labels=torch.from_numpy(y.astype(np.int64)), pixels=torch.from_numpy(x.copy()))

    return Splits(train=split("train"), val=None, test=split("t10k"), classes=classes)


# name -> (folder, train batches, test batches, meta file, prefix of the class-names and labels keys)
_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", ""),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_"),
}


class _SafeUnpickler(pickle.Unpickler):
    """CIFAR batches (dicts, lists, numpy arrays), refusing any other global: no code runs (unlike torchvision's
    CIFAR classes, whose ``pickle.load`` runs whatever code a tampered file names)."""

    def find_class(self, module: str, name: str) -> object:
        numpy_ok = module.split(".")[0] == "numpy" and name in {"_reconstruct", "ndarray", "dtype", "scalar"}
        if numpy_ok or (module, name) == ("_codecs", "encode"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")


def _unpickle(path: Path, name: str, *keys: str) -> list:
    """The ``keys`` entries of the CIFAR pickle ``path``, read by ``_SafeUnpickler``."""
    try:
        obj = _SafeUnpickler(io.BytesIO(need(path, name).read_bytes()), encoding="latin1").load()
    except Exception as e:  # a corrupt pickle can raise almost anything
        raise UserError(f"data: {name}: cannot read CIFAR batch {path}: {why(e)}") from None
    if not isinstance(obj, dict):
        raise UserError(f"data: {name}: {path} is not a CIFAR batch (no dict inside)")
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if missing := [key for key in keys if key not in d]:
        raise UserError(f"data: {name}: {path} has no {missing[0]!r} entry")
    return [d[key] for key in keys]


def _cifar_split(folder: Path, files: list[str], labels_key: str, k: int, name: str) -> Split:
    xs, ys = [], []
    for f in files:
        x, y = _unpickle(folder / f, name, "data", labels_key)
        x, y = np.asarray(x), np.asarray(y).ravel()
        ok = x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3 * 32 * 32 and len(x) == len(y)
        if not ok or (len(y) and y.dtype.kind not in "iu"):
            raise UserError(
                f"data: {name}: {folder / f}: expected uint8 data [N,3072] and N integer labels, "
                f"got {x.dtype} {list(x.shape)} and {len(y)} {y.dtype} labels"
            )
        if len(bad := y[(y < 0) | (y >= k)]):
            raise UserError(f"data: {name}: {folder / f}: label {int(bad[0])} out of range for {k} classes")
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(y.astype(np.int64))
    return Split(labels=torch.from_numpy(np.concatenate(ys)), pixels=torch.from_numpy(np.concatenate(xs)))


def _cifar_loader(name: str) -> Loader:
    folder_name, train_files, test_files, meta_file, prefix = _CIFAR[name]

    def load(cfg: DataConfig) -> Splits:
        """CIFAR from its python batches under ``cfg.root`` (default: the data cache); torchvision downloads."""
        root = Path(cfg.root).expanduser() if cfg.root else data_dir() / "cifar"
        folder = root if root.name == folder_name else root / folder_name
        missing = [folder / f for f in [*train_files, *test_files, meta_file] if not (folder / f).is_file()]
        if missing and not cfg.download:
            raise UserError(
                f"data: {name}: {missing[0]} not found; put the CIFAR python batches under "
                f"{folder.parent} or set data.download: true"
            )
        if missing:
            import torchvision

            try:
                getattr(torchvision.datasets, name.upper())(str(folder.parent), train=True, download=True)
            except Exception as e:  # no internet, disk full, bad checksum...
                raise UserError(f"data: {name}: download into {folder.parent} failed: {why(e)}") from None
        (names,) = _unpickle(folder / meta_file, name, f"{prefix}label_names")
        classes = [str(c) for c in names]
        train, test = (
            _cifar_split(folder, fs, f"{prefix}labels", len(classes), name) for fs in (train_files, test_files)
        )
        return Splits(train=train, val=None, test=test, classes=classes)

    return load


def _files(layout: Callable[[DataConfig], Layout]) -> Loader:
    """A loader of ``layout``'s image files as lazy RGB splits."""

    def load(cfg: DataConfig) -> Splits:
        splits, classes = layout(cfg)
        lazy = {}
        for part, pairs in splits.items():
            # layouts go class by class; shuffled once (SPLIT_SEED), any prefix of a split (AutoAttack's
            # n_autoattack subset of the test split) spans the classes instead of holding the first few
            pairs = [pairs[i] for i in permutation(len(pairs)).tolist()]
            labels = torch.tensor([y for _, y in pairs], dtype=torch.int64)
            files = [str(f) for f, _ in pairs]
            lazy[part] = Split(labels=labels, files=files, image_size=cfg.image_size or 224, augment=cfg.augment)
        return Splits(train=lazy["train"], val=lazy.get("val"), test=lazy["test"], classes=classes)

    return load


DATASETS: dict[str, Loader] = {
    "mnist": partial(_embedded, "mnist", [str(i) for i in range(10)]),
    "fashion-mnist": partial(_embedded, "fashion-mnist", FASHION_CLASSES),
    **{name: _cifar_loader(name) for name in _CIFAR},
    **{name: _files(layout) for name, layout in LAYOUTS.items()},
}
