"""MLflow side without Ray: tracking URIs, the resilient run logger, and run comparison."""
from __future__ import annotations

import logging
import socket

import pytest
import yaml
from conftest import tiny_config
from rich.console import Console

from pfnas.config import ExperimentConfig
from pfnas.tracking import RunLogger, compare_runs, get_experiment_id, make_client, resolve_tracking_uri


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/t.db"


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"  # default, made absolute
    assert resolve_tracking_uri("sqlite:///sub/x.db", base_dir="/srv") == "sqlite:////srv/sub/x.db"
    assert resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("runs/mlruns") == (tmp_path / "runs" / "mlruns").as_uri()
    assert resolve_tracking_uri("http://10.0.0.1:5000") == "http://10.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path}/env.db"  # the environment beats the default
    assert resolve_tracking_uri("http://h:1") == "http://h:1"  # an explicit URI beats the environment


@pytest.mark.slow
def test_logger_survives_an_unreachable_server(monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with caplog.at_level(logging.WARNING, logger="pfnas.tracking"):
        lg = RunLogger(f"http://127.0.0.1:{port}", "x", "trial", tiny_config(), retry_s=0.0)
        for epoch in (1, 2, 3):
            lg.log_epoch({"phase": "search", "epoch": epoch, "val_acc": 0.5, "alpha": [[0.5, 0.5]]})
        lg.finish({"test_acc": 0.5, "policy": {0: "add"}})
    assert lg.run_id is None and len(lg._pending) > 0
    warnings = [r for r in caplog.records if r.name == "pfnas.tracking"]
    assert len(warnings) == 2 and "training continues" in warnings[0].getMessage()
    assert "failed" in warnings[1].getMessage() and "not logged" in warnings[1].getMessage()  # no run folder


@pytest.mark.slow
def test_logger_buffers_through_an_outage_then_flushes(tmp_path):
    db_dir = tmp_path / "later"
    db_dir.write_text("a file where the store's folder should be")  # the store cannot open: an outage
    lg = RunLogger(f"sqlite:///{db_dir}/m.db", "outage", "t1", tiny_config(), retry_s=0.0)
    lg.log_epoch({"phase": "search", "epoch": 1, "val_acc": 0.25})
    assert lg.run_id is None
    db_dir.unlink()  # the store comes back
    lg.log_epoch({"phase": "search", "epoch": 2, "val_acc": 0.75})
    lg.finish({"test_acc": 0.5})
    client = make_client(f"sqlite:///{db_dir}/m.db")
    hist = client.get_metric_history(lg.run_id, "search/val_acc")
    assert sorted((m.step, m.value) for m in hist) == [(1, 0.25), (2, 0.75)]
    assert client.get_run(lg.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_resumed_run_logs_each_step_once(uri):
    """A run killed after epoch 3 but resumed from its epoch-2 checkpoint re-runs epoch 3: one point per step."""
    cfg = tiny_config()
    first = RunLogger(uri, "resume", "r", cfg)
    for e in (1, 2, 3):
        first.log_epoch({"phase": "retrain", "epoch": e, "train_loss": 1.0 / e})
    first.log_metrics({"val_acc": 0.5})  # a final metric logged before the kill
    again = RunLogger(uri, "resume", "r", cfg, run_id=first.run_id)  # the resumed trial reopens its run
    for e in (3, 4):
        again.log_epoch({"phase": "retrain", "epoch": e, "train_loss": 1.0 / e})
    again.finish({"val_acc": 0.5})
    client = make_client(uri)
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "retrain/train_loss")) == [1, 2, 3, 4]
    assert len(client.get_metric_history(first.run_id, "val_acc")) == 1
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_logger_reuses_the_run_of_a_retried_trial(uri):
    client = make_client(uri)
    exp = get_experiment_id(client, "retry", uri)  # artifacts beside the database, not in the cwd
    parent = client.create_run(exp, tags={"pfnas.kind": "study"}).info.run_id
    a = RunLogger(uri, "retry", "t", tiny_config(), parent_run_id=parent, reuse_tags={"pfnas.trial_id": "t"},
                  tags={"pfnas.trial_id": "t"})
    a.finish(status="FAILED", error="boom")
    b = RunLogger(uri, "retry", "t", tiny_config(), parent_run_id=parent, reuse_tags={"pfnas.trial_id": "t"},
                  tags={"pfnas.trial_id": "t"})
    other = RunLogger(uri, "retry", "u", tiny_config(), parent_run_id=parent, reuse_tags={"pfnas.trial_id": "u"},
                      tags={"pfnas.trial_id": "u"})
    assert b.run_id == a.run_id != other.run_id
    assert client.get_run(b.run_id).info.status == "RUNNING"


