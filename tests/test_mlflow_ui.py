"""The MLflow UI in a real browser: headless Chromium (Debian package ``chromium``) on a local ``mlflow server``."""
from __future__ import annotations

import pytest
from conftest import MlflowServer, free_port, tiny_config
from mlflow_ui import chromium, dump_dom

from pfnas.tracking import RunLogger, make_client, runs_table_url, set_runs_view

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(chromium() is None, reason="needs chromium (apt-get install chromium)")]


def test_runs_table_shows_the_study_runs_with_val_acc(tmp_path):
    """pfnas's runs-table view (the link a study prints) lists the trials under their one name with val_acc, the
    method and the policy visible, on the "Model training" side of the UI, without picking columns."""
    server = MlflowServer(tmp_path, free_port())
    server.start()
    try:
        client = make_client(server.uri)
        first = RunLogger(server.uri, "demo", "t01", tiny_config(), tags={"pfnas.kind": "trial"},
                          tuned=["search.arch_lr"])  # creates the experiment, as a study's first trial would
        exp_id = client.get_experiment_by_name("demo").experiment_id
        parent = client.create_run(exp_id, run_name="demo", tags={"pfnas.kind": "study"}).info.run_id
        set_runs_view(client, exp_id, ["search.arch_lr"], expand=parent)
        client.set_tag(first.run_id, "mlflow.parentRunId", parent)
        first.finish({"val_acc": 0.6123, "policy": {0: "add", 1: "prepend"}})
        second = RunLogger(server.uri, "demo", "t02", tiny_config(), tags={"pfnas.kind": "trial"},
                           parent_run_id=parent, tuned=["search.arch_lr"])
        second.finish({"val_acc": 0.7345, "policy": {0: "affine", 1: "add"}})
        client.set_terminated(parent)
        dom = dump_dom(runs_table_url(server.uri, exp_id))
        assert "Run Name" in dom and ">t01<" in dom and ">t02<" in dom, dom[-3000:]
        assert ">val_acc<" in dom and "0.7345" in dom and "0.6123" in dom  # the metric column, with its values
        assert "affine,add" in dom and "pfnas.method" in dom  # the policy and method tags
    finally:
        server.stop()
