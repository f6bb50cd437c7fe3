"""Raw dataset loaders: the embedded files (checksums, IDX parsing) and the disk datasets on tiny fixtures written in
each dataset's real on-disk format."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import re
import shutil
import struct
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from advtransfer import datasets, embedded, imagefiles
from advtransfer.config import DataConfig
from advtransfer.data import load_splits, tensors
from advtransfer.datasets import DATASETS, Splits, read_idx
from advtransfer.errors import UserError

# ----------------------------------------------------------------------------- fixtures helpers


def pairs(split) -> list[tuple[str, int]]:
    """A lazy split's (file, label) pairs in sorted order (splits hold them in a fixed shuffled order)."""
    return sorted(zip(split.files, split.labels.tolist()))


def test_lazy_test_split_prefix_spans_classes(tmp_path: Path) -> None:
    """Folder layouts list images class by class; the split is shuffled once (fixed seed) so that a prefix,
    such as AutoAttack's n_autoattack subset, is not all one class, and the order is the same every load."""
    for c in ("a", "b", "c", "d"):
        for i in range(5):
            _img(tmp_path / "train" / c / f"{i}.png", (10 * i, 0, 0))
            _img(tmp_path / "test" / c / f"{i}.png", (10 * i, 0, 0))
    _, test, _ = tri(DATASETS["imagefolder"](_cfg("imagefolder", tmp_path, image_size=8)))
    assert len(set(test.labels[:8].tolist())) >= 3
    _, again, _ = tri(DATASETS["imagefolder"](_cfg("imagefolder", tmp_path, image_size=8)))
    assert again.files == test.files and torch.equal(again.labels, test.labels)
    assert all(Path(f).parent.name == "abcd"[y] for f, y in pairs(test))  # labels moved with their files


