"""Disk datasets: CIFAR-10/100, ImageFolder, Caltech-256, CUB-200-2011 and Stanford Dogs.

Each loader maps a ``DataConfig`` to ``(train, test, class_names)``: int64 labels in ``[0, K)``, a
deterministic (sorted) order, and a one-line ``UserError`` for any missing or malformed input. CIFAR is
held in memory as uint8; the others are lazy file lists resized to ``cfg.image_size`` (0 = 224) when read.
The validation split is carved from train later, by ``data.load_splits``.

Train/test conventions:
  * CIFAR-10/100, CUB-200-2011, Stanford Dogs: the official splits.
  * ImageFolder: a split file of ``relative/path label split`` lines, else ``root/train`` and ``root/test``.
  * Caltech-256 has none: 60 training images per class, the rest test, ``257.clutter`` excluded (256
    classes). This is the usual protocol (Griffin et al. 2007's largest setting) and the shape of the split
    released with "Initialization Matters for Adversarial Transfer Learning" (57 train + 3 val per class);
    their exact file lists can be used through ``imagefolder`` with a split file. Our 60 are the first by a
    seeded SHA-256 of each file's class and name, so the split depends on neither the machine, numpy's RNG,
    nor the other files present.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig
from .data import SPLIT_SEED, Loader, Split, data_dir
from .errors import UserError

Result = tuple[Split, Split, list[str]]
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
CALTECH_TRAIN_PER_CLASS = 60
CALTECH_SEED = "advtransfer-caltech256-v1"


# ----------------------------------------------------------------------------- helpers


def _root(cfg: DataConfig, name: str) -> Path:
    if not cfg.root:
        raise UserError(f"data: {name} needs data.root (the folder holding the dataset)")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise UserError(f"data: {name}: root directory {root} does not exist")
    return root


def _need(path: Path, name: str) -> Path:
    if not path.exists():
        raise UserError(f"data: {name}: missing {path}")
    return path


def _class_dirs(folder: Path, name: str) -> list[Path]:
    dirs = sorted(p for p in _need(folder, name).iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise UserError(f"data: {name}: no class folders in {folder}")
    return dirs


def _images_in(folder: Path, name: str) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
    if not files:
        raise UserError(f"data: {name}: class folder {folder} has no images")
    return files


def _lazy(pairs: list[tuple[Path, int]], cfg: DataConfig) -> Split:
    """A lazy RGB split of ``(image path, label)`` pairs, in a fixed pseudo-random order (``SPLIT_SEED``).

    Folder layouts list images class by class; shuffled once, any prefix of the split (AutoAttack's
    ``n_autoattack`` subset of the test split) spans the classes instead of holding the first few.
    """
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    pairs = [pairs[i] for i in order]
    return Split(
        labels=torch.tensor([y for _, y in pairs], dtype=torch.int64),
        files=[str(f) for f, _ in pairs],
        image_size=cfg.image_size or 224,
        channels=3,
    )


def _strip_prefix(folder_name: str) -> str:
    """``001.ak47`` -> ``ak47``; ``n02085620-Chihuahua`` -> ``Chihuahua``."""
    return re.sub(r"^(\d+\.|n\d+-)", "", folder_name)


def _table(path: Path, ncols: int, name: str, *, path_first: bool = False) -> list[tuple[int, list[str]]]:
    """``(line number, fields)`` of a whitespace-separated text file; blank lines and ``#`` comments skipped.
    The path field (first if ``path_first``, else last) may contain spaces."""
    try:
        text = _need(path, name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"data: {name}: cannot read {path}: {_why(e)}") from None
    rows = []
    for no, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.rsplit(None, ncols - 1) if path_first else line.split(None, ncols - 1)
        if len(fields) != ncols:
            raise UserError(f"data: {name}: {path} line {no}: expected {ncols} fields, got {line!r}")
        rows.append((no, fields))
    return rows


def _why(e: BaseException) -> str:
    """An exception as one short line, for error messages."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _int(text: str, path: Path, no: int, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"data: {name}: {path} line {no}: {text!r} is not an integer") from None


# ----------------------------------------------------------------------------- CIFAR


