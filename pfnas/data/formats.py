"""On-disk layouts: VTAB-1k txt splits, FGVC json splits, HTA and generic ImageFolder class folders.

Each reader turns a task folder into a :class:`Listing` (image paths and labels per split) and reports
what is wrong through :class:`Issues`, which raises at the first problem when a task is loaded and
collects every problem for ``pfnas data check``. No image is decoded here.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from pfnas.config import DataConfig, DataError
from pfnas.data.task import SPLITS

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
# Error collection shared by the loaders (strict) and check_dataset (lenient)
# --------------------------------------------------------------------------------------------


class Issues:
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
class Listing:
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



def _check_exists(listing: dict[str, list[tuple[Path, int]]], source: dict[str, str], issues: Issues) -> None:
    seen: set[Path] = set()
    for split, entries in listing.items():
        for p, _ in entries:
            if p in seen:
                continue
            seen.add(p)
            if not p.is_file():
                issues.broken_file(f"image listed in {source.get(split, split)} but missing: {p}")



# split pairs that must not share an image, and what sharing one would make wrong
_DISJOINT = (("train", "val", "every choice made on val would score images the model trains on"),
             ("train", "test", "the test score would count images the model trained on"),
             ("val", "test", "the test score would count images the finals train on and val selects with"),
             ("trainval", "test", "the test score would count images the finals train on"))


def _check_disjoint(listing: dict[str, list[tuple[Path, int]]], source: dict[str, str], issues: Issues) -> None:
    """Train, val and test name distinct files (``./a.png``, ``a.png`` and a link to it are one file); a shared one
    is a problem."""
    files = {s: {os.path.realpath(p) for p, _ in entries} for s, entries in listing.items()}
    reported: set[str] = set()
    for a, b, why in _DISJOINT:
        if a not in files or b not in files or (a == "trainval" and reported & {"train", "val"}):
            continue
        shared = sorted(files[a] & files[b])
        if shared:
            reported.add(a)
            n = len(shared)
            issues.problem(f"{source.get(a, a)} and {source.get(b, b)} share {n} image{'s' if n > 1 else ''} "
                           f"(e.g. {shared[0]}): {why}")


def _num_classes(splits: dict[str, list[tuple[Path, int]]]) -> int:
    labels = [lab for entries in splits.values() for _, lab in entries]
    return max(labels) + 1 if labels else 0



def _check_labels(where: object, splits: dict[str, list[tuple[Path, int]]], num_classes: int, issues: Issues,
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


def _list_vtab(task_dir: Path, issues: Issues) -> Listing:
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
    source = {k: str(task_dir / v) for k, v in VTAB_SPLIT_FILES.items()}
    _check_disjoint(splits, source, issues)
    _check_exists(splits, source, issues)
    return Listing(splits, num_classes)



def _fgvc_image_root(task_dir: Path, keys: Sequence[str]) -> Path:
    candidates = [task_dir / "images", task_dir / "Images", task_dir]
    for key in keys[:8]:
        for c in candidates:
            if (c / key).is_file():
                return c
    return next((c for c in candidates if c.is_dir() and c != task_dir), task_dir)



def _list_fgvc(task_dir: Path, issues: Issues) -> Listing:
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
    source = {k: str(task_dir / v) for k, v in FGVC_SPLIT_FILES.items()}
    _check_disjoint(splits, source, issues)
    _check_exists(splits, source, issues)
    return Listing(splits, len(values))



def is_image(p: Path) -> bool:
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
            files.extend(Path(cur) / n for n in sorted(names) if is_image(Path(n)))
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



def _list_imagefolder(root: Path, issues: Issues, seed: int, require_splits: bool = False) -> Listing:
    split_dirs = {s: root / s for s in ("train", "val", "test")}
    if require_splits or any(d.is_dir() for d in split_dirs.values()):
        for s in ("train", "test"):
            if not split_dirs[s].is_dir():
                issues.problem(f"missing split folder {split_dirs[s]}")
        if not split_dirs["train"].is_dir():
            return Listing({}, 0, [])
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
    _check_disjoint(splits, {s: str(split_dirs[s]) for s in ("train", "val", "test") if split_dirs[s].is_dir()}, issues)
    return Listing({s: splits[s] for s in SPLITS if s in splits}, len(classes), classes)


def list_task(kind: str, task_dir: Path, issues: Issues, seed: int = 0) -> Listing:
    """The reader of ``kind`` (vtab, fgvc, hta or imagefolder) on one task folder; ``seed`` draws an
    ImageFolder's missing splits."""
    if kind == "vtab":
        return _list_vtab(task_dir, issues)
    if kind == "fgvc":
        return _list_fgvc(task_dir, issues)
    return _list_imagefolder(task_dir, issues, seed, require_splits=kind == "hta")


# --------------------------------------------------------------------------------------------
# Where a task's files are
# --------------------------------------------------------------------------------------------


def subdirs(root: Path) -> list[str]:
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:
        raise DataError(f"cannot list {root}: {e.strerror or e}") from None



def _task_dir(root: Path, task: str | None, kind: str) -> Path:
    if not task:
        raise DataError(f"data.task is required for data.kind={kind!r} (tasks under {root}: {subdirs(root)})")
    d = root / task
    if not d.is_dir():
        avail = subdirs(root)
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



def data_dir(cfg: DataConfig) -> Path:
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
        data_dir(cfg)
