"""Image classification data held as decoded uint8 tensors.

Readers for the VTAB-1k, FGVC (VPT json), HTA (DAM-VP ImageFolder sets) and generic ImageFolder
layouts, plus a procedural synthetic task that needs no files. Every image is decoded once (in a
thread pool), resized as the VPT recipe prescribes and stored as ``uint8``; :meth:`TaskData.batches`
crops, flips and normalises whole batches on the tensors' device, so no loader process is needed.
"""
from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from pfnas.config import DataConfig, DataError

SPLITS: tuple[str, ...] = ("train", "val", "trainval", "test")
TRAIN_SPLITS: tuple[str, ...] = ("train", "trainval")
KINDS: tuple[str, ...] = ("vtab", "fgvc", "hta", "imagefolder", "synthetic")

VTAB_SPLIT_FILES: dict[str, str] = {
    "train": "train800.txt",
    "val": "val200.txt",
    "trainval": "train800val200.txt",
    "test": "test.txt",
}
FGVC_SPLIT_FILES: dict[str, str] = {"train": "train.json", "val": "val.json", "test": "test.json"}
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})

VTAB_TASKS: dict[str, int] = {
    "cifar100": 100,
    "caltech101": 102,
    "dtd": 47,
    "oxford_flowers102": 102,
    "oxford_iiit_pet": 37,
    "svhn": 10,
    "sun397": 397,
    "patch_camelyon": 2,
    "eurosat": 10,
    "resisc45": 45,
    "diabetic_retinopathy": 5,
    "clevr_count": 8,
    "clevr_dist": 6,
    "dmlab": 6,
    "kitti": 4,
    "dsprites_loc": 16,
    "dsprites_ori": 16,
    "smallnorb_azi": 18,
    "smallnorb_ele": 9,
}
FGVC_CLASSES: dict[str, int] = {
    "CUB-200-2011": 200,
    "NABirds": 555,
    "OxfordFlowers": 102,
    "StanfordDogs": 120,
    "StanfordCars": 196,
}
# Normalised directory names (lower case, alphanumerics only) that denote the FGVC sets above.
_FGVC_ALIASES: dict[str, str] = {
    "cub2002011": "CUB-200-2011", "cub200": "CUB-200-2011", "cub": "CUB-200-2011",
    "nabirds": "NABirds",
    "oxfordflowers": "OxfordFlowers", "oxfordflower": "OxfordFlowers", "flowers102": "OxfordFlowers",
    "stanforddogs": "StanfordDogs", "stanforddog": "StanfordDogs", "dogs": "StanfordDogs",
    "stanfordcars": "StanfordCars", "stanfordcar": "StanfordCars", "cars": "StanfordCars",
}
HTA_TASKS: dict[str, int] = {
    "cifar10": 10,
    "cifar100": 100,
    "dtd": 47,
    "cub200": 200,
    "nabirds": 555,
    "stanford_dogs": 120,
    "oxford_flowers": 102,
    "food101": 101,
    "gtsrb": 43,
    "svhn": 10,
}


def fgvc_num_classes(task: str) -> int | None:
    """Known class count of an FGVC set from its directory name (``CUB_200_2011``, ``Stanford-dogs``...)."""
    key = "".join(ch for ch in task.lower() if ch.isalnum())
    name = _FGVC_ALIASES.get(key)
    return FGVC_CLASSES[name] if name else None


# --------------------------------------------------------------------------------------------
# Tensors and batches
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Error collection shared by the loaders (strict) and check_dataset (lenient)
# --------------------------------------------------------------------------------------------


