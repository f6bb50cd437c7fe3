"""load_splits on the real embedded files: shapes, ranges, counts, splits, composites, variants, batching."""

from __future__ import annotations

import weakref
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from advtransfer import data
from advtransfer.config import DataConfig
from advtransfer.configfile import from_dict
from advtransfer.data import Split, batches, load_splits, tensors, to_device
from advtransfer.datasets import Splits
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
    return data.DATASETS["mnist"](DataConfig(name="mnist")).train


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
    x, y = tensors(s.test)
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0  # full range used, scaled by 255 not 256
    assert torch.equal(x * 255, s.test.pixels.float())
    assert set(y.tolist()) == set(range(10))
    counts = torch.bincount(s.train.labels, minlength=10)
    assert counts.min() > 4000  # every class well represented (MNIST min is ~5400, Fashion exactly 6000)
    xb, yb = to_device(*next(batches(s.train, 64)), "cpu")
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


# ----------------------------------------------------------------------------- batching


def test_batches_order_and_start(mnist: data.Splits) -> None:
    split = mnist.val.subset(torch.arange(10))
    order = torch.tensor([9, 2, 7, 0, 5, 1, 8, 3, 6, 4])
    got = [to_device(x, y, "cpu") for x, y in batches(split, 4, order=order, start=3)]
    assert [len(y) for _, y in got] == [4, 3]
    x = torch.cat([b[0] for b in got])
    y = torch.cat([b[1] for b in got])
    want_x, want_y = tensors(split, order[3:])
    assert torch.equal(x, want_x) and torch.equal(y, want_y)
    assert torch.equal(y, split.labels[order[3:]])
    assert torch.equal(x[0], split.load(0).float() / 255)  # order[3] == 0
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
    got = [to_device(x, y, "cpu") for x, y in batches(split, 2, order=order, start=1)]
    x = torch.cat([b[0] for b in got])
    y = torch.cat([b[1] for b in got])
    assert x.shape == (5, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.allclose(x[:, 0, 0, 0], torch.tensor([3, 1, 0, 2, 4]) * 40 / 255)
    assert y.tolist() == [0, 1, 0, 2, 1]


# ----------------------------------------------------------------------------- composites, variants, resampling


def test_parse_name() -> None:
    assert data.parse_name("mnist") == [("mnist", None)]
    assert data.parse_name("mnist[5-9]") == [("mnist", [5, 6, 7, 8, 9])]
    assert data.parse_name(" mnist[0-1, 7] + fashion-mnist[9,3]") == [("mnist", [0, 1, 7]), ("fashion-mnist", [9, 3])]
    for bad, pattern in [
        ("mnist[5-", "bad dataset name"),
        ("mnist+", "bad dataset name"),
        ("mnist[a]", r"bad class list \[a\]"),
        ("mnist[1,,2]", "bad class list"),
        ("mnist[-1]", "bad class list"),
        ("mnist[4-2]", "empty class range 4-2"),
        ("mnist[1-3,2]", "selects a class twice"),
    ]:
        with pytest.raises(UserError, match=pattern):
            data.parse_name(bad)


def test_class_selection(mnist_full: Split) -> None:
    s = load_splits(DataConfig(name="mnist[5-9]", n_val=500))
    assert s.classes == ["5", "6", "7", "8", "9"] and s.num_classes == 5
    full_counts = torch.bincount(mnist_full.labels, minlength=10)[5:]
    assert torch.equal(torch.bincount(torch.cat([s.train.labels, s.val.labels]), minlength=5), full_counts)
    assert len(s.val) == 500 and set(s.val.labels.tolist()) == set(range(5))
    # every image keeps its own label, shifted by 5: the (image, label) pairs are those of the stored file
    moved = Counter({(img, y + 5): c for (img, y), c in (_keys(s.train) + _keys(s.val)).items()})
    assert moved == Counter({k: c for k, c in _keys(mnist_full).items() if k[1] >= 5})
    test = load_splits(DataConfig(name="mnist[7,5]", n_val=10)).test  # listed order: 7 -> 0, 5 -> 1
    full_test = data.DATASETS["mnist"](DataConfig(name="mnist")).test
    assert torch.equal(test.pixels, full_test.pixels[(full_test.labels == 7) | (full_test.labels == 5)])
    assert torch.equal(test.labels, (full_test.labels[(full_test.labels == 7) | (full_test.labels == 5)] == 5).long())
    with pytest.raises(UserError, match="mnist has classes 0..9; there is no class 10"):
        load_splits(DataConfig(name="mnist[8-10]"))
    with pytest.raises(UserError, match="unknown dataset 'mnst'"):
        load_splits(DataConfig(name="mnist[0-4]+mnst[0-4]"))


def test_fashion_selection_keeps_names() -> None:
    s = load_splits(DataConfig(name="fashion-mnist[0-4]", n_train=10, n_val=10, n_test=10))
    assert s.classes == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]


