"""``load_splits``: a dataset or a composite (``mnist[0-4]+fashion-mnist[0-4]``) -> train / val / test ``Splits``, the
validation split carved from train by a fixed permutation (model selection never sees test images; every run compares
on the same images), variants (``invert``, ``rot90``, ``patch-shuffle``) for far domains; ``batches`` reads them."""

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
from .datasets import DATASETS, Split, Splits, permutation
from .errors import UserError

VARIANTS = ("none", "invert", "rot90", "patch-shuffle")
PATCH_GRID = 4  # patch-shuffle cuts each image into a 4x4 grid of patches (7x7 pixels on 28x28 images)


def apply_variant(x: torch.Tensor, variant: str) -> torch.Tensor:
    """Images ``[..., C, H, W]`` (uint8 or float ``[0,1]``) inverted, turned counter-clockwise or patch-shuffled."""
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
    # one fixed permutation of the patches (SPLIT_SEED), the same for every image and split
    patches = x.reshape(*lead, c, g, h // g, g, w // g).transpose(-3, -2).reshape(*lead, c, g * g, h // g, w // g)
    out = patches[..., permutation(g * g), :, :].reshape(*lead, c, g, g, h // g, w // g).transpose(-3, -2)
    return out.reshape(*lead, c, h, w)


def transforms(split: Split, train: bool) -> v2.Compose:
    """The paper's image-file transforms: Resize(256), then RandomCrop(224) + flip or CenterCrop(224), scaled."""
    resize = v2.Resize(round(split.image_size * 256 / 224), antialias=True)
    if train and split.augment:
        return v2.Compose([resize, v2.RandomCrop(split.image_size), v2.RandomHorizontalFlip()])
    return v2.Compose([resize, v2.CenterCrop(split.image_size)])


class _Examples(torch.utils.data.Dataset):
    """Image-file examples by key ``(index, seed, epoch)``: decoded, transformed, variant applied."""

    def __init__(self, split: Split, train: bool) -> None:
        # a copy without ``split.loaders``: no reference cycle, so a loader and its workers go with their split at once
        # (collected as a cycle they may outlive their queues, and shutting down waits 5 s for each worker)
        self.split, self.random, self.transform = replace(split), train and split.augment, transforms(split, train)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        # random transforms draw from the global generator seeded by the key alone (the caller's state is restored):
        # an example is the same whichever worker reads it, in any order, so resume is exact for any worker count
        i, seed, epoch = key
        with torch.random.fork_rng(devices=[], enabled=self.random):
            if self.random:  # CPU only: torch.manual_seed seeds CUDA too, 100x slower
                state = np.random.SeedSequence((seed, epoch, i)).generate_state(1, np.uint64)
                torch.default_generator.manual_seed(int(state[0]))
            x = self.transform(self.split.load(i))
        return apply_variant(x, self.split.variant), self.split.labels[i]


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
    """Uint8 images ``[B,C,H,W]`` and int64 labels ``[B]`` in ``order`` (default: as stored) from ``start`` on."""
    order = (torch.arange(len(split)) if order is None else torch.as_tensor(order))[start:]
    if split.in_memory:  # sliced; image files are read by ``workers`` DataLoader processes (0: this one)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            yield split.pixels[idx], split.labels[idx]
        return
    setting = (batch_size, workers, train)
    if setting not in split.loaders:
        # one loader (and its persistent workers) serves every pass: its sampler, a list, is refilled before each;
        # its own generator: the loader draws its workers' base seed, never from the training's global one
        split.loaders[setting] = torch.utils.data.DataLoader(
            _Examples(split, train),
            batch_size,
            sampler=[],
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator(),
        )
    loader = split.loaders[setting]
    loader.sampler[:] = [(i, seed, epoch) for i in order.tolist()]
    yield from loader


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of ``batches`` on ``device``: float ``[0,1]`` images (converted there), int64 labels."""
    return x.to(device, non_blocking=True).float().div_(255), y.to(device, non_blocking=True)


def tensors(
    split: Split, order: torch.Tensor | None = None, *, device: torch.device | str = "cpu", workers: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """All (or ``order``'s) images of ``split`` as one float ``[0,1]`` tensor on ``device``, and their labels."""
    order = torch.arange(len(split)) if order is None else torch.as_tensor(order)
    got = [to_device(x, y, device) for x, y in batches(split, 256, order=order, workers=workers)]
    if got:
        return torch.cat([x for x, _ in got]), torch.cat([y for _, y in got])
    size = split.pixels.shape[2:] if split.in_memory else (split.image_size, split.image_size)
    return torch.zeros(0, split.channels, *size, device=device), split.labels[:0].to(device)


def worker_count(cfg: DataConfig) -> int:
    """DataLoader processes per split: ``data.workers``, or for ``"auto"`` min(8, CPUs / processes of the run)."""
    return int(cfg.workers) if cfg.workers != "auto" else min(8, len(os.sched_getaffinity(0)) // D.world())


def parse_name(name: str) -> list[tuple[str, list[int] | None]]:
    """``"mnist[0-2,7]+fashion-mnist"`` -> ``[("mnist", [0, 1, 2, 7]), ("fashion-mnist", None)]`` (ranges inclusive)."""
    parts: list[tuple[str, list[int] | None]] = []
    for text in name.split("+"):
        if (m := re.fullmatch(r"\s*([\w.-]+)\s*(?:\[([^\]]*)\])?\s*", text)) is None:
            raise UserError(f"data: bad dataset name {name!r}: expected parts like mnist or mnist[0-4,7] joined by '+'")
        keep = None if m[2] is None else []
        for item in [] if m[2] is None else m[2].split(","):
            lo, _, hi = item.strip().partition("-")
            try:
                first, last = int(lo), int(hi or lo)
            except ValueError:
                raise UserError(f"data: bad class list [{m[2]}] in {name!r}: use indices and ranges like 0-4") from None
            if first > last:
                raise UserError(f"data: empty class range {item.strip()} in {name!r}")
            keep += range(first, last + 1)
        if keep is not None and len(set(keep)) != len(keep):
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
        if s is not None and len(s) and (int(s.labels.min()) < 0 or int(s.labels.max()) >= k):
            raise UserError(f"data: {name} {what} split has labels outside [0, {k - 1}]")
    keep = list(range(k)) if keep is None else keep
    if bad := [c for c in keep if not 0 <= c < k]:
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
    return joined.subset(permutation(len(joined)))


def load_splits(cfg: DataConfig, seed: int = 0) -> Splits:
    """``cfg.name`` (see ``parse_name``) as train / val (carved from train) / test, subsampled, under the variant."""
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
    if empty := [what for what, s in (("train", train), ("test", test)) if len(s) == 0]:
        raise UserError(f"data: {cfg.name} {empty[0]} split is empty")
    rest, notes = permutation(len(train)), []
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
    if cfg.n_train:  # the run seed draws the subset only when resampling: runs compare on the same images
        rest = rest[permutation(len(rest), seed)][: cfg.n_train] if cfg.resample else rest[: cfg.n_train]
    train = train.subset(rest)
    if cfg.n_test and cfg.n_test < len(test):
        test = test.subset(permutation(len(test))[: cfg.n_test])
    splits = [train, val, test]
    if cfg.variant != "none":  # in memory: applied once here; image files: when each image is read
        splits = [
            replace(s, pixels=apply_variant(s.pixels, cfg.variant).contiguous())
            if s.in_memory
            else replace(s, variant=cfg.variant)
            for s in splits
        ]
    return Splits(*splits, classes=classes, notes=notes)
