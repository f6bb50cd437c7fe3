"""The embedded datasets on the real files: shapes, ranges, counts, checksums, IDX parsing, splits, batching."""

from __future__ import annotations

import gzip
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from advtransfer import data
from advtransfer.config import DataConfig
from advtransfer.data import Split, batches, load_splits, read_idx
from advtransfer.errors import UserError


def _keys(split: Split) -> Counter:
    """Multiset of (image bytes, label): identifies items without knowing any index."""
    px = split.pixels.reshape(len(split), -1).numpy()
    return Counter(zip((row.tobytes() for row in px), split.labels.tolist()))


@pytest.fixture(scope="module")
def mnist() -> data.Splits:
    return load_splits(DataConfig(name="mnist"))


@pytest.fixture(scope="module")
def mnist_full() -> Split:
    """The training file as stored, before any carve-out."""
    train, _, _ = data.DATASETS["mnist"](DataConfig(name="mnist"))
    return train


# ----------------------------------------------------------------------------- the real files


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_shapes_dtypes_counts(name: str) -> None:
    s = load_splits(DataConfig(name=name, n_val=1000))
    assert (len(s.train), len(s.val), len(s.test)) == (59000, 1000, 10000)
    assert s.num_classes == 10 and len(s.classes) == 10
    for split in (s.train, s.val, s.test):
        assert split.in_memory and split.pixels.dtype == torch.uint8
        assert split.pixels.shape[1:] == (1, 28, 28) and split.channels == 1
        assert split.labels.dtype == torch.int64
    x, y = s.test.tensors()
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0  # full range used, scaled by 255 not 256
    assert torch.equal(x * 255, s.test.pixels.float())
    assert set(y.tolist()) == set(range(10))
    counts = torch.bincount(s.train.labels, minlength=10)
    assert counts.min() > 4000  # every class well represented (MNIST min is ~5400, Fashion exactly 6000)
    xb, yb = next(batches(s.train, 64))
    assert xb.shape == (64, 1, 28, 28) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert 0.0 <= float(xb.min()) and float(xb.max()) <= 1.0


def test_fashion_classes() -> None:
    s = load_splits(DataConfig(name="fashion-mnist", n_train=10, n_val=10, n_test=10))
    assert s.classes[0] == "T-shirt/top" and s.classes[9] == "Boot"


def test_default_counts(mnist: data.Splits) -> None:
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (55000, 5000, 10000)


def test_unknown_dataset() -> None:
    with pytest.raises(UserError, match="unknown dataset 'mnst'"):
        load_splits(DataConfig(name="mnst"))


# ----------------------------------------------------------------------------- validation split


def test_val_partitions_train(mnist: data.Splits, mnist_full: Split) -> None:
    """train + val is exactly the stored training set, each item once: disjoint, nothing lost."""
    assert len(mnist_full) == 60000
    assert _keys(mnist.train) + _keys(mnist.val) == _keys(mnist_full)
    assert not set(_keys(mnist.val)) & set(_keys(mnist.train)) - _dup_images(mnist_full)
    assert set(mnist.val.labels.tolist()) == set(range(10))


def _dup_images(split: Split) -> set:
    """Items that occur more than once in the stored set (may legitimately land on both sides)."""
    return {k for k, c in _keys(split).items() if c > 1}


def test_val_not_the_first_images(mnist: data.Splits, mnist_full: Split) -> None:
    """The carve-out is a permutation, not the head of the file (which is ordered by writer, not random)."""
    assert not torch.equal(mnist.val.pixels[:100], mnist_full.pixels[:100])


def test_val_deterministic_and_independent_of_run_seed(mnist: data.Splits) -> None:
    torch.manual_seed(1)
    a = load_splits(DataConfig(name="mnist", n_train=500, n_test=300))
    torch.manual_seed(2)
    torch.rand(7)  # move the global generator some more
    b = load_splits(DataConfig(name="mnist", n_train=500, n_test=300))
    for sa, sb in ((a.val, b.val), (a.train, b.train), (a.test, b.test)):
        assert torch.equal(sa.pixels, sb.pixels) and torch.equal(sa.labels, sb.labels)
    # the val split does not move with the subsample options either
    assert torch.equal(a.val.pixels, mnist.val.pixels) and torch.equal(a.val.labels, mnist.val.labels)