def test_join_two_datasets() -> None:
    cfg = DataConfig(name="mnist[0-4]+fashion-mnist[0-4]", n_val=1000)
    s = load_splits(cfg)
    assert s.classes[:2] == ["mnist:0", "mnist:1"] and s.classes[5:] == [
        "fashion-mnist:T-shirt/top",
        "fashion-mnist:Trouser",
        "fashion-mnist:Pullover",
        "fashion-mnist:Dress",
        "fashion-mnist:Coat",
    ]
    m, f = (data.DATASETS[n](DataConfig(name=n)) for n in ("mnist", "fashion-mnist"))
    assert _keys(s.train) + _keys(s.val) == _selected(m.train, 0) + _selected(f.train, 5)  # nothing lost or added
    assert _keys(s.test) == _selected(m.test, 0) + _selected(f.test, 5)
    assert len(s.train) + len(s.val) == 30596 + 30000 and len(s.test) == 5139 + 5000
    assert set(s.test.labels[:100].tolist()) == set(range(10))  # a prefix of the test split spans both parts
    # disjoint: no image is in two of train / val / test (neither file has duplicates across these)
    keys = [set(k for k, _ in _keys(x)) for x in (s.train, s.val, s.test)]
    assert not keys[0] & keys[1] and not keys[0] & keys[2] and not keys[1] & keys[2]
    again = load_splits(cfg)
    for a, b in zip((s.train, s.val, s.test), (again.train, again.val, again.test)):
        assert torch.equal(a.pixels, b.pixels) and torch.equal(a.labels, b.labels)


def _selected(split: Split, shift: int) -> Counter:
    """Keys of the items of ``split`` in classes 0..4, their labels shifted by ``shift``."""
    return Counter({(img, y + shift): c for (img, y), c in _keys(split).items() if y < 5})


def test_join_needs_same_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    load_splits(DataConfig(name="mnist", n_train=10, n_val=10, n_test=10))  # registers every dataset
    rgb = Split(labels=torch.arange(4) % 2, pixels=torch.zeros(4, 3, 28, 28, dtype=torch.uint8))
    monkeypatch.setitem(data.DATASETS, "rgb", lambda cfg: Splits(rgb, None, rgb, ["a", "b"]))
    with pytest.raises(UserError, match="joined datasets must share image size and channels, got 1x28x28 and 3x28x28"):
        load_splits(DataConfig(name="mnist[0-1]+rgb"))
    assert load_splits(DataConfig(name="rgb+rgb", n_val=1)).classes == ["rgb:a", "rgb:b", "rgb:a", "rgb:b"]