def _img(path: Path, color: tuple[int, int, int], size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


class _Py2Pickler(pickle._Pickler):
    """Writes strings as Python 2 ``str`` (BINSTRING), as the original CIFAR batches were pickled."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str


def _py2_dump(obj: object, path: Path) -> None:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 1.x / Python 2 module path, as in the shipped files
    path.write_bytes(buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


def _cifar_images(n: int, offset: int) -> np.ndarray:
    """``n`` images, flattened CIFAR-style (R plane, G plane, B plane; rows in order): image i has R = offset+i,
    G = 100, B = 200, and pixel (0, 1) of R is 255 to check the row-major layout."""
    x = np.zeros((n, 3, 32, 32), np.uint8)
    x[:, 0] = (offset + np.arange(n, dtype=np.uint8))[:, None, None]
    x[:, 1], x[:, 2] = 100, 200
    x[:, 0, 0, 1] = 255
    return x.reshape(n, 3072)


def _make_cifar10(root: Path, per_batch: int = 2, n_test: int = 3) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for b in range(1, 6):
        labels = [(b + i) % 10 for i in range(per_batch)]
        batch = {
            "batch_label": f"training batch {b} of 5",
            "labels": labels,
            "data": _cifar_images(per_batch, 10 * b),
            "filenames": [f"img_{b}_{i}.png" for i in range(per_batch)],
        }
        _py2_dump(batch, d / f"data_batch_{b}")
    _py2_dump(
        {
            "batch_label": "testing batch 1 of 1",
            "labels": list(range(n_test)),
            "data": _cifar_images(n_test, 0),
            "filenames": [f"t{i}.png" for i in range(n_test)],
        },
        d / "test_batch",
    )
    _py2_dump(
        {
            "num_cases_per_batch": per_batch,
            "num_vis": 3072,
            "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
        },
        d / "batches.meta",
    )
    return d


def _make_cifar100(root: Path) -> Path:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for part, n in (("train", 4), ("test", 2)):
        _py2_dump(
            {
                "filenames": [f"{part}{i}.png" for i in range(n)],
                "batch_label": f"{part} batch",
                "fine_labels": [99 - i for i in range(n)],
                "coarse_labels": [19 - i for i in range(n)],
                "data": _cifar_images(n, 0),
            },
            d / part,
        )
    _py2_dump(
        {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": [f"coarse{i}" for i in range(20)]},
        d / "meta",
    )
    return d


def _cfg(name: str, root: Path | str, **kw: object) -> DataConfig:
    return DataConfig(name=name, root=str(root), **kw)


def image(split, i: int) -> torch.Tensor:
    """Image ``i`` as evaluation reads it: float ``[0,1]``, after the transforms (image files)."""
    return tensors(split, torch.tensor([i]))[0][0]


def tri(s: Splits) -> tuple:
    """A loader's ``(train, test, classes)``."""
    assert s.val is None  # no loader here has an official validation split
    return s.train, s.test, s.classes


def _caltech(cfg: DataConfig, per_class: int) -> Splits:
    return datasets._files(partial(imagefiles.caltech256, per_class=per_class))(cfg)


def _same(a: Splits, b: Splits) -> None:
    for s, t in zip(tri(a)[:2], tri(b)[:2]):
        assert torch.equal(s.labels, t.labels)
        assert s.files == t.files
        assert (s.pixels is None and t.pixels is None) or torch.equal(s.pixels, t.pixels)
    assert a.classes == b.classes


# ----------------------------------------------------------------------------- checksums and IDX files


def test_checksum_mismatch_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = embedded.data_dir() / "mnist"
    dest = tmp_path / "mnist"
    dest.mkdir()
    for f in embedded.CHECKSUMS["mnist"]:
        (dest / f).symlink_to(src / f)
    embedded.verify(dest / "t10k-labels-idx1-ubyte", embedded.CHECKSUMS["mnist"]["t10k-labels-idx1-ubyte"])  # control
    bad = dest / "t10k-labels-idx1-ubyte"
    bad.unlink()
    shutil.copyfile(src / "t10k-labels-idx1-ubyte", bad)
    raw = bytearray(bad.read_bytes())
    raw[5000] ^= 0x01  # one flipped bit in one label
    bad.write_bytes(bytes(raw))
    monkeypatch.setenv("ADVTRANSFER_DATA", str(tmp_path))
    assert embedded.data_dir() == tmp_path
    with pytest.raises(UserError, match="checksum mismatch.*t10k-labels-idx1-ubyte"):
        load_splits(DataConfig(name="mnist"))
    assert embedded.sha256(src / "t10k-labels-idx1-ubyte") == embedded.CHECKSUMS["mnist"]["t10k-labels-idx1-ubyte"]


def _idx(shape: tuple[int, ...], values: np.ndarray | None = None) -> bytes:
    n = int(np.prod(shape))
    body = (np.arange(n) % 256).astype(np.uint8) if values is None else values.astype(np.uint8).ravel()
    header = bytes([0, 0, 0x08, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape)
    return header + body.tobytes()


def test_read_idx_valid_raw_and_gz(tmp_path: Path) -> None:
    raw = _idx((3, 2, 4))
    (tmp_path / "a-idx3-ubyte").write_bytes(raw)
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        arr = read_idx(tmp_path / name)
        assert arr.shape == (3, 2, 4) and arr.dtype == np.uint8
        assert arr.ravel().tolist() == list(range(24))
    labels = tmp_path / "l-idx1-ubyte"
    labels.write_bytes(_idx((5,), np.array([3, 1, 4, 1, 5])))
    assert read_idx(labels).tolist() == [3, 1, 4, 1, 5]


@pytest.mark.parametrize(
    "mangle, pattern",
    [
        (lambda b: b[:-1], "truncated or corrupt"),
        (lambda b: b[:20], "truncated or corrupt"),
        (lambda b: b + b"\x00", "truncated or corrupt"),  # trailing bytes are corruption too
        (lambda b: b"\x00\x00\x0d" + b[3:], "bad magic"),  # float IDX, not unsigned byte
        (lambda b: b"\x01" + b[1:], "bad magic"),
        (lambda b: b[:5], "bad magic"),
        (lambda b: b"", "bad magic"),
    ],
)
def test_read_idx_rejects(tmp_path: Path, mangle, pattern: str) -> None:
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(mangle(_idx((3, 2, 4))))
    with pytest.raises(UserError, match=pattern):
        read_idx(path)


def test_read_idx_bad_gzip(tmp_path: Path) -> None:
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="cannot read IDX"):
        read_idx(path)
    path.write_bytes(gzip.compress(_idx((3, 2, 4)))[:-12])  # cut inside the stream
    with pytest.raises(UserError, match="cannot read IDX"):
        read_idx(path)


def test_real_file_truncated(tmp_path: Path) -> None:
    src = embedded.data_dir() / "mnist" / "t10k-labels-idx1-ubyte"
    path = tmp_path / src.name
    path.write_bytes(src.read_bytes()[:-100])
    with pytest.raises(UserError, match="header says 10008 bytes, file has 9908"):
        read_idx(path)


# ----------------------------------------------------------------------------- CIFAR


def test_registry_names() -> None:
    disk = {"cifar10", "cifar100", "imagefolder", "caltech256", "cub200", "stanford-dogs"}
    assert set(DATASETS) == {"mnist", "fashion-mnist"} | disk


def test_cifar10_reads_python_batches(tmp_path: Path) -> None:
    _make_cifar10(tmp_path)
    out = DATASETS["cifar10"](_cfg("cifar10", tmp_path))
    train, test, classes = tri(out)
    assert classes[:3] == ["airplane", "automobile", "bird"] and len(classes) == 10
    assert len(train) == 10 and len(test) == 3
    assert train.pixels.dtype == torch.uint8 and train.pixels.shape == (10, 3, 32, 32)
    assert train.labels.dtype == torch.int64
    assert train.labels.tolist() == [(b + i) % 10 for b in range(1, 6) for i in range(2)]
    img = image(train, 1)  # batch 1, image 1: R = 11
    assert img.shape == (3, 32, 32) and 0 <= img.min() and img.max() <= 1
    assert img[0, 0, 0] == pytest.approx(11 / 255) and img[0, 0, 1] == pytest.approx(1.0)
    assert img[1, 5, 5] == pytest.approx(100 / 255) and img[2, 31, 31] == pytest.approx(200 / 255)
    x, y = tensors(test)
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [0, 1, 2]
    _same(out, DATASETS["cifar10"](_cfg("cifar10", tmp_path)))


def test_cifar10_root_may_be_the_batches_folder(tmp_path: Path) -> None:
    d = _make_cifar10(tmp_path)
    train, test, _ = tri(DATASETS["cifar10"](_cfg("cifar10", d)))
    assert (len(train), len(test)) == (10, 3)


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    _make_cifar100(tmp_path)
    train, test, classes = tri(DATASETS["cifar100"](_cfg("cifar100", tmp_path)))
    assert len(classes) == 100 and classes[99] == "fine99"
    assert train.labels.tolist() == [99, 98, 97, 96] and test.labels.tolist() == [99, 98]
    assert train.pixels.shape == (4, 3, 32, 32) and image(train, 2)[0, 0, 0] == pytest.approx(2 / 255)


def test_cifar_missing_without_download(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="data.download: true") as e:
        DATASETS["cifar10"](_cfg("cifar10", tmp_path))
    assert str(tmp_path / "cifar-10-batches-py") in str(e.value)


def test_cifar_download_goes_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    calls = []

    def fake(root: str, train: bool, download: bool) -> None:
        calls.append((root, download))
        _make_cifar100(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", fake)
    train, _, _ = tri(DATASETS["cifar100"](_cfg("cifar100", tmp_path, download=True)))
    assert calls == [(str(tmp_path), True)] and len(train) == 4
    DATASETS["cifar100"](_cfg("cifar100", tmp_path, download=True))  # present now: no second download
    assert len(calls) == 1


def test_cifar_download_failure_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    def offline(root: str, train: bool, download: bool) -> None:
        raise RuntimeError("no internet\nsecond line of a long traceback-ish message")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(UserError, match="download into .* failed: RuntimeError: no internet$"):
        DATASETS["cifar10"](_cfg("cifar10", tmp_path, download=True))


def test_cifar_corrupt_batch(tmp_path: Path) -> None:
    d = _make_cifar10(tmp_path)
    (d / "data_batch_3").write_bytes(b"not a pickle at all")
    with pytest.raises(UserError, match="data_batch_3"):
        DATASETS["cifar10"](_cfg("cifar10", tmp_path))


def test_cifar_missing_one_file(tmp_path: Path) -> None:
    d = _make_cifar10(tmp_path)
    (d / "batches.meta").unlink()
    with pytest.raises(UserError, match="batches.meta"):
        DATASETS["cifar10"](_cfg("cifar10", tmp_path))


def test_cifar_label_out_of_range(tmp_path: Path) -> None:
    d = _make_cifar10(tmp_path)
    _py2_dump({"labels": [3, -1], "data": _cifar_images(2, 0)}, d / "test_batch")
    with pytest.raises(UserError, match="test_batch: label -1 out of range for 10 classes"):
        DATASETS["cifar10"](_cfg("cifar10", tmp_path))


def test_cifar_bad_shape(tmp_path: Path) -> None:
    d = _make_cifar10(tmp_path)
    _py2_dump({"labels": [0], "data": np.zeros((1, 100), np.uint8)}, d / "test_batch")
    with pytest.raises(UserError, match=r"test_batch: expected uint8 data \[N,3072\]"):
        DATASETS["cifar10"](_cfg("cifar10", tmp_path))
    _py2_dump({"labels": ["cat"], "data": _cifar_images(1, 0)}, d / "test_batch")
    with pytest.raises(UserError, match=r"test_batch: expected .* N integer labels"):
        DATASETS["cifar10"](_cfg("cifar10", tmp_path))


class _Evil:
    def __reduce__(self) -> tuple:
        return (print, ("pwned",))


def test_cifar_pickle_with_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d = _make_cifar10(tmp_path)
    (d / "batches.meta").write_bytes(pickle.dumps({"label_names": _Evil()}, protocol=2))
    with pytest.raises(UserError, match=r"batches.meta.*unexpected object \w+\.print"):
        DATASETS["cifar10"](_cfg("cifar10", tmp_path))
    assert "pwned" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- ImageFolder


def _make_folders(root: Path) -> None:
    for part, n in (("train", 2), ("test", 1)):
        for cls, color in (("dog", (0, 255, 0)), ("cat", (255, 0, 0))):
            for i in range(n):
                _img(root / part / cls / f"{i}.png", color)


def test_imagefolder_class_folders(tmp_path: Path) -> None:
    _make_folders(tmp_path)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    out = DATASETS["imagefolder"](_cfg("imagefolder", tmp_path, image_size=16))
    train, test, classes = tri(out)
    assert classes == ["cat", "dog"]
    assert sorted(train.labels.tolist()) == [0, 0, 1, 1] and sorted(test.labels.tolist()) == [0, 1]
    assert pairs(train)[0] == (str(tmp_path / "train" / "cat" / "0.png"), 0)
    img = image(train, train.files.index(str(tmp_path / "train" / "cat" / "0.png")))
    assert img.shape == (3, 16, 16) and torch.allclose(img[0], torch.ones(16, 16)) and img[1].max() == 0
    x, y = tensors(test)
    assert x.shape == (2, 3, 16, 16) and x.min() >= 0 and x.max() <= 1 and y.dtype == torch.int64
    _same(out, DATASETS["imagefolder"](_cfg("imagefolder", tmp_path, image_size=16)))


def test_imagefolder_default_size_is_224(tmp_path: Path) -> None:
    _make_folders(tmp_path)
    train, _, _ = tri(DATASETS["imagefolder"](_cfg("imagefolder", tmp_path)))
    assert train.image_size == 224 and image(train, 0).shape == (3, 224, 224)


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (lambda r: None, "root directory .*nowhere does not exist"),
        (lambda r: shutil.rmtree(r / "test"), "missing .*test"),
        (lambda r: [p.unlink() for p in (r / "train" / "dog").iterdir()], "class folder .*dog has no images"),
        (lambda r: _img(r / "test" / "bird" / "0.png", (0, 0, 0)), "bird is a class with no folder under"),
    ],
)
def test_imagefolder_folder_errors(tmp_path: Path, breakage, expected: str) -> None:
    _make_folders(tmp_path)
    breakage(tmp_path)
    root = tmp_path / "nowhere" if "nowhere" in expected else tmp_path
    with pytest.raises(UserError, match=expected):
        DATASETS["imagefolder"](_cfg("imagefolder", root))


