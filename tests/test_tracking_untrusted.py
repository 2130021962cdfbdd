"""Tracking stores and the MLflow backlog as untrusted input: a hand-edited ``mlflow_buffer.jsonl``, two processes
creating one new sqlite store. A sqlite file that is not a database (one line, exit 2): tests/test_cli_exit_codes.py."""
from __future__ import annotations

import pytest

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna

from conftest import REPO, tiny_config
from pfnas.tracking import RunLogger, make_client
from pfnas.tune.study import open_optuna_storage


def _buffered(folder: Path, *ops: dict) -> None:
    """A backlog as an earlier process (or someone editing the file) left it in the run folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RunLogger.BUFFER).write_text("".join(json.dumps(op) + "\n" for op in ops))


def _tracking_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pfnas.tracking" and r.levelno >= logging.WARNING]


def _rejected(folder: Path) -> list[dict]:
    return [json.loads(ln) for ln in (folder / RunLogger.REJECTED).read_text().splitlines()]


@pytest.mark.slow
def test_a_buffered_file_outside_the_run_folder_is_not_uploaded(tmp_path, caplog):
    uri, run = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "run"
    secret = tmp_path / "secret.txt"
    secret.write_text("not the run's")
    own = run / "retrain" / "pfnas_model.json"
    own.parent.mkdir(parents=True)
    own.write_text("{}")
    (run / "link.txt").symlink_to(secret)  # inside by name, outside in fact
    _buffered(run, {"op": "artifacts", "files": [str(secret)], "path": "model"},
              {"op": "artifacts", "files": [str(run / "link.txt")], "path": "model"},
              {"op": "artifacts", "files": [str(own)], "path": "model"})
    with caplog.at_level(logging.WARNING, logger="pfnas.tracking"):
        lg = RunLogger(uri, "untrusted", "r", tiny_config(), folder=run, retry_s=0.0)
        lg.finish()
    client = make_client(uri)
    assert [Path(a.path).name for a in client.list_artifacts(lg.run_id, "model")] == ["pfnas_model.json"]
    assert client.get_run(lg.run_id).info.status == "FINISHED"
    assert not (run / RunLogger.BUFFER).exists()
    rejected = _rejected(run)
    assert [r["record"]["files"] for r in rejected] == [[str(secret)], [str(run / "link.txt")]]
    assert all("outside the run folder" in r["reason"] for r in rejected)
    warnings = _tracking_warnings(caplog)
    assert len(warnings) == 1 and str(run / RunLogger.REJECTED) in warnings[0], warnings


@pytest.mark.slow
def test_a_record_that_always_fails_is_set_aside_and_the_rest_is_sent(tmp_path, caplog):
    uri, run = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "run"
    ts = int(time.time() * 1000)
    _buffered(run, {"op": "tag", "key": "bad*key", "value": "x"},  # MLflow refuses this name every time
              {"op": "metrics", "m": [["after", 1.5, ts, 0]]}, {"op": "tag", "key": "after", "value": "yes"},
              {"op": "upload-everything"})  # not one of ours
    with caplog.at_level(logging.WARNING, logger="pfnas.tracking"):
        lg = RunLogger(uri, "untrusted", "r", tiny_config(), folder=run, retry_s=0.0, finish_wait_s=0.0)
        lg.finish()
    run_data = make_client(uri).get_run(lg.run_id)
    assert run_data.data.metrics["after"] == 1.5 and run_data.data.tags["after"] == "yes"
    assert run_data.info.status == "FINISHED" and "bad*key" not in run_data.data.tags
    assert not (run / RunLogger.BUFFER).exists()
    rejected = _rejected(run)
    assert [r["record"].get("key", r["record"]["op"]) for r in rejected] == ["bad*key", "upload-everything"]
    assert "bad*key" in rejected[0]["reason"]
    assert any(str(run / RunLogger.REJECTED) in w for w in _tracking_warnings(caplog))


def _at_once(tmp_path: Path, body: str, n: int = 2) -> list[str]:
    """``body`` run by ``n`` fresh processes released together once all have imported (``I``: the process index);
    returns their stdout, each asserted to exit 0."""
    gate = tmp_path / "gate"
    gate.mkdir()
    script = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        I, gate = int(sys.argv[1]), Path({str(gate)!r})
        from pfnas.tracking import RunLogger, make_client
        from pfnas.tune.study import open_optuna_storage
        (gate / str(I)).touch()
        while len(os.listdir(gate)) < {n}:
            time.sleep(0.005)
    """) + textwrap.dedent(body)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(n)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outs]


@pytest.mark.slow
def test_two_processes_creating_a_new_mlflow_store_both_log(tmp_path):
    uri = f"sqlite:///{tmp_path}/new/mlflow.db"
    outs = _at_once(tmp_path, f"""
        lg = RunLogger({uri!r}, "race", f"p{{I}}", None, folder=Path(f"p{{I}}"), retry_s=0.0, finish_wait_s=0.0)
        lg.log_metrics({{"index": I}})
        lg.finish()
        print(lg.run_id)
    """)
    client = make_client(uri)
    for i, out in enumerate(outs):
        run = client.get_run(out.strip())
        assert run.data.metrics["index"] == i and run.info.status == "FINISHED"
        assert not (tmp_path / f"p{i}" / RunLogger.BUFFER).exists()


@pytest.mark.slow
def test_two_processes_creating_a_new_optuna_store_both_work(tmp_path):
    url = f"sqlite:///{tmp_path}/new/optuna.db"
    _at_once(tmp_path, f"""
        import optuna
        optuna.create_study(storage=open_optuna_storage({url!r}), study_name=f"s{{I}}")
    """)
    assert sorted(optuna.study.get_all_study_names(open_optuna_storage(url))) == ["s0", "s1"]