def _logged_run(uri: str, cfg: ExperimentConfig, test_acc: float, status: str = "FINISHED") -> str:
    lg = RunLogger(uri, "cmp", f"{cfg.name}-s{cfg.seed}", cfg, tags={"pfnas.kind": "run"})
    epochs = cfg.search.epochs
    for e in range(1, epochs + 1):
        lg.log_epoch({"phase": "search", "epoch": e, "val_acc": 0.1 * e, "alpha": [[0.7, 0.1, 0.1, 0.1]] * 2,
                      "policy": {0: "prepend", 1: "prepend"}})
    lg.finish({"val_acc": test_acc, "test_acc": test_acc - 0.05, "tuned_params": 100 * cfg.prompts.length, "tuned_percent": 0.5,
               "cost_images": 1000, "policy": {0: "prepend", 1: "prepend"}}, status=status)
    return lg.run_id


@pytest.mark.slow
def test_compare_groups_seeds_and_sorts(uri, tmp_path):
    a = tiny_config(name="a")
    b = tiny_config(name="b", prompts={"length": 8, "dropout": 0.0, "fusion_dim": 4})
    ids = [_logged_run(uri, a.model_copy(update={"seed": s}), acc) for s, acc in ((0, 0.5), (1, 0.6), (2, 0.7))]
    _logged_run(uri, b, 0.8)
    _logged_run(uri, b.model_copy(update={"seed": 5}), 0.99, status="FAILED")  # not a finished result
    client = make_client(uri)
    arts = {x.path for x in client.list_artifacts(ids[0])}
    assert {"alpha_heatmap.png", "policy.json", "config.yaml"} <= arts  # heatmap logged at the last search epoch
    console = Console(record=True, width=200)
    rows = compare_runs(tracking_uri=uri, experiment="cmp", out_dir=tmp_path, console=console)  # val_acc
    assert [(r["label"], r["n"]) for r in rows] == [("search", 1), ("search", 3)]
    assert rows[0]["mean"] == pytest.approx(0.8) and rows[0]["tuned_params"] == 800
    assert rows[1]["mean"] == pytest.approx(0.6) and rows[1]["std"] == pytest.approx(0.1)
    assert sorted(rows[1]["run_ids"]) == sorted(ids)
    assert "0.6000 ± 0.1000" in console.export_text()
    assert rows[1]["final_mean"] == pytest.approx(0.55) and rows[1]["final_n"] == 3  # final-stage runs: own test
    csv_lines = (tmp_path / "compare.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[1].startswith("1,search,search,1,0.8")
    assert (tmp_path / "acc_vs_params.png").read_bytes()[:4] == b"\x89PNG"
    best = yaml.safe_load((tmp_path / "best_config.yaml").read_text())
    assert best["name"] == "b" and best["prompts"]["length"] == 8
    shown = compare_runs(tracking_uri=uri, experiment="cmp", metric="test_acc", out_dir=tmp_path / "t", console=console)
    assert [r["n"] for r in shown] == [1, 3] and not (tmp_path / "t" / "best_config.yaml").exists()  # test picks nothing
    assert "selects nothing" in console.export_text()
    cheap = compare_runs(tracking_uri=uri, experiment="cmp", metric="tuned_params", out_dir=tmp_path / "p", console=console)
    assert [r["mean"] for r in cheap] == [400, 800]  # fewer deployed numbers rank first: it improves downward


def test_config_hash_ignores_fields_that_cannot_change_a_result():
    from pfnas.config import merge_dotted
    from pfnas.tracking import config_hash

    fixed = tiny_config(method={"kind": "fixed", "op": "add"})
    same = [merge_dotted(fixed, {k: v}) for k, v in (("seed", 3), ("search.arch_every", 1), ("train.eval_every", 2),
                                                      ("method.samples", 2), ("name", "x"))]
    assert {config_hash(c) for c in same} == {config_hash(fixed)}
    differ = [merge_dotted(fixed, {k: v}) for k, v in (("method.op", "affine"), ("train.optim.lr", 0.3),
                                                        ("prompts.length", 3), ("data.synthetic_classes", 5))]
    assert len({config_hash(c) for c in differ} | {config_hash(fixed)}) == 5
    search = tiny_config()
    assert config_hash(merge_dotted(search, {"search.arch_every": 1})) != config_hash(search)  # used by a search
    assert config_hash(merge_dotted(search, {"method.op": "affine"})) == config_hash(search)  # unused by a search


@pytest.mark.slow
def test_cli_run_logs_a_diverged_run_as_failed(tmp_path, capsys):
    from pfnas.cli import main

    uri = f"sqlite:///{tmp_path}/m.db"
    code = main(["run", "--set", "backbone.kwargs.init_values=1.0e+30",  # LayerScale 1e30: every loss non-finite
                 "--set", "search.epochs=1", "--set", "train.epochs=1", "--set", "data.synthetic_per_class=4",
                 "--tracking-uri", uri, "--experiment", "nan", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "non-finite loss" in err[0]
    client = make_client(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("nan").experiment_id])
    assert run.info.status == "FAILED" and "non-finite loss" in run.data.tags["pfnas.error"]
    assert run.data.tags["pfnas.kind"] == "run"
    saved = yaml.safe_load(open(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))))
    assert saved["backbone"]["kwargs"]["init_values"] == 1e30  # the whole config: its config.yaml artifact