@pytest.mark.parametrize("variant", ["invert", "rot90", "patch-shuffle"])
def test_variants(variant: str) -> None:
    cfg = DataConfig(name="mnist", n_train=50, n_val=20, n_test=30)
    plain = load_splits(cfg)
    s = load_splits(cfg.model_copy(update={"variant": variant}))
    assert s.classes == plain.classes
    g = data.PATCH_GRID
    for a, b in ((plain.train, s.train), (plain.val, s.val), (plain.test, s.test)):  # every split
        assert torch.equal(a.labels, b.labels) and b.pixels.dtype == torch.uint8
        if variant == "invert":
            assert torch.equal(b.pixels, 255 - a.pixels)
        elif variant == "rot90":  # counter-clockwise: the top row becomes the left column, read bottom-up
            assert torch.equal(b.pixels[..., :, 0], a.pixels[..., 0, :].flip(-1))
        else:
            perm = _patch_perm(a.pixels, b.pixels, g)
            assert sorted(perm) == list(range(g * g)) and perm != list(range(g * g))
            assert perm == _patch_perm(plain.train.pixels, s.train.pixels, g)  # one permutation for all
    x = plain.test.pixels[:4]
    assert torch.allclose(data.apply_variant(x.float() / 255, variant), data.apply_variant(x, variant).float() / 255)


