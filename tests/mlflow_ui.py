"""The MLflow UI as a user sees it: headless Chromium (the Debian ``chromium`` package) on a local ``mlflow server``.

Used by ``tests/test_mlflow_ui.py`` (slow) and, as a script, to refresh the docs' screenshots from a store that
holds a pfnas study::

    PYTHONPATH=. python tests/mlflow_ui.py --store sqlite:////abs/mlflow.db --experiment demo --shots docs/img
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def chromium() -> str | None:
    """The Chromium binary, or None when it is not installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(store: str, port: int, folder: Path, log: Path, artifacts: str | None = None,
                        timeout: float = 120) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:``port`` over the backend ``store``, in a process group of its own (cwd
    ``folder``, output appended to ``log``), returned once /health answers. RuntimeError with the log's tail when it
    exits or does not answer within ``timeout`` seconds (it is stopped first). Also conftest's ``MlflowServer``."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    if artifacts:
        cmd += ["--artifacts-destination", artifacts]
    proc = subprocess.Popen(cmd, cwd=folder, stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, start_new_session=True)
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            stop_server(proc)
            raise RuntimeError(f"mlflow server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.3)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (the server and its uvicorn worker), SIGKILL after 20 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


class UiServer:
    """``mlflow server`` on 127.0.0.1 over an existing backend store (stopped with its whole process group)."""

    def __init__(self, store: str, folder: Path, artifacts: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "ui-server.log"
        self.proc = start_mlflow_server(store, self.port, folder, self.log, artifacts)

    def stop(self) -> None:
        stop_server(self.proc)


def _browser(args: list[str], url: str, budget_ms: int, timeout_s: float) -> subprocess.CompletedProcess:
    exe = chromium()
    if exe is None:
        raise RuntimeError("chromium is not installed (apt-get install chromium)")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--virtual-time-budget={budget_ms}", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)


def dump_dom(url: str, size: str = "1600,1000", budget_ms: int = 20000, timeout_s: float = 180) -> str:
    """The page's DOM after its scripts ran (``--dump-dom``); the runs table renders only the columns that fit
    the window."""
    return _browser(["--dump-dom", f"--window-size={size}"], url, budget_ms, timeout_s).stdout


def screenshot(url: str, path: Path, size: str = "1600,1000", budget_ms: int = 20000, timeout_s: float = 180) -> Path:
    """A PNG of the rendered page."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _browser([f"--screenshot={path}", f"--window-size={size}"], url, budget_ms, timeout_s)
    if not path.is_file():
        raise RuntimeError(f"chromium wrote no screenshot for {url}")
    return path


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, help="backend store URI of the study (sqlite:////abs/mlflow.db)")
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--shots", type=Path, default=Path("docs/img"))
    a = ap.parse_args()
    from mlflow import MlflowClient

    from pfnas.tracking import runs_table_url

    client = MlflowClient(a.store)
    exp = client.get_experiment_by_name(a.experiment)
    parent = client.search_runs([exp.experiment_id], filter_string="tags.`pfnas.kind` = 'study'", max_results=1)[0]
    folder = Path(os.environ.get("TMPDIR", "/tmp"))
    srv = UiServer(a.store, folder)
    try:
        runs = screenshot(runs_table_url(srv.url, exp.experiment_id), a.shots / "mlflow-runs.png")
        par = screenshot(run_url(srv.url, exp.experiment_id, parent.info.run_id), a.shots / "mlflow-parent-run.png",
                         size="1600,1400")
    finally:
        srv.stop()
    print(runs, par)
    return 0


if __name__ == "__main__":
    sys.exit(main())