def test_imagefolder_needs_a_root() -> None:
    with pytest.raises(UserError, match="needs data.root"):
        DATASETS["imagefolder"](DataConfig(name="imagefolder"))


def _make_split_file(root: Path, lines: list[str]) -> Path:
    for rel in ("birds/a.png", "birds/b c.png", "fish/a.png", "fish/b.png"):
        _img(root / rel, (0, 0, 255))
    path = root / "splits.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD_LINES = [
    "# path label split",
    "",
    "fish/b.png 1 train",
    "birds/b c.png 0 train",
    "birds/a.png 0 test",
    "  fish/a.png 1 test  ",
]


def test_imagefolder_split_file(tmp_path: Path) -> None:
    split_file = _make_split_file(tmp_path, GOOD_LINES)
    out = DATASETS["imagefolder"](_cfg("imagefolder", tmp_path, split_file=str(split_file), image_size=8))
    train, test, classes = tri(out)
    assert classes == ["birds", "fish"]
    assert pairs(train) == [(str(tmp_path / "birds/b c.png"), 0), (str(tmp_path / "fish/b.png"), 1)]
    assert sorted(test.labels.tolist()) == [0, 1]
    assert image(train, 1).shape == (3, 8, 8) and image(train, 1)[2].min() == 1
    # a relative split file is found under the root too
    _same(out, DATASETS["imagefolder"](_cfg("imagefolder", tmp_path, split_file="splits.txt", image_size=8)))