def _patch_perm(before: torch.Tensor, after: torch.Tensor, g: int) -> list[int]:
    """For each patch of ``after``, the index of the patch of ``before`` it shows (checked on every image)."""
    p = before.shape[-1] // g

    def patch(x: torch.Tensor, k: int) -> torch.Tensor:
        return x[..., (k // g) * p : (k // g + 1) * p, (k % g) * p : (k % g + 1) * p]

    out = []
    for k in range(g * g):
        match = [j for j in range(g * g) if torch.equal(patch(after, k), patch(before, j))]
        assert len(match) == 1
        out.append(match[0])
    return out


def test_variant_on_image_files(tmp_path: Path) -> None:
    from PIL import Image

    for part in ("train", "test"):
        for i, c in enumerate(("a", "b", "a", "b")):
            (tmp_path / part / c).mkdir(parents=True, exist_ok=True)
            arr = (np.arange(64).reshape(8, 8) * 3 + 20 * i).astype(np.uint8)
            Image.fromarray(arr).convert("RGB").save(tmp_path / part / c / f"{i}.png")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=8, n_val=1)
    plain = load_splits(cfg)
    for variant, fn in (("rot90", lambda x: x.rot90(1, (-2, -1))), ("invert", lambda x: 1 - x)):
        s = load_splits(cfg.model_copy(update={"variant": variant}))
        for a, b in ((plain.train, s.train), (plain.val, s.val), (plain.test, s.test)):
            assert a.files == b.files and torch.allclose(tensors(b)[0], fn(tensors(a)[0]))


def test_unknown_variant() -> None:
    with pytest.raises(UserError, match="'variant' must be one of"):
        load_splits(from_dict(DataConfig, {"name": "mnist", "variant": "flip"}))


def test_resample_draws_train_with_the_run_seed() -> None:
    cfg = DataConfig(name="mnist", n_train=200, n_val=100, n_test=10)
    fixed = [load_splits(cfg, seed=s) for s in (0, 1)]
    assert torch.equal(fixed[0].train.pixels, fixed[1].train.pixels)  # without resample the seed does not matter
    a, b, a2 = (load_splits(cfg.model_copy(update={"resample": True}), seed=s) for s in (0, 1, 0))
    assert torch.equal(a.train.pixels, a2.train.pixels) and torch.equal(a.train.labels, a2.train.labels)
    assert not torch.equal(a.train.pixels, b.train.pixels) and len(b.train) == 200
    for s in (a, b):  # the validation and test images stay fixed and never overlap train
        assert torch.equal(s.val.pixels, fixed[0].val.pixels) and torch.equal(s.test.pixels, fixed[0].test.pixels)
        assert not set(_keys(s.train)) & set(_keys(s.val))


# ----------------------------------------------------------------------------- image-file transforms


def _stripes(root: Path, n: int = 6) -> None:
    """``n`` 60x20 images per split in two classes: thirds red | green | blue, a grey top-left corner."""
    from PIL import Image

    for part in ("train", "test"):
        for i in range(n):
            arr = np.zeros((20, 60, 3), np.uint8)
            arr[:, :20, 0], arr[:, 20:40, 1], arr[:, 40:, 2] = 250, 250, 250
            arr[:2, :2] = 10 * i
            (root / part / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / part / f"c{i % 2}" / f"{i}.png")


def test_eval_transform_resizes_the_shorter_side_then_center_crops(tmp_path: Path) -> None:
    _stripes(tmp_path)
    s = load_splits(DataConfig(name="imagefolder", root=str(tmp_path), image_size=16, n_val=1, augment=True))
    for split in (s.train, s.val, s.test):  # train too when read for evaluation (train=False)
        x, _ = tensors(split)
        assert x.shape == (len(split), 3, 16, 16)
        # 60x20 -> 54x18 -> the central 16x16 lies in the green third; a squash to 16x16 would show all three
        assert torch.all(x[:, 1] > 0.9) and torch.all(x[:, 0] < 0.1) and torch.all(x[:, 2] < 0.1)
    default = load_splits(DataConfig(name="imagefolder", root=str(tmp_path), n_val=1))
    assert tensors(default.test)[0].shape == (6, 3, 224, 224)  # 0 = 224, after Resize(256)


def _epoch(split: Split, **kw) -> torch.Tensor:
    """One training pass over ``split`` as float images."""
    return torch.cat([to_device(x, y, "cpu")[0] for x, y in batches(split, 4, train=True, **kw)])


def test_random_transforms_are_seeded_per_example(tmp_path: Path) -> None:
    _stripes(tmp_path, n=12)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=16, n_val=1, augment=True)
    train = load_splits(cfg).train
    torch.manual_seed(5)
    state = torch.get_rng_state()
    a = _epoch(train, seed=3, epoch=1)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is untouched
    assert a.shape == (11, 3, 16, 16) and len({x.sum().item() for x in a}) > 1  # crops and flips vary
    # the same (seed, epoch, index) gives the same image in another order, from other worker processes
    order = torch.arange(11).flip(0)
    b = _epoch(train, order=order, workers=2, seed=3, epoch=1)
    assert torch.equal(b, a[order]) and torch.equal(torch.get_rng_state(), state)
    resumed = _epoch(train, start=5, seed=3, epoch=1)
    assert torch.equal(resumed, a[5:])
    assert not torch.equal(_epoch(train, seed=3, epoch=2), a) and not torch.equal(_epoch(train, seed=4, epoch=1), a)
    crops = torch.cat([_epoch(train, seed=0, epoch=e) for e in range(4)])
    red = crops[:, 0] > 0.9
    assert red.any() and (crops[:, 2] > 0.9).any()  # random crops reach the red and the blue third
    assert (red[:, :, 0].all(1) & ~red[:, :, -1].any(1)).any()  # red on the left: not flipped
    assert (red[:, :, -1].all(1) & ~red[:, :, 0].any(1)).any()  # red on the right: flipped
    plain = load_splits(cfg.model_copy(update={"augment": False})).train
    assert torch.equal(_epoch(plain, seed=3, epoch=1), tensors(plain)[0])  # no augment: the center crop


# ----------------------------------------------------------------------------- streaming


def test_images_stay_uint8_until_the_device(tmp_path: Path, mnist: data.Splits) -> None:
    _stripes(tmp_path)
    lazy = load_splits(DataConfig(name="imagefolder", root=str(tmp_path), image_size=16, n_val=1)).test
    for split in (mnist.val, lazy):
        x, y = next(batches(split, 4))
        assert x.dtype == torch.uint8 and y.dtype == torch.int64 and len(x) == 4
        xf, yf = to_device(x, y, torch.device("cpu"))
        assert xf.dtype == torch.float32 and torch.equal(xf * 255, x.float()) and torch.equal(yf, y)
    assert not hasattr(Split, "tensors")  # nothing stacks a whole split as float but data.tensors, on request