class _Issues:
    """Raise :class:`DataError` at the first issue (``strict``) or collect them for a report."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.problems: list[str] = []
        self.broken: list[str] = []
        self.warnings: list[str] = []

    def problem(self, msg: str) -> None:
        if self.strict:
            raise DataError(msg)
        self.problems.append(msg)

    def broken_file(self, msg: str) -> None:
        if self.strict:
            raise DataError(msg)
        self.broken.append(msg)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)


@dataclass
class _Listing:
    """Image paths and labels per split, before decoding."""

    splits: dict[str, list[tuple[Path, int]]]
    num_classes: int
    classes: list[str] | None = None


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _check_exists(listing: dict[str, list[tuple[Path, int]]], source: dict[str, str], issues: _Issues) -> None:
    seen: set[Path] = set()
    for split, entries in listing.items():
        for p, _ in entries:
            if p in seen:
                continue
            seen.add(p)
            if not p.is_file():
                issues.broken_file(f"image listed in {source.get(split, split)} but missing: {p}")


def _num_classes(splits: dict[str, list[tuple[Path, int]]]) -> int:
    labels = [lab for entries in splits.values() for _, lab in entries]
    return max(labels) + 1 if labels else 0


def _check_labels(where: object, splits: dict[str, list[tuple[Path, int]]], num_classes: int, issues: _Issues,
                  names: Sequence[str] | None = None, unseen_ok: bool = False) -> None:
    """Any task: at least two classes, every label 0..num_classes-1 used, every val/test class seen in train.

    ``unseen_ok`` turns the last check into a warning (VTAB-1k sun397 samples 1000 images of 397 classes).
    """
    used = {lab for entries in splits.values() for _, lab in entries}
    if not used:
        return  # empty splits are reported by the readers

    def show(ids: list[int]) -> str:
        txt = ", ".join(repr(names[i]) if names else str(i) for i in ids[:5])
        return txt + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")

    if num_classes < 2:
        issues.problem(f"{where}: only one class ({show(sorted(used))}); a classifier needs at least two")
        return
    gaps = sorted(set(range(num_classes)) - used)
    if gaps:
        issues.problem(f"{where}: class(es) {show(gaps)} have no images (labels must be 0..{num_classes - 1} "
                       "without gaps)")
    train = {lab for _, lab in splits.get("train", [])}
    for s in ("val", "test"):
        unseen = sorted({lab for _, lab in splits.get(s, [])} - train)
        if train and unseen:
            msg = f"{where}: {s} has class(es) {show(unseen)} that never occur in train"
            issues.warn(msg) if unseen_ok else issues.problem(msg)


# --------------------------------------------------------------------------------------------
# Layout readers
# --------------------------------------------------------------------------------------------


def _list_vtab(task_dir: Path, issues: _Issues) -> _Listing:
    splits: dict[str, list[tuple[Path, int]]] = {}
    for split, fname in VTAB_SPLIT_FILES.items():
        f = task_dir / fname
        if not f.is_file():
            issues.problem(f"missing split file {f}")
            continue
        try:
            text = f.read_text()
        except (OSError, UnicodeDecodeError) as e:
            issues.problem(f"{f}: unreadable ({e})")
            continue
        entries: list[tuple[Path, int]] = []
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(None, 1)
            label = _as_int(parts[1]) if len(parts) == 2 else None
            if label is None:
                issues.problem(f"{f}:{n}: expected '<relative/path> <label>', got {line!r}")
                continue
            if label < 0:
                issues.problem(f"{f}:{n}: label {label} out of range (labels must be >= 0)")
                continue
            entries.append((task_dir / parts[0], label))
        if not entries:
            issues.problem(f"split file {f} is empty")
        splits[split] = entries
    num_classes = _num_classes(splits)
    known = VTAB_TASKS.get(task_dir.name)
    if known is not None and num_classes > known:
        issues.problem(
            f"{task_dir}: label {num_classes - 1} out of range for VTAB task {task_dir.name} ({known} classes)"
        )
    elif known is not None and num_classes != known:
        issues.warn(f"{task_dir.name}: labels use {num_classes} classes, VTAB-1k {task_dir.name} has {known}")
    _check_labels(task_dir, splits, num_classes, issues, unseen_ok=known is not None)
    if {"train", "val", "trainval"} <= splits.keys():
        union = {p for p, _ in splits["train"]} | {p for p, _ in splits["val"]}
        if union != {p for p, _ in splits["trainval"]}:
            issues.warn(f"{task_dir.name}: {VTAB_SPLIT_FILES['trainval']} is not the union of train800 and val200")
    _check_exists(splits, {k: str(task_dir / v) for k, v in VTAB_SPLIT_FILES.items()}, issues)
    return _Listing(splits, num_classes)


def _fgvc_image_root(task_dir: Path, keys: Sequence[str]) -> Path:
    candidates = [task_dir / "images", task_dir / "Images", task_dir]
    for key in keys[:8]:
        for c in candidates:
            if (c / key).is_file():
                return c
    return next((c for c in candidates if c.is_dir() and c != task_dir), task_dir)


def _list_fgvc(task_dir: Path, issues: _Issues) -> _Listing:
    raw: dict[str, list[tuple[str, int]]] = {}
    for split, fname in FGVC_SPLIT_FILES.items():
        f = task_dir / fname
        if not f.is_file():
            issues.problem(f"missing split file {f}")
            continue
        try:
            data = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            issues.problem(f"{f}: invalid JSON ({str(e).splitlines()[0]})")
            continue
        if not isinstance(data, dict):
            issues.problem(f"{f}: expected a JSON object {{image_path: label}}, got {type(data).__name__}")
            continue
        entries: list[tuple[str, int]] = []
        for key, value in data.items():
            label = _as_int(value)
            if label is None:
                issues.problem(f"{f}: label of {key!r} is not an integer: {value!r}")
                continue
            entries.append((key, label))
        if not entries:
            issues.problem(f"split file {f} is empty")
        raw[split] = entries
    values = sorted({lab for entries in raw.values() for _, lab in entries})
    to_index = {v: i for i, v in enumerate(values)}
    keys = [k for entries in raw.values() for k, _ in entries]
    root = _fgvc_image_root(task_dir, keys)
    splits = {s: [(root / k, to_index[lab]) for k, lab in e] for s, e in raw.items()}
    if "train" in splits and "val" in splits:
        splits["trainval"] = splits["train"] + splits["val"]
    _check_labels(task_dir, splits, len(values), issues, names=[str(v) for v in values])
    known = fgvc_num_classes(task_dir.name)
    if known is not None and len(values) != known:
        issues.warn(f"{task_dir.name}: {len(values)} distinct labels, the FGVC set has {known}")
    _check_exists(splits, {k: str(task_dir / v) for k, v in FGVC_SPLIT_FILES.items()}, issues)
    return _Listing(splits, len(values))


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


def _scan_classes(split_dir: Path) -> dict[str, list[Path]]:
    """Class folder name -> sorted image files below it (recursively)."""
    out: dict[str, list[Path]] = {}
    try:
        class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:
        raise DataError(f"cannot list {split_dir}: {e.strerror or e}") from None
    for d in class_dirs:
        files: list[Path] = []
        for cur, dirs, names in os.walk(d, followlinks=True):
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            files.extend(Path(cur) / n for n in sorted(names) if _is_image(Path(n)))
        out[d.name] = files
    return out


def _stratified(per_class: list[list[Path]], fractions: Sequence[float], seed: int) -> list[list[tuple[Path, int]]]:
    """Seeded per-class split; parts after the first get >= 1 image when the class is large enough."""
    g = torch.Generator().manual_seed(seed)
    parts: list[list[tuple[Path, int]]] = [[] for _ in fractions]
    for label, files in enumerate(per_class):
        n = len(files)
        perm = torch.randperm(n, generator=g).tolist()
        sizes = []
        for frac in fractions[1:]:
            k = int(round(frac * n))
            if k == 0 and n - sum(sizes) > 1:
                k = 1
            sizes.append(min(k, max(n - sum(sizes) - 1, 0)))
        sizes.insert(0, n - sum(sizes))
        start = 0
        for part, k in zip(parts, sizes):
            part.extend((files[i], label) for i in perm[start : start + k])
            start += k
    return parts


def _list_imagefolder(root: Path, issues: _Issues, seed: int, require_splits: bool = False) -> _Listing:
    split_dirs = {s: root / s for s in ("train", "val", "test")}
    if require_splits or any(d.is_dir() for d in split_dirs.values()):
        for s in ("train", "test"):
            if not split_dirs[s].is_dir():
                issues.problem(f"missing split folder {split_dirs[s]}")
        if not split_dirs["train"].is_dir():
            return _Listing({}, 0, [])
        train = _scan_classes(split_dirs["train"])
        classes = sorted(train)
        if not classes:
            issues.problem(f"no class folders in {split_dirs['train']}")
        index = {c: i for i, c in enumerate(classes)}
        splits: dict[str, list[tuple[Path, int]]] = {}
        for s in ("val", "test"):
            if not split_dirs[s].is_dir():
                continue
            entries = []
            for c, files in _scan_classes(split_dirs[s]).items():
                if c not in index:
                    issues.problem(f"{split_dirs[s] / c}: class {c!r} has no folder in {split_dirs['train']}")
                    continue
                entries.extend((f, index[c]) for f in files)
            splits[s] = entries
        per_class = [train[c] for c in classes]
        if "val" in splits:
            splits["train"] = [(f, i) for i, files in enumerate(per_class) for f in files]
        else:
            splits["train"], splits["val"] = _stratified(per_class, (0.9, 0.1), seed)
    else:
        found = _scan_classes(root) if root.is_dir() else {}
        classes = sorted(found)
        if not any(found.values()):
            issues.problem(f"no class folders with images under {root}")
        per_class = [found[c] for c in classes]
        parts = _stratified(per_class, (0.7, 0.1, 0.2), seed)
        splits = dict(zip(("train", "val", "test"), parts))
    for s in ("train", "val", "test"):
        if s in splits and not splits[s]:
            issues.problem(f"split {s!r} of {root} is empty")
    _check_labels(root, splits, len(classes), issues, names=classes)
    splits["trainval"] = splits.get("train", []) + splits.get("val", [])
    return _Listing({s: splits[s] for s in SPLITS if s in splits}, len(classes), classes)


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _View:
    """How a decoded image is turned into a stored square: resize then centre crop ``crop``."""

    resize: int
    crop: int
    square: bool  # True: resize to (resize, resize); False: shorter side to ``resize`` (aspect kept)


def _resized(img: Image.Image, view: _View) -> Image.Image:
    w, h = img.size
    if view.square:
        size = (view.resize, view.resize)
    elif w <= h:
        size = (view.resize, int(view.resize * h / w))
    else:
        size = (int(view.resize * w / h), view.resize)
    return img if img.size == size else img.resize(size, Image.BICUBIC)


def _render(img: Image.Image, view: _View) -> np.ndarray:
    w, h = img.size
    c = view.crop
    if (w, h) != (c, c):
        left, top = int(round((w - c) / 2.0)), int(round((h - c) / 2.0))
        img = img.crop((left, top, left + c, top + c))
    return np.array(img, dtype=np.uint8)


def _workers() -> int:
    """Decode threads: one per usable core (PIL releases the GIL while decoding and resizing)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(32, cores))