def test_imagefolder_split_file_numeric_names_when_folders_do_not_name_classes(tmp_path: Path) -> None:
    split_file = _make_split_file(tmp_path, ["birds/a.png 0 train", "fish/a.png 0 train", "fish/b.png 1 test"])
    _, _, classes = tri(DATASETS["imagefolder"](_cfg("imagefolder", tmp_path, split_file=str(split_file))))
    assert classes == ["0", "1"]


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ("fish/a.png 1", r"line 2: expected 3 fields"),
        ("fish/a.png one train", r"line 2: 'one' is not an integer"),
        ("fish/a.png -1 train", r"line 2: label -1 out of range"),
        ("fish/a.png 1 dev", r"line 2: unknown split 'dev'"),
        ("fish/missing.png 1 test", r"missing .*fish/missing.png"),
        ("birds/a.png 0 test", r"line 2: birds/a.png already listed on line 1"),
        ("fish/a.png 2 test", r"labels must be 0..2 without gaps; 1 has no image"),
    ],
)
def test_imagefolder_split_file_errors(tmp_path: Path, bad_line: str, expected: str) -> None:
    split_file = _make_split_file(tmp_path, ["birds/a.png 0 train", bad_line])
    with pytest.raises(UserError, match=expected) as e:
        DATASETS["imagefolder"](_cfg("imagefolder", tmp_path, split_file=str(split_file)))
    assert "\n" not in str(e.value)


