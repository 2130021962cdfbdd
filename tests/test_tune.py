"""Ray Tune + Optuna + MLflow studies on tiny configs: logging, reproducibility, failures, resume, CLI."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import (OVERFLOW, PARAMS, REPO, MlflowServer, blank_image_folder, free_port, kill_tree, tiny_config,
                      tune_state, write_space)

from pfnas.config import ConfigError, ExperimentConfig, PfnasError
from pfnas.tracking import compare_runs, get_experiment_id, make_client
from pfnas.tune import EXPERIMENT_CACHE, load_space, run_trial_method, run_tune

def trial_runs(uri: str, experiment: str):
    client = make_client(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("pfnas.kind") == "study"]
    trials = [r for r in runs if r.data.tags.get("pfnas.kind") == "trial"]
    return client, parents, trials


@pytest.fixture(scope="module")
def study(ray_session, tmp_path_factory, tracking):
    """One 4-trial study (2 concurrent, TPE after 2 random trials), shared by several tests."""
    d = tmp_path_factory.mktemp("study")
    space = write_space(d, final={"seeds": 2})
    summary = run_tune(space, storage=str(d / "ray"), tracking_uri=tracking)
    return SimpleNamespace(dir=d, space=space, uri=tracking, summary=summary, s=summary.studies[0])


# ----------------------------------------------------------------------------- a real study
@pytest.mark.slow
def test_study_trials_have_nested_mlflow_runs(study):
    s = study.s
    assert [t.status for t in s.trials] == ["TERMINATED"] * 4
    assert [t.index for t in s.trials] == [1, 2, 3, 4]
    client, parents, trials = trial_runs(study.uri, "study")
    assert len(parents) == 1 and parents[0].info.run_id == s.parent_run_id
    assert parents[0].data.params["param.search.arch_lr"].startswith("loguniform")
    assert parents[0].data.metrics["best_val_acc"] == pytest.approx(s.best.value)
    by_name = {r.data.tags["pfnas.trial_id"]: r for r in trials}
    assert sorted(by_name) == sorted(t.trial_id for t in s.trials)
    assert sorted(r.info.run_name for r in trials) == ["t01", "t02", "t03", "t04"]  # one name: MLflow = tables
    for t in s.trials:
        run = by_name[t.trial_id]
        assert run.info.status == "FINISHED" and run.info.run_name == t.name
        assert run.data.tags["mlflow.parentRunId"] == s.parent_run_id
        # params: a curated few (tuned keys first), with this trial's sampled values; the rest is config.yaml
        assert float(run.data.params["search.arch_lr"]) == pytest.approx(t.params["search.arch_lr"])
        assert int(run.data.params["prompts.length"]) == t.params["prompts.length"]
        assert "backbone.kwargs.embed_dim" not in run.data.params and len(run.data.params) < 25
        assert run.data.tags["pfnas.method"] == "search"
        # per-epoch metrics with steps, final metrics equal to what Tune saw
        hist = client.get_metric_history(run.info.run_id, "search/val_acc")
        assert sorted(m.step for m in hist) == [1, 2]
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "retrain/val_acc")) == [1, 2]
        assert run.data.metrics["val_acc"] == pytest.approx(t.value)
        assert not [k for k in run.data.metrics if "test" in k]  # a trial never reads test
        assert run.data.tags["pfnas.stage"] == "select" and run.data.params["train.stage"] == "select"
        assert run.data.metrics["tuned_params"] == t.metrics["tuned_params"] > 0
        assert run.data.metrics["images_per_s"] > 0
        arts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"policy.json", "alpha_heatmap.png", "config.yaml"} <= arts
        policy = json.loads(Path(client.download_artifacts(run.info.run_id, "policy.json", str(study.dir))).read_text())
        assert ",".join(policy[str(i)] for i in range(2)) == t.metrics["policy"]
        png = Path(client.download_artifacts(run.info.run_id, "alpha_heatmap.png", str(study.dir)))
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_finals_retrain_the_val_selected_trial_and_test_once(study):
    s = study.s
    client = make_client(study.uri)
    exp = client.get_experiment_by_name("study")
    finals = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("pfnas.kind") == "final"]
    assert sorted(r.info.run_name for r in finals) == [f"{s.best.name} final s0", f"{s.best.name} final s1"]
    policy = s.best.metrics["policy"].split(",")
    for r in finals:
        assert r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == s.parent_run_id
        assert r.data.tags["pfnas.method"] == "search" and r.data.tags["pfnas.selected_run"] == s.best.name
        assert r.data.tags["pfnas.selected_trial"] == s.best.trial_id and r.data.tags["pfnas.stage"] == "final"
        assert r.data.params["train.stage"] == "final" and json.loads(r.data.params["method.policy"]) == policy
        hist = client.get_metric_history(r.info.run_id, "retrain/test_acc")
        assert [m.step for m in hist] == [2]  # tested once, after the last epoch
        assert not client.get_metric_history(r.info.run_id, "retrain/val_acc")  # val is trained on
    accs = sorted(r.data.metrics["test_acc"] for r in finals)
    assert sorted(s.finals.test_accs) == pytest.approx(accs) and len(s.finals.seeds) == 2
    parent = client.get_run(s.parent_run_id)
    assert parent.data.metrics["final_test_acc_mean"] == pytest.approx(sum(accs) / 2)
    assert parent.data.metrics["final_n"] == 2
    assert parent.data.tags["pfnas.best_trial"] == s.best.name  # the run name the MLflow UI shows
    note = parent.data.tags["mlflow.note.content"]  # the parent's description: selection, the pick, its finals
    mean = sum(accs) / 2
    assert f"Selected: **{s.best.name}**" in note and s.best.metrics["policy"] in note and f"{mean:.4f}" in note
    assert {"compare/compare.csv", "compare/acc_vs_params.png"} <= {
        a.path for a in client.list_artifacts(s.parent_run_id, "compare")}
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development" and exp.tags["mlflow.note.content"]
    text = str(study.summary)
    assert "selected on validation" in text and "final: test_acc" in text
    assert f"trial {s.best.name} " in text and s.best.trial_id not in text  # one name in the summary too


def test_best_config_is_the_best_trial(study):
    s = study.s
    assert s.best.value == max(t.value for t in s.trials)
    # every trial reports the val loss of the split its score comes from: it breaks val_acc ties
    losses = [t.metrics["val_loss"] for t in s.trials]
    assert all(isinstance(x, float) and x > 0 for x in losses) and len(set(losses)) == 4
    cfg = ExperimentConfig.model_validate(yaml.safe_load(s.best_config_path.read_text()))
    assert cfg.train.stage == "final" and cfg.method.kind == "fixed"
    assert cfg.method.policy == s.best.metrics["policy"].split(",")
    assert s.best_config_path == study.dir / "ray" / "study" / "best_config.yaml"
    assert cfg.search.arch_lr == pytest.approx(s.best.params["search.arch_lr"])
    assert cfg.prompts.length == s.best.params["prompts.length"]
    assert cfg.backbone.kwargs["embed_dim"] == 32  # the rest comes from the base config
    text = str(study.summary)
    assert "study study: 4 trials (4 finished" in text and s.best.name in text


@pytest.mark.slow
def test_same_seed_same_configs_and_best(study, cli_study):
    """The same space (seed 7) run in this process and by ``pfnas tune`` in another: the same configs, values and
    selected config (the study's name and its finals' seeds apart)."""
    import optuna

    a = study.s
    b = optuna.load_study(study_name="prov", storage=f"sqlite:///{cli_study.dir}/optuna.db").trials
    assert [t.params for t in a.trials] == [t.params for t in b]
    assert [t.value for t in a.trials] == [t.value for t in b]
    load = lambda p: {k: v for k, v in yaml.safe_load(p.read_text()).items() if k != "name"}
    assert load(a.best_config_path) == load(cli_study.dir / "ray" / "prov" / "best_config.yaml")
    # trials 3-4 come from TPE (startup_trials=2), so the history mattered, and values differ
    assert len({t.params["search.arch_lr"] for t in a.trials}) == 4


def test_compare_runs_on_study(study, tmp_path):
    rows = compare_runs(tracking_uri=study.uri, experiment="study", out_dir=tmp_path)  # default: val_acc
    assert len(rows) == 4  # one row per trial label (each trial has its own tuned values)
    assert [r["mean"] for r in rows] == sorted((t.value for t in study.s.trials), reverse=True)
    labels = {r["label"] for r in rows}
    assert len(labels) == 4 and all(lb.startswith("search [search.arch_lr=") for lb in labels)
    lines = (tmp_path / "compare.csv").read_text().splitlines()
    assert len(lines) == 5 and lines[0].startswith("rank,label,method,n,val_acc_mean,val_acc_std,final_test_acc_mean")
    assert (tmp_path / "acc_vs_params.png").read_bytes()[:4] == b"\x89PNG"
    # the finals sit on the selected trial's row only
    with_finals = [r for r in rows if r["final_n"]]
    assert len(with_finals) == 1 and with_finals[0]["final_n"] == 2
    assert with_finals[0]["final_mean"] == pytest.approx(sum(study.s.finals.test_accs) / 2)
    best = ExperimentConfig.model_validate(yaml.safe_load((tmp_path / "best_config.yaml").read_text()))
    assert best.train.stage == "final" and best.method.policy == study.s.best.metrics["policy"].split(",")
    assert best.prompts.length == study.s.best.params["prompts.length"]
    shown = compare_runs(tracking_uri=study.uri, experiment="study", metric="select_val_acc", out_dir=tmp_path / "s")
    assert len(shown) == 4


def test_existing_study_needs_resume_and_resume_needs_a_study(study, tmp_path):
    with pytest.raises(ConfigError, match="already exists; pass --resume"):
        run_tune(study.space, storage=str(study.dir / "ray"), tracking_uri=study.uri)
    with pytest.raises(ConfigError, match="nothing to resume"):
        run_tune(study.space, storage=str(tmp_path / "none"), tracking_uri=study.uri, resume=True)


def test_val_acc_ties_go_to_the_lower_val_loss_then_the_earliest_trial():
    from pfnas.tune.select import TrialRecord, best_trial

    def rec(i, acc, loss=None, key="val_loss", status="TERMINATED"):
        return TrialRecord(i, f"t{i}", status, {}, acc, {} if loss is None else {key: loss})

    tied = [rec(1, 0.36, 1.74), rec(2, 0.30, 0.90), rec(3, 0.36, 1.59), rec(4, 0.36, 1.60)]
    assert best_trial(tied, "max").trial_id == "t3"  # 0.30's lower loss does not outrank a higher accuracy
    assert best_trial(tied[:3] + [rec(4, 0.365, 2.0)], "max").trial_id == "t4"
    assert best_trial([rec(1, 0.36), rec(2, 0.36)], "max").trial_id == "t1"  # no loss: the earliest
    assert best_trial([rec(1, 0.36), rec(2, 0.36, 1.5)], "max").trial_id == "t2"  # a measured loss beats none
    # a study started before val_loss was reported: the last retrain epoch's val loss
    assert best_trial([rec(1, 0.36, 1.7, "retrain/val_loss"), rec(2, 0.36, 1.6, "retrain/val_loss")], "max").trial_id == "t2"
    assert best_trial([rec(1, 0.36, 1.6), rec(2, 0.36, float("nan"))], "max").trial_id == "t1"
    assert best_trial(tied + [rec(5, 0.9, 0.1, status="STOPPED")], "max").trial_id == "t3"  # unfinished: not a candidate
    # another metric keeps the earliest of equal values (its ties are not about val200's coarse steps)
    assert best_trial([rec(1, 0.5, 1.7), rec(2, 0.5, 1.6)], "max", metric="select_val_acc").trial_id == "t1"
    assert best_trial([rec(1, 2.0, 1.7), rec(2, 1.0, 1.9)], "min", metric="infer_ms_per_image").trial_id == "t2"
    # the summary says how a tie was decided
    import io

    from rich.console import Console

    from pfnas.tune.display import StudySummary

    def shown(trials):
        buf = io.StringIO()
        Console(file=buf, width=160, color_system=None).print(
            StudySummary("s", "val_acc", "max", [], trials, best_trial(trials, "max"), None, "", "", "", None))
        return buf.getvalue()

    assert "tied on val_acc with trial t01, t04: the lowest val_loss decided (1.5900)" in shown(tied)
    assert "tied on val_acc with trial t02: the earliest trial decided" in shown([rec(1, 0.36), rec(2, 0.36)])
    assert "tied on" not in shown(tied[1:3])


# ----------------------------------------------------------------------------- failures
@pytest.mark.slow
def test_diverging_trial_fails_alone(ray_session, tmp_path, tracking):
    """A NaN loss fails the same way on every try: the trial ends as an error once, without Ray's retries."""
    base = tiny_config().model_dump(mode="json")
    base["search"]["optim"]["grad_clip"] = None
    key = "backbone.kwargs.init_values"  # LayerScale: OVERFLOW makes every loss non-finite, 1.0 and 0.5 train
    space = write_space(tmp_path, "nan", base=base, num_samples=3, max_failures=2, max_concurrent_trials=1,
                        params={key: {"type": "choice", "values": [OVERFLOW, 1.0, 0.5]}},
                        points_to_evaluate=[{key: OVERFLOW}, {key: 1.0}, {key: 0.5}])
    uri = tracking
    s = run_tune(space, storage=str(tmp_path / "ray"), tracking_uri=uri).studies[0]
    assert [t.status for t in s.trials] == ["ERROR", "TERMINATED", "TERMINATED"]
    bad = s.trials[0]
    assert bad.params[key] == OVERFLOW and "non-finite loss" in bad.error
    assert s.best is not None and s.best.params[key] in (1.0, 0.5)
    assert "1 errored" in str(s.__rich__().renderables[0].title)
    _, _, runs = trial_runs(uri, "nan")
    status = {r.data.tags["pfnas.trial_id"]: r.info.status for r in runs}
    assert len(runs) == 3
    assert status[bad.trial_id] == "FAILED"
    assert "TrainingError" in next(r for r in runs if r.data.tags["pfnas.trial_id"] == bad.trial_id).data.tags["pfnas.error"]
    state = json.loads(sorted((tmp_path / "ray" / "nan").glob("experiment_state-*.json"))[-1].read_text())
    failures = {json.loads(t)["trial_id"]: json.loads(m)["num_failures"] for t, m in state["trial_data"]}
    assert failures == {t.trial_id: 0 for t in s.trials}  # the NaN trial ran once: max_failures=2 did not retry it
    assert "non-finite loss" in bad.metrics["error"] and "val_acc" not in bad.metrics  # no score to select


