"""Provenance of an MLflow run: what ran it, from which code, on which data and backbone.

Only :mod:`pfnas.tracking` and :mod:`pfnas.tune` use this module; it imports MLflow lazily (in
:func:`dataset_input`) and never torch at import time, so the engine stays free of MLflow and the CLI starts fast.

Tags written on every pfnas run (``provenance_tags``):

* ``mlflow.source.name``        ``pfnas <verb>`` (``pfnas run``, ``pfnas tune``, ``pfnas baseline fixed``...)
* ``mlflow.source.type``        ``LOCAL`` (a command on this machine, a study's parent run) or ``JOB`` (a Ray Tune
                                trial or final)
* ``mlflow.source.git.commit``  ``git rev-parse HEAD`` of the checkout holding the pfnas package (else the cwd);
                                absent outside a git checkout
* ``mlflow.user``               the OS user (the UI's "Created by" / "User")
* ``pfnas.version``, ``pfnas.torch``, ``pfnas.timm``   package versions
* ``pfnas.cpu``, ``pfnas.threads``   the CPU model and torch's intra-op threads in the process that ran it (where
                                torch is loaded). CPU float sums depend on both and a near-tied alpha can flip with
                                them (README, "Offline demo study"): a run repeats exactly only where both match
* ``pfnas.backbone``, ``pfnas.backbone.digest``        timm name; sha256 of the checkpoint file when there is one
* ``pfnas.dataset``             the task name (``data.task``, else ``data.kind``)

Once the data is decoded, :meth:`pfnas.tracking.RunLogger.log_dataset` adds ``pfnas.dataset.splits`` (JSON split
sizes), ``pfnas.dataset.digest`` and the MLflow dataset input (``mlflow.log_input``: name, digest, source
= ``data.root``, a profile with the split sizes and class count) from :func:`dataset_info`.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from .config import ExperimentConfig
from .sysinfo import cpu_model, file_sha256, git_commit, user, versions


def compute_tags() -> dict[str, str]:
    """``pfnas.cpu`` and, where torch is loaded (every run that computes), ``pfnas.threads``: its intra-op threads."""
    tags = {"pfnas.cpu": cpu_model()}
    torch = sys.modules.get("torch")  # never imported here: a study's parent run computes nothing
    if torch is not None:
        tags["pfnas.threads"] = str(torch.get_num_threads())
    return tags


def dataset_name(cfg: ExperimentConfig) -> str:
    return str(cfg.data.task or cfg.data.kind)


def backbone_tags(cfg: ExperimentConfig) -> dict[str, str]:
    """``pfnas.backbone`` (timm name) and, for a checkpoint file, ``pfnas.backbone.digest`` (its sha256)."""
    bb = cfg.backbone
    tags = {"pfnas.backbone": bb.name}
    if bb.checkpoint:
        path = Path(bb.checkpoint).expanduser()
        tags["pfnas.backbone.checkpoint"] = str(path.resolve())
        if path.is_file():
            tags["pfnas.backbone.digest"] = file_sha256(path)
    else:
        tags["pfnas.backbone.weights"] = "timm pretrained" if bb.pretrained else f"random init (seed {cfg.seed})"
    return tags


def provenance_tags(source: str, source_type: str = "LOCAL", cfg: ExperimentConfig | None = None) -> dict[str, str]:
    """The tags listed in the module docstring for a run started by ``source`` (``pfnas <verb>``)."""
    tags = {"mlflow.source.name": source, "mlflow.source.type": source_type, "mlflow.user": user(), **versions(),
            **compute_tags()}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if cfg is not None:
        tags["pfnas.dataset"] = dataset_name(cfg)
        tags.update(backbone_tags(cfg))
    return tags


def dataset_info(cfg: ExperimentConfig, data: Any) -> dict[str, Any]:
    """Name, source, split sizes, class count and digest of a decoded task (``pfnas.data.TaskData``).

    The digest hashes what defines the data (kind, root, task, image size, for synthetic and ImageFolder sets the
    ``data.split_seed`` that draws them, never the training seed) and every split's labels: cheap (no image bytes),
    and it changes when a split changes.
    """
    d = cfg.data
    ident = {"kind": d.kind, "root": str(Path(d.root).expanduser().resolve()) if d.root else None, "task": d.task,
             "img_size": int(data.img_size), "num_classes": int(data.num_classes)}
    if d.kind == "synthetic":
        ident.update(classes=d.synthetic_classes, per_class=d.synthetic_per_class, seed=d.split_seed)
    elif d.kind in ("imagefolder", "hta"):  # HTA draws its train/val split too
        ident["seed"] = d.split_seed
    h = hashlib.sha256(json.dumps(ident, sort_keys=True).encode())
    splits = {}
    for name in sorted(data.splits):
        labels = data.splits[name].labels
        splits[name] = int(labels.shape[0])
        h.update(f"|{name}|{splits[name]}|".encode())
        h.update(labels.detach().to("cpu").contiguous().numpy().astype("int64").tobytes())
    return {"name": dataset_name(cfg), "source": ident["root"] or d.kind, "kind": d.kind,
            "splits": splits, "num_classes": int(data.num_classes), "img_size": int(data.img_size),
            "digest": h.hexdigest()[:16]}


def dataset_tags(info: dict[str, Any]) -> dict[str, str]:
    return {"pfnas.dataset": info["name"], "pfnas.dataset.splits": json.dumps(info["splits"], sort_keys=True),
            "pfnas.dataset.digest": info["digest"]}


def dataset_input(info: dict[str, Any], context: str = "training"):
    """The MLflow ``DatasetInput`` of :func:`dataset_info` (metadata only: no rows, a profile with the sizes)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    profile = {"splits": info["splits"], "num_classes": info["num_classes"], "img_size": info["img_size"]}
    ds = Dataset(name=info["name"], digest=info["digest"], source_type="local",
                 source=json.dumps({"uri": info["source"]}), profile=json.dumps(profile))
    return DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])
