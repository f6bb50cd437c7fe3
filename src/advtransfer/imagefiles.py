"""Image-file datasets on disk (ImageFolder, Caltech-256, CUB-200-2011, Stanford Dogs) as ``Layout``s: ``({split:
[(image path, label), ...]}, class names)``, labels in ``[0, K)``, sorted, a one-line ``UserError`` for bad input.
Official splits (CUB, Dogs), ``root/{train,test}`` (ImageFolder) or Caltech's 60 per class; ``data.split_file`` wins."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .config import DataConfig
from .errors import UserError

Pairs = list[tuple[Path, int]]
Layout = tuple[dict[str, Pairs], list[str]]
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
# Caltech-256 has no official split. The usual protocol (Griffin et al. 2007; "Initialization Matters for Adversarial
# Transfer Learning" released 57 train + 3 val): 60 training images per class, the rest test, 257.clutter excluded.
# Ours are the first by a seeded SHA-256 of class and file name: independent of the machine, numpy and other files.
CALTECH_TRAIN_PER_CLASS = 60
CALTECH_SEED = "advtransfer-caltech256-v1"


def why(e: BaseException) -> str:
    """An exception as one short line, for error messages."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def need(path: Path, name: str) -> Path:
    """``path``, or a ``UserError`` naming it if it does not exist."""
    if not path.exists():
        raise UserError(f"data: {name}: missing {path}")
    return path


def root_dir(cfg: DataConfig, name: str) -> Path:
    if not cfg.root:
        raise UserError(f"data: {name} needs data.root (the folder holding the dataset)")
    if not (root := Path(cfg.root).expanduser()).is_dir():
        raise UserError(f"data: {name}: root directory {root} does not exist")
    return root