@pytest.mark.parametrize("resources,match", [({"cpu": 3, "gpu": 0}, "resources.cpu=3 per trial, but the Ray cluster has 2 CPUs"),
                                             ({"cpu": 1, "gpu": 1}, "resources.gpu=1 per trial, but the Ray cluster has 0 GPUs")])
def test_a_trial_the_cluster_cannot_hold_is_refused(ray_session, tmp_path, tracking, resources, match):
    """Tune would keep such a trial pending forever, silently; the study is refused before it starts."""
    space = write_space(tmp_path, "toobig", num_samples=1, resources=resources)
    with pytest.raises(ConfigError, match=re.escape(match) + ".*no trial could ever start"):
        run_tune(space, storage=str(tmp_path / "ray"), tracking_uri=tracking)
    assert not (tmp_path / "ray" / "toobig").exists()


@pytest.mark.slow
def test_a_study_continues_when_rays_own_loop_stops(ray_session, tmp_path, tracking, monkeypatch, caplog):
    """Ray 2.60 stops the whole run, not one trial, when its memory monitor kills a trial's worker (its actor
    manager raises "Caught unexpected exception"). The study continues from Tune's saved state by itself: every
    trial finishes once, under one MLflow parent; with no restart left it ends in one line saying how to resume."""
    import logging

    from pfnas.tune import study as st
    from pfnas.tune import display

    real, stops = display.Progress.on_step_end, []

    def stop(self, iteration, trials, **info):  # once a trial has finished, Ray's loop stops (as Tune's own would)
        real(self, iteration, trials, **info)
        if len(stops) < stops_wanted and any(t.status == "TERMINATED" for t in trials):
            stops.append(iteration)
            raise RuntimeError("Caught unexpected exception: 1 worker(s) were killed due to the node running low "
                               "on memory.")

    monkeypatch.setattr(display.Progress, "on_step_end", stop)
    monkeypatch.setattr(st, "RAY_RESTART_WAIT_S", 0.0)
    stops_wanted = 1
    space = write_space(tmp_path, "raystop", num_samples=2, final={"seeds": 1})
    with caplog.at_level(logging.WARNING, logger="pfnas"):
        s = run_tune(space, storage=str(tmp_path / "ray"), tracking_uri=tracking).studies[0]
    assert len(stops) == 1 and "Ray stopped study raystop: Caught unexpected exception: 1 worker(s) were killed" in caplog.text
    assert "continuing it from its saved state" in caplog.text
    assert [t.status for t in s.trials] == ["TERMINATED"] * 2 and s.best is not None
    assert s.finals is not None and len(s.finals.test_accs) == 1
    _, parents, runs = trial_runs(tracking, "raystop")
    assert len(parents) == 1 and sorted(r.data.tags["pfnas.trial_id"] for r in runs) == sorted(t.trial_id for t in s.trials)

    stops.clear()
    monkeypatch.setattr(st, "RAY_RESTARTS", 0)  # no restart left
    space = write_space(tmp_path, "raystop2", num_samples=1)
    with pytest.raises(PfnasError, match=r"^Ray stopped study raystop2: Caught unexpected exception.*memory; "
                                         r"rerun with --resume") as err:
        run_tune(space, storage=str(tmp_path / "ray"), tracking_uri=tracking)
    assert "\n" not in str(err.value) and len(stops) == 1