# name -> (folder, train batches, test batches, meta file, class-names key, labels key, torchvision class)
_CIFAR = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        "label_names",
        "labels",
        "CIFAR10",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_label_names", "fine_labels", "CIFAR100"),
}


class _SafeUnpickler(pickle.Unpickler):
    """Loads CIFAR batches (dicts, lists, numpy arrays) but refuses any other global: no code runs."""

    def find_class(self, module: str, name: str) -> object:
        numpy_ok = module.split(".")[0] == "numpy" and name in {"_reconstruct", "ndarray", "dtype", "scalar"}
        if numpy_ok or (module, name) == ("_codecs", "encode"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")


def _unpickle(path: Path, name: str) -> dict:
    try:
        obj = _SafeUnpickler(io.BytesIO(_need(path, name).read_bytes()), encoding="latin1").load()
    except Exception as e:  # a corrupt pickle can raise almost anything
        raise UserError(f"data: {name}: cannot read CIFAR batch {path}: {_why(e)}") from None
    if not isinstance(obj, dict):
        raise UserError(f"data: {name}: {path} is not a CIFAR batch (no dict inside)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_key(d: dict, key: str, path: Path, name: str) -> object:
    if key not in d:
        raise UserError(f"data: {name}: {path} has no {key!r} entry")
    return d[key]


def _cifar_split(folder: Path, files: list[str], labels_key: str, k: int, name: str) -> Split:
    xs, ys = [], []
    for f in files:
        d = _unpickle(folder / f, name)
        x = np.asarray(_cifar_key(d, "data", folder / f, name))
        y = np.asarray(_cifar_key(d, labels_key, folder / f, name)).ravel()
        ok = x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3 * 32 * 32 and len(x) == len(y)
        if not ok or (len(y) and y.dtype.kind not in "iu"):
            raise UserError(
                f"data: {name}: {folder / f}: expected uint8 data [N,3072] and N integer labels, "
                f"got {x.dtype} {list(x.shape)} and {len(y)} {y.dtype} labels"
            )
        bad = y[(y < 0) | (y >= k)]
        if len(bad):
            raise UserError(f"data: {name}: {folder / f}: label {int(bad[0])} out of range for {k} classes")
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(y.astype(np.int64))
    return Split(labels=torch.from_numpy(np.concatenate(ys)), pixels=torch.from_numpy(np.concatenate(xs)))


def _cifar_loader(name: str) -> Loader:
    folder_name, train_files, test_files, meta_file, names_key, labels_key, tv_class = _CIFAR[name]

    def load(cfg: DataConfig) -> Result:
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
                getattr(torchvision.datasets, tv_class)(str(folder.parent), train=True, download=True)
            except Exception as e:  # no internet, disk full, bad checksum...
                raise UserError(f"data: {name}: download into {folder.parent} failed: {_why(e)}") from None
        meta = _unpickle(folder / meta_file, name)
        classes = [str(c) for c in _cifar_key(meta, names_key, folder / meta_file, name)]
        k = len(classes)
        return (
            _cifar_split(folder, train_files, labels_key, k, name),
            _cifar_split(folder, test_files, labels_key, k, name),
            classes,
        )

    load.__name__ = f"load_{name}"
    return load


load_cifar10 = _cifar_loader("cifar10")
load_cifar100 = _cifar_loader("cifar100")


# ----------------------------------------------------------------------------- ImageFolder


def load_imagefolder(cfg: DataConfig) -> Result:
    """Images under ``cfg.root``, split by ``cfg.split_file`` or by ``root/{train,test}/<class>/`` folders.

    A relative split file is looked up from the working directory, then under the root. Without one, the
    classes are the train class folders sorted by name.
    """
    root = _root(cfg, "imagefolder")
    if cfg.split_file:
        split_file = Path(cfg.split_file).expanduser()
        if not split_file.is_file() and not split_file.is_absolute():
            split_file = root / split_file
        return _from_split_file(root, split_file, cfg)
    dirs = _class_dirs(root / "train", "imagefolder")
    classes = [d.name for d in dirs]
    splits = []
    for part in ("train", "test"):
        pairs: list[tuple[Path, int]] = []
        for d in _class_dirs(root / part, "imagefolder"):
            if d.name not in classes:
                raise UserError(f"data: imagefolder: {d} is a class with no folder under {root / 'train'}")
            c = classes.index(d.name)
            pairs += [(f, c) for f in _images_in(d, "imagefolder")]
        splits.append(_lazy(pairs, cfg))
    return splits[0], splits[1], classes


def _from_split_file(root: Path, split_file: Path, cfg: DataConfig) -> Result:
    name, seen = "imagefolder", {}
    entries: dict[str, list[tuple[Path, int]]] = {"train": [], "test": []}
    for no, (rel, label_text, part) in _table(split_file, 3, name, path_first=True):
        label = _int(label_text, split_file, no, name)
        if label < 0:
            raise UserError(f"data: {name}: {split_file} line {no}: label {label} out of range (must be >= 0)")
        if part not in entries:
            raise UserError(f"data: {name}: {split_file} line {no}: unknown split {part!r} (use train or test)")
        if rel in seen:
            raise UserError(f"data: {name}: {split_file} line {no}: {rel} already listed on line {seen[rel]}")
        seen[rel] = no
        entries[part].append((_need(root / rel, name), label))
    all_labels = {y for rows in entries.values() for _, y in rows}
    if not all_labels:
        raise UserError(f"data: {name}: {split_file} lists no images")
    k = max(all_labels) + 1
    gaps = sorted(set(range(k)) - all_labels)
    if gaps:
        raise UserError(f"data: {name}: {split_file}: labels must be 0..{k - 1} without gaps; {gaps[0]} has no image")
    # class names: the images' parent folder where each label has exactly one (and they differ), else "0".."K-1"
    parents: dict[int, set[str]] = {}
    for f, y in entries["train"] + entries["test"]:
        parents.setdefault(y, set()).add(f.parent.name)
    classes = [min(parents[y]) for y in range(k)]
    if any(len(parents[y]) > 1 for y in range(k)) or len(set(classes)) != k:
        classes = [str(y) for y in range(k)]
    return _lazy(sorted(entries["train"]), cfg), _lazy(sorted(entries["test"]), cfg), classes


# ----------------------------------------------------------------------------- Caltech-256


def load_caltech256(cfg: DataConfig, per_class: int = CALTECH_TRAIN_PER_CLASS) -> Result:
    """``root/256_ObjectCategories/NNN.name/*.jpg`` (or root = that folder); 256 classes, ``257.clutter`` excluded.

    ``per_class`` images of each class train (chosen by a seeded hash of the file name), the rest test.
    """
    root = _root(cfg, "caltech256")
    folder = root if root.name == "256_ObjectCategories" else root / "256_ObjectCategories"
    dirs = [d for d in _class_dirs(folder, "caltech256") if _strip_prefix(d.name) != "clutter"]
    train: list[tuple[Path, int]] = []
    test: list[tuple[Path, int]] = []
    for c, d in enumerate(dirs):
        files = _images_in(d, "caltech256")
        if len(files) <= per_class:
            raise UserError(
                f"data: caltech256: class folder {d} has {len(files)} images; "
                f"the split needs more than {per_class} ({per_class} train, the rest test)"
            )
        ranked = sorted(files, key=lambda p: hashlib.sha256(f"{CALTECH_SEED}/{d.name}/{p.name}".encode()).digest())
        chosen = set(ranked[:per_class])
        for f in files:
            (train if f in chosen else test).append((f, c))
    return _lazy(train, cfg), _lazy(test, cfg), [_strip_prefix(d.name) for d in dirs]


# ----------------------------------------------------------------------------- CUB-200-2011


def _id_table(path: Path, name: str, *, as_int: bool = False) -> dict[int, str]:
    out: dict[int, str] = {}
    for no, (id_text, value) in _table(path, 2, name):
        i = _int(id_text, path, no, name)
        if i in out:
            raise UserError(f"data: {name}: {path} line {no}: id {i} listed twice")
        out[i] = str(_int(value, path, no, name)) if as_int else value
    return out


def load_cub200(cfg: DataConfig) -> Result:
    """Official CUB_200_2011 files and train/test split; root is its parent folder or the folder itself."""
    name = "cub200"
    root = _root(cfg, name)
    base = root / "CUB_200_2011" if (root / "CUB_200_2011").is_dir() else root
    class_table = _id_table(base / "classes.txt", name)
    if sorted(class_table) != list(range(1, len(class_table) + 1)):
        raise UserError(f"data: {name}: {base / 'classes.txt'} must number its classes 1..{len(class_table)}")
    classes = [_strip_prefix(class_table[i]) for i in range(1, len(class_table) + 1)]
    paths = _id_table(base / "images.txt", name)
    labels = _id_table(base / "image_class_labels.txt", name, as_int=True)
    is_train = _id_table(base / "train_test_split.txt", name, as_int=True)
    splits: dict[str, list[tuple[Path, int]]] = {"1": [], "0": []}
    for i in sorted(paths):
        for table, fname in ((labels, "image_class_labels.txt"), (is_train, "train_test_split.txt")):
            if i not in table:
                raise UserError(f"data: {name}: image id {i} of images.txt is missing from {base / fname}")
        y = int(labels[i])
        if not 1 <= y <= len(classes):
            raise UserError(f"data: {name}: image id {i}: label {y} out of range 1..{len(classes)}")
        if is_train[i] not in splits:
            raise UserError(f"data: {name}: image id {i}: is_training_image must be 0 or 1, got {is_train[i]}")
        splits[is_train[i]].append((_need(base / "images" / paths[i], name), y - 1))
    return _lazy(splits["1"], cfg), _lazy(splits["0"], cfg), classes


# ----------------------------------------------------------------------------- Stanford Dogs


def _read_mat_list(path: Path, name: str) -> tuple[list[str], np.ndarray]:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise UserError(f"data: {name} needs scipy to read its .mat lists (pip install scipy)") from None
    _need(path, name)
    try:
        m = loadmat(str(path))
        files = [str(np.asarray(x).ravel()[0]) for x in np.asarray(m["file_list"]).ravel()]
        labels = np.asarray(m["labels"]).ravel()
    except Exception as e:  # corrupt file, missing key, odd structure
        raise UserError(f"data: {name}: cannot read file_list/labels from {path}: {_why(e)}") from None
    if len(files) != len(labels) or not np.all(labels == np.round(labels)):
        raise UserError(f"data: {name}: {path}: {len(files)} files but {len(labels)} integer labels")
    return files, labels.astype(np.int64)


def load_stanford_dogs(cfg: DataConfig) -> Result:
    """``root/Images/<wnid-breed>/*.jpg`` with the official ``train_list.mat`` / ``test_list.mat`` (1-based labels)
    in root or ``root/lists``. Class ``k`` is named after the folder of its images."""
    name = "stanford-dogs"
    root = _root(cfg, name)
    images = _need(root / "Images", name)
    lists = root if (root / "train_list.mat").is_file() or not (root / "lists").is_dir() else root / "lists"
    parts = [_read_mat_list(lists / f"{p}_list.mat", name) for p in ("train", "test")]
    folder_of: dict[int, str] = {}
    label_of: dict[str, int] = {}
    for files, labels in parts:
        for f, y in zip(files, labels.tolist()):
            d = Path(f).parent.as_posix()
            if folder_of.setdefault(y, d) != d:
                raise UserError(f"data: {name}: {f} has label {y}, but label {y} belongs to folder {folder_of[y]}")
            if label_of.setdefault(d, y) != y:
                raise UserError(f"data: {name}: {f} has label {y}, but folder {d} has label {label_of[d]}")
    k = len(folder_of)
    if sorted(folder_of) != list(range(1, k + 1)):
        raise UserError(f"data: {name}: labels must be 1..{k} without gaps, got {min(folder_of)}..{max(folder_of)}")
    classes = [_strip_prefix(Path(folder_of[y]).name) for y in range(1, k + 1)]
    train, test = (
        [(_need(images / f, name), y - 1) for f, y in sorted(zip(files, labels.tolist()))] for files, labels in parts
    )
    return _lazy(train, cfg), _lazy(test, cfg), classes


DATASETS: dict[str, Loader] = {
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "imagefolder": load_imagefolder,
    "caltech256": load_caltech256,
    "cub200": load_cub200,
    "stanford-dogs": load_stanford_dogs,
}