def test_imagefolder_missing_split_file(tmp_path: Path) -> None:
    _make_split_file(tmp_path, GOOD_LINES)
    with pytest.raises(UserError, match="missing .*nope.txt"):
        DATASETS["imagefolder"](_cfg("imagefolder", tmp_path, split_file="nope.txt"))


def _split_dict() -> dict[str, dict[str, int]]:
    return {"train": {"fish/b.png": 1, "birds/b c.png": 0}, "val": {"birds/a.png": 0}, "test": {"fish/a.png": 1}}


@pytest.mark.parametrize("form", ["text", "json", "folder"])
def test_split_file_forms_with_val(tmp_path: Path, form: str) -> None:
    """The three forms give the same splits; a listed val split is used instead of carving one (n_val ignored)."""
    _make_split_file(tmp_path, [])
    if form == "text":
        lines = [f"{rel} {y} {part}" for part, d in _split_dict().items() for rel, y in d.items()]
        (tmp_path / "split.txt").write_text("\n".join(lines) + "\n")
        path = tmp_path / "split.txt"
    elif form == "json":
        path = tmp_path / "split.json"
        path.write_text(json.dumps(_split_dict()))
    else:
        path = tmp_path / "vpt"
        path.mkdir()
        for part, d in _split_dict().items():
            (path / f"{part}.json").write_text(json.dumps(d))
    raw = DATASETS["imagefolder"](_cfg("imagefolder", tmp_path, split_file=str(path), image_size=8))
    assert raw.classes == ["birds", "fish"]
    assert pairs(raw.train) == [(str(tmp_path / "birds/b c.png"), 0), (str(tmp_path / "fish/b.png"), 1)]
    assert pairs(raw.val) == [(str(tmp_path / "birds/a.png"), 0)] and pairs(raw.test) == [
        (str(tmp_path / "fish/a.png"), 1)
    ]
    s = load_splits(_cfg("imagefolder", tmp_path, split_file=str(path), image_size=8, n_val=5000))
    assert (len(s.train), len(s.val), len(s.test)) == (2, 1, 1) and s.val.files == raw.val.files
    assert s.notes == ["data: validation split from data.split_file (1 images); data.n_val ignored"]


def test_split_file_without_val_is_carved(tmp_path: Path) -> None:
    path = tmp_path / "split.json"
    path.write_text(json.dumps({k: v for k, v in _split_dict().items() if k != "val"}))
    _make_split_file(tmp_path, [])
    s = load_splits(_cfg("imagefolder", tmp_path, split_file=str(path), n_val=1))
    assert (len(s.train), len(s.val), len(s.test)) == (1, 1, 1) and s.notes == []


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"split.json": "{not json"}, r"cannot read .*split.json: JSONDecodeError"),
        ({"split.json": '{"train": {}, "dev": {}}'}, r"split.json must map train, test \(and optionally val\)"),
        ({"split.json": '{"train": [], "test": {}}'}, r"split.json train must be an object"),
        ({"split.json": '{"train": {"fish/a.png": "1"}, "test": {"fish/b.png": 0}}'}, r"labels mix integers and names"),
        ({"split.json": '{"train": {"fish/a.png": 1.5}, "test": {}}'}, r"'fish/a.png': label 1.5 out of range"),
        ({"split.json": '{"train": {"fish/a.png": true}, "test": {}}'}, r"label True out of range"),
        (
            {"split.json": '{"train": {"fish/a.png": 0}, "test": {"fish/a.png": 0}}'},
            r"fish/a.png already listed in train",
        ),
        ({"split.json": '{"train": {"fish/no.png": 0}, "test": {}}'}, r"missing .*fish/no.png"),
        ({"vpt/train.json": '{"fish/a.png": 0}', "vpt/val.json": "{}"}, r"missing .*vpt/test.json"),
    ],
)
def test_split_file_json_errors(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    _make_split_file(tmp_path, [])
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text(text)
    split = "vpt" if "vpt/train.json" in files else "split.json"  # relative: found under the root
    with pytest.raises(UserError, match=expected) as e:
        DATASETS["imagefolder"](_cfg("imagefolder", tmp_path, split_file=split))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["caltech256", "cub200", "stanford-dogs"])
