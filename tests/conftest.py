"""Shared fixtures: tiny timm ViT configs, the optional ../shared resources, one Ray session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PROXY_BACKBONE = SHARED / "backbones" / "vit_tiny_p4_32_c10.safetensors"
VTAB_PROXY = SHARED / "data" / "vtab-proxy"

TINY_BACKBONE = {"name": "vit_tiny_patch16_224", "pretrained": False,
                 "kwargs": {"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}}


def tiny_config(**sections):
    """A seconds-fast ExperimentConfig: 2-block 32-dim ViT on 16px synthetic data."""
    from pfnas.config import ExperimentConfig

    raw = {"backbone": TINY_BACKBONE,
           "data": {"kind": "synthetic", "batch_size": 16, "synthetic_classes": 3, "synthetic_per_class": 16},
           "prompts": {"length": 4, "dropout": 0.0, "fusion_dim": 4},
           "search": {"epochs": 2, "optim": {"lr": 1.0, "warmup_epochs": 0}},
           "train": {"epochs": 2, "optim": {"lr": 1.0, "warmup_epochs": 0}}}
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return ExperimentConfig.model_validate(raw)


@pytest.fixture
def shared_proxy():
    if not (PROXY_BACKBONE.is_file() and VTAB_PROXY.is_dir()):
        pytest.skip("../shared proxy backbone / vtab-proxy not present")
    return PROXY_BACKBONE, VTAB_PROXY


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray runtime for the whole test session (2 CPUs, no dashboard)."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()
