"""``load_splits``: a dataset (or a composite of datasets) -> train / val / test ``Splits``; ``batches`` to read them.

The validation split is carved from the training set with a fixed permutation (seed independent of the run
seed), so model selection never sees test images and every run compares on the same images. Composites select
classes and join datasets (``mnist[0-4]+fashion-mnist[0-4]``); variants (``invert``, ``rot90``, ``patch-shuffle``)
turn a dataset into a far-domain target. Raw datasets come from ``datasets.py``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch
from torchvision.transforms import v2

from . import distributed as D
from .config import DataConfig
from .datasets import DATASETS, SPLIT_SEED, Split, Splits
from .errors import UserError

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
    perm = _perm(g * g, SPLIT_SEED)
    patches = x.reshape(*lead, c, g, h // g, g, w // g).transpose(-3, -2).reshape(*lead, c, g * g, h // g, w // g)
    out = patches[..., perm, :, :].reshape(*lead, c, g, g, h // g, w // g).transpose(-3, -2)
    return out.reshape(*lead, c, h, w)


def transforms(split: Split, train: bool) -> v2.Compose:
    """The paper's transforms of an image-file split: ``Resize(256)`` (shorter side), then ``RandomCrop(224)`` and
    ``RandomHorizontalFlip`` when ``train`` and the split augments, else ``CenterCrop(224)``; 256 and 224 scaled to
    ``split.image_size``. In-memory datasets (MNIST, CIFAR) keep their native resolution: the model resizes."""
    resize = v2.Resize(round(split.image_size * 256 / 224), antialias=True)
    if train and split.augment:
        return v2.Compose([resize, v2.RandomCrop(split.image_size), v2.RandomHorizontalFlip()])
    return v2.Compose([resize, v2.CenterCrop(split.image_size)])


class _Examples(torch.utils.data.Dataset):
    """Image-file examples by key ``(index, seed, epoch)``: decoded, transformed, variant applied.

    Random transforms draw from the global generator seeded by the key alone (the caller's state is restored), so an
    example is the same whichever worker reads it and in whatever order: resume is exact for any worker count.
    """

    def __init__(self, split: Split, train: bool) -> None:
        # a copy without ``split.loaders``: no reference cycle, so a loader and its workers go with their split at once
        # (collected as a cycle they may outlive their queues, and shutting down waits 5 s for each worker)
        self.split, self.random, self.transform = replace(split), train and split.augment, transforms(split, train)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        i, seed, epoch = key
        x = self.split.load(i)
        if self.random:
            key = int(np.random.SeedSequence((seed, epoch, i)).generate_state(1, np.uint64)[0])
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(key)  # CPU only: torch.manual_seed seeds CUDA too, 100x slower
                x = self.transform(x)
        else:
            x = self.transform(x)
        return apply_variant(x, self.split.variant), self.split.labels[i]


class _Keys(torch.utils.data.Sampler):
    """The example keys of the next pass, set before each: one loader (and its worker processes) serves every pass."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, int, int]] = []

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def batches(
    split: Split,
    batch_size: int,
    *,
    order: torch.Tensor | None = None,
    start: int = 0,
    workers: int = 0,
    seed: int = 0,
    epoch: int = 0,
    train: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield uint8 images ``[B,C,H,W]`` and int64 labels ``[B]`` in ``order`` (default: as stored), skipping the first
    ``start``; ``to_device`` makes them float ``[0,1]`` on the device.

    In-memory splits are sliced directly. Image files are decoded and transformed (``transforms``; random ones when
    ``train``, seeded by ``(seed, epoch, index)``) by ``workers`` DataLoader processes (0: in this one). The loader
    is built once per split and setting (persistent workers, pinned memory under CUDA) and reused by every pass.
    """
    order = (torch.arange(len(split)) if order is None else torch.as_tensor(order))[start:]
    if split.in_memory:
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            yield split.pixels[idx], split.labels[idx]
        return
    setting = (batch_size, workers, train)
    if setting not in split.loaders:
        # its own generator: the loader draws its workers' base seed, never from the training's global one
        split.loaders[setting] = torch.utils.data.DataLoader(
            _Examples(split, train),
            batch_size,
            sampler=_Keys(),
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator(),
        )
    loader = split.loaders[setting]
    loader.sampler.keys = [(i, seed, epoch) for i in order.tolist()]
    yield from loader


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of ``batches`` on ``device``: float ``[0,1]`` images (converted there), int64 labels."""
    return x.to(device, non_blocking=True).float().div_(255), y.to(device, non_blocking=True)


def tensors(
    split: Split, order: torch.Tensor | None = None, *, device: torch.device | str = "cpu", workers: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """All (or ``order``'s) images of ``split`` as one float ``[0,1]`` tensor on ``device``, and their labels: for
    small splits and evaluation functions that take whole tensors."""
    order = torch.arange(len(split)) if order is None else torch.as_tensor(order)
    got = [to_device(x, y, device) for x, y in batches(split, 256, order=order, workers=workers)]
    if got:
        return torch.cat([x for x, _ in got]), torch.cat([y for _, y in got])
    size = split.pixels.shape[2:] if split.in_memory else (split.image_size, split.image_size)
    return torch.zeros(0, split.channels, *size, device=device), split.labels[:0].to(device)


def worker_count(cfg: DataConfig) -> int:
    """DataLoader processes per split: ``data.workers``, or for ``"auto"`` min(8, CPUs / processes of the run)."""
    if cfg.workers != "auto":
        return int(cfg.workers)
    return min(8, len(os.sched_getaffinity(0)) // D.world())


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


def _part(cfg: DataConfig, name: str, keep: list[int] | None, offset: int) -> Splits:
    """Dataset ``name`` restricted to the classes ``keep`` (all if None), labelled from ``offset`` on."""
    if name not in DATASETS:
        raise UserError(f"data: unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    raw = DATASETS[name](cfg)
    k = raw.num_classes
    for what, s in (("train", raw.train), ("val", raw.val), ("test", raw.test)):
        if s is not None:
            check_labels(s, k, f"{name} {what} split")
    keep = list(range(k)) if keep is None else keep
    bad = [c for c in keep if not 0 <= c < k]
    if bad:
        raise UserError(f"data: {name} has classes 0..{k - 1}; there is no class {bad[0]}")
    lut = torch.full((k,), -1, dtype=torch.int64)
    lut[keep] = torch.arange(len(keep)) + offset

    def relabel(split: Split | None) -> Split | None:
        if split is None:
            return None
        new = lut[split.labels]
        idx = (new >= 0).nonzero().squeeze(1)
        return replace(split.subset(idx), labels=new[idx])

    return Splits(relabel(raw.train), relabel(raw.val), relabel(raw.test), [raw.classes[c] for c in keep])


def _join(parts: list[Split | None], name: str) -> Split | None:
    """One split holding ``parts`` in a fixed shuffled order (so that any prefix spans every part)."""
    if parts[0] is None:
        return None
    kinds = {(p.channels, *p.pixels.shape[2:]) if p.in_memory else (p.channels, "files") for p in parts}
    if len(kinds) > 1:
        shapes = " and ".join("x".join(map(str, k)) for k in sorted(kinds, key=str))
        raise UserError(f"data: {name}: joined datasets must share image size and channels, got {shapes}")
    labels = torch.cat([p.labels for p in parts])
    if parts[0].in_memory:
        joined = replace(parts[0], labels=labels, pixels=torch.cat([p.pixels for p in parts]))
    else:
        joined = replace(parts[0], labels=labels, files=[f for p in parts for f in p.files])
    return joined.subset(_perm(len(joined), SPLIT_SEED))


def _perm(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def load_splits(cfg: DataConfig, seed: int = 0) -> Splits:
    """Load ``cfg.name`` (a dataset or a composite, see ``parse_name``), carve the validation split from train,
    subsample, and apply ``cfg.variant`` to every split.

    ``seed`` (the run seed) draws the ``n_train`` subset when ``cfg.resample``; otherwise, and always for the
    validation carve-out and the test subset, the draw is fixed (``SPLIT_SEED``), so runs compare on the same images.
    """
    if cfg.variant not in VARIANTS:
        raise UserError(f"data: unknown variant {cfg.variant!r}; known: {', '.join(VARIANTS)}")
    parts, classes, offset = [], [], 0
    spec = parse_name(cfg.name)
    for name, keep in spec:
        parts.append(_part(cfg, name, keep, offset))
        offset += parts[-1].num_classes
        classes += [f"{name}:{c}" for c in parts[-1].classes] if len(spec) > 1 else parts[-1].classes
    if len({p.val is None for p in parts}) > 1:
        raise UserError(f"data: {cfg.name}: either every joined dataset has a validation split file or none")
    train, val, test = (
        _join([getattr(p, s) for p in parts], cfg.name) if len(parts) > 1 else getattr(parts[0], s)
        for s in ("train", "val", "test")
    )
    for what, s in (("train split", train), ("test split", test)):
        if len(s) == 0:
            raise UserError(f"data: {cfg.name} {what} is empty")
    rest, notes = _perm(len(train), SPLIT_SEED), []
    if val is None:  # carved from train by a fixed permutation
        if cfg.n_val >= len(train) and cfg.n_val:
            asked = f" (data.n_train={cfg.n_train} asked)" if cfg.n_train else ""
            raise UserError(
                f"data: data.n_val={cfg.n_val} leaves no training images: {cfg.name} has {len(train)}{asked}"
            )
        val, rest = train.subset(rest[: cfg.n_val]), rest[cfg.n_val :]
    else:
        notes.append(f"data: validation split from data.split_file ({len(val)} images); data.n_val ignored")
    if cfg.n_train > len(rest):
        raise UserError(
            f"data: data.n_train={cfg.n_train} but only {len(rest)} training images remain after the "
            f"{len(train) - len(rest)} validation images (data.n_val={cfg.n_val})"
        )
    if cfg.n_train:
        rest = rest[_perm(len(rest), seed)][: cfg.n_train] if cfg.resample else rest[: cfg.n_train]
    train = train.subset(rest)
    if cfg.n_test and cfg.n_test < len(test):
        test = test.subset(_perm(len(test), SPLIT_SEED)[: cfg.n_test])
    splits = [train, val, test]
    if cfg.variant != "none":  # in memory: applied once here; image files: when each image is read
        splits = [
            replace(s, pixels=apply_variant(s.pixels, cfg.variant).contiguous())
            if s.in_memory
            else replace(s, variant=cfg.variant)
            for s in splits
        ]
    return Splits(*splits, classes=classes, notes=notes)