def _class_dirs(folder: Path, name: str) -> list[Path]:
    dirs = sorted(p for p in need(folder, name).iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise UserError(f"data: {name}: no class folders in {folder}")
    return dirs


def _images_in(folder: Path, name: str) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
    if not files:
        raise UserError(f"data: {name}: class folder {folder} has no images")
    return files


def _strip_prefix(folder_name: str) -> str:
    """``001.ak47`` -> ``ak47``; ``n02085620-Chihuahua`` -> ``Chihuahua``."""
    return re.sub(r"^(\d+\.|n\d+-)", "", folder_name)


def _table(path: Path, ncols: int, name: str, *, path_first: bool = False) -> list[tuple[int, list[str]]]:
    """``(line number, fields)`` of a text table (no blanks, ``#`` comments); the path field may hold spaces."""
    try:
        text = need(path, name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"data: {name}: cannot read {path}: {why(e)}") from None
    rows = []
    for no, line in enumerate(text.splitlines(), 1):
        if not (line := line.strip()) or line.startswith("#"):
            continue
        fields = line.rsplit(None, ncols - 1) if path_first else line.split(None, ncols - 1)
        if len(fields) != ncols:
            raise UserError(f"data: {name}: {path} line {no}: expected {ncols} fields, got {line!r}")
        rows.append((no, fields))
    return rows


def _int(text: str, path: Path, no: int, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"data: {name}: {path} line {no}: {text!r} is not an integer") from None


def imagefolder(cfg: DataConfig) -> Layout:
    """Images under ``cfg.root``, split by ``cfg.split_file`` or ``root/{train,test}/<class>/`` (train's classes)."""
    root = root_dir(cfg, "imagefolder")
    if cfg.split_file:
        return split_file(cfg, root, "imagefolder")
    classes = [d.name for d in _class_dirs(root / "train", "imagefolder")]
    layout: dict[str, Pairs] = {"train": [], "test": []}
    for part, pairs in layout.items():
        for d in _class_dirs(root / part, "imagefolder"):
            if d.name not in classes:
                raise UserError(f"data: imagefolder: {d} is a class with no folder under {root / 'train'}")
            pairs.extend((f, classes.index(d.name)) for f in _images_in(d, "imagefolder"))
    return layout, classes


def split_file(cfg: DataConfig, images: Path, name: str) -> Layout:
    """The split ``cfg.split_file`` (text, JSON or VPT folder, see README) gives the images under ``images``."""
    path = Path(cfg.split_file).expanduser()
    if not path.exists() and not path.is_absolute():
        path = root_dir(cfg, name) / path
    rows: list[tuple[str, str, str, str, object]] = []  # (where, "on line 3" / "in train", split, path, label)
    if path.is_dir():
        for part in ("train", "val", "test"):
            if part != "val" or (path / "val.json").exists():
                rows += _json_rows(_read_json(path / f"{part}.json", name), f"{path / part}.json", part, name)
    elif path.suffix == ".json":
        tree = _read_json(path, name)
        if not isinstance(tree, dict) or not {"train", "test"} <= tree.keys() <= {"train", "val", "test"}:
            raise UserError(f"data: {name}: {path} must map train, test (and optionally val) to {{path: label}}")
        for part, entries in tree.items():
            rows += _json_rows(entries, f"{path} {part}", part, name)
    else:
        for no, (rel, label, part) in _table(path, 3, name, path_first=True):
            rows.append((f"{path} line {no}", f"on line {no}", part, rel, _int(label, path, no, name)))
    layout: dict[str, Pairs] = {"train": [], "test": []}
    seen: dict[str, str] = {}
    index = _label_index(rows, path, name)
    for where, tag, part, rel, label in rows:
        label = index(where, label)
        if part not in ("train", "val", "test"):
            raise UserError(f"data: {name}: {where}: unknown split {part!r} (use train, val or test)")
        if rel in seen:
            raise UserError(f"data: {name}: {where}: {rel} already listed {seen[rel]}")
        seen[rel] = tag
        layout.setdefault(part, []).append((need(images / rel, name), label))
    labels = {y for pairs in layout.values() for _, y in pairs}
    if not labels:
        raise UserError(f"data: {name}: {path} lists no images")
    k = max(labels) + 1
    if gaps := sorted(set(range(k)) - labels):
        raise UserError(f"data: {name}: {path}: labels must be 0..{k - 1} without gaps; {gaps[0]} has no image")
    # classes are named after their images' parent folder where each has its own, else by number
    parents: dict[int, set[str]] = {}
    for f, y in (pair for pairs in layout.values() for pair in pairs):
        parents.setdefault(y, set()).add(_strip_prefix(f.parent.name))
    classes = [min(parents[y]) for y in range(k)]
    if any(len(parents[y]) > 1 for y in range(k)) or len(set(classes)) != k:
        classes = [str(y) for y in range(k)]
    return {part: sorted(pairs) for part, pairs in layout.items()}, classes


def _label_index(rows: list, path: Path, name: str) -> Callable[[str, object], int]:
    """Label -> 0..K-1: integers from 0 as they are, from 1 (Dogs) shifted, names (CUB's "001") in sorted order."""
    labels = {label for *_, label in rows if type(label) in (int, str)}
    names, numbers = {y for y in labels if type(y) is str}, {y for y in labels if type(y) is int and y >= 0}
    if names and numbers:
        raise UserError(f"data: {name}: {path}: labels mix integers and names (e.g. {min(numbers)} and {min(names)!r})")
    key = (lambda y: (int(y), y)) if all(y.isdigit() for y in names) else None
    shift = 1 if numbers and min(numbers) == 1 else 0
    order = {y: i for i, y in enumerate(sorted(names, key=key))} or {y: y - shift for y in numbers}

    def index(where: str, y: object) -> int:
        if type(y) not in (int, str) or y not in order:
            raise UserError(f"data: {name}: {where}: label {y!r} out of range (must be an integer >= 0 or a name)")
        return order[y]

    return index


def _read_json(path: Path, name: str) -> object:
    try:
        return json.loads(need(path, name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"data: {name}: cannot read {path}: {why(e)}") from None


def _json_rows(entries: object, where: str, part: str, name: str) -> list[tuple[str, str, str, str, object]]:
    if not isinstance(entries, dict):
        raise UserError(f"data: {name}: {where} must be an object {{relative path: label}}")
    return [(f"{where} {rel!r}", f"in {part}", part, rel, label) for rel, label in entries.items()]


def caltech256(cfg: DataConfig, per_class: int = CALTECH_TRAIN_PER_CLASS) -> Layout:
    """``root[/256_ObjectCategories]/NNN.name/*.jpg``: ``per_class`` images of each class train, the rest test."""
    root = root_dir(cfg, "caltech256")
    folder = root if root.name == "256_ObjectCategories" else root / "256_ObjectCategories"
    if cfg.split_file:
        return split_file(cfg, folder, "caltech256")
    dirs = [d for d in _class_dirs(folder, "caltech256") if _strip_prefix(d.name) != "clutter"]
    layout: dict[str, Pairs] = {"train": [], "test": []}
    for c, d in enumerate(dirs):
        if len(files := _images_in(d, "caltech256")) <= per_class:
            raise UserError(
                f"data: caltech256: class folder {d} has {len(files)} images; "
                f"the split needs more than {per_class} ({per_class} train, the rest test)"
            )
        ranked = sorted(files, key=lambda p: hashlib.sha256(f"{CALTECH_SEED}/{d.name}/{p.name}".encode()).digest())
        chosen = set(ranked[:per_class])
        for f in files:
            layout["train" if f in chosen else "test"].append((f, c))
    return layout, [_strip_prefix(d.name) for d in dirs]


def _id_table(path: Path, name: str, *, as_int: bool = False) -> dict[int, str]:
    out: dict[int, str] = {}
    for no, (id_text, value) in _table(path, 2, name):
        if (i := _int(id_text, path, no, name)) in out:
            raise UserError(f"data: {name}: {path} line {no}: id {i} listed twice")
        out[i] = str(_int(value, path, no, name)) if as_int else value
    return out


def cub200(cfg: DataConfig) -> Layout:
    """Official CUB_200_2011 files and train/test split; root is its parent folder or the folder itself."""
    name, root = "cub200", root_dir(cfg, "cub200")
    base = root / "CUB_200_2011" if (root / "CUB_200_2011").is_dir() else root
    if cfg.split_file:
        return split_file(cfg, base / "images", name)
    class_table = _id_table(base / "classes.txt", name)
    k = len(class_table)
    if sorted(class_table) != list(range(1, k + 1)):
        raise UserError(f"data: {name}: {base / 'classes.txt'} must number its classes 1..{k}")
    paths = _id_table(base / "images.txt", name)
    labels = _id_table(base / "image_class_labels.txt", name, as_int=True)
    is_train = _id_table(base / "train_test_split.txt", name, as_int=True)
    splits: dict[str, Pairs] = {"1": [], "0": []}
    for i in sorted(paths):
        for table, fname in ((labels, "image_class_labels.txt"), (is_train, "train_test_split.txt")):
            if i not in table:
                raise UserError(f"data: {name}: image id {i} of images.txt is missing from {base / fname}")
        if not 1 <= (y := int(labels[i])) <= k:
            raise UserError(f"data: {name}: image id {i}: label {y} out of range 1..{k}")
        if is_train[i] not in splits:
            raise UserError(f"data: {name}: image id {i}: is_training_image must be 0 or 1, got {is_train[i]}")
        splits[is_train[i]].append((need(base / "images" / paths[i], name), y - 1))
    return {"train": splits["1"], "test": splits["0"]}, [_strip_prefix(class_table[i]) for i in range(1, k + 1)]


def _read_mat_list(path: Path, name: str) -> tuple[list[str], np.ndarray]:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise UserError(f"data: {name} needs scipy to read its .mat lists (pip install scipy)") from None
    need(path, name)
    try:
        m = loadmat(str(path))
        files = [str(np.asarray(x).ravel()[0]) for x in np.asarray(m["file_list"]).ravel()]
        labels = np.asarray(m["labels"]).ravel()
    except Exception as e:  # corrupt file, missing key, odd structure
        raise UserError(f"data: {name}: cannot read file_list/labels from {path}: {why(e)}") from None
    if len(files) != len(labels) or not np.all(labels == np.round(labels)):
        raise UserError(f"data: {name}: {path}: {len(files)} files but {len(labels)} integer labels")
    return files, labels.astype(np.int64)


def stanford_dogs(cfg: DataConfig) -> Layout:
    """``root/Images/<wnid-breed>/*.jpg``, official ``{train,test}_list.mat`` (1-based) in root or ``root/lists``."""
    name, root = "stanford-dogs", root_dir(cfg, "stanford-dogs")
    images = need(root / "Images", name)
    if cfg.split_file:
        return split_file(cfg, images, name)
    lists = root if (root / "train_list.mat").is_file() or not (root / "lists").is_dir() else root / "lists"
    parts = {p: _read_mat_list(lists / f"{p}_list.mat", name) for p in ("train", "test")}
    folder_of: dict[int, str] = {}
    label_of: dict[str, int] = {}
    for files, labels in parts.values():
        for f, y in zip(files, labels.tolist()):
            d = Path(f).parent.as_posix()
            if folder_of.setdefault(y, d) != d:
                raise UserError(f"data: {name}: {f} has label {y}, but label {y} belongs to folder {folder_of[y]}")
            if label_of.setdefault(d, y) != y:
                raise UserError(f"data: {name}: {f} has label {y}, but folder {d} has label {label_of[d]}")
    k = len(folder_of)
    if sorted(folder_of) != list(range(1, k + 1)):
        raise UserError(f"data: {name}: labels must be 1..{k} without gaps, got {min(folder_of)}..{max(folder_of)}")
    layout = {
        p: [(need(images / f, name), y - 1) for f, y in sorted(zip(fs, ys.tolist()))] for p, (fs, ys) in parts.items()
    }
    return layout, [_strip_prefix(Path(folder_of[y]).name) for y in range(1, k + 1)]  # named after its images' folder


LAYOUTS = {"imagefolder": imagefolder, "caltech256": caltech256, "cub200": cub200, "stanford-dogs": stanford_dogs}
