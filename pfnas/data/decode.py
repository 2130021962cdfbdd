"""Decoding: every image is read once (in a thread pool), resized as the VPT recipe prescribes, stored uint8."""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from pfnas.config import DataError
from pfnas.data.formats import Listing
from pfnas.data.task import SPLITS, Split, TaskData, as_triple


@dataclass(frozen=True)
class View:
    """How a decoded image is turned into a stored square: resize then centre crop ``crop``."""

    resize: int
    crop: int
    square: bool  # True: resize to (resize, resize); False: shorter side to ``resize`` (aspect kept)



# 16-bit and 32-bit grey modes: ``convert("RGB")`` clips them at 255 (a 16-bit grey of 30000 becomes white)
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_MAX_16BIT = 65535.0


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL image. 16-bit and 32-bit integer grey (``I;16*``, ``I``: how Pillow decodes 16-bit
    PNG and TIFF) is scaled from 0..65535 to 0..255; float grey (``F``) from 0..1, or from 0..65535 when an
    image holds values above 1. Values outside the range are clipped."""
    if img.mode == "RGB":
        return img
    if img.mode not in _WIDE_MODES:
        return img.convert("RGB")
    a = np.asarray(img, dtype=np.float64)
    top = 1.0 if img.mode == "F" and a.size and float(np.nanmax(a)) <= 1.0 else _MAX_16BIT
    grey = np.rint(np.clip(np.nan_to_num(a) * (255.0 / top), 0, 255)).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def _resized(img: Image.Image, view: View) -> Image.Image:
    w, h = img.size
    if view.square:
        size = (view.resize, view.resize)
    elif w <= h:
        size = (view.resize, int(view.resize * h / w))
    else:
        size = (int(view.resize * w / h), view.resize)
    return img if img.size == size else img.resize(size, Image.BICUBIC)



def _render(img: Image.Image, view: View) -> np.ndarray:
    w, h = img.size
    c = view.crop
    if (w, h) != (c, c):
        left, top = int(round((w - c) / 2.0)), int(round((h - c) / 2.0))
        img = img.crop((left, top, left + c, top + c))
    return np.array(img, dtype=np.uint8)



def decode_workers() -> int:
    """Decode threads: one per usable core (PIL releases the GIL while decoding and resizing)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(32, cores))



def _decode_one(path: Path, targets: list[tuple[View, np.ndarray]]) -> None:
    try:
        with Image.open(path) as im:
            im.load()
            img = _to_rgb(im)
            cache: dict[tuple[int, bool], Image.Image] = {}
            for view, slot in targets:
                key = (view.resize, view.square)
                if key not in cache:
                    cache[key] = _resized(img, view)
                slot[...] = _render(cache[key], view)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"unreadable image {path}: {msg}") from None



def _decode_chunk(jobs: list[tuple[Path, list[tuple[View, np.ndarray]]]]) -> None:
    for path, targets in jobs:
        _decode_one(path, targets)



def _decode_splits(
    items: dict[str, list[Path]], views: dict[str, View], workers: int | None = None
) -> dict[str, torch.Tensor]:
    """Decode every (path, view) pair once into uint8 ``[N, 3, S, S]`` tensors; repeats are copied."""
    buf = {s: np.empty((len(paths), views[s].crop, views[s].crop, 3), dtype=np.uint8) for s, paths in items.items()}
    first: dict[tuple[Path, View], tuple[str, int]] = {}
    jobs: dict[Path, list[tuple[View, np.ndarray]]] = {}
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
    n_workers = workers or decode_workers()
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



def build_task(
    name: str,
    listing: Listing,
    views: dict[str, View],
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
        mean=as_triple(mean, "mean"),
        std=as_triple(std, "std"),
        augment=augment,
        classes=listing.classes,
    )



def fgvc_views(img_size: int) -> dict[str, View]:
    """VPT FGVC preprocessing: train stored at ``round(S*256/224)`` for random crops, eval centre-cropped."""
    big = int(round(img_size * 256 / 224))
    train = View(big, big, square=False)
    test = View(big, img_size, square=False)
    return {"train": train, "trainval": train, "val": test, "test": test}



def vtab_views(img_size: int) -> dict[str, View]:
    """VPT VTAB preprocessing: every split resized straight to ``(S, S)``."""
    v = View(img_size, img_size, square=True)
    return {s: v for s in SPLITS}



def eval_view(kind: str, img_size: int) -> View:
    """How ``kind``'s evaluation splits are decoded (vtab and synthetic: square resize; others: FGVC's)."""
    return (vtab_views if kind in ("vtab", "synthetic") else fgvc_views)(img_size)["test"]



def decode_images(paths: Sequence[str | Path], view: View, workers: int | None = None) -> torch.Tensor:
    """Decode image files into uint8 ``[N, 3, crop, crop]`` exactly as a split stored with ``view``."""
    return _decode_splits({"images": [Path(p) for p in paths]}, {"images": view}, workers)["images"]



def render_image(img: Image.Image, view: View) -> torch.Tensor:
    """One decoded PIL image -> uint8 ``[3, crop, crop]``, the same resize and crop as :func:`decode_images`."""
    img = _to_rgb(img)
    return torch.from_numpy(_render(_resized(img, view), view)).permute(2, 0, 1).contiguous()
