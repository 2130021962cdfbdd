"""Never a stale result, never lost MLflow data: output folders that hold another config's run are refused,
one process per folder (a lock that dies with its holder), whole checkpoints only, and MLflow runs that survive a
server that is down or restarts. The CLI's one-line refusals (a folder of another config, a full disk, ``pfnas
compare`` against a down server) are in tests/test_cli_exit_codes.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import pytest
from conftest import REPO, MlflowServer, fill_disk, free_port, one_error_line, run_cli, tiny_config

from pfnas.config import PfnasError
from pfnas.tracking import RunLogger, make_client


# ----------------------------------------------------------------------------- stale output folders
def test_run_method_refuses_a_folder_of_another_seed(tmp_path):
    from pfnas.methods import run_method

    cfg = tiny_config(method={"kind": "probe"}, train={"epochs": 1})
    first = run_method(cfg, tmp_path)
    with pytest.raises(PfnasError, match=r"different configuration \(seed: 0 -> 1\)"):
        run_method(cfg.model_copy(update={"seed": 1}), tmp_path)
    assert run_method(cfg, tmp_path)["test_acc"] == first["test_acc"]  # same config: resumed


@pytest.mark.slow
def test_second_run_on_a_locked_folder_refused_and_kill_9_frees_it(tmp_path, tiny_yaml, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    args = ["run", "-c", str(tiny_yaml), "--set", "train.epochs=200", "-o", str(out)]
    holder = subprocess.Popen([sys.executable, "-m", "pfnas", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 240
        while not (out / "retrain.pt").is_file():  # the holder is training (~45 ms per epoch, 200 epochs)
            assert holder.poll() is None, holder.stderr.read()
            assert time.monotonic() < deadline, "the first run never checkpointed"
            time.sleep(0.05)
        rc, err = run_cli(capsys, *args)
        assert holder.poll() is None  # still running: the refusal is the lock's
        assert rc == 2
        one_error_line(err, str(out), "in use by another pfnas run", f"pid {holder.pid}")
        rc, err = run_cli(capsys, "baseline", "probe", "-c", str(tiny_yaml), "-o", str(tmp_path / "p"))
        assert rc == 0, err  # other folders are free
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: no cleanup runs, the kernel drops the lock
        holder.communicate(timeout=30)
    assert not (out / "result.json").exists() and (out / ".lock").is_file()
    rc, err = run_cli(capsys, *args)  # resumes from the holder's last checkpoint
    assert rc == 0, err
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert (last["phase"], last["epoch"]) == ("retrain", 200)
    assert json.loads((out / "result.json").read_text())["test_acc"] is not None


def test_a_failed_checkpoint_write_leaves_no_partial_file(tmp_path, monkeypatch):
    """``pfnas run`` on such a disk: tests/test_cli_exit_codes.py."""
    from pfnas.runtime import load_checkpoint, save_checkpoint

    ckpt = tmp_path / "ck" / "search.pt"
    save_checkpoint({"epoch": 1}, ckpt)
    real = fill_disk(monkeypatch)
    with pytest.raises(PfnasError) as ei:
        save_checkpoint({"epoch": 2}, ckpt)
    assert "\n" not in str(ei.value) and "no space left on device" in str(ei.value) and str(ckpt) in str(ei.value)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["search.pt", "search.pt.sha256"]
    monkeypatch.setattr(os, "write", real)
    assert load_checkpoint(ckpt) == {"epoch": 1}  # the previous checkpoint is whole


# ----------------------------------------------------------------------------- MLflow server down or restarting
@pytest.fixture
def server(tmp_path):
    (tmp_path / "srv").mkdir()
    srv = MlflowServer(tmp_path / "srv", free_port())
    yield srv
    srv.stop()


def _epoch(e: int) -> dict:
    return {"phase": "search", "epoch": e, "val_acc": 0.1 * e, "train_loss": 1.0 / e,
            "alpha": [[0.7, 0.1, 0.1, 0.1]] * 2, "policy": {0: "prepend", 1: "add"}}


FINAL = {"val_acc": 0.5, "test_acc": 0.45, "tuned_params": 100, "tuned_percent": 0.5, "cost_images": 10,
         "policy": {0: "prepend", 1: "add"}}


def _check_complete(uri: str, run_id: str, epochs: list[int]) -> None:
    client = make_client(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("search/val_acc", "search/train_loss"):
        hist = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in hist) == epochs, key  # every epoch, once, at its step
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "search/val_acc")] == \
        sorted((e, pytest.approx(0.1 * e)) for e in epochs)
    assert run.data.metrics["test_acc"] == pytest.approx(0.45) and run.data.metrics["tuned_params"] == 100
    assert run.data.params["prompts.length"] == "4" and run.data.tags["pfnas.kind"] == "run"
    assert {"config.yaml", "policy.json", "alpha_heatmap.png", "alpha.json"} <= {
        a.path for a in client.list_artifacts(run_id)}


@pytest.mark.slow
def test_run_started_while_the_server_is_down_is_complete_once_it_is_back(tmp_path, server, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = tiny_config()
    a, b = tmp_path / "a", tmp_path / "b"
    # default retry_s (60 s): after the first failure, calls pause; nothing may be lost meanwhile
    la = RunLogger(server.uri, "dur", "a", cfg, folder=a, tags={"pfnas.kind": "run"})
    lb = RunLogger(server.uri, "dur", "b", cfg, folder=b, tags={"pfnas.kind": "run"})
    assert la.run_id is None and lb.run_id is None
    for e in (1, 2):
        la.log_epoch(_epoch(e))
        lb.log_epoch(_epoch(e))
    assert (a / "mlflow_buffer.jsonl").is_file()
    lb.finish(FINAL)  # still down at the end: kept on disk, one warning line
    assert (b / "mlflow_buffer.jsonl").is_file() and lb.run_id is None
    assert any("kept in" in r.getMessage() and str(b) in r.getMessage() for r in caplog.records)

    server.start()
    la.finish(FINAL)  # the server is back: run created, params, every epoch, final metrics, status
    _check_complete(server.uri, la.run_id, [1, 2])
    assert not (a / "mlflow_buffer.jsonl").exists() and (a / "mlflow_run_id").read_text() == la.run_id

    again = RunLogger(server.uri, "dur", "b", cfg, folder=b, tags={"pfnas.kind": "run"})  # the same command, rerun
    assert not (b / "mlflow_buffer.jsonl").exists()
    _check_complete(server.uri, again.run_id, [1, 2])
    client = make_client(server.uri)
    assert len(client.search_runs([client.get_experiment_by_name("dur").experiment_id])) == 2


@pytest.mark.slow
def test_server_restart_mid_run_loses_nothing(tmp_path, server, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server.start()
    lg = RunLogger(server.uri, "restart", "r", tiny_config(), folder=tmp_path / "r", tags={"pfnas.kind": "run"})
    lg.log_epoch(_epoch(1))
    server.stop()
    lg.log_epoch(_epoch(2))
    lg.log_epoch(_epoch(3))
    assert (tmp_path / "r" / "mlflow_buffer.jsonl").is_file()
    server.start()
    lg.log_epoch(_epoch(4))  # still inside the 60 s pause: queued behind epochs 2-3
    lg.finish(FINAL)
    _check_complete(server.uri, lg.run_id, [1, 2, 3, 4])
    # a rerun of the finished command logs nothing twice
    again = RunLogger(server.uri, "restart", "r", tiny_config(), folder=tmp_path / "r", tags={"pfnas.kind": "run"})
    assert again.run_id == lg.run_id
    for e in (3, 4):
        again.log_epoch(_epoch(e))
    again.finish(FINAL)
    _check_complete(server.uri, lg.run_id, [1, 2, 3, 4])
    client = make_client(server.uri)
    assert len(client.get_metric_history(lg.run_id, "test_acc")) == 1


@pytest.mark.slow
def test_cli_run_with_the_server_down_is_replayed_by_the_rerun(tmp_path, tiny_yaml, server, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    out = tmp_path / "out"
    args = ["run", "-c", str(tiny_yaml), "-o", str(out), "--tracking-uri", server.uri, "--experiment", "cli"]
    rc, err = run_cli(capsys, *args)
    assert rc == 0, err
    assert (out / "mlflow_buffer.jsonl").is_file()
    server.start()
    rc, err = run_cli(capsys, *args)  # resume: nothing to train, the buffer is sent
    assert rc == 0, err
    assert not (out / "mlflow_buffer.jsonl").exists()
    client = make_client(server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cli").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_id == (out / "mlflow_run_id").read_text()
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "retrain/train_loss")) == [1, 2]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "search/val_acc")) == [1]
    assert len(client.get_metric_history(run.info.run_id, "test_acc")) == 1