def test_subsampling(mnist: data.Splits, mnist_full: Split) -> None:
    s = load_splits(DataConfig(name="mnist", n_train=300, n_val=200, n_test=100))
    assert (len(s.train), len(s.val), len(s.test)) == (300, 200, 100)
    assert set(_keys(s.train)) <= set(_keys(mnist_full))
    assert not set(_keys(s.train)) & set(_keys(s.val)) - _dup_images(mnist_full)  # never a val image
    assert set(_keys(s.val)) <= set(_keys(mnist.val))  # a smaller val is drawn from the same carve-out
    assert set(_keys(s.test)) <= set(_keys(mnist.test))
    assert len(set(s.test.labels.tolist())) == 10  # a random subsample, not the first 100 of one class
    big = load_splits(DataConfig(name="mnist", n_train=0, n_val=0, n_test=20000))
    assert (len(big.train), len(big.val), len(big.test)) == (60000, 0, 10000)


# ----------------------------------------------------------------------------- checksums and IDX files


def test_checksum_mismatch_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = data.data_dir() / "mnist"
    dest = tmp_path / "mnist"
    dest.mkdir()
    for f in data.CHECKSUMS["mnist"]:
        (dest / f).symlink_to(src / f)
    data.verify(dest / "t10k-labels-idx1-ubyte", data.CHECKSUMS["mnist"]["t10k-labels-idx1-ubyte"])  # control
    bad = dest / "t10k-labels-idx1-ubyte"
    bad.unlink()
    shutil.copyfile(src / "t10k-labels-idx1-ubyte", bad)
    raw = bytearray(bad.read_bytes())
    raw[5000] ^= 0x01  # one flipped bit in one label
    bad.write_bytes(bytes(raw))
    monkeypatch.setenv("ADVTRANSFER_DATA", str(tmp_path))
    assert data.data_dir() == tmp_path
    with pytest.raises(UserError, match="checksum mismatch.*t10k-labels-idx1-ubyte"):
        load_splits(DataConfig(name="mnist"))
    assert data.sha256(src / "t10k-labels-idx1-ubyte") == data.CHECKSUMS["mnist"]["t10k-labels-idx1-ubyte"]


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
    src = data.data_dir() / "mnist" / "t10k-labels-idx1-ubyte"
    path = tmp_path / src.name
    path.write_bytes(src.read_bytes()[:-100])
    with pytest.raises(UserError, match="header says 10008 bytes, file has 9908"):
        read_idx(path)


# ----------------------------------------------------------------------------- batching


def test_batches_order_and_start(mnist: data.Splits) -> None:
    split = mnist.val.subset(torch.arange(10))
    order = torch.tensor([9, 2, 7, 0, 5, 1, 8, 3, 6, 4])
    got = list(batches(split, 4, order=order, start=3))
    assert [len(y) for _, y in got] == [4, 3]
    x = torch.cat([b[0] for b in got])
    y = torch.cat([b[1] for b in got])
    want_x, want_y = split.tensors(order[3:])
    assert torch.equal(x, want_x) and torch.equal(y, want_y)
    assert torch.equal(y, split.labels[order[3:]])
    assert torch.equal(x[0], split.load(0))  # order[3] == 0
    plain = list(batches(split, 3))
    assert [len(y) for _, y in plain] == [3, 3, 3, 1]
    assert torch.equal(torch.cat([b[1] for b in plain]), split.labels)
    assert list(batches(split, 4, order=order, start=10)) == []


def test_batches_lazy_split_matches_order(tmp_path: Path) -> None:
    from PIL import Image

    files, labels = [], []
    for i in range(6):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(path)
        files.append(str(path))
        labels.append(i % 3)
    split = Split(labels=torch.tensor(labels), files=files, image_size=8, channels=1)
    assert not split.in_memory
    order = torch.tensor([5, 3, 1, 0, 2, 4])
    got = list(batches(split, 2, order=order, start=1))
    x = torch.cat([b[0] for b in got])
    y = torch.cat([b[1] for b in got])
    assert x.shape == (5, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.allclose(x[:, 0, 0, 0], torch.tensor([3, 1, 0, 2, 4]) * 40 / 255)
    assert y.tolist() == [0, 1, 0, 2, 1]
