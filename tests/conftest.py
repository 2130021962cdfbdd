"""Shared fixtures: tiny timm ViT configs, the optional ../shared resources, one Ray session."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
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
# A backbone whose forward overflows (LayerScale 1e30): every loss is non-finite from the first step. Learning
# rates are bounded (config.MAX_LR), so an absurd lr no longer makes a run diverge.
OVERFLOW = 1.0e30
DIVERGING_BACKBONE = {**TINY_BACKBONE, "kwargs": {**TINY_BACKBONE["kwargs"], "init_values": OVERFLOW}}


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


def one_error_line(stderr: str, *fragments: str) -> str:
    """The single ``pfnas: error:`` line of ``stderr`` (asserted), containing every fragment."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("pfnas: error: "), stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` on a fixed port and sqlite file; stop() and start() again to restart it."""

    def __init__(self, folder: Path, port: int):
        self.folder, self.port, self.proc = folder, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        log = open(self.folder / "server.log", "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.folder}/srv.db",
             "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", "1"], cwd=self.folder, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, start_new_session=True)
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert self.proc.poll() is None and time.time() < deadline, (self.folder / "server.log").read_text()[-2000:]
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and its uvicorn worker
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        deadline = time.time() + 20
        while time.time() < deadline:  # the port is free again (a worker may outlive its parent briefly)
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.2)
