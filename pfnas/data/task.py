"""Decoded tasks: :class:`TaskData` holds each split as uint8 tensors and yields normalised batches.

Also the procedural synthetic task, which needs no files (the offline demo and the tests use it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import torch

from pfnas.config import DataError

SPLITS: tuple[str, ...] = ("train", "val", "trainval", "test")

TRAIN_SPLITS: tuple[str, ...] = ("train", "trainval")


@dataclass(repr=False)
class Split:
    """One split: ``images`` uint8 ``[N, 3, S, S]`` and ``labels`` int64 ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return f"Split(images={tuple(self.images.shape)}, device={self.images.device})"



@dataclass(repr=False)
class TaskData:
    """A decoded classification task; train splits may be stored larger than ``img_size`` for cropping."""

    name: str
    num_classes: int
    splits: dict[str, Split]
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    augment: bool = False
    classes: list[str] | None = None

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        return f"TaskData({self.name!r}, classes={self.num_classes}, img_size={self.img_size}, {sizes})"

    @property
    def device(self) -> torch.device:
        return next(iter(self.splits.values())).images.device

    def to(self, device: str | torch.device) -> "TaskData":
        """Copy with every split moved to ``device`` (images stay uint8)."""
        dev = torch.device(device)
        moved = {k: Split(v.images.to(dev), v.labels.to(dev)) for k, v in self.splits.items()}
        return replace(self, splits=moved)

    def split(self, name: str) -> Split:
        try:
            return self.splits[name]
        except KeyError:
            raise DataError(f"unknown split {name!r}; {self.name} has {sorted(self.splits)}") from None

    def num_images(self, split: str) -> int:
        return len(self.split(split))

    def batches(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        augment: bool | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(float32 normalised [B, 3, img_size, img_size], int64 [B])`` on the data's device.

        The order comes from ``torch.randperm(n, generator=generator)`` on the CPU, crop offsets and
        flips from the same generator, so restoring its state replays the epoch exactly.
        """
        s = self.split(split)
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if augment is None:
            augment = self.augment and split in TRAIN_SPLITS
        n = len(s)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        dev = s.images.device
        mean = torch.tensor(self.mean, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if drop_last and idx.numel() < batch_size:
                break
            idx = idx.to(dev)
            x = s.images.index_select(0, idx)
            if augment:
                x = _random_crop_flip(x, self.img_size, generator)
            elif x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
                x = _center_crop(x, self.img_size)
            x = (x.float() / 255.0 - mean) / std
            yield x, s.labels.index_select(0, idx)



def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if h < size or w < size:
        raise DataError(f"stored images are {h}x{w}, smaller than img_size={size}")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top : top + size, left : left + size]



def _random_crop_flip(x: torch.Tensor, size: int, generator: torch.Generator | None) -> torch.Tensor:
    """Per-image random ``size`` crop and horizontal flip as one gather; randomness from ``generator``."""
    b, _, h, w = x.shape
    if h < size or w < size:
        raise DataError(f"stored images are {h}x{w}, smaller than img_size={size}")
    top = torch.randint(0, h - size + 1, (b,), generator=generator)
    left = torch.randint(0, w - size + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    ar = torch.arange(size)
    rows = top[:, None] + ar  # [B, S]
    cols = torch.where(flip[:, None], left[:, None] + (size - 1 - ar), left[:, None] + ar)
    dev = x.device
    bi = torch.arange(b, device=dev)[:, None, None]
    out = x[bi, :, rows.to(dev)[:, :, None], cols.to(dev)[:, None, :]]  # [B, S, S, 3]
    return out.permute(0, 3, 1, 2).contiguous()



def as_triple(v: Sequence[float], what: str) -> tuple[float, float, float]:
    t = tuple(float(x) for x in v)
    if len(t) != 3:
        raise DataError(f"{what} needs 3 values (RGB), got {len(t)}")
    if what == "std" and any(x <= 0 for x in t):
        raise DataError(f"std values must be > 0, got {t}")
    return t  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Synthetic task
# --------------------------------------------------------------------------------------------


def _draw_bars(labels: torch.Tensor, num_classes: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Noisy images of one bar whose angle from the horizontal encodes the class (mirror-symmetric).

    Drawn at ``min(size, 64)`` pixels and bilinearly upsampled, so large sizes stay cheap.
    """
    n = labels.numel()
    base = min(size, 64)
    step = (math.pi / 2) / max(num_classes - 1, 1)
    sign = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    theta = sign * (labels.float() * step + (torch.rand(n, generator=g) - 0.5) * 0.4 * step)
    centre = base / 2 + (torch.rand(n, 2, generator=g) - 0.5) * (base / 4)
    half_width = base * (0.05 + 0.05 * torch.rand(n, generator=g))
    fg = 0.55 + 0.45 * torch.rand(n, 3, generator=g)
    bg = 0.35 * torch.rand(n, 3, generator=g)
    out = torch.empty((n, 3, size, size), dtype=torch.uint8)
    coords = torch.arange(base, dtype=torch.float32) + 0.5
    ys, xs = coords[:, None], coords[None, :]
    for s in range(0, n, 256):
        sl = slice(s, min(n, s + 256))
        cx, cy = centre[sl, 0, None, None], centre[sl, 1, None, None]
        t = theta[sl, None, None]
        dist = ((xs - cx) * torch.sin(t) - (ys - cy) * torch.cos(t)).abs()
        bar = torch.sigmoid((half_width[sl, None, None] - dist) * 2.0)[:, None]
        img = bg[sl, :, None, None] + (fg[sl] - bg[sl])[:, :, None, None] * bar
        img = (img + 0.08 * torch.randn(img.shape, generator=g)).clamp_(0, 1)
        if base != size:
            img = torch.nn.functional.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
        out[sl] = img.mul_(255).round_()
    return out



def synthetic_task(
    num_classes: int = 4,
    per_class: int = 64,
    img_size: int = 32,
    seed: int = 0,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.25, 0.25, 0.25),
) -> TaskData:
    """Procedural offline task: the class is the angle of a bar (drawn at +/- that angle, so flips keep it).

    ``per_class`` images per class form trainval (80% train / 20% val, stratified) and as many form test.
    Deterministic for a given ``seed``.
    """
    if num_classes < 2:
        raise DataError(f"synthetic task needs >= 2 classes, got {num_classes}")
    if per_class < 2:
        raise DataError(f"synthetic task needs >= 2 images per class, got {per_class}")
    if img_size < 4:
        raise DataError(f"synthetic task needs img_size >= 4, got {img_size}")
    n_val = max(1, int(round(0.2 * per_class)))
    n_train = per_class - n_val
    classes = torch.arange(num_classes)
    counts = {"train": n_train, "val": n_val, "test": per_class}
    labels = {s: classes.repeat(k) for s, k in counts.items()}
    g = torch.Generator().manual_seed(int(seed))
    all_labels = torch.cat([labels["train"], labels["val"], labels["test"]])
    images = _draw_bars(all_labels, num_classes, img_size, g)
    parts = torch.split(images, [len(labels["train"]), len(labels["val"]), len(labels["test"])])
    splits = {s: Split(img, labels[s]) for s, img in zip(("train", "val", "test"), parts)}
    splits["trainval"] = Split(
        torch.cat([splits["train"].images, splits["val"].images]),
        torch.cat([splits["train"].labels, splits["val"].labels]),
    )
    step = 90 / max(num_classes - 1, 1)
    return TaskData(
        name="synthetic",
        num_classes=num_classes,
        splits={s: splits[s] for s in SPLITS},
        img_size=img_size,
        mean=as_triple(mean, "mean"),
        std=as_triple(std, "std"),
        augment=False,
        classes=[f"bar_{c * step:.0f}deg" for c in range(num_classes)],
    )