# ----------------------------------------------------------------------------- kill and resume
# a trial stopped between a report and its checkpoint repeats that epoch on resume; Optuna keeps the first value
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The reported value is ignored because this `step=")
def test_ctrl_c_selects_nothing_and_resume_finishes(ray_session, tmp_path, tracking):
    """Ctrl-C (SIGINT) after one trial finished: Tune saves its state and returns; the study must not select
    from the finished part nor start finals. It exits 2 with one line naming --resume; the resume ends it."""
    base = tiny_config(data={"synthetic_per_class": 64}, search={"epochs": 4},
                       train={"epochs": 3}).model_dump(mode="json")
    space = write_space(tmp_path, "ctrlc", base=base, num_samples=2, max_concurrent_trials=1, final={"seeds": 1})
    storage = tmp_path / "ray"
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    exp_dir = storage / "ctrlc"
    proc = subprocess.Popen([sys.executable, "-m", "pfnas", "tune", "--space", str(space), "--storage",
                             str(storage), "--tracking-uri", tracking], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            state = tune_state(exp_dir)
            if any(st == "TERMINATED" for st, _ in state.values()) and any(
                    st == "RUNNING" and r.get("training_iteration", 0) >= 1 for st, r in state.values()):
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        else:
            pytest.fail("the study never reached its first finished trial")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    assert proc.returncode == 2, out[-2000:] + err[-2000:]
    assert err.strip().splitlines()[-1] == ("pfnas: error: study ctrlc was interrupted before its trials ended, "
                                           "nothing was selected: rerun with --resume to continue it")
    assert not (storage / "ctrlc-final").exists() and not (exp_dir / "best_config.yaml").exists()
    client, parents, _ = trial_runs(tracking, "ctrlc")
    runs = client.search_runs([client.get_experiment_by_name("ctrlc").experiment_id])
    assert not [r for r in runs if r.data.tags.get("pfnas.kind") == "final"]
    assert parents[0].info.status == "KILLED"
    s = run_tune(space, storage=str(storage), tracking_uri=tracking, resume=True).studies[0]
    assert [t.status for t in s.trials] == ["TERMINATED"] * 2 and not s.interrupted
    assert s.best is not None and len(s.finals.test_accs) == 1 and s.failure() is None


@pytest.mark.slow
def test_kill_and_resume(ray_session, tmp_path, tracking):
    # ~0.3 s per epoch, 8 reports per trial: slow enough to interrupt the second trial mid-run
    base = tiny_config(data={"synthetic_per_class": 64}, search={"epochs": 4},
                       train={"epochs": 3}).model_dump(mode="json")
    space = write_space(tmp_path, "killme", base=base, num_samples=3, max_concurrent_trials=1)
    storage, uri = tmp_path / "ray", tracking
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    exp_dir, log = storage / "killme", tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pfnas", "tune", "--space", str(space), "--storage",
                                 str(storage), "--tracking-uri", uri], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            state = tune_state(exp_dir)
            done = [t for t, (st, _) in state.items() if st == "TERMINATED"]
            # the first trial finished and is recorded; the second has a recorded mid-run checkpoint
            running = [r for st, r in state.values() if st == "RUNNING" and r.get("training_iteration", 0) >= 2]
            if done and running:
                break
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        else:
            pytest.fail("the study never reached its first finished trial:\n" + log.read_text()[-3000:])
    finally:
        kill_tree(proc.pid)
        proc.wait(timeout=30)
    before = {t: r for t, (st, r) in tune_state(exp_dir).items() if st == "TERMINATED"}
    assert before and len(before) < 3
    (exp_dir / "pfnas_study.json").unlink()  # as with s3:// storage: the parent run is found by its MLflow tags
    # a trial killed with the driver before Tune recorded it: its MLflow run exists, Tune will never resume it
    client = make_client(uri)
    exp_id = client.get_experiment_by_name("killme").experiment_id
    (parent,) = client.search_runs([exp_id], filter_string="tags.`pfnas.kind` = 'study'")
    orphan = client.create_run(exp_id, run_name="lost", tags={"pfnas.kind": "trial", "pfnas.trial_id": "lost",
                                                              "mlflow.parentRunId": parent.info.run_id}).info.run_id

    s = run_tune(space, storage=str(storage), tracking_uri=uri, resume=True).studies[0]
    assert [t.status for t in s.trials] == ["TERMINATED"] * 3
    after = {t.trial_id: t for t in s.trials}
    assert set(before) <= set(after)
    for tid, last in before.items():  # finished trials are neither lost nor re-run
        assert after[tid].value == last["val_acc"]
        assert after[tid].metrics["training_iteration"] == last["training_iteration"]
        assert after[tid].metrics["restored"] == 0
    second = next(t for t in s.trials if t.index == 2)
    assert second.trial_id not in before and second.metrics["restored"] == 1  # continued from its checkpoint
    assert second.metrics["training_iteration"] == 4 + 3 + 1
    client, parents, runs = trial_runs(uri, "killme")
    assert client.get_run(orphan).info.status == "KILLED"  # closed by the resumed study, not left RUNNING
    runs = [r for r in runs if r.info.run_id != orphan]
    assert len(parents) == 1 and len(runs) == 3  # one MLflow run per trial, the resumed one reopened
    assert all(r.info.status == "FINISHED" for r in runs)
    run2 = next(r for r in runs if r.data.tags["pfnas.trial_id"] == second.trial_id)
    steps = [m.step for m in client.get_metric_history(run2.info.run_id, "retrain/val_acc")]
    assert sorted(steps) == [1, 2, 3]
    everything = client.search_runs([client.get_experiment_by_name("killme").experiment_id])
    assert not [r.info.run_name for r in everything if r.info.status == "RUNNING"]  # no orphan left RUNNING
    for r in runs:  # no metric point twice at one step, though the killed trial re-ran epochs after its checkpoint
        for key in r.data.metrics:
            steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
            assert len(steps) == len(set(steps)), (r.info.run_name, key, sorted(steps))


# ----------------------------------------------------------------------------- MLflow server
@pytest.mark.slow
def test_study_against_mlflow_server(ray_session, tmp_path):
    server = MlflowServer(tmp_path, free_port())
    server.start()
    uri = server.uri
    try:
        space = write_space(tmp_path, "remote", num_samples=2, max_concurrent_trials=1)
        s = run_tune(space, storage=str(tmp_path / "ray"), tracking_uri=uri).studies[0]
        assert [t.status for t in s.trials] == ["TERMINATED"] * 2
        client, parents, runs = trial_runs(uri, "remote")
        assert len(parents) == 1 and len(runs) == 2
        assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parents[0].info.run_id}
        assert {r.data.tags["pfnas.trial_id"] for r in runs} == {t.trial_id for t in s.trials}
        for r in runs:
            assert r.info.status == "FINISHED" and "val_acc" in r.data.metrics
            assert "alpha_heatmap.png" in {a.path for a in client.list_artifacts(r.info.run_id)}
        assert list((tmp_path / "artifacts").rglob("alpha_heatmap.png"))  # stored by the server
    finally:
        server.stop()


# ----------------------------------------------------------------------------- space schema and CLI
def test_space_errors_name_the_field(tmp_path):
    good = {"name": "s", "base": tiny_config().model_dump(mode="json"), "params": PARAMS}
    cases = [
        ({"num_sample": 3}, r"^num_sample: unknown field"),
        ({"params": {"search.arch_lr": {"type": "gauss", "low": 1, "high": 2}}}, r"^params\.search\.arch_lr\.type"),
        ({"params": {"search.arch_lr": {"type": "loguniform", "low": 0, "high": 1}}}, r"params\.search\.arch_lr.*low > 0"),
        ({"params": {"search.arch_lrr": {"type": "uniform", "low": 0.1, "high": 1}}},
         r"^params\.search\.arch_lrr: .*search\.arch_lrr: unknown field"),
        ({"params": {"search.arch_lr": {"type": "uniform", "low": -1, "high": 1}}},
         r"^params\.search\.arch_lr: value -1\.0 .*greater than 0"),
        ({"scheduler": {"type": "asha", "grace": 2}}, r"^scheduler\.grace: unknown field"),
        ({"base": {"search": {"epochs": 0}}}, r"^base\.search\.epochs: "),
        ({"points_to_evaluate": [{"nope": 1}]}, r"points_to_evaluate\[0\]: 'nope' is not in params"),
        ({"tasks": ["a"], "params": {"data.task": {"type": "choice", "values": ["a"]}}}, r"not both"),
    ]
    for change, pattern in cases:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**good, **change}))
        with pytest.raises(ConfigError, match=pattern):
            load_space(path)


def test_grid_points_spread_the_trials_that_share_a_search(tmp_path):
    """A retrain-lr grid shares one search per search config; its trials launch apart, not side by side (two
    slots would otherwise hold one searching trial and one waiting on it)."""
    space = write_space(tmp_path, "order", algorithm="grid", num_samples=None,
                        variants=[{"method.kind": "search"}, {"method.kind": "fixed", "method.op": "add"}],
                        params={"train.optim.lr": {"type": "choice", "values": [0.1, 0.2, 0.4]}})
    _, (plan,) = load_space(space)
    points = plan.grid_points()
    as_pairs = [(p["variant"], p["train.optim.lr"]) for p in points]
    assert sorted(as_pairs) == sorted((v, lr) for v in (0, 1) for lr in (0.1, 0.2, 0.4))  # the whole grid, once
    assert as_pairs == [(0, 0.1), (1, 0.1), (1, 0.2), (1, 0.4), (0, 0.2), (0, 0.4)]
    for kind in ("random", "evolution"):  # their selection is shared the same way (baselines._shared_selection)
        _, (plan,) = load_space(write_space(tmp_path, kind, algorithm="grid", num_samples=None,
                                            variants=[{"method.kind": kind}, {"method.kind": "probe"}],
                                            params={"train.optim.lr": {"type": "choice", "values": [0.1, 0.2, 0.4]}}))
        assert [(p["variant"], p["train.optim.lr"]) for p in plan.grid_points()] == as_pairs
    # distinct searches (a search param in the grid) are not held back; repeats share their config's search
    _, (plan,) = load_space(write_space(tmp_path, "order2", algorithm="grid", num_samples=2,
                                        params={"search.arch_lr": {"type": "choice", "values": [0.1, 0.2]}}))
    assert [p["search.arch_lr"] for p in plan.grid_points(2)] == [0.1, 0.2, 0.1, 0.2]


@pytest.mark.slow
def test_a_final_that_diverges_hands_the_finals_to_the_next_config_by_val(ray_session, tmp_path, tracking):
    """Blank images: every model predicts one class, so every final collapses. Variant 0 (collapse_check on) and
    variant 1 (off) train the same runs, so they tie on val and the earlier trial is selected; its final fails
    before test is scored, and the study finalises the next trial by val instead, in a second finals round."""
    base = tiny_config(data={"kind": "imagefolder", "root": str(blank_image_folder(tmp_path / "blank"))})
    space = write_space(tmp_path, "fallback", algorithm="grid", num_samples=None, startup_trials=0,
                        base=base.model_dump(mode="json"), params={},
                        variants=[{"train.collapse_check": True}, {"train.collapse_check": False}], final={"seeds": 1})
    s = run_tune(space, storage=str(tmp_path / "ray"), tracking_uri=tracking).studies[0]
    first, second = sorted(s.trials, key=lambda t: t.index)
    assert [t.status for t in (first, second)] == ["TERMINATED"] * 2 and first.value == second.value
    assert s.best.trial_id == second.trial_id and s.finals.trial_id == second.trial_id
    assert len(s.finals.test_accs) == 1 and s.finals.replaced == [first.name]
    assert [n for n in s.notes if n.startswith(f"finals of trial {first.name} diverged on train+val (seed 0: "
                                               "TrainingError: training collapsed") and f"finalised {second.name}" in n]
    rounds = [tmp_path / "ray" / name for name in ("fallback-final", "fallback-final2")]
    assert [len([p for p in r.iterdir() if p.is_dir() and p.name[:4].isdigit()]) for r in rounds] == [1, 1]
    client = make_client(tracking)
    finals = [r for r in client.search_runs([client.get_experiment_by_name("fallback").experiment_id])
              if r.data.tags.get("pfnas.kind") == "final"]
    status = {r.data.tags["pfnas.selected_trial"]: r.info.status for r in finals}
    assert status == {first.trial_id: "FAILED", second.trial_id: "FINISHED"}
    assert "test_acc" not in next(r for r in finals if r.info.status == "FAILED").data.metrics
    assert f"# (the better-by-val {first.name} diverged" in (tmp_path / "ray" / "fallback" / "best_config.yaml").read_text()


@pytest.mark.slow
def test_grid_study_runs_every_variant_and_seed(ray_session, tmp_path, tracking):
    """algorithm: grid runs the cross product of variants x choices; compare averages the seeds."""
    space = write_space(tmp_path, "grid", algorithm="grid", num_samples=None, startup_trials=0,
                        variants=[{"method": {"kind": "search"}}, {"method.kind": "fixed", "method.op": "prepend"}],
                        params={"seed": {"type": "choice", "values": [0, 1]}}, final={"seeds": 1, "per_variant": True})
    s = run_tune(space, storage=str(tmp_path / "ray"), tracking_uri=tracking).studies[0]
    assert [t.status for t in s.trials] == ["TERMINATED"] * 4
    # one final per variant: each variant's val-best trial, retrained on train+val and tested
    assert sorted(f.label for f in s.group_finals) == ["kind=fixed op=prepend", "kind=search"]
    for f in s.group_finals:
        picked = next(t for t in s.trials if t.trial_id == f.trial_id)
        group = [t for t in s.trials if t.params["variant"] == picked.params["variant"]]
        assert picked.value == max(t.value for t in group) and len(f.test_accs) == 1
        assert f.seeds == [int(picked.params["seed"])]  # a final keeps its trial's seed
    # both variants' finals are one Tune run (a slot never idles between configs), one MLflow run per final
    finals_dir = tmp_path / "ray" / "grid-final"
    assert len([p for p in finals_dir.iterdir() if p.is_dir() and p.name[:4].isdigit()]) == 2
    assert not list((tmp_path / "ray").glob("grid-final-*"))
    client = make_client(tracking)
    runs = client.search_runs([client.get_experiment_by_name("grid").experiment_id])
    fin = {r.data.tags["pfnas.selected_trial"]: r for r in runs if r.data.tags.get("pfnas.kind") == "final"}
    assert sorted(fin) == sorted(f.trial_id for f in s.group_finals)
    # the parent run is finished with its description (a variant's display label once broke it: int("kind=..."))
    assert not [n for n in s.notes if "could not finish" in n], s.notes
    parent = client.get_run(s.parent_run_id)
    assert parent.info.status == "FINISHED" and "Selected: **t" in parent.data.tags["mlflow.note.content"]
    for f in s.group_finals:
        r = fin[f.trial_id]
        assert r.info.run_name == f"{f.name} final s{f.seeds[0]}"  # the trial it finalises, by its run name
        assert r.data.metrics["test_acc"] == pytest.approx(f.test_accs[0])
    assert sorted((t.params["variant"], t.params["seed"]) for t in s.trials) == [
        ("kind=fixed op=prepend", 0), ("kind=fixed op=prepend", 1), ("kind=search", 0), ("kind=search", 1)]
    rows = compare_runs(tracking_uri=tracking, experiment="grid", out_dir=tmp_path / "cmp")
    assert sorted((r["label"], r["n"]) for r in rows) == [("fixed:prepend", 2), ("search", 2)]
    fixed = next(t for t in s.trials if t.params["variant"].startswith("kind=fixed"))
    assert fixed.metrics["policy"] == "prepend,prepend" and fixed.metrics["cost_images"] == 0
    # the study hands its trials a search cache: one search per search seed; the fixed trials never search
    assert len([p for p in (tmp_path / "ray" / "grid" / "search-cache").iterdir() if p.is_dir()]) == 2
    with pytest.raises(ConfigError, match="algorithm grid takes choice params only"):
        load_space(write_space(tmp_path, "g2", algorithm="grid"))
    with pytest.raises(ConfigError, match=r"variants\[0\]: method.kind"):
        load_space(write_space(tmp_path, "g3", algorithm="grid", params={}, variants=[{"method.kind": "nope"}]))


@pytest.mark.slow
def test_an_lr_grid_of_evolution_trains_its_candidates_once(ray_session, tmp_path, tracking):
    """Two evolution trials that differ only in the retrain lr: one candidate loop in the study's cache, both
    trials select the same policy from the same records and log the loop's candidates into their own runs."""
    space = write_space(tmp_path, "evo-grid", algorithm="grid", num_samples=None, startup_trials=0,
                        variants=[{"method.kind": "evolution", "method.population": 2, "method.sample_size": 2,
                                   "method.budget_multiplier": 2.0}],
                        params={"train.optim.lr": {"type": "choice", "values": [0.05, 0.2]}})
    s = run_tune(space, storage=str(tmp_path / "ray"), tracking_uri=tracking).studies[0]
    assert [t.status for t in s.trials] == ["TERMINATED"] * 2
    (slot,) = [p for p in (tmp_path / "ray" / "evo-grid" / "search-cache").iterdir() if p.is_dir()]
    assert slot.name.startswith("evolution-")
    a, b = s.trials
    assert a.metrics["policy"] == b.metrics["policy"] and a.metrics["select_val_acc"] == b.metrics["select_val_acc"]
    assert a.metrics["cost_images"] == b.metrics["cost_images"] > 0
    client, _, runs = trial_runs(tracking, "evo-grid")
    n = len((slot / "events.jsonl").read_text().splitlines())
    assert n >= 3 and [len(client.get_metric_history(r.info.run_id, "evolution/val_acc")) for r in runs] == [n, n]


def test_space_paths_overrides_and_tasks(tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "base.yaml").write_text(yaml.safe_dump(
        {**tiny_config().model_dump(mode="json"), "data": {"kind": "vtab", "root": "../data"}}))
    path = write_space(tmp_path, "t", base=None, base_config="cfg/base.yaml", tasks=["dtd", "svhn"])
    _, plans = load_space(path, overrides=["prompts.length=3"], study_name="x")
    assert [p.name for p in plans] == ["x-dtd", "x-svhn"] and [p.base.data.task for p in plans] == ["dtd", "svhn"]
    assert plans[0].base.data.root == str(tmp_path / "data")  # relative to the file that names it
    assert plans[0].base.prompts.length == 3 and "prompts.length" not in plans[0].params  # --set pins it
    with pytest.raises(ConfigError, match=r"^--set search\.epochs"):
        load_space(path, overrides=["search.epochs=-1"])


@pytest.mark.parametrize("name,tasks", [("demo", None), ("vtab", 19), ("fgvc", 5), ("hta", 10), ("proxy", 4), ("pareto-proxy", None),
                                        ("baselines-proxy", None),
                                        ("ablation-proxy", 4), ("equal-effort-proxy", 4)])
def test_shipped_spaces_load(name, tasks):
    space, plans = load_space(REPO / "search_spaces" / f"{name}.yaml")
    assert len(plans) == (tasks or 1)
    assert plans[0].params or plans[0].variants


@pytest.mark.slow
def test_cluster_study_checks_data_paths_on_the_nodes(ray_session, tmp_path, tracking):
    """With --address the data pre-flight runs on every Ray node (as a task there), before any trial."""
    from pfnas.config import DataError
    from pfnas.tune.cluster import check_data_on_nodes

    base = tiny_config().model_dump(mode="json")
    base["data"].update(kind="vtab", root=str(tmp_path / "nope"), task="toy")
    space = write_space(tmp_path, "cluster", base=base, num_samples=1)
    with pytest.raises(DataError, match=r"^on Ray node .+: data root not found: .+nope$"):
        run_tune(space, address="auto", storage=str(tmp_path / "ray"), tracking_uri=tracking)
    assert not (tmp_path / "ray" / "cluster").exists()  # refused before the study started
    (tmp_path / "root" / "toy").mkdir(parents=True)
    ok = ExperimentConfig.model_validate({**base, "data": {**base["data"], "root": str(tmp_path / "root")}}).data
    check_data_on_nodes([ok])  # present on the node: no error
    gone = ExperimentConfig.model_validate({**base, "data": {**base["data"], "root": str(tmp_path / "root"),
                                                             "task": "other"}}).data
    with pytest.raises(DataError, match="task directory not found"):
        check_data_on_nodes([ok, gone])


@pytest.fixture
def one_thread():
    """Tiny CPU runs in this process: one intra-op thread, as Ray gives a 1-CPU trial (far faster on 2 busy cores)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_cached_experiment_matches_fresh_build(tmp_path, one_thread):
    cfg = tiny_config(search={"epochs": 1}, train={"epochs": 1})
    EXPERIMENT_CACHE.clear()
    fresh = run_trial_method(cfg, tmp_path / "a")
    backbone = EXPERIMENT_CACHE["backbone"][1]  # kept for the next trial in this process
    cached = run_trial_method(cfg, tmp_path / "b")
    assert EXPERIMENT_CACHE["backbone"][1] is backbone
    losses = lambda r: [h["train_loss"] for h in r["search_history"] + r["retrain_history"]]
    assert losses(cached) == losses(fresh) and cached["test_acc"] == fresh["test_acc"] is not None
    assert cached["policy"] == fresh["policy"]
    other = run_trial_method(cfg.model_copy(update={"seed": 1}), tmp_path / "c")  # new seed: new random backbone
    assert EXPERIMENT_CACHE["backbone"][1] is not backbone and losses(other) != losses(fresh)


def test_compare_on_empty_experiment_is_a_clear_error(tmp_path, tracking):
    uri = tracking
    get_experiment_id(make_client(uri), "nothing", uri)
    with pytest.raises(PfnasError, match="no finished pfnas runs with metric 'val_acc'"):
        compare_runs(tracking_uri=uri, experiment="nothing", out_dir=tmp_path / "cmp")
    with pytest.raises(PfnasError, match="experiment 'missing' not found"):
        compare_runs(tracking_uri=uri, experiment="missing", out_dir=tmp_path / "cmp")


def test_context_pickled_by_an_older_pfnas_gets_the_new_fields():
    """A study resumed after an upgrade unpickles its old TrialContext (Tune's saved callbacks): fields added
    since then take their defaults instead of failing the resumed study's progress display."""
    import pickle

    from pfnas.tune.trial import TrialContext

    ctx = TrialContext(study="s", base={}, tracking_uri="sqlite:///x.db", experiment="e", parent_run_id=None,
                       param_keys=["seed"])
    old = TrialContext.__new__(TrialContext)
    old.__dict__.update({k: v for k, v in vars(ctx).items() if k not in ("finals", "search_cache")})
    back = pickle.loads(pickle.dumps(old))
    assert back.finals == [] and back.search_cache is None and back == ctx
    assert back.resolve({"seed": 3}) == (back, {"seed": 3})


def test_finals_progress_line_names_each_final_by_its_run_name():
    """Finals of several configs share one Tune run: off a terminal a start line gives the plan, then each final's
    line names it as its MLflow run does (``t03 final s2``: the trial it finalises, its seed), with no best test."""
    import io

    from rich.console import Console

    from pfnas.tune.display import LiveTable, Progress
    from pfnas.tune.trial import TrialContext

    base = tiny_config().model_dump(mode="json")
    one = TrialContext(study="s", base=base, tracking_uri="u", experiment="e", parent_run_id=None,
                       param_keys=["seed"], kind="final", tags={"pfnas.label": "fixed:add [train.optim.lr=1]",
                                                                 "pfnas.selected_run": "t03"})
    other = tiny_config(train={"epochs": 7}).model_dump(mode="json")  # the dispatcher's placeholder base
    several = TrialContext(study="s", base=other, tracking_uri="u", experiment="e", parent_run_id=None,
                           param_keys=["seed"], kind="final", finals=[one])
    buf = io.StringIO()
    table = LiveTable(console=Console(file=buf, width=300, force_terminal=False))
    trial = SimpleNamespace(trial_id="t0", status="TERMINATED", config={"final": {"config": 0, "seed": 2}},
                            last_result={"test_acc": 0.9, "phase": "done"}, experiment_tag="0")
    table.update(Progress("finals of 2 configs", "test_acc", several, 2), [trial], done=trial)
    start, line = buf.getvalue().strip().splitlines()
    assert start.startswith("finals of 2 configs: 2 trials of ") and "progress each minute" in start
    assert line.startswith("finals of 2 configs: t03 final s2 done test_acc=0.9000 | 1/2 done")
    assert "best" not in line
    cfg = ExperimentConfig.model_validate(base)  # its planned epochs come from its own config, not the dispatcher's
    cb = Progress("finals of 2 configs", "test_acc", several, 2)
    assert table._plan(cb, trial)[:3] == ((cfg.search.epochs if cfg.method.kind == "search" else 0), cfg.train.epochs,
                                          cfg.method.kind)


def test_live_table_fits_100_columns_and_names_trials_as_mlflow_does():
    """The demo study's live table: one line per trial at 100 columns (one-word param headers, the phase on one
    line), each trial named as its MLflow run (``t01``), not by its Tune id."""
    import io

    from rich.console import Console

    from pfnas.tune.display import LiveTable, Progress
    from pfnas.tune.trial import TrialContext

    _, (plan,) = load_space(REPO / "search_spaces" / "demo.yaml")
    ctx = TrialContext(study="demo", base=plan.base.model_dump(mode="json"), tracking_uri="u", experiment="demo",
                       parent_run_id=None, param_keys=plan.param_keys)
    params = {"prompts.length": 8, "search.mode": "softmax", "search.arch_lr": 1.23456789,
              "search.optim.lr": 0.123456789, "train.optim.lr": 0.98765432}
    trials = [SimpleNamespace(trial_id=f"abc{i}_0000{i}", status="RUNNING", config=params, experiment_tag=f"{i}_x",
                              last_result={"phase": "retrain", "epoch": 7, "val_acc": 0.61234, "time_total_s": 30.0})
              for i in range(1, 9)]
    table = LiveTable(console=Console(file=io.StringIO(), width=100))
    table.t0 = time.monotonic()
    rendered, _ = table._table(Progress("study demo", "val_acc", ctx, 8), trials)
    out = Console(file=io.StringIO(), width=100, record=True)
    out.print(rendered)
    lines = [ln for ln in out.export_text().splitlines() if ln.strip()]
    assert len(lines) == 2 + len(trials), "\n".join(lines)  # header, rule, one line per trial
    assert lines[2].split()[0] == "t01" and "abc1" not in out.export_text() and "retrain 7/8" in lines[2]


def test_off_a_terminal_a_study_says_its_plan_and_progress_every_minute(monkeypatch):
    """Piped to a log, a study prints its plan first, then a progress line at least every LOG_EVERY_S seconds
    while trials run (not only when one finishes): minutes of silence read as a hang."""
    import io

    from rich.console import Console

    from pfnas.tune.display import LiveTable, Progress
    from pfnas.tune.trial import TrialContext

    ctx = TrialContext(study="s", base=tiny_config().model_dump(mode="json"), tracking_uri="u", experiment="e",
                       parent_run_id=None, param_keys=[])
    running = SimpleNamespace(trial_id="abc_00001", status="RUNNING", config={}, experiment_tag="1_x",
                              last_result={"phase": "search", "epoch": 1})
    buf = io.StringIO()
    table = LiveTable(console=Console(file=buf, width=80, force_terminal=False))
    cb = Progress("study s", "val_acc", ctx, 3)
    table.update(cb, [running])
    table.update(cb, [running])  # within the minute: nothing new
    assert len(buf.getvalue().splitlines()) == 1 and buf.getvalue().startswith("study s: 3 trials of 2+2 epochs")
    monkeypatch.setattr(LiveTable, "LOG_EVERY_S", 0.0)
    table.update(cb, [running])
    assert buf.getvalue().splitlines()[1].startswith("study s: 0/3 done, 1 running (t01 search 1/2)")


def test_a_selection_loop_has_progress_and_an_eta_before_its_retrain():
    """A one-shot (or random / evolution) trial spends most of its time selecting: its phase shows the share of the
    budget spent and the ETA counts the budget as epochs, instead of '0 of the retrain' and no ETA."""
    import io

    from rich.console import Console

    from pfnas.tune.display import LiveTable, Progress
    from pfnas.tune.trial import TrialContext

    base = tiny_config(method={"kind": "oneshot"}, train={"epochs": 2}).model_dump(mode="json")
    ctx = TrialContext(study="s", base=base, tracking_uri="u", experiment="e", parent_run_id=None, param_keys=[])
    cb = Progress("study s", "val_acc", ctx, 1)
    table = LiveTable(console=Console(file=io.StringIO(), width=100))
    table.t0 = time.monotonic() - 60.0

    def trial(**result):
        return SimpleNamespace(trial_id="abc_00001", status="RUNNING", config={}, experiment_tag="1_x",
                               last_result={"time_total_s": 60.0, **result})

    assert table._progress(cb, trial(phase="supernet", epoch=1)) == (0, 2, "supernet")  # before any budget report
    sel = {"supernet/select_epochs_done": 10.0, "supernet/select_epochs_planned": 40.0}
    assert table._progress(cb, trial(phase="supernet", epoch=2, **sel)) == (10.0, 42.0, "supernet (25% of the budget)")
    verify = {**sel, "oneshot_verify/select_epochs_done": 30.0, "oneshot_verify/select_epochs_planned": 40.0}
    assert table._progress(cb, trial(phase="oneshot_verify", epoch=0, **verify))[0] == 30.0
    assert table._progress(cb, trial(phase="retrain", epoch=1, **verify))[:2] == (41.0, 42.0)
    table._table(cb, [trial(phase="supernet", epoch=2, **sel)])
    assert table._eta == pytest.approx(60.0 * 32 / 10, rel=0.05)  # elapsed x (42 - 10) / 10
    buf = io.StringIO()
    log = LiveTable(console=Console(file=buf, width=100, force_terminal=False))
    log.update(cb, [trial(phase="supernet", epoch=1)])
    assert buf.getvalue().startswith("study s: 1 trials of a oneshot selection + 2 epochs")


def test_trials_that_share_a_selection_plan_it_once():
    """A retrain-lr grid runs one search (or one selection loop) for its lrs: the ETA plans it on the first trial
    only; the others plan their retrain, unless one reports a search of its own (the first failed)."""
    import io

    from rich.console import Console

    from pfnas.tune.display import LiveTable, Progress
    from pfnas.tune.trial import TrialContext

    base = tiny_config(search={"epochs": 3}, train={"epochs": 2}).model_dump(mode="json")
    ctx = TrialContext(study="s", base=base, tracking_uri="u", experiment="e", parent_run_id=None,
                       param_keys=["train.optim.lr"])
    cb = Progress("study s", "val_acc", ctx, 3)
    table = LiveTable(console=Console(file=io.StringIO(), width=100))
    table.t0 = time.monotonic() - 60.0

    def trial(i, lr, **result):
        return SimpleNamespace(trial_id=f"abc_0000{i}", status="RUNNING" if result else "PENDING",
                               config={"train.optim.lr": lr}, experiment_tag=f"{i}_x",
                               last_result={"time_total_s": 60.0, **result} if result else {})

    trials = [trial(0, 0.25, phase="search", epoch=1), trial(1, 0.5), trial(2, 1.0)]
    assert table.shared(cb, trials) == {"abc_00001", "abc_00002"}
    table._table(cb, trials)
    assert table._eta == pytest.approx(60.0 * (3 + 2 + 2 + 2 - 1) / 1, rel=0.05)  # was (3 + 2) x 3 planned
    assert table._progress(cb, trial(1, 0.5, phase="search", epoch=1), shared=True)[:2] == (1, 5)  # its own search
    arch = TrialContext(study="s", base=base, tracking_uri="u", experiment="e", parent_run_id=None,
                        param_keys=["search.arch_lr"])  # a grid over the search itself: nothing shared
    grid = [SimpleNamespace(trial_id=f"abc_0000{i}", status="PENDING", config={"search.arch_lr": lr},
                            experiment_tag=f"{i}_x", last_result={}) for i, lr in enumerate([0.1, 0.2])]
    assert LiveTable(console=Console(file=io.StringIO())).shared(Progress("s", "val_acc", arch, 2), grid) == set()


def test_a_grid_studys_first_trial_is_t00_everywhere():
    """Tune numbers a grid study's trials from 0: trial 0 is ``t00`` as its MLflow run, in Tune's display and in
    the selection records, like every other trial (it was its Tune id in MLflow and ``t00`` in the log)."""
    from types import SimpleNamespace

    from pfnas.tune.trial import trial_name, trial_run_name

    assert trial_run_name(0, "f2f04_00000") == "t00" and trial_run_name(3, "x") == "t03"
    assert trial_run_name(None, "f2f04_00000") == "f2f04_00000"
    assert trial_name(SimpleNamespace(trial_id="f2f04_00000", experiment_tag="0_lr=0.25", config={})) == "t00"
    assert trial_name(SimpleNamespace(trial_id="f2f04_00000", experiment_tag="", config={})) == "f2f04_00000"