def _decode_one(path: Path, targets: list[tuple[_View, np.ndarray]]) -> None:
    try:
        with Image.open(path) as im:
            im.load()
            img = im if im.mode == "RGB" else im.convert("RGB")
            cache: dict[tuple[int, bool], Image.Image] = {}
            for view, slot in targets:
                key = (view.resize, view.square)
                if key not in cache:
                    cache[key] = _resized(img, view)
                slot[...] = _render(cache[key], view)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"unreadable image {path}: {msg}") from None


def _decode_chunk(jobs: list[tuple[Path, list[tuple[_View, np.ndarray]]]]) -> None:
    for path, targets in jobs:
        _decode_one(path, targets)


def _decode_splits(
    items: dict[str, list[Path]], views: dict[str, _View], workers: int | None = None
) -> dict[str, torch.Tensor]:
    """Decode every (path, view) pair once into uint8 ``[N, 3, S, S]`` tensors; repeats are copied."""
    buf = {s: np.empty((len(paths), views[s].crop, views[s].crop, 3), dtype=np.uint8) for s, paths in items.items()}
    first: dict[tuple[Path, _View], tuple[str, int]] = {}
    jobs: dict[Path, list[tuple[_View, np.ndarray]]] = {}
    copies: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    for s, paths in items.items():
        v = views[s]
        for i, p in enumerate(paths):
            src = first.get((p, v))
            if src is None:
                first[(p, v)] = (s, i)
                jobs.setdefault(p, []).append((v, buf[s][i]))
            else:
                dst_idx, src_idx = copies.setdefault((s, src[0]), ([], []))
                dst_idx.append(i)
                src_idx.append(src[1])
    job_list = list(jobs.items())
    n_workers = workers or _workers()
    chunk = max(1, min(256, math.ceil(len(job_list) / (4 * n_workers))))
    chunks = [job_list[i : i + chunk] for i in range(0, len(job_list), chunk)]
    if n_workers == 1 or len(chunks) <= 1:
        for c in chunks:
            _decode_chunk(c)
    else:
        with ThreadPoolExecutor(max_workers=n_workers) as ex:
            futures = [ex.submit(_decode_chunk, c) for c in chunks]
            try:
                for f in futures:
                    f.result()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    for (dst, src), (dst_idx, src_idx) in copies.items():
        buf[dst][dst_idx] = buf[src][src_idx]
    out = {}
    for s in list(buf):
        out[s] = torch.from_numpy(buf.pop(s)).permute(0, 3, 1, 2).contiguous()
    return out


