"""Shared fixtures: tiny timm ViT configs, the optional ../shared resources, one Ray session."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow_ui
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
           "train": {"epochs": 2, "optim": {"lr": 1.0, "warmup_epochs": 0},
                     "collapse_check": False}}  # a 2-epoch random 32-dim ViT often predicts one class: not a bug
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


SLOW_FIXTURES = {"ray_session", "cli_study"}  # a Ray study: every test that uses it (directly or through a fixture) is slow


def pytest_collection_modifyitems(config, items):
    """Studies are slow: a test that needs the Ray session gets the ``slow`` mark, so ``-m "not slow"`` is the fast
    loop (docs/architecture.md); the others that take seconds (subprocesses, servers) carry it explicitly."""
    grouped = config.pluginmanager.hasplugin("xdist")
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if SLOW_FIXTURES & names:
            item.add_marker(pytest.mark.slow)
        if grouped and "cli_study" in names:  # -n 2: the session's CLI study runs once, on one worker
            item.add_marker(pytest.mark.xdist_group("cli_study"))


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


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """``pfnas ARGS`` in this process (``pfnas.cli.main``): its exit code and its stderr."""
    from pfnas import cli

    capsys.readouterr()
    rc = cli.main(list(args))
    return rc, capsys.readouterr().err


def pfnas_process(*args: str, timeout: float = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``python -m pfnas ARGS`` as a user runs it (a subprocess, no MLFLOW_TRACKING_URI): the real exit code and
    stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "pfnas", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def tiny_yaml(tmp_path: Path) -> Path:
    """The conftest tiny config as a file for the CLI (1 search + 2 retrain epochs: seconds)."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(search={"epochs": 1}).model_dump(mode="json")))
    return path


free_port = mlflow_ui.free_port  # a free local TCP port (one definition, for the tests)


class MlflowServer:
    """A real ``mlflow server`` on a fixed port and sqlite file; stop() and start() again to restart it (started and
    stopped as tests/mlflow_ui.py does)."""

    def __init__(self, folder: Path, port: int):
        self.folder, self.port, self.proc = folder, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        try:
            self.proc = mlflow_ui.start_mlflow_server(f"sqlite:///{self.folder}/srv.db", self.port, self.folder,
                                                      self.folder / "server.log",
                                                      artifacts=str(self.folder / "artifacts"))
        except RuntimeError as e:
            raise AssertionError(str(e)) from None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        mlflow_ui.stop_server(self.proc)  # its own session: the server and its uvicorn worker
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


def blank_image_folder(root: Path, classes: int = 3, per_class: int = 20) -> Path:
    """A flat ImageFolder whose images are all one grey: labels with no signal, so every model predicts one class."""
    for c in range(classes):
        for i in range(per_class):
            png(root / f"class_{c}" / f"{i}.png", (128, 128, 128))
    return root


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


@pytest.fixture(scope="session")
def cli_study(tmp_path_factory):
    """`python -m pfnas tune` on :func:`write_space`'s 4-trial tiny space (2 concurrent) with one final, MLflow and
    Optuna in sqlite, as a user runs it: its provenance (test_provenance) and its configs against the same space
    run in-process (test_tune)."""
    d = tmp_path_factory.mktemp("prov")
    space = write_space(d, "prov", final={"seeds": 1})
    uri = f"sqlite:///{d}/mlflow.db"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "COLUMNS": "80", "RAY_AUTH_MODE": "disabled"}
    for key in ("MLFLOW_TRACKING_URI", "RAY_AIR_NEW_OUTPUT", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "RAY_DEDUP_LOGS"):
        env.pop(key, None)  # as a user runs it (conftest sets these for the in-process studies)
    r = subprocess.run([sys.executable, "-m", "pfnas", "tune", "--space", str(space), "--storage", str(d / "ray"),
                        "--tracking-uri", uri], cwd=d, env=env, capture_output=True, text=True, timeout=600,
                       check=False)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return SimpleNamespace(dir=d, uri=uri, out=r.stdout + r.stderr)


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


def write_one_trial_space(folder: Path, name: str, **fields) -> Path:
    """A one-trial space over the conftest tiny config, its lr the only parameter (no finals unless asked)."""
    return write_space(folder, name, **{"params": {"train.optim.lr": {"type": "loguniform", "low": 0.1, "high": 10.0}},
                                        "num_samples": 1, "max_concurrent_trials": 1, "seed": 3, "startup_trials": 1,
                                        **fields})


# spaces that select on the test split, and metrics that cannot select the best trial (with the refusal's words)
TEST_READING_SPACES = [("metric", "test_acc"), ("metric", "retrain/test_acc"),
                       ("scheduler", {"type": "asha", "metric": "test_loss"})]
UNSELECTABLE_METRICS = [
    ({"metric": "val_acc", "mode": "min"}, "metric 'val_acc' with mode 'min' selects the worst trial"),
    ({"metric": "val_loss"}, "metric 'val_loss' with mode 'max' selects the worst trial"),  # mode defaults to max
    ({"metric": ["val_acc", "tuned_params"], "mode": ["max", "max"]}, "metric 'tuned_params' with mode 'max'"),
    ({"metric": "retrain/val_loss", "mode": "max"}, "metric 'retrain/val_loss' with mode 'max'"),
    ({"scheduler": {"type": "asha", "metric": "val_acc", "mode": "min"}}, "scheduler.metric 'val_acc' with mode 'min'"),
    ({"metric": "val_accuracy"}, "metric 'val_accuracy' is not reported by a trial"),
]


