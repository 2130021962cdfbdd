"""Resource-aware search and accuracy / parameters / latency Pareto studies."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import pfnas.methods as bl
from conftest import tiny_config
from pfnas.engine import Experiment, run_search
from pfnas.tracking import compare_runs, make_client, pareto_front


def test_pareto_front_on_a_hand_built_set():
    pts = [[0.90, 100], [0.80, 50], [0.85, 200], [0.70, 50], [0.90, 100], [0.95, 400], [0.60, 10]]
    assert pareto_front(pts, ["max", "min"]) == [0, 1, 4, 5, 6]  # 2 is beaten by 0, 3 by 1; ties kept
    assert pareto_front(pts, ["min", "max"]) == [2, 3, 5, 6]  # both flipped: low acc, many params
    assert pareto_front([[1.0, 1.0]], ["max", "min"]) == [0]
    assert pareto_front([[1, 2, 3], [1, 2, 4], [0, 2, 3]], ["max", "max", "max"]) == [1]


@pytest.fixture(scope="module")
def exp():
    return Experiment.build(tiny_config(data={"synthetic_per_class": 32}))


def test_param_cost_pushes_alpha_to_cheap_ops(exp, tmp_path):
    """lambda * E_alpha[deployed params]: a large lambda moves alpha to the cheapest op (add) and the
    discretized policy deploys fewer numbers than the unpenalised search's."""
    runs = {}
    for w in (0.0, 20.0):
        cfg = tiny_config(data={"synthetic_per_class": 32}, search={"epochs": 3, "arch_lr": 0.3, "cost_weight": w,
                                                                     "arch_every": 1})
        phase = run_search(Experiment(cfg, exp.backbone, exp.data, exp.device), tmp_path / f"w{w}")
        runs[w] = phase
    cheap = runs[20.0]
    assert "expected_cost" in cheap.history[-1] and "expected_cost" not in runs[0.0].history[-1]
    assert cheap.history[-1]["expected_cost"] < cheap.history[0]["expected_cost"]
    table = cheap.costs.cpu()  # the same normalised table for both runs
    expected = lambda ph: float((ph.model.alpha.detach().softmax(-1) * table).sum())
    assert expected(cheap) < expected(runs[0.0])
    assert set(cheap.model.discretize().values()) == {"add"}  # D numbers: the cheapest of the four


def test_latency_cost_is_measured_once_and_cached(exp, tmp_path, monkeypatch):
    monkeypatch.setenv("PFNAS_CACHE", str(tmp_path / "cache"))
    cfg = tiny_config(data={"synthetic_per_class": 32}, search={"epochs": 1, "cost_weight": 1.0, "cost": "latency"})
    phase = run_search(Experiment(cfg, exp.backbone, exp.data, exp.device), tmp_path / "a")
    files = list((tmp_path / "cache" / "latency").glob("*.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    assert saved["ops"] == list(cfg.prompts.ops) and all(ms > 0 for ms in saved["ms"])
    table = phase.costs
    assert table.shape == (2, 4) and abs(float(table.max(-1).values.sum()) - 1.0) < 1e-6
    stamp = files[0].stat().st_mtime_ns
    run_search(Experiment(cfg, exp.backbone, exp.data, exp.device), tmp_path / "b")
    assert files[0].stat().st_mtime_ns == stamp  # read back, not measured again


def test_retrained_policy_records_inference_latency(exp, tmp_path):
    cfg = tiny_config(method={"kind": "fixed", "op": "prepend"}, train={"epochs": 1})
    res = bl.run_method(cfg, tmp_path, exp=Experiment(cfg, exp.backbone, exp.data, exp.device))
    assert res["infer_images_per_s"] > 0 and res["infer_ms_per_image"] > 0
    assert res["infer_batch"] >= 1 and res["infer_device"] == "cpu"


@pytest.mark.slow
def test_two_objective_study_through_tune_optuna_mlflow(ray_session, tmp_path):
    from conftest import write_space

    from pfnas.tune import run_tune

    """A Pareto study end to end: Tune trials from Optuna's two-objective study (kept in the space's own
    ``optuna_storage``), the front selected on val, every front point finalised, MLflow artifacts, ``compare``;
    then a fresh study of the same name gets its own Optuna study."""
    import optuna

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    fields = dict(metric=["val_acc", "tuned_params"], mode=["max", "min"], optuna_storage="sqlite:///opt/front.db",
                  params={"prompts.length": {"type": "choice", "values": [1, 8]},
                          "search.cost_weight": {"type": "choice", "values": [0.0, 10.0]},
                          "search.arch_lr": {"type": "loguniform", "low": 0.1, "high": 0.5}})
    space = write_space(tmp_path, "front", num_samples=4, final={"seeds": 1}, **fields)
    summary = run_tune(space, storage=str(tmp_path / "ray"), tracking_uri=uri)
    s = summary.studies[0]
    done = [t for t in s.trials if t.values is not None]
    assert len(done) == 4 and s.front
    assert s.optuna_storage == f"sqlite:///{tmp_path}/opt/front.db"  # relative to the space file
    study = optuna.load_study(study_name=s.optuna_study, storage=s.optuna_storage)
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    got = sorted(tuple(t.values) for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert [v for p in got for v in p] == pytest.approx([v for p in sorted(t.values for t in done) for v in p])
    expect = [done[i].trial_id for i in pareto_front([t.values for t in done], ["max", "min"])]
    assert [t.trial_id for t in s.front] == expect
    assert all(t.values[1] == t.metrics["tuned_params"] for t in done)
    # every front point is finalised (train+val -> test), the best-by-val one included
    assert sorted(f.trial_id for f in s.group_finals) == sorted(expect)
    assert all(len(f.test_accs) == 1 for f in s.group_finals)
    client = make_client(uri)
    exp_id = client.get_experiment_by_name("front").experiment_id
    runs = client.search_runs([exp_id])
    finals = {r.data.tags["pfnas.selected_trial"] for r in runs if r.data.tags.get("pfnas.kind") == "final"}
    assert finals == set(expect)
    parent = next(r for r in runs if r.data.tags.get("pfnas.kind") == "study")
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto_front.json", "pareto_front.png"} <= arts
    front = json.loads(Path(client.download_artifacts(parent.info.run_id, "pareto_front.json", str(tmp_path))).read_text())
    assert [p["trial_id"] for p in front["front"]] == expect
    assert "Pareto front of (val_acc, tuned_params)" in str(summary)
    rows = compare_runs(tracking_uri=uri, experiment="front", out_dir=tmp_path / "cmp", pareto="tuned_params")
    assert (tmp_path / "cmp" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    on = [r for r in rows if r.get("pareto")]
    assert on and all(r["tuned_params"] is not None for r in on)
    lines = (tmp_path / "cmp" / "pareto.csv").read_text().splitlines()
    assert lines[0].startswith("label,val_acc_mean,tuned_params") and len(lines) == len(rows) + 1
    # a fresh study of the same name never continues that history: it gets its own Optuna study
    again = write_space(tmp_path / "again", "front", num_samples=1, **{**fields, "optuna_storage": s.optuna_storage})
    s2 = run_tune(again, storage=str(tmp_path / "ray2"), tracking_uri=uri).studies[0]
    assert s2.optuna_study == "front-2"
    assert len(optuna.load_study(study_name="front-2", storage=s.optuna_storage).trials) == 1