def _build_task(
    name: str,
    listing: _Listing,
    views: dict[str, _View],
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: bool,
) -> TaskData:
    present = [s for s in SPLITS if s in listing.splits]
    images = _decode_splits({s: [p for p, _ in listing.splits[s]] for s in present}, views)
    splits = {
        s: Split(images[s], torch.tensor([lab for _, lab in listing.splits[s]], dtype=torch.int64)) for s in present
    }
    return TaskData(
        name=name,
        num_classes=listing.num_classes,
        splits=splits,
        img_size=img_size,
        mean=_triple(mean, "mean"),
        std=_triple(std, "std"),
        augment=augment,
        classes=listing.classes,
    )


def _triple(v: Sequence[float], what: str) -> tuple[float, float, float]:
    t = tuple(float(x) for x in v)
    if len(t) != 3:
        raise DataError(f"{what} needs 3 values (RGB), got {len(t)}")
    if what == "std" and any(x <= 0 for x in t):
        raise DataError(f"std values must be > 0, got {t}")
    return t  # type: ignore[return-value]


def fgvc_views(img_size: int) -> dict[str, _View]:
    """VPT FGVC preprocessing: train stored at ``round(S*256/224)`` for random crops, eval centre-cropped."""
    big = int(round(img_size * 256 / 224))
    train = _View(big, big, square=False)
    test = _View(big, img_size, square=False)
    return {"train": train, "trainval": train, "val": test, "test": test}


