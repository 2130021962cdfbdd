"""Shared fixtures: tiny timm ViT configs, the optional ../shared resources, one Ray session."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from PIL import Image

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


@pytest.fixture(scope="module")
def exp():
    """An Experiment (backbone + decoded data) of the conftest tiny config, built once per test module."""
    from pfnas.engine import Experiment

    return Experiment.build(tiny_config())


@pytest.fixture(scope="module")
def backbone():
    """The tiny frozen timm ViT of :data:`TINY_BACKBONE`, seeded, built once per test module."""
    import torch

    from pfnas.config import BackboneConfig
    from pfnas.model import load_backbone

    torch.manual_seed(0)
    return load_backbone(BackboneConfig(**TINY_BACKBONE))


@pytest.fixture
def shared_proxy():
    if not (PROXY_BACKBONE.is_file() and VTAB_PROXY.is_dir()):
        pytest.skip("../shared proxy backbone / vtab-proxy not present")
    return PROXY_BACKBONE, VTAB_PROXY


SLOW_FIXTURES = {"ray_session"}  # a Ray study: every test that uses it (directly or through a fixture) is slow


def pytest_collection_modifyitems(config, items):
    """Studies are slow: a test that needs the Ray session gets the ``slow`` mark, so ``-m "not slow"`` is the fast
    loop (docs/architecture.md); the others that take seconds (subprocesses, servers) carry it explicitly."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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


# ----------------------------------------------------------------------------- data and space helpers
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
def png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def image_folder(root: Path, classes: int = 3, per_class: int = 10) -> None:
    for c in range(classes):
        for i in range(per_class):
            png(root / f"class_{c}" / f"{i}.png", (c * 50, i, 0))


def expect_data_error(cfg, *fragments: str) -> str:
    """The one-line DataError of loading ``cfg`` (a DataConfig), containing every fragment."""
    from pfnas import data as D
    from pfnas.errors import DataError

    with pytest.raises(DataError) as ei:
        D.load_task(cfg, img_size=8, mean=MEAN, std=STD)
    msg = str(ei.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg
    return msg


PARAMS = {
    "search.arch_lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1},
    "train.optim.lr": {"type": "loguniform", "low": 0.1, "high": 10.0},
    "prompts.length": {"type": "choice", "values": [2, 4, 8]},
}


def write_space(folder: Path, name: str = "study", **fields) -> Path:
    """A space over the conftest tiny config (2-block 32-dim ViT, 16 px synthetic data, 2+2 epochs)."""
    space = {"name": name, "base": tiny_config().model_dump(mode="json"), "params": PARAMS, "num_samples": 4,
             "max_concurrent_trials": 2, "seed": 7, "startup_trials": 2, "final": {"seeds": 0}}
    space.update(fields)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- studies
@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> str:
    """One sqlite tracking store for this module (creating a store costs seconds); tests use own experiments."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(p.name))
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process it started (its local Ray cluster included), by pid."""
    kids, todo, tree = _children(), [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += kids.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def tune_state(exp_dir: Path) -> dict[str, tuple[str, dict]]:
    files = sorted(exp_dir.glob("experiment_state-*.json"))
    try:
        data = json.loads(files[-1].read_text()) if files else {"trial_data": []}
    except json.JSONDecodeError:  # being replaced
        return {}
    out = {}
    for trial, meta in data["trial_data"]:
        trial, meta = json.loads(trial), json.loads(meta)
        out[trial["trial_id"]] = (trial["status"], meta.get("last_result") or {})
    return out