# ----------------------------------------------------------------------------- issue 41: what a user sees
def _tiny_yaml(folder, **sections):
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(**sections).model_dump(mode="json")))
    return str(path)


def test_baseline_logged_to_an_experiment_appears_in_compare(tmp_path, monkeypatch, capsys):
    """``pfnas baseline fixed --experiment X`` (no tracking URI: the default ./mlflow.db that compare reads) logs a
    final-stage run with test_acc and no val_acc; ``pfnas compare --experiment X`` lists it apart (test mean ±
    std, n, not ranked), beside a ranked run with val_acc, and the CSV carries run name and policy."""
    from pfnas.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = _tiny_yaml(tmp_path)
    assert main(["baseline", "fixed", "--op", "add", "-c", cfg, "--seeds", "2", "--experiment", "X",
                 "-o", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "fixed add on every layer: test acc " in out and "(n=2;" in out and "{" not in out  # no raw dict
    assert main(["compare", "--experiment", "X", "-o", str(tmp_path / "c1")]) == 0  # refused before: no val_acc
    shown = capsys.readouterr().out
    assert "final-stage runs in experiment 'X'" in shown and "not selectable" in shown and "all-add" in shown
    lines = (tmp_path / "c1" / "compare.csv").read_text().splitlines()
    assert lines[0].endswith(",run_name,policy") and len(lines) == 2
    assert lines[1].startswith("no val,fixed:add,all-add,0,,,") and lines[1].endswith(",fixed:add-seed0 +1,\"add,add\"")
    # a mixed experiment: a select-stage run is ranked, the baseline still listed apart
    assert main(["run", "-c", cfg, "--set", "train.stage=select", "--experiment", "X", "-o", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    assert main(["compare", "--experiment", "X", "-o", str(tmp_path / "c2")]) == 0
    shown = capsys.readouterr().out
    assert "pfnas runs in experiment 'X' by val_acc" in shown and "final-stage runs" in shown
    rows = (tmp_path / "c2" / "compare.csv").read_text().splitlines()
    assert rows[1].startswith("1,search,search,1,") and rows[2].startswith("no val,fixed:add")


def test_experiment_opens_on_runs_and_runs_log_a_curated_param_set(uri, tmp_path):
    """A new experiment has kind custom_model_development (the UI opens on its runs, not GenAI traces) and a
    description; a run logs a few params (method, op, lengths, lrs...) instead of the whole flattened config, which
    is its config.yaml artifact; its ``pfnas.method`` tag is the method as tables name it."""
    cfg = tiny_config(method={"kind": "fixed", "op": "add"})
    lg = RunLogger(uri, "ui", "fixed:add-seed0", cfg, tags={"pfnas.kind": "run"}, tuned=["train.optim.lr"])
    lg.finish({"test_acc": 0.5, "policy": {0: "add", 1: "add"}})
    client = make_client(uri)
    exp = client.get_experiment_by_name("ui")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "pfnas compare" in exp.tags["mlflow.note.content"]
    run = client.get_run(lg.run_id)
    params = run.data.params
    assert "backbone.kwargs.embed_dim" not in params and len(params) < 20
    assert params["method.kind"] == "fixed" and params["method.op"] == "add" and params["policy"] == "add,add"
    assert {"prompts.length", "search.arch_lr", "train.optim.lr", "search.optim.lr"} <= set(params)
    assert run.data.tags["pfnas.method"] == "all-add"
    saved = yaml.safe_load(open(client.download_artifacts(lg.run_id, "config.yaml", str(tmp_path))))
    assert ExperimentConfig.model_validate(saved) == cfg  # the full config, as an artifact
    # an experiment made before (no kind): tagged when pfnas next logs to it; a user's own kind is kept
    old = client.create_experiment("older")
    client.set_experiment_tag(client.create_experiment("mine"), "mlflow.experimentKind", "genai_development")
    get_experiment_id(client, "older", uri)
    get_experiment_id(client, "mine", uri)
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment_by_name("mine").tags["mlflow.experimentKind"] == "genai_development"


def test_one_demo_config(tmp_path):
    """`pfnas run` without -c, `-c demo` and the base of search_spaces/demo.yaml are one config."""
    from conftest import REPO

    from pfnas.cli import _cfg
    from pfnas.config import load_config, merge_dotted
    from pfnas.tune import load_space

    plain, demo = _cfg(None, None), load_config("demo")
    _, (plan,) = load_space(REPO / "search_spaces" / "demo.yaml")
    assert plain == demo
    assert plan.base == merge_dotted(demo, {"train.stage": "select", "train.test_every": None})


def test_terminal_messages(monkeypatch, capsys):
    """Flags show no <bool> type. (`-c nosuch` and `predict -m runs:/...` without a tracking URI, exit 2:
    tests/test_cli_exit_codes.py.)"""
    from pfnas.cli import main

    monkeypatch.setenv("COLUMNS", "120")
    assert main(["tune", "--help"]) == 0
    flags = [ln for ln in capsys.readouterr().out.splitlines() if "--resume" in ln or "--verbose" in ln]
    assert len(flags) == 2 and not any("<bool>" in ln for ln in flags)