def vtab_views(img_size: int) -> dict[str, _View]:
    """VPT VTAB preprocessing: every split resized straight to ``(S, S)``."""
    v = _View(img_size, img_size, square=True)
    return {s: v for s in SPLITS}


def eval_view(kind: str, img_size: int) -> _View:
    """How ``kind``'s evaluation splits are decoded (vtab and synthetic: square resize; others: FGVC's)."""
    return (vtab_views if kind in ("vtab", "synthetic") else fgvc_views)(img_size)["test"]


def decode_images(paths: Sequence[str | Path], view: _View, workers: int | None = None) -> torch.Tensor:
    """Decode image files into uint8 ``[N, 3, crop, crop]`` exactly as a split stored with ``view``."""
    return _decode_splits({"images": [Path(p) for p in paths]}, {"images": view}, workers)["images"]


def render_image(img: Image.Image, view: _View) -> torch.Tensor:
    """One decoded PIL image -> uint8 ``[3, crop, crop]``, the same resize and crop as :func:`decode_images`."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    return torch.from_numpy(_render(_resized(img, view), view)).permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _subdirs(root: Path) -> list[str]:
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:
        raise DataError(f"cannot list {root}: {e.strerror or e}") from None


def _task_dir(root: Path, task: str | None, kind: str) -> Path:
    if not task:
        raise DataError(f"data.task is required for data.kind={kind!r} (tasks under {root}: {_subdirs(root)})")
    d = root / task
    if not d.is_dir():
        avail = _subdirs(root)
        shown = ", ".join(avail[:20]) + (" ..." if len(avail) > 20 else "")
        raise DataError(f"task directory not found: {d} (available: {shown or 'none'})")
    return d


def _existing_root(root: str | Path | None) -> Path:
    if not root:
        raise DataError("data.root is not set")
    p = Path(root).expanduser()
    if not p.exists():
        raise DataError(f"data root not found: {p}")
    if not p.is_dir():
        raise DataError(f"data root is not a directory: {p}")
    return p


def _data_dir(cfg: DataConfig) -> Path:
    """The folder a file-backed task is read from: ``root/task`` (``root`` for a task-less ImageFolder)."""
    root = _existing_root(cfg.root)
    if cfg.kind == "imagefolder" and not cfg.task:
        return root
    if cfg.kind not in ("vtab", "fgvc", "hta", "imagefolder"):  # DataConfig validates kind; kept for callers that bypass it
        raise DataError(f"unknown data.kind {cfg.kind!r}; choose from {list(KINDS)}")
    return _task_dir(root, cfg.task, cfg.kind)


def check_data_paths(cfg: DataConfig) -> None:
    """Cheap pre-flight: the data root (and the task folder where the kind needs one) exists; raises DataError.

    Reads no images; :func:`load_task` still checks everything. Used by drivers before they start workers.
    """
    if cfg.kind != "synthetic":
        _data_dir(cfg)


def load_task(
    cfg: DataConfig,
    *,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> TaskData:
    """Read (or generate) the task described by ``cfg``; decoded tensors go to ``device`` when ``cfg.resident``."""
    if int(img_size) < 1:
        raise DataError(f"img_size must be >= 1, got {img_size}")
    img_size = int(img_size)
    kind = cfg.kind
    augment = cfg.augment if cfg.augment is not None else kind in ("fgvc", "hta", "imagefolder")
    if kind == "synthetic":
        data = synthetic_task(cfg.synthetic_classes, cfg.synthetic_per_class, img_size, seed, mean, std)
        data.augment = augment
    else:
        d = _data_dir(cfg)
        issues = _Issues(strict=True)
        if kind == "vtab":
            listing, views = _list_vtab(d, issues), vtab_views(img_size)
        elif kind == "fgvc":
            listing, views = _list_fgvc(d, issues), fgvc_views(img_size)
        elif kind == "hta":
            listing, views = _list_imagefolder(d, issues, seed, require_splits=True), fgvc_views(img_size)
        else:  # imagefolder (_data_dir refused any other kind)
            listing, views = _list_imagefolder(d, issues, seed), fgvc_views(img_size)
        data = _build_task(d.name, listing, views, img_size, mean, std, augment)
    return data.to(device) if cfg.resident else data


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
        mean=_triple(mean, "mean"),
        std=_triple(std, "std"),
        augment=False,
        classes=[f"bar_{c * step:.0f}deg" for c in range(num_classes)],
    )


# --------------------------------------------------------------------------------------------
# check_dataset
# --------------------------------------------------------------------------------------------


@dataclass
class DataReport:
    """Outcome of :func:`check_dataset`; ``warnings`` are hints that do not make the set invalid."""

    path: str
    kind: str
    classes: int
    counts: dict[str, int]
    broken: list[str]
    problems: list[str]
    warnings: list[str] = field(default_factory=list)
    tasks: dict[str, int] = field(default_factory=dict)  # task -> classes when ``path`` holds several tasks

    @property
    def ok(self) -> bool:
        return not self.problems and not self.broken

    def render(self, limit: int = 20):
        """A rich Table for ``pfnas data check``."""
        from rich.table import Table

        status = "[green]OK[/green]" if self.ok else "[red]FAILED[/red]"
        table = Table(title=f"{self.path} ({self.kind}) {status}", show_header=True)
        table.add_column("item")
        table.add_column("value", overflow="fold")
        if self.tasks:
            for t, c in self.tasks.items():
                table.add_row(f"{t} classes", str(c))
        else:
            table.add_row("classes", str(self.classes))
        for k, v in self.counts.items():
            table.add_row(k, str(v))
        for label, items, style in (
            ("problem", self.problems, "red"),
            ("broken", self.broken, "red"),
            ("warning", self.warnings, "yellow"),
        ):
            for msg in items[:limit]:
                table.add_row(f"[{style}]{label}[/{style}]", msg)
            if len(items) > limit:
                table.add_row(f"[{style}]{label}[/{style}]", f"... {len(items) - limit} more")
        return table


def _detect_task(d: Path) -> str | None:
    if any((d / f).is_file() for f in VTAB_SPLIT_FILES.values()):
        return "vtab"
    if any((d / f).is_file() for f in FGVC_SPLIT_FILES.values()):
        return "fgvc"
    if any((d / s).is_dir() for s in ("train", "val", "test")):
        return "imagefolder"
    try:
        subs = [p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if subs and any(_is_image(f) for s in subs for f in s.iterdir()):
            return "imagefolder"
    except OSError:
        return None
    return None


def _verify_one(path: Path) -> str | None:
    try:
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, still reads every byte
            im.load()
        return None
    except Exception as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__


def _verify(paths: Iterable[Path]) -> dict[Path, str]:
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=_workers()) as ex:
        errors = list(ex.map(_verify_one, paths, chunksize=32))
    return {p: e for p, e in zip(paths, errors) if e is not None}


def _check_one(kind: str, d: Path, issues: _Issues, seed: int = 0) -> _Listing:
    if kind == "vtab":
        listing = _list_vtab(d, issues)
    elif kind == "fgvc":
        listing = _list_fgvc(d, issues)
    else:
        listing = _list_imagefolder(d, issues, seed, require_splits=kind == "hta")
    existing = {p for entries in listing.splits.values() for p, _ in entries if p.is_file()}
    for p, err in sorted(_verify(existing).items()):
        issues.broken_file(f"{p}: unreadable ({err})")
    return listing


def _single_report(kind: str, d: Path, issues: _Issues) -> DataReport:
    listing = _check_one(kind, d, issues)
    counts = {s: len(listing.splits[s]) for s in SPLITS if s in listing.splits}
    return DataReport(str(d), kind, listing.num_classes, counts, issues.broken, issues.problems, issues.warnings)


def check_dataset(path: str | Path, kind: str | None = None, task: str | None = None) -> DataReport:
    """Validate a data set folder without raising; only a missing ``path`` raises :class:`DataError`.

    ``path`` may be one task folder or a root of several tasks (each is checked). ``kind=None``
    auto-detects VTAB txt splits, FGVC json splits, ImageFolder class folders and HTA roots.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data path not found: {root}")
    try:
        return _check(root, kind, task)
    except (DataError, OSError) as e:
        return DataReport(str(root), kind or "unknown", 0, {}, [], [str(e)])


