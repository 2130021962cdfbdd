"""Image classification data held as decoded uint8 tensors.

Readers for the VTAB-1k, FGVC (VPT json), HTA (DAM-VP ImageFolder sets) and generic ImageFolder
layouts, plus a procedural synthetic task that needs no files. Every image is decoded once (in a
thread pool), resized as the VPT recipe prescribes and stored as ``uint8``; :meth:`TaskData.batches`
crops, flips and normalises whole batches on the tensors' device, so no loader process is needed.

Modules: ``task`` (TaskData, batches, the synthetic task), ``formats`` (layout readers and their
checks), ``decode`` (decoding and the VPT resize views), ``check`` (``check_dataset``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from pfnas.config import DataConfig, DataError
from pfnas.data.check import DataReport, check_dataset
from pfnas.data.decode import (
    View,
    build_task,
    decode_images,
    eval_view,
    fgvc_views,
    render_image,
    vtab_views,
)
from pfnas.data.formats import (
    FGVC_CLASSES,
    FGVC_SPLIT_FILES,
    HTA_TASKS,
    IMAGE_EXTS,
    KINDS,
    VTAB_SPLIT_FILES,
    VTAB_TASKS,
    data_dir,
    Issues,
    check_data_paths,
    fgvc_num_classes,
    list_task,
)
from pfnas.data.task import SPLITS, TRAIN_SPLITS, Split, TaskData, synthetic_task

__all__ = [
    "SPLITS", "TRAIN_SPLITS", "KINDS", "VTAB_SPLIT_FILES", "FGVC_SPLIT_FILES", "IMAGE_EXTS", "VTAB_TASKS",
    "FGVC_CLASSES", "HTA_TASKS", "Split", "TaskData", "View", "DataReport", "DataError", "load_task",
    "check_data_paths", "check_dataset", "synthetic_task", "decode_images", "render_image", "eval_view",
    "fgvc_views", "vtab_views", "fgvc_num_classes",
]


def load_task(
    cfg: DataConfig,
    *,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: str | torch.device = "cpu",
) -> TaskData:
    """Read (or generate) the task described by ``cfg``; decoded tensors go to ``device`` when ``cfg.resident``.

    The splits pfnas draws itself (and the synthetic images) come from ``cfg.split_seed``, never from a training
    seed: runs that differ in their seed only train, validate and test on the same images.
    """
    if int(img_size) < 1:
        raise DataError(f"img_size must be >= 1, got {img_size}")
    img_size = int(img_size)
    kind = cfg.kind
    augment = cfg.augment if cfg.augment is not None else kind in ("fgvc", "hta", "imagefolder")
    if kind == "synthetic":
        data = synthetic_task(cfg.synthetic_classes, cfg.synthetic_per_class, img_size, cfg.split_seed, mean, std)
        data.augment = augment
    else:
        d = data_dir(cfg)
        listing = list_task(kind, d, Issues(strict=True), cfg.split_seed)  # data_dir refused kinds without a reader
        views = (vtab_views if kind == "vtab" else fgvc_views)(img_size)
        data = build_task(d.name, listing, views, img_size, mean, std, augment)
    return data.to(device) if cfg.resident else data