def test_split_file_for_named_datasets(tmp_path: Path, name: str) -> None:
    """Paths in a split file are relative to the dataset's image folder; classes are its folders, prefixes stripped."""
    if name == "caltech256":
        images = _make_caltech(tmp_path)
    elif name == "cub200":
        images = _make_cub(tmp_path) / "images"
    else:
        images = _make_dogs(tmp_path) / "Images"
    folders = sorted(d.name for d in images.iterdir() if d.is_dir())[:2]
    files = [sorted(p.relative_to(images).as_posix() for p in (images / d).glob("*.jpg"))[:2] for d in folders]
    split = {"train": {files[0][0]: 0, files[1][0]: 1}, "val": {files[0][1]: 0}, "test": {files[1][1]: 1}}
    (tmp_path / "vpt").mkdir()
    for part, d in split.items():
        (tmp_path / "vpt" / f"{part}.json").write_text(json.dumps(d))
    raw = DATASETS[name](_cfg(name, tmp_path, split_file=str(tmp_path / "vpt")))
    assert raw.classes == [re.sub(r"^(\d+\.|n\d+-)", "", f) for f in folders]
    assert pairs(raw.val) == [(str(images / files[0][1]), 0)] and len(raw.train) == 2 and len(raw.test) == 1


@pytest.mark.parametrize(
    "labels, classes",
    [
        (("001", "002"), ["birds", "fish"]),  # CUB's official files: names, in sorted (numeric) order
        (("10", "9"), ["fish", "birds"]),  # digits sort as numbers, not as text
        ((1, 2), ["birds", "fish"]),  # Stanford Dogs' official files: 1..K
        (("b", "a"), ["fish", "birds"]),
    ],
)
def test_split_file_labels_as_the_official_files_write_them(tmp_path: Path, labels: tuple, classes: list) -> None:
    _make_split_file(tmp_path, [])
    bird, fish = labels
    tree = {
        "train": {"birds/b c.png": bird, "fish/b.png": fish},
        "val": {"birds/a.png": bird},
        "test": {"fish/a.png": fish},
    }
    (tmp_path / "split.json").write_text(json.dumps(tree))
    raw = DATASETS["imagefolder"](_cfg("imagefolder", tmp_path, split_file=str(tmp_path / "split.json")))
    assert raw.classes == classes  # named after the folders, in label order
    bird_y, fish_y = classes.index("birds"), classes.index("fish")
    assert pairs(raw.train) == [(str(tmp_path / "birds/b c.png"), bird_y), (str(tmp_path / "fish/b.png"), fish_y)]
    assert pairs(raw.val) == [(str(tmp_path / "birds/a.png"), bird_y)] and pairs(raw.test) == [
        (str(tmp_path / "fish/a.png"), fish_y)
    ]


def test_load_splits_end_to_end(tmp_path: Path) -> None:
    _make_folders(tmp_path)
    s = load_splits(_cfg("imagefolder", tmp_path, n_val=1, image_size=8))
    assert (len(s.train), len(s.val), len(s.test), s.num_classes) == (3, 1, 2, 2)


# ----------------------------------------------------------------------------- Caltech-256


def _make_caltech(root: Path, n: int = 5) -> Path:
    cats = root / "256_ObjectCategories"
    for folder, color in (("001.ak47", (10, 10, 10)), ("002.american-flag", (200, 0, 0)), ("257.clutter", (5, 5, 5))):
        for i in range(1, n + 1):
            _img(cats / folder / f"{folder[:3]}_{i:04d}.jpg", color)
    (cats / "002.american-flag" / "RENAME2").write_text("stray non-image file")
    return cats


def test_caltech256_per_class_split(tmp_path: Path) -> None:
    cats = _make_caltech(tmp_path)
    out = _caltech(_cfg("caltech256", tmp_path, image_size=8), per_class=3)
    train, test, classes = tri(out)
    assert classes == ["ak47", "american-flag"]  # clutter excluded
    assert sorted(train.labels.tolist()) == [0, 0, 0, 1, 1, 1] and sorted(test.labels.tolist()) == [0, 0, 1, 1]
    assert not set(train.files) & set(test.files) and len(set(train.files) | set(test.files)) == 10
    assert train.files != sorted(train.files)  # held in a fixed shuffled order, not class by class
    assert image(train, 3)[0].mean() == pytest.approx(200 / 255, abs=3 / 255)
    _same(out, _caltech(_cfg("caltech256", cats, image_size=8), per_class=3))
    # the choice in one class does not move when another class gains images
    _img(cats / "002.american-flag" / "002_0099.jpg", (200, 0, 0))
    again = _caltech(_cfg("caltech256", tmp_path, image_size=8), per_class=3)
    assert again.train.files[:3] == train.files[:3]