def one_param_space(fields: dict) -> dict:
    """A space (as its YAML's dict) with one parameter and ``fields``."""
    return {"name": "s", "params": {"search.arch_lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}}, **fields}


# ----------------------------------------------------------------------------- checkpoints and run files
class Payload:
    """Unpickling this creates the folder ``marker``: code that ran from a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def sidecar(path: Path) -> Path:
    """The ``.sha256`` file pfnas writes beside a checkpoint."""
    return path.with_name(path.name + ".sha256")


def disk_with(free: int, monkeypatch) -> None:
    """``os.write`` as on a disk with ``free`` bytes left: what fits is written, then ENOSPC (as the kernel does)."""
    real = os.write
    left = [free]

    def write(fd, data):
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real(fd, bytes(data)[: left[0]])
        left[0] -= n
        return n

    monkeypatch.setattr(os, "write", write)


def checkpoint_32px(path: Path) -> Path:
    """A tiny timm ViT (32 px, patch 4) saved as safetensors, the layout of the shared proxy backbone."""
    import timm
    from safetensors.torch import save_file

    kw = {**TINY_BACKBONE["kwargs"], "img_size": 32}
    model = timm.create_model(TINY_BACKBONE["name"], num_classes=10, **kw)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


# ----------------------------------------------------------------------------- exported models
@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    """One exported 2-layer model (policy add, affine) and one 40 px image, shared by the crafted-file tests."""
    from pfnas.methods import run_method

    root = tmp_path_factory.mktemp("export")
    cfg = tiny_config(method={"kind": "fixed", "policy": ["add", "affine"]}, train={"epochs": 1})
    run_method(cfg, root / "run")
    Image.new("RGB", (40, 40), (200, 10, 10)).save(root / "img.png")
    return root


def crafted_model(root: Path, tmp_path: Path, edit) -> Path:
    """A copy of the export under ``root`` (:func:`tiny_export`) whose pfnas_model.json ``edit`` changed in place."""
    from pfnas.export import META_FILE

    folder = tmp_path / "model"
    shutil.copytree(root / "run" / "retrain", folder)
    meta = json.loads((folder / META_FILE).read_text())
    edit(meta)
    (folder / META_FILE).write_text(json.dumps(meta))
    return folder


def _set(section: str | None, key: str, value):
    def edit(meta):
        (meta[section] if section else meta)[key] = value
    return edit


CRAFTED = {  # the reviewer's pfnas_model.json files (edit, what the error names): tracebacks, or gigabytes allocated
    "policy key x": (lambda m: m["policy"].update({"x": m["policy"].pop("1")}), "layer number"),
    "policy op unknown": (lambda m: m["policy"].update({"0": "conv"}), "policy.0"),
    "policy one layer short": (lambda m: m["policy"].pop("1"), "2 blocks"),
    "prompt length -1": (_set("prompts", "length", -1), "prompts.length"),
    "prompt length huge": (_set("prompts", "length", 10**9), "prompts.length"),
    "num_classes four": (_set(None, "num_classes", "four"), "num_classes"),
    "num_classes 1e9": (_set(None, "num_classes", 10**9), "num_classes"),
    "num_classes float": (_set(None, "num_classes", 3.0), "num_classes"),
    "mean one value": (_set("preprocessing", "mean", [0.5]), "preprocessing.mean: List should have at least 3"),
    "std zero": (_set("preprocessing", "std", [0.5, 0.0, 0.5]), "preprocessing.std"),
    "mean NaN": (_set("preprocessing", "mean", [0.5, float("nan"), 0.5]), "preprocessing.mean"),
    "crop_size 100000": (_set("preprocessing", "crop_size", 100000), "preprocessing.crop_size"),
    "resize_size 30000": (_set("preprocessing", "resize_size", 30000), "preprocessing.resize_size"),
    "crop above resize": (_set("preprocessing", "crop_size", 20), "crop_size"),
    "crop not the backbone's": (lambda m: m["preprocessing"].update(crop_size=12, image_size=12), "16"),
    "backbone img_size 100000": (lambda m: m["backbone"]["kwargs"].update(img_size=100000), "patches"),
    "backbone depth x": (lambda m: m["backbone"]["kwargs"].update(depth="x"), "cannot build"),
    "weights other file": (_set("weights", "file", "../../etc/passwd"), "weights.file"),
    "extra field": (_set(None, "surprise", 1), "surprise"),
    "prompt ops repeated": (_set("prompts", "ops", ["add", "add", "affine", "cross_attn"]), "prompts.ops"),  # hypothesis
    "classes too few": (_set(None, "classes", ["a"]), "classes: 1 class names"),
    "head size differs": (lambda m: m.update(num_classes=5, classes=None), "does not fit"),
}


def fill_disk(monkeypatch):
    """Every later ``os.write`` does what a full disk does: part of the bytes, then ENOSPC. Returns the real
    ``os.write`` (to free the disk again)."""
    real = os.write

    def disk_full(fd, data):
        if len(data) > 16:
            real(fd, bytes(data)[:16])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", disk_full)
    return real