def test_loader_is_built_once_and_reused(tmp_path: Path) -> None:
    _stripes(tmp_path, n=10)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=16, n_val=1, augment=True)
    train = load_splits(cfg).train
    want = {e: _epoch(train, seed=1, epoch=e) for e in (0, 1)}
    passes = [_epoch(train, workers=2, seed=1, epoch=e, order=torch.arange(9)) for e in (0, 1, 0)]
    assert torch.equal(passes[0], want[0]) and torch.equal(passes[1], want[1]) and torch.equal(passes[2], want[0])
    loader = train.loaders[(4, 2, True)]
    assert loader.persistent_workers and loader.pin_memory == torch.cuda.is_available()
    pids = [w.pid for w in loader._iterator._workers]
    next(batches(train, 4, workers=2, seed=1, epoch=1, train=True))  # a pass left unfinished (an interrupted epoch)
    assert torch.equal(_epoch(train, workers=2, seed=1, epoch=0), want[0])  # the next pass is whole and right
    assert [w.pid for w in loader._iterator._workers] == pids  # the same worker processes served every pass
    _ = tensors(train, workers=2)  # evaluation reads through a loader of its own (no augmentation)
    assert set(train.loaders) == {(4, 0, True), (4, 2, True), (256, 2, False)}
    gone = weakref.ref(loader)
    del loader, train
    assert gone() is None  # no reference cycle: the loader and its workers go with the split, not at a later GC


def test_worker_count(monkeypatch: pytest.MonkeyPatch) -> None:
    from advtransfer.configfile import load_config

    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(12)))
    assert data.worker_count(DataConfig()) == 8  # auto: min(8, CPUs / processes)
    monkeypatch.setattr(data.D, "world", lambda: 4)
    assert data.worker_count(DataConfig()) == 3
    assert data.worker_count(load_config(overrides=["data.workers=0"]).data) == 0
    assert data.worker_count(load_config(overrides=["data.workers=5"]).data) == 5
    assert load_config(overrides=["data.workers=auto"]).data.workers == "auto"
    for bad in ("-1", "many", "2.5"):
        with pytest.raises(UserError, match=r"data\.workers must be >= 0"):
            load_config(overrides=[f"data.workers={bad}"])


def test_run_on_image_files_is_the_same_for_any_worker_count(tmp_path: Path) -> None:
    """A whole augmented run (training, validation, test) on image files: workers 0 and 2 give identical weights."""
    from safetensors.torch import load_file

    from advtransfer.configfile import load_config
    from advtransfer.pipeline import run

    _stripes(tmp_path / "data", n=10)
    data = f"{{name: imagefolder, root: '{tmp_path / 'data'}', image_size: 16, n_val: 2, augment: true}}"
    vit = "{img_size: 16, patch_size: 8, embed_dim: 16, depth: 1, num_heads: 1}"
    sets = [f"data={data}", "model.backbone=vit_tiny_patch16_224", f"model.kwargs={vit}", "method.name=full"]
    sets += ["attack.eps=0.1", "attack.steps=1", "train.epochs=2", "train.batch_size=4", "eval.val_pgd_steps=1"]
    sets += ["eval.pgd_steps=1", "eval.autoattack=false"]
    cards = [run(load_config(overrides=[*sets, f"data.workers={w}"]), tmp_path / f"w{w}") for w in (0, 2)]
    assert cards[0]["clean_acc"] == cards[1]["clean_acc"] and cards[0]["pgd_acc"] == cards[1]["pgd_acc"]
    best = [load_file(str(tmp_path / f"w{w}" / "best.safetensors")) for w in (0, 2)]
    assert best[0].keys() == best[1].keys() and all(torch.equal(best[0][k], best[1][k]) for k in best[0])