def test_caltech256_default_needs_more_than_60_per_class(tmp_path: Path) -> None:
    _make_caltech(tmp_path)
    assert imagefiles.CALTECH_TRAIN_PER_CLASS == 60
    with pytest.raises(UserError, match="001.ak47 has 5 images; the split needs more than 60"):
        DATASETS["caltech256"](_cfg("caltech256", tmp_path))


def test_caltech256_default_split_counts(tmp_path: Path) -> None:
    _make_caltech(tmp_path, n=62)
    train, test, _ = tri(DATASETS["caltech256"](_cfg("caltech256", tmp_path)))
    assert (len(train), len(test)) == (120, 4) and train.labels.bincount().tolist() == [60, 60]


def test_caltech256_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="missing .*256_ObjectCategories"):
        DATASETS["caltech256"](_cfg("caltech256", tmp_path))
    (tmp_path / "256_ObjectCategories" / "003.backpack").mkdir(parents=True)
    with pytest.raises(UserError, match="class folder .*003.backpack has no images"):
        DATASETS["caltech256"](_cfg("caltech256", tmp_path))


# ----------------------------------------------------------------------------- CUB-200-2011


def _make_cub(root: Path) -> Path:
    base = root / "CUB_200_2011"
    names = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    images, labels, split = [], [], []
    i = 0
    for c, name in enumerate(names, 1):
        for j in range(2):
            i += 1
            rel = f"{name}/{name.split('.')[1]}_{j:04d}_{i}.jpg"
            _img(base / "images" / rel, (40 * c, 0, 0))
            images.append(f"{i} {rel}")
            labels.append(f"{i} {c}")
            split.append(f"{i} {1 - j}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (base / "classes.txt").write_text("\n".join(f"{c} {n}" for c, n in enumerate(names, 1)) + "\n")
    return base


def test_cub200_official_split(tmp_path: Path) -> None:
    base = _make_cub(tmp_path)
    out = DATASETS["cub200"](_cfg("cub200", tmp_path, image_size=8))
    train, test, classes = tri(out)
    assert classes == ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
    assert sorted(train.labels.tolist()) == [0, 1, 2] and sorted(test.labels.tolist()) == [0, 1, 2]
    assert pairs(train)[0] == (str(base / "images/001.Black_footed_Albatross/Black_footed_Albatross_0000_1.jpg"), 0)
    x, y = tensors(train)
    assert x.shape == (3, 3, 8, 8)
    for img, label in zip(x, y.tolist()):  # class c (1-based) was drawn with red 40 c
        assert img[0].mean() == pytest.approx(40 * (label + 1) / 255, abs=3 / 255)
    _same(out, DATASETS["cub200"](_cfg("cub200", base, image_size=8)))  # root = the CUB_200_2011 folder


@pytest.mark.parametrize(
    "file, text, expected",
    [
        ("train_test_split.txt", None, "missing .*train_test_split.txt"),
        ("image_class_labels.txt", "1 1\n2 4\n", "image id 2: label 4 out of range 1..3"),
        ("image_class_labels.txt", "1 1\n\n2\n", r"image_class_labels.txt line 3: expected 2 fields"),
        ("image_class_labels.txt", "1 1\n", "image id 2 of images.txt is missing from .*image_class_labels.txt"),
        ("images.txt", "1 001.Black_footed_Albatross/gone.jpg\n", "missing .*gone.jpg"),
        ("train_test_split.txt", "1 1\n1 0\n", "train_test_split.txt line 2: id 1 listed twice"),
        ("train_test_split.txt", "1 2\n", "is_training_image must be 0 or 1"),
    ],
)
def test_cub200_errors(tmp_path: Path, file: str, text: str | None, expected: str) -> None:
    base = _make_cub(tmp_path)
    if text is None:
        (base / file).unlink()
    else:
        (base / file).write_text(text)
    with pytest.raises(UserError, match=expected):
        DATASETS["cub200"](_cfg("cub200", tmp_path))


# ----------------------------------------------------------------------------- Stanford Dogs


BREEDS = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel"]


def _savemat_list(path: Path, files: list[str], labels: list[int]) -> None:
    from scipy.io import savemat

    cells = np.empty((len(files), 1), dtype=object)
    for i, f in enumerate(files):
        cells[i, 0] = f
    annotations = np.empty((len(files), 1), dtype=object)
    for i, f in enumerate(files):
        annotations[i, 0] = f.removesuffix(".jpg")
    savemat(
        path,
        {
            "file_list": cells,
            "annotation_list": annotations,
            "labels": np.asarray(labels, dtype=np.float64).reshape(-1, 1),
        },
    )


def _make_dogs(root: Path, lists_dir: str = "") -> Path:
    files = {"train": [], "test": []}
    for c, breed in enumerate(BREEDS):
        for j in range(3):
            rel = f"{breed}/{breed.split('-')[0]}_{100 + j}.jpg"
            _img(root / "Images" / rel, (0, 0, 60 + 100 * c))
            files["train" if j < 2 else "test"].append((rel, c + 1))
    (root / lists_dir).mkdir(parents=True, exist_ok=True)
    for part, rows in files.items():
        _savemat_list(root / lists_dir / f"{part}_list.mat", [r for r, _ in rows[::-1]], [y for _, y in rows[::-1]])
    return root


def test_stanford_dogs_official_lists(tmp_path: Path) -> None:
    pytest.importorskip("scipy")
    _make_dogs(tmp_path)
    out = DATASETS["stanford-dogs"](_cfg("stanford-dogs", tmp_path, image_size=8))
    train, test, classes = tri(out)
    assert classes == ["Chihuahua", "Japanese_spaniel"]
    assert sorted(train.labels.tolist()) == [0, 0, 1, 1] and sorted(test.labels.tolist()) == [0, 1]
    assert pairs(train)[0] == (str(tmp_path / "Images/n02085620-Chihuahua/n02085620_100.jpg"), 0)
    for i, label in enumerate(test.labels.tolist()):  # breed c (0-based) was drawn with blue 60 + 100 c
        assert image(test, i)[2].mean() == pytest.approx((60 + 100 * label) / 255, abs=3 / 255)
    _same(out, DATASETS["stanford-dogs"](_cfg("stanford-dogs", tmp_path, image_size=8)))


def test_stanford_dogs_lists_subfolder(tmp_path: Path) -> None:
    pytest.importorskip("scipy")
    _make_dogs(tmp_path, lists_dir="lists")
    train, test, _ = tri(DATASETS["stanford-dogs"](_cfg("stanford-dogs", tmp_path)))
    assert (len(train), len(test)) == (4, 2)


def test_stanford_dogs_errors(tmp_path: Path) -> None:
    pytest.importorskip("scipy")
    _make_dogs(tmp_path)
    load = DATASETS["stanford-dogs"]
    chi, jap = (f"{b}/{b.split('-')[0]}_100.jpg" for b in BREEDS)
    _savemat_list(tmp_path / "test_list.mat", [chi, jap], [2, 2])
    with pytest.raises(UserError, match="n02085620_100.jpg has label 2, but label 2 belongs to folder n02085782-Jap"):
        load(_cfg("stanford-dogs", tmp_path))
    for part in ("train", "test"):
        _savemat_list(tmp_path / f"{part}_list.mat", [chi, jap], [1, 3])
    with pytest.raises(UserError, match="labels must be 1..2 without gaps"):
        load(_cfg("stanford-dogs", tmp_path))
    _savemat_list(tmp_path / "train_list.mat", [chi, jap], [1, 2])
    _savemat_list(tmp_path / "test_list.mat", [chi, f"{BREEDS[1]}/gone.jpg"], [1, 2])
    with pytest.raises(UserError, match="missing .*gone.jpg"):
        load(_cfg("stanford-dogs", tmp_path))
    (tmp_path / "test_list.mat").write_bytes(b"MATLAB garbage")
    with pytest.raises(UserError, match="cannot read file_list/labels from .*test_list.mat"):
        load(_cfg("stanford-dogs", tmp_path))
    (tmp_path / "test_list.mat").unlink()
    with pytest.raises(UserError, match="missing .*test_list.mat"):
        load(_cfg("stanford-dogs", tmp_path))
    shutil.rmtree(tmp_path / "Images")
    with pytest.raises(UserError, match="missing .*Images"):
        load(_cfg("stanford-dogs", tmp_path))


@pytest.mark.parametrize(
    "name, make, tv_class", [("cifar10", _make_cifar10, "CIFAR10"), ("cifar100", _make_cifar100, "CIFAR100")]
)
def test_cifar_fixture_reads_as_torchvision_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, make, tv_class: str
) -> None:
    """Cross-check the fixture format and our reader against torchvision's (md5 check off: the fixture is tiny)."""
    import torchvision

    make(tmp_path)
    cls = getattr(torchvision.datasets, tv_class)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    train, test, classes = tri(DATASETS[name](_cfg(name, tmp_path)))
    for ours, is_train in ((train, True), (test, False)):
        ref = cls(str(tmp_path), train=is_train, download=False)
        assert torch.equal(ours.pixels, torch.from_numpy(ref.data).permute(0, 3, 1, 2))
        assert ours.labels.tolist() == list(ref.targets)
        assert classes == ref.classes
