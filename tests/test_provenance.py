"""Provenance on every MLflow run, readable run names, the Optuna study in RDB storage, the quiet `pfnas tune`
terminal, a summary that fits 80 columns, and `pfnas --version`."""
from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import REPO, TINY_BACKBONE, tiny_config
from rich.console import Console

import pfnas
from pfnas import cli
from pfnas.tracking import make_client
from pfnas.tune import StudySummary, TrialRecord

OP_SHORT = {"prepend": "pre", "add": "add", "affine": "aff", "cross_attn": "xat"}


def _head() -> str | None:
    r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return r.stdout.strip() if r.returncode == 0 else None


def _runs(uri: str, experiment: str):
    client = make_client(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    by_kind: dict[str, list] = {}
    for r in runs:
        by_kind.setdefault(r.data.tags.get("pfnas.kind"), []).append(r)
    return client, by_kind


def _check_common(run, source: str, source_type: str) -> None:
    tags = run.data.tags
    assert tags["mlflow.source.name"] == source and tags["mlflow.source.type"] == source_type
    assert tags["mlflow.user"] == getpass.getuser() and run.info.user_id == getpass.getuser()
    assert tags.get("mlflow.source.git.commit") == _head()  # the checkout holding the pfnas package
    assert tags["pfnas.version"] == pfnas.__version__
    import timm
    import torch

    assert tags["pfnas.torch"] == torch.__version__.split("+")[0] or tags["pfnas.torch"] == torch.__version__
    assert tags["pfnas.timm"] == timm.__version__
    assert tags["pfnas.backbone"] == TINY_BACKBONE["name"] and tags["pfnas.dataset"] == "synthetic"
    assert tags["pfnas.cpu"] and tags["pfnas.cpu"] != "unknown"
    if source_type == "JOB":  # the study subprocess runs with OMP_NUM_THREADS=1 (cli_study)
        assert tags["pfnas.threads"] == "1", tags["pfnas.threads"]
    elif "pfnas.threads" in tags:
        assert int(tags["pfnas.threads"]) >= 1


def _check_dataset(run) -> None:
    """The decoded task as an MLflow dataset input (what the UI lists under Datasets) and as tags."""
    tags = run.data.tags
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "synthetic" and inp.dataset.digest == tags["pfnas.dataset.digest"]
    splits = json.loads(tags["pfnas.dataset.splits"])
    assert splits["train"] == 39 and splits["val"] == 9 and splits["test"] == 48  # 3 classes x 16, 80/20
    assert json.loads(inp.dataset.profile)["splits"] == splits
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"


def test_compute_tags_read_the_live_thread_count():
    """pfnas.threads is torch's thread count when the run starts, not a value fixed at import."""
    import torch

    from pfnas.provenance import compute_tags

    before = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            assert compute_tags()["pfnas.threads"] == str(n)
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_cli_tune_prints_one_quiet_table_with_the_metric(cli_study):
    out = cli_study.out
    lines = out.splitlines()
    assert len(lines) < 60, out
    assert "val_acc" in out and "study prov: 4 trials (4 finished" in out
    for noise in ("Trial status", "Configuration for experiment", "Trial prov", "Wrote the latest version",
                  "Started a local Ray instance", "A new study created", "pid="):
        assert noise not in out, (noise, out)
    assert sum(ln.startswith("study prov: t0") for ln in lines) == 4  # one progress line per trial off a terminal
    assert max(len(ln) for ln in lines) <= 100, [ln for ln in lines if len(ln) > 100]  # log lines: never wrapped


def test_every_run_carries_provenance_and_the_dataset(cli_study):
    _, runs = _runs(cli_study.uri, "prov")
    (parent,) = runs["study"]
    _check_common(parent, "pfnas tune", "LOCAL")
    assert len(runs["trial"]) == 4 and len(runs["final"]) == 1
    for run in runs["trial"] + runs["final"]:
        _check_common(run, "pfnas tune", "JOB")
        _check_dataset(run)
    trial_digests = {r.data.tags["pfnas.dataset.digest"] for r in runs["trial"]}
    assert len(trial_digests) == 1  # same data, same digest


def test_trial_runs_are_named_and_carry_their_policy(cli_study):
    client, runs = _runs(cli_study.uri, "prov")
    names = sorted(r.info.run_name for r in runs["trial"])
    assert names == ["t01", "t02", "t03", "t04"], names  # one name: the live table, summary and compare use it
    for r in runs["trial"]:
        p = r.data.params
        assert r.data.tags["pfnas.trial_id"] and r.data.tags["pfnas.trial_id"] not in r.info.run_name
        policy = json.loads(Path(client.download_artifacts(r.info.run_id, "policy.json", str(cli_study.dir)))
                            .read_text())
        ops = ",".join(policy[str(i)] for i in range(len(policy)))
        assert r.data.tags["pfnas.policy"] == ops == p["policy"]
    (final,) = runs["final"]
    picked = final.data.tags["pfnas.selected_run"]
    assert final.info.run_name == f"{picked} final s0" and picked in names
    assert final.data.tags["pfnas.policy"] == final.data.params["policy"]
    found = client.search_runs([runs["trial"][0].info.experiment_id],
                               filter_string=f"params.policy = '{runs['trial'][0].data.params['policy']}'")
    assert found  # the runs table filters on it


def test_optuna_study_persists_next_to_the_mlflow_db(cli_study):
    _, runs = _runs(cli_study.uri, "prov")
    storage = f"sqlite:///{cli_study.dir}/optuna.db"
    (parent,) = runs["study"]
    assert parent.data.tags["pfnas.optuna_storage"] == storage and parent.data.tags["pfnas.optuna_study"] == "prov"
    study = optuna.load_study(study_name="prov", storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 4
    assert sorted(t.value for t in done) == pytest.approx(sorted(r.data.metrics["val_acc"] for r in runs["trial"]))
    by_length = sorted((t.params["prompts.length"], t.value) for t in done)
    logged = sorted((int(r.data.params["prompts.length"]), r.data.metrics["val_acc"]) for r in runs["trial"])
    assert [n for n, _ in by_length] == [n for n, _ in logged]
    assert [v for _, v in by_length] == pytest.approx([v for _, v in logged])
    assert "optuna-dashboard" in cli_study.out


# ----------------------------------------------------------------------------- pfnas run / baseline provenance
@pytest.mark.slow
def test_cli_runs_carry_their_verb_backbone_digest_and_dataset(tmp_path, capsys, monkeypatch):
    import timm
    from safetensors.torch import save_file

    from pfnas.sysinfo import file_sha256

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ckpt = tmp_path / "backbone.safetensors"
    bb = timm.create_model(TINY_BACKBONE["name"], pretrained=False, num_classes=0, **TINY_BACKBONE["kwargs"])
    save_file({k: v.contiguous() for k, v in bb.state_dict().items()}, str(ckpt))
    cfg = tiny_config(search={"epochs": 1}, train={"epochs": 1}, backbone={"checkpoint": str(ckpt)})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["-c", str(path), "--tracking-uri", uri, "--experiment", "prov-run"]
    assert cli.main(["run", *common, "-o", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    assert cli.main(["run", *common, "-o", str(tmp_path / "run")]) == 0  # a rerun resumes: one dataset input
    assert cli.main(["baseline", "fixed", "--op", "add", *common, "-o", str(tmp_path / "fixed")]) == 0
    _, runs = _runs(uri, "prov-run")
    by_source = {r.data.tags["mlflow.source.name"]: r for r in runs["run"]}
    assert set(by_source) == {"pfnas run", "pfnas baseline fixed"}
    for source, run in by_source.items():
        _check_common(run, source, "LOCAL")
        _check_dataset(run)
        assert run.data.tags["pfnas.backbone.digest"] == file_sha256(ckpt)
        assert run.data.tags["pfnas.policy"] == run.data.params["policy"]
    assert by_source["pfnas baseline fixed"].data.params["policy"] == "add,add"


# ----------------------------------------------------------------------------- the summary at 80 columns
def test_summary_fits_80_columns_and_keeps_the_policy():
    ops = ["prepend", "add", "affine", "cross_attn"]
    policies = [ops * 3, list(reversed(ops)) * 3]  # 12 layers, ViT-B/16
    keys = ["search.arch_lr", "train.optim.lr", "prompts.length", "search.mode", "search.tau.start"]
    params = {"search.arch_lr": 0.000123456, "train.optim.lr": 1.23456, "prompts.length": 10, "search.mode": "gumbel",
              "search.tau.start": 5.0}
    recs = [TrialRecord(i + 1, f"{i}b2c3d4e", "TERMINATED", params, 0.8 + i / 100,
                        {"policy": ",".join(p), "tuned_params": 1234567, "search/alpha_entropy": 0.5})
            for i, p in enumerate(policies)]
    s = StudySummary("a-long-study-name", "val_acc", "max", keys, recs, recs[1], Path("/x/best_config.yaml"), "/x",
                     "sqlite:////x/mlflow.db", "demo", "abc")
    console = Console(width=80, record=True, color_system=None)
    console.print(s)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    table = text.split("policy per layer")[0]
    tokens = [w for w in table.split() if w in OP_SHORT.values()]
    assert tokens == [OP_SHORT[o] for p in policies for o in p]  # every op of every trial, the best's included
    for v in ("0.000123", "1.23", "gumbel", "0.8000", "0.8100", "t02*"):  # trials by their run name
        assert v in table
    wide = Console(width=200, record=True, color_system=None)
    wide.print(s)
    assert " ".join(OP_SHORT[o] for o in policies[1]) in wide.export_text()  # one line per trial when it fits


# ----------------------------------------------------------------------------- version and completion
def test_version_and_shell_completion(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"pfnas {pfnas.__version__}\n"
    assert cli.main(["--help"]) == 0
    assert "--install-completion" in capsys.readouterr().out
    r = subprocess.run([sys.executable, "-m", "pfnas", "--version"], capture_output=True, text=True, check=False,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0 and r.stdout.strip() == f"pfnas {pfnas.__version__}"


def test_docs_agree_on_the_quick_start_time():
    for path in ("README.md", "search_spaces/README.md", "search_spaces/demo.yaml"):
        text = (REPO / path).read_text()
        assert "about 1 min on 2 idle cores" in text, path
    readme = (REPO / "README.md").read_text()
    assert "44 s" not in readme and "2-3 min" not in (REPO / "search_spaces/README.md").read_text()
    assert "optuna-dashboard sqlite:///optuna.db" in readme and "pfnas --version" in readme
    launchers = (REPO / "launchers/README.md").read_text()
    assert "RAY_AUTH_MODE=token ray start --address 127.0.0.1:6379" in launchers
    assert "ray start --head --port 6379" in launchers


# ----------------------------------------------------------------------------- reproducibility over seeds
def test_policy_agreement_and_seed_groups():
    from pfnas.tracking import policy_agreement

    a, b, c = ["add"] * 4, ["add", "add", "affine", "affine"], ["prepend"] * 4
    assert policy_agreement([a]) is None
    assert policy_agreement([a, a, a]) == 1.0
    assert policy_agreement([a, b, c]) == pytest.approx((0.5 + 0.0 + 0.0) / 3)
    with pytest.raises(ValueError):
        policy_agreement([a, a[:2]])
    keys = ["variant", "seed"]
    recs = [TrialRecord(i, f"t{i}", "TERMINATED", {"variant": v, "seed": s}, acc,
                        {"policy": ",".join(p), "search/alpha_entropy": h})
            for i, (v, s, acc, p, h) in enumerate([
                ("kind=search", 0, 0.80, a, 0.2), ("kind=search", 1, 0.84, b, 0.4), ("kind=search", 2, 0.82, a, 0.3),
                ("kind=fixed", 0, 0.70, a, None), ("kind=fixed", 1, 0.72, a, None)])]
    recs.append(TrialRecord(9, "t9", "ERROR", {"variant": "kind=fixed", "seed": 2}, None, {}, "boom"))
    s = StudySummary("abl", "val_acc", "max", keys, recs, recs[1], None, "/x", "sqlite:////x/mlflow.db", "abl", "p")
    groups = {g.label: g.stats() for g in s.seed_groups()}
    assert groups["variant=kind=search"]["n"] == 3 and groups["variant=kind=fixed"]["n"] == 2  # errored left out
    st = groups["variant=kind=search"]
    assert st["mean"] == pytest.approx(0.82) and st["std"] == pytest.approx(0.02)
    assert st["alpha_entropy"] == pytest.approx(0.3) and st["agreement"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert groups["variant=kind=fixed"]["agreement"] is None  # no search: no policy agreement to report
    console = Console(width=200, record=True, color_system=None)
    console.print(s)
    assert "over seeds [variant=kind=search]: val_acc 0.8200 ± 0.0200 (n=3), H(α) 0.30, policy agreement 0.67" \
        in console.export_text()
    no_seed = StudySummary("abl", "val_acc", "max", ["variant"], recs, None, None, "/x", "u", "abl", "p")
    assert no_seed.seed_groups() == []