def _check(root: Path, kind: str | None, task: str | None) -> DataReport:
    if kind is not None and kind not in KINDS:
        return DataReport(str(root), str(kind), 0, {}, [], [f"unknown kind {kind!r}; choose from {list(KINDS)}"])
    if kind == "synthetic":
        return DataReport(str(root), kind, 0, {}, [], ["kind 'synthetic' is generated in memory; nothing to check"])
    if not root.is_dir():
        return DataReport(str(root), kind or "unknown", 0, {}, [], [f"{root} is not a directory"])
    base = root
    if task:
        base = root / task
        if not base.is_dir():
            msg = f"task directory not found: {base} (available: {', '.join(_subdirs(root)[:20])})"
            return DataReport(str(base), kind or "unknown", 0, {}, [], [msg])
    here = _detect_task(base)
    if kind is None:
        single = here
    elif kind == "hta":
        single = "hta" if (base / "train").is_dir() else None
    elif kind == "imagefolder":
        single = "imagefolder"
    else:
        single = kind if here == kind else None
    issues = _Issues(strict=False)
    if single is not None:
        return _single_report(single, base, issues)
    # A root of several tasks: detect each sub folder.
    task_kinds: dict[str, str] = {}
    for name in _subdirs(base):
        k = _detect_task(base / name)
        if k == "imagefolder" and (base / name / "train").is_dir():
            k = "hta"
        if k is not None and (kind is None or k == kind):
            task_kinds[name] = k
    if not task_kinds and kind is not None:
        return _single_report(kind, base, issues)  # reports the missing split files
    if not task_kinds:
        return DataReport(
            str(base), "unknown", 0, {}, [],
            [f"no data set found in {base} (expected VTAB txt splits, FGVC json splits or class folders)"],
        )
    kinds_found = sorted(set(task_kinds.values()))
    if len(kinds_found) > 1:
        issues.warn(f"mixed layouts under {base}: {kinds_found}")
    counts: dict[str, int] = {}
    tasks: dict[str, int] = {}
    for name, k in task_kinds.items():
        listing = _check_one(k, base / name, issues)
        tasks[name] = listing.num_classes
        counts.update({f"{name}/{s}": len(listing.splits[s]) for s in SPLITS if s in listing.splits})
    return DataReport(
        str(base), "+".join(kinds_found), 0, counts, issues.broken, issues.problems, issues.warnings, tasks
    )
