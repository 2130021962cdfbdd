"""The CLI's exit codes on wrong input, grouped by command. The rule: wrong input to ``pfnas`` (in-process through
``cli.main``, or as a subprocess) is one line ``pfnas: error: ...`` on stderr and exit 2, never a traceback and
never a wrong result with exit 0; ``predict --skip-bad`` exits 3 when it skipped files; SIGTERM exits 143. See
docs/cli.md for the codes. The feature files keep the library refusals (a PfnasError without the CLI), the tests
that only check rc == 0, and the scenarios where an exit code is one step of a feature (a folder or study locked
by a running process, Ctrl-C in a study, a disk that fills at the finals)."""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import (CRAFTED, DIVERGING_BACKBONE, PARAMS, REPO, TEST_READING_SPACES, TINY_BACKBONE,
                      UNSELECTABLE_METRICS, Payload, checkpoint_32px, crafted_model, disk_with, expect_data_error,
                      fill_disk, free_port, image_folder, one_error_line, one_param_space, pfnas_process, png, run_cli,
                      sidecar, tiny_config, write_one_trial_space, write_space)
from pfnas import cli
from pfnas import data as D
from pfnas.config import OPS, ConfigError, DataConfig, PfnasError, dump_config, load_config
from pfnas.export import META_FILE
from pfnas.methods import run_method
from pfnas.tracking import RunLogger, get_experiment_id, make_client


# ----------------------------------------------------------------------------- usage


def test_usage_errors_exit_2_with_one_line() -> None:
    for args, fragment in ((["--bogus"], "--bogus"), (["tune"], "--space"),
                           (["baseline", "fixed", "--op", "prepend", "--seeds", "abc"], "--seeds")):
        r = pfnas_process(*args, timeout=120)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        one_error_line(r.stderr, fragment)
    r = pfnas_process("--help", timeout=120)
    assert r.returncode == 0 and "Usage" in r.stdout and not r.stderr.strip()


# ----------------------------------------------------------------------------- run, search and baseline: settings


@pytest.mark.parametrize("args, needle", [
    (["run", "--set", "search.nope=3"], "search.nope: unknown field"),
    (["run", "--set", "backbone.name=vit_nonexistent"], "unknown timm model"),
    (["run", "--set", "data.kind=vtab", "--set", "data.root=/nonexistent/vtab", "--set", "data.task=x"], "/nonexistent"),
    (["run", "--config", "/nonexistent.yaml"], "config file not found"),
])
def test_cli_bad_input_exits_2_with_one_line(args, needle, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err


@pytest.mark.slow
def test_search_process_with_a_bad_setting_exits_2(tmp_path):
    bad = pfnas_process("search", "--set", "search.epochs=0", cwd=tmp_path)
    assert bad.returncode == 2 and "search.epochs" in bad.stderr and "Traceback" not in bad.stderr


def test_an_unknown_embedded_config_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    """``-c nosuch`` lists the embedded configs."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "-c", "nosuch"]) == 2
    assert "embedded config: demo, proxy" in capsys.readouterr().err


@pytest.mark.parametrize("override,field", [("search.arch_lr=1e30", "search.arch_lr"),
                                            ("train.optim.lr=inf", "train.optim.lr")])
def test_cli_refuses_absurd_numbers_with_one_line(tmp_path, override, field):
    r = pfnas_process("run", "--set", override, "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr[-2000:]
    one_error_line(r.stderr, field)
    assert not (tmp_path / "out").exists()


def test_unknown_device_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    from pfnas.engine import resolve_device

    for name in ("tpu", "xla", "meta", "cpu:x"):
        with pytest.raises(PfnasError, match="device"):
            resolve_device(name)
    assert resolve_device("cpu") == torch.device("cpu")
    rc, err = run_cli(capsys, "run", "--set", "device=tpu", "-o", str(tmp_path / "out"))
    assert rc == 2
    one_error_line(err, "tpu")


def test_data_root_or_task_on_the_synthetic_default_is_refused(tmp_path: Path, capsys) -> None:
    """``--set data.root=...`` without ``data.kind`` used to train on the in-memory task and exit 0."""
    for setting, fragment in (("data.root=/some/vtab", "data.root='/some/vtab' is ignored"),
                              ("data.task=digits", "data.task='digits' is ignored")):
        rc, err = run_cli(capsys, "run", "--set", setting, "-o", str(tmp_path / "out"))
        assert rc == 2 and not (tmp_path / "out").exists()
        line = one_error_line(err, fragment)
        assert "Value error" not in line and "data.kind" in line


def test_a_run_name_that_leaves_its_folder_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "runs"
    rc, err = run_cli(capsys, "run", "--set", "name=../escaped", "--set", f"output_dir={out}")
    assert rc == 2
    one_error_line(err, "name: '../escaped' is not a plain folder name")
    assert not (tmp_path / "escaped").exists() and not out.exists()


def test_oneshot_rungs_that_do_not_grow_are_one_line_exit_2(tmp_path, capsys):
    rc = cli.main(["run", "--set", "method.kind=oneshot", "--set", "method.rungs=[3,2]", "-o", str(tmp_path / "o")])
    assert rc == 2
    one_error_line(capsys.readouterr().err, "method.rungs")


@pytest.mark.slow
def test_cli_refuses_a_resampled_checkpoint_with_one_line(tmp_path):
    ckpt = checkpoint_32px(tmp_path / "vit32.safetensors")
    r = pfnas_process("run", "--set", f"backbone.name={TINY_BACKBONE['name']}", "--set", f"backbone.checkpoint={ckpt}",
                      *[a for k, v in TINY_BACKBONE["kwargs"].items() for a in ("--set", f"backbone.kwargs.{k}={v}")],
                      "--set", "backbone.kwargs.img_size=64", "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr[-2000:]
    one_error_line(r.stderr, "32 px, patch 4", "64 px, patch 4", "backbone.resample")


def _garbage(path: Path) -> Path:
    """A file of bytes that no database reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(range(256)) * 16)
    return path


@pytest.mark.slow
def test_a_corrupt_mlflow_db_is_one_line_exit_2(tmp_path, tiny_yaml):
    db = _garbage(tmp_path / "mlflow.db")
    before = db.read_bytes()
    out = tmp_path / "out"
    r = pfnas_process("run", "-c", str(tiny_yaml), "-o", str(out), "--tracking-uri", f"sqlite:///{db}", timeout=180)
    assert r.returncode == 2, r.stderr[-3000:]
    one_error_line(r.stderr, f"sqlite:///{db}", "not a valid database", "file is not a database")
    assert not (out / "result.json").exists() and not (out / RunLogger.BUFFER).exists()  # refused before training
    assert db.read_bytes() == before  # never touched


# ----------------------------------------------------------------------------- run and baseline: the output folder


@pytest.mark.slow
def test_output_folder_under_a_file_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    target = blocker / "sub"
    rc, err = run_cli(capsys, "run", "-o", str(target))
    assert rc == 2
    one_error_line(err, str(target))
    r = pfnas_process("baseline", "fixed", "--op", "add", "-o", str(target), timeout=120)
    assert r.returncode == 2
    one_error_line(r.stderr, str(target))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes through chmod")
def test_read_only_output_folder_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for target in (ro, ro / "sub"):
            rc, err = run_cli(capsys, "run", "-o", str(target))
            assert rc == 2
            one_error_line(err, str(target))
    finally:
        ro.chmod(0o755)


def test_rerun_into_a_folder_with_another_config_is_refused(tmp_path, tiny_yaml, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    rc, err = run_cli(capsys, "run", "-c", str(tiny_yaml), "-o", str(out))
    assert rc == 0, err
    result, stored = (out / "result.json").read_bytes(), (out / "config.yaml").read_bytes()
    for change, field in ((["--set", "seed=1"], "seed: 0 -> 1"), (["--set", "train.optim.lr=0.3"], "train.optim.lr"),
                          (["--set", "prompts.length=8"], "prompts.length: 4 -> 8")):
        rc, err = run_cli(capsys, "run", "-c", str(tiny_yaml), *change, "-o", str(out))
        assert rc == 2, (change, err)
        one_error_line(err, str(out), field, "another --out")
        assert (out / "result.json").read_bytes() == result and (out / "config.yaml").read_bytes() == stored
    # the same config resumes (nothing retrained); fields that cannot change the result may differ
    epochs = len((out / "log.jsonl").read_text().splitlines())
    for same in ([], ["--set", "train.eval_every=3", "--set", "name=renamed", "--set", "device=cpu"]):
        rc, err = run_cli(capsys, "run", "-c", str(tiny_yaml), *same, "-o", str(out))
        assert rc == 0, err
        assert len((out / "log.jsonl").read_text().splitlines()) == epochs
    # baselines: the per-seed folder of another learning rate is refused too
    base = tmp_path / "fixed"
    assert run_cli(capsys, "baseline", "fixed", "--op", "add", "-c", str(tiny_yaml), "-o", str(base))[0] == 0
    rc, err = run_cli(capsys, "baseline", "fixed", "--op", "add", "-c", str(tiny_yaml), "--set", "train.optim.lr=0.3",
                      "-o", str(base))
    assert rc == 2
    one_error_line(err, str(base / "seed0"), "train.optim.lr")
    # a first try that stopped before training (a wrong data path) leaves only config.yaml: nothing to protect
    fresh = tmp_path / "fresh"
    rc, err = run_cli(capsys, "run", "-c", str(tiny_yaml), "--set", "data.kind=imagefolder",
                      "--set", f"data.root={tmp_path / 'missing'}", "-o", str(fresh))
    assert rc == 2 and (fresh / "config.yaml").is_file() and not list(fresh.rglob("*.pt"))
    assert run_cli(capsys, "run", "-c", str(tiny_yaml), "-o", str(fresh))[0] == 0


# ----------------------------------------------------------------------------- run: checkpoints, policy, full disk


def test_a_crafted_checkpoint_is_one_line_exit_2_and_its_payload_never_runs(tmp_path, tiny_yaml, capsys,
                                                                            monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out, marker = tmp_path / "out", tmp_path / "payload-ran"
    out.mkdir()
    dump_config(tiny_config(search={"epochs": 1}), out / "config.yaml")  # a folder the run accepts as its own
    ckpt = out / "search.pt"
    torch.save({"phase": "search", "epoch": 0, "evil": Payload(marker)}, ckpt)
    rc, err = run_cli(capsys, "run", "-c", str(tiny_yaml), "-o", str(out))
    assert rc == 2 and not marker.exists()
    one_error_line(err, str(ckpt))
    # plain data, but not a checkpoint of this phase (the payload's dict without it): one line, not a KeyError
    torch.save({"phase": "search", "epoch": 0}, ckpt)
    rc, err = run_cli(capsys, "run", "-c", str(tiny_yaml), "-o", str(out))
    assert rc == 2
    one_error_line(err, str(ckpt), "does not fit")


@pytest.mark.slow
def test_truncated_checkpoints_are_one_line_exit_2(tmp_path, tiny_yaml, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    rc, err = run_cli(capsys, "run", "-c", str(tiny_yaml), "-o", str(out))
    assert rc == 0, err
    search, retrain = out / "search.pt", out / "retrain.pt"
    whole = search.read_bytes()
    search.write_bytes(whole[: len(whole) // 2])
    sidecar(search).unlink(missing_ok=True)  # a checkpoint of an older pfnas: no checksum, the truncation itself is caught
    r = pfnas_process("run", "-c", str(tiny_yaml), "--out", str(out))
    assert r.returncode == 2, r.stderr[-2000:]
    one_error_line(r.stderr, str(search), "truncated")
    search.write_bytes(whole)  # whole again (and without a sidecar it still loads); now the retrain checkpoint
    cut = retrain.read_bytes()
    retrain.write_bytes(cut[: len(cut) - 100])
    rc, err = run_cli(capsys, "run", "-c", str(tiny_yaml), "-o", str(out))
    assert rc == 2
    one_error_line(err, str(retrain))


def test_a_truncated_policy_json_is_one_line_exit_2(tmp_path, tiny_yaml, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    rc, err = run_cli(capsys, "run", "-c", str(tiny_yaml), "-o", str(out))
    assert rc == 0, err
    policy = out / "policy.json"
    text = policy.read_text()
    policy.write_text(text[: len(text) // 2])
    rc, err = run_cli(capsys, "run", "-c", str(tiny_yaml), "-o", str(out))
    assert rc == 2
    one_error_line(err, str(policy))


def test_a_full_disk_is_one_line_exit_2_and_leaves_no_file(tmp_path, tiny_yaml, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    disk_with(0, monkeypatch)
    rc, err = run_cli(capsys, "run", "-c", str(tiny_yaml), "-o", str(tmp_path / "out"))
    assert rc == 2
    one_error_line(err, "no space left", str(tmp_path / "out"))
    assert not list((tmp_path / "out").rglob("*.tmp")) and not list((tmp_path / "out").rglob("*.pt"))


def test_a_failed_checkpoint_write_is_one_line_exit_2(tmp_path, tiny_yaml, capsys, monkeypatch):
    fill_disk(monkeypatch)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rc, err = run_cli(capsys, "run", "-c", str(tiny_yaml), "-o", str(tmp_path / "out"))
    assert rc == 2
    one_error_line(err, "no space left on device")
    assert not list((tmp_path / "out").rglob("*.tmp")) and not list((tmp_path / "out").rglob("*.pt"))


# ----------------------------------------------------------------------------- tune


@pytest.mark.slow
def test_an_unreachable_ray_address_is_one_line_exit_2(tmp_path: Path) -> None:
    """Ray's own client retries a dead GCS address for minutes, printing a warning every few seconds; pfnas tries
    the port once first."""
    port = free_port()  # nothing listens there
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        r = pfnas_process("tune", "--space", str(REPO / "search_spaces" / "demo.yaml"), "--address", address,
                          "--storage", str(tmp_path / "ray"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                          timeout=60)
        assert r.returncode == 2, r.stderr[-2000:]
        one_error_line(r.stderr, "cannot reach the Ray cluster at", address, "--address")


@pytest.mark.slow
def test_cli_bad_space_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "params": PARAMS, "max_concurent_trials": 2}))
    r = pfnas_process("tune", "--space", str(bad), cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "pfnas: error: max_concurent_trials: unknown field"


@pytest.mark.slow
def test_cli_missing_data_root_exits_2_before_ray(tmp_path):
    """A local study with a missing data root is refused in one line before any trial starts (no Tune folder)."""
    r = pfnas_process("tune", "--space", str(REPO / "search_spaces" / "ablation-proxy.yaml"),
                      "--storage", str(tmp_path / "rr"), "--set", f"data.root={tmp_path / 'nope'}", cwd=tmp_path,
                      timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip() == f"pfnas: error: data root not found: {tmp_path / 'nope'}"
    assert not (tmp_path / "rr").exists()


def test_tune_space_that_reads_test_or_cannot_select_exits_2(tmp_path, capsys):
    """The refusals of load_space (tests/test_protocol.py), through ``pfnas tune``."""
    path = tmp_path / "s.yaml"
    cases = [(one_param_space({field: value}), "reads the test split") for field, value in TEST_READING_SPACES]
    cases += [(one_param_space(fields), match) for fields, match in UNSELECTABLE_METRICS]
    for space, match in cases:
        path.write_text(yaml.safe_dump(space))
        rc, err = run_cli(capsys, "tune", "--space", str(path))
        assert rc == 2, (space, err)
        one_error_line(err, match)


def test_experiment_name_cannot_reach_outside_the_storage(tmp_path, capsys):
    """``--storage S/ray --experiment ../../victim`` once ran and removed ``S/../victim-final`` (the finals rmtree)."""
    victim = tmp_path / "victim-final"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    space = write_one_trial_space(tmp_path / "spaces", "s", final={"seeds": 1})
    rc, err = run_cli(capsys, "tune", "--space", str(space), "--storage", str(tmp_path / "S" / "ray"),
                      "--experiment", "../../victim", "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
    assert rc == 2
    one_error_line(err, "--experiment '../../victim' is not a plain folder name")
    assert (victim / "thesis.tex").read_text() == "years of work"
    assert not (tmp_path / "S").exists()  # refused before anything was made


def test_a_finals_folder_pfnas_did_not_make_is_never_removed(tmp_path, capsys):
    """The finals folder is replaced when a study selects other trials; one pfnas did not make is refused whole,
    before the study starts."""
    storage = tmp_path / "ray"
    mine = storage / "s-final"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    space = write_one_trial_space(tmp_path, "s", final={"seeds": 1})
    rc, err = run_cli(capsys, "tune", "--space", str(space), "--storage", str(storage),
                      "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db")
    assert rc == 2
    one_error_line(err, f"{mine} exists and was not made by pfnas")
    assert (mine / "notes.txt").read_text() == "mine" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert not (storage / "s").exists()


@pytest.mark.slow
def test_a_corrupt_optuna_db_is_one_line_exit_2(tmp_path):
    db = _garbage(tmp_path / "optuna.db")  # where the study keeps its sampler by default: beside mlflow.db
    r = pfnas_process("tune", "--space", "search_spaces/demo.yaml", "--tracking-uri",
                      f"sqlite:///{tmp_path}/mlflow.db", "--storage", str(tmp_path / "ray"), timeout=180)
    assert r.returncode == 2, r.stderr[-3000:]
    one_error_line(r.stderr, f"sqlite:///{db}", "not a valid database", "file is not a database")
    assert not list((tmp_path / "ray").glob("*/*/params.json"))  # no trial ran
    client = make_client(f"sqlite:///{tmp_path}/mlflow.db")  # and no study parent run left RUNNING
    assert not [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
                if r.data.tags.get("pfnas.kind") == "study"]


def test_cli_study_without_a_finished_trial_exits_2(ray_session, tmp_path, tracking, capsys):
    """Every trial failed: the table still shows why, and `pfnas tune` exits 2 with one error line (slow: Ray)."""
    base = tiny_config().model_dump(mode="json")
    base["backbone"] = DIVERGING_BACKBONE
    space = write_space(tmp_path, "allfail", base=base, num_samples=1, params={
        "search.arch_lr": {"type": "choice", "values": [0.01]}})
    rc = cli.main(["tune", "--space", str(space), "--storage", str(tmp_path / "ray"), "--tracking-uri", tracking])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("pfnas: error: study allfail: none of its 1 trials finished with val_acc (1 errored), "
                              "nothing was selected; first error: ")
    assert "non-finite loss" in err[-1]


# ----------------------------------------------------------------------------- predict and export


def test_predict_a_missing_image_or_model_is_one_line_exit_2(tiny_export: Path, tmp_path: Path, capsys) -> None:
    rc = cli.main(["predict", "-m", str(tiny_export / "run"), str(tmp_path / "missing.png")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("pfnas: error: ") and "missing.png" in err[0]
    rc = cli.main(["predict", "-m", str(tmp_path / "nomodel"), str(tiny_export / "img.png")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "nomodel" in err[0]


def test_predict_a_run_uri_without_a_tracking_uri_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    """``predict -m runs:/...`` with no tracking URI makes no ./mlflow.db."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "img.png").write_bytes(b"x")
    assert cli.main(["predict", "-m", "runs:/0123abcd/model", str(tmp_path / "img.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pfnas: error: runs:/0123abcd/model names an MLflow run, but no tracking URI is set")
    assert not (tmp_path / "mlflow.db").exists()


def test_predict_on_a_crafted_model_file_is_one_line_exit_2(tiny_export: Path, tmp_path: Path, capsys) -> None:
    """The crafted pfnas_model.json files of tests/test_export.py, through ``pfnas predict``."""
    for case, (edit, fragment) in CRAFTED.items():
        folder = crafted_model(tiny_export, tmp_path / case.replace(" ", "_"), edit)
        rc, err = run_cli(capsys, "predict", "-m", str(folder), str(tiny_export / "img.png"))
        assert rc == 2, (case, err)
        one_error_line(err, fragment)


def _images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img{i}.png" for i in range(n)]
    for i, p in enumerate(paths):
        Image.new("RGB", (20 + i, 16), (40 * i, 0, 0)).save(p)
    return paths


def test_predict_skip_bad_writes_the_good_ones(tiny_export: Path, tmp_path: Path, capsys) -> None:
    good = _images(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "broken.png").write_text("not a png")
    (tmp_path / "imgs" / "loop.jpg").symlink_to("loop.jpg")  # a symlink loop inside the folder
    model = str(tiny_export / "run")
    rc = cli.main(["predict", "-m", model, str(tmp_path / "imgs")])  # default: any bad file stops it
    one_error_line(capsys.readouterr().err, "broken.png", "--skip-bad")
    assert rc == 2
    out = tmp_path / "pred.csv"
    rc = cli.main(["predict", "-m", model, str(tmp_path / "imgs"), "--skip-bad", "--csv", str(out),
                   "--batch-size", "2"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 3, err
    assert sorted({r["path"] for r in csv.DictReader(out.open())}) == [str(p) for p in good]
    assert len(err) == 2 and all(ln.startswith("pfnas: skipped: ") for ln in err), err
    assert "broken.png" in err[0] and "loop.jpg" in err[1] and "symlink loop" in err[1]
    (tmp_path / "imgs" / "broken.png").unlink()
    rc = cli.main(["predict", "-m", model, str(tmp_path / "imgs")])  # a loop inside a folder is named as such
    one_error_line(capsys.readouterr().err, "loop.jpg", "symlink loop", "--skip-bad")
    assert rc == 2
    rc = cli.main(["predict", "-m", model, *map(str, good), "--skip-bad"])  # all good: 0
    assert rc == 0 and capsys.readouterr().err == ""
    (tmp_path / "broken.png").write_text("not a png")
    rc = cli.main(["predict", "-m", model, str(tmp_path / "broken.png"), "--skip-bad"])  # none good: 2
    assert rc == 2 and capsys.readouterr().err.splitlines()[-1].startswith("pfnas: error: no readable image")


def test_predict_names_a_symlink_loop(tiny_export: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    rc = cli.main(["predict", "-m", str(tiny_export / "run"), str(tmp_path / "a.png")])
    one_error_line(capsys.readouterr().err, "a.png", "symlink loop")
    assert rc == 2
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    rc = cli.main(["predict", "-m", str(tiny_export / "run"), str(tmp_path / "gone.png")])
    one_error_line(capsys.readouterr().err, "gone.png", "dangling symlink")
    assert rc == 2


# ----------------------------------------------------------------------------- compare and report

REPORT_EXP = "eep"  # the experiment the report's wrong-input tests find (and name in their errors)


@pytest.fixture(scope="module")
def report_uri(tracking) -> str:
    """The module's sqlite store with an (empty) experiment REPORT_EXP."""
    get_experiment_id(make_client(tracking), REPORT_EXP, tracking)
    return tracking


def test_compare_against_a_down_server_fails_in_seconds(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)  # MLflow's own default: 7 retries
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    rc, err = run_cli(capsys, "compare", "--tracking-uri", uri, "--experiment", "x", "-o", str(tmp_path / "cmp"))
    took = time.monotonic() - t0
    assert rc == 2 and took < 30, (rc, took)
    one_error_line(err, uri)


@pytest.mark.parametrize("args,fragments", [
    (["--experiment", "nope"], ["'nope' not found", REPORT_EXP]),
    (["--experiment-prefix", "zz"], ["no MLflow experiment named zz*"]),
    ([], ["--experiment NAME"]),
    (["--experiment", REPORT_EXP, "--format", "html"], ["--format 'html'"]),
])
def test_report_wrong_input_is_one_line_exit_2(report_uri, capsys, args, fragments):
    rc = cli.main(["report", "--tracking-uri", report_uri, *args])
    assert rc == 2
    one_error_line(capsys.readouterr().err, *fragments)


def test_report_of_an_experiment_without_finals_is_refused(report_uri, capsys):
    client = make_client(report_uri)
    get_experiment_id(client, "empty", report_uri)
    assert cli.main(["report", "--tracking-uri", report_uri, "--experiment", "empty"]) == 2
    one_error_line(capsys.readouterr().err, "no finished finals", "empty")


# ----------------------------------------------------------------------------- bench


def test_bench_of_zero_steps_exits_2(capsys):
    rc, err = run_cli(capsys, "bench", "--steps", "0")
    assert rc == 2
    one_error_line(err, "steps >= 1", "steps=0")


# ----------------------------------------------------------------------------- data check: broken data, labels


def _vtab_task(root: Path, train: list[int], test: list[int], name: str = "toy") -> Path:
    """A VTAB-1k task folder: one 8x8 PNG per listed label; val200 has train800's labels in files of its own."""
    task = root / name
    lines = {}
    for split, labels in (("train", train), ("val", train), ("test", test)):
        lines[split] = []
        for i, lab in enumerate(labels):
            png(task / "images" / f"{split}_{i}.png", (i * 10, lab * 20, 0))
            lines[split].append(f"images/{split}_{i}.png {lab}")
    lines["trainval"] = lines["train"] + lines["val"]
    for split, f in (("train", "train800.txt"), ("val", "val200.txt"), ("trainval", "train800val200.txt"),
                     ("test", "test.txt")):
        (task / f).write_text("\n".join(lines[split]) + "\n")
    return task


def _check_fails(path: Path, fragment: str) -> None:
    rep = D.check_dataset(path)
    assert not rep.ok and any(fragment in p for p in rep.problems), rep.problems
    r = pfnas_process("data", "check", str(path), timeout=120)
    assert r.returncode == 2, r.stderr
    one_error_line(r.stderr)


@pytest.mark.slow
def test_data_check_on_broken_data_exits_2(tmp_path: Path) -> None:
    ok = _vtab_task(tmp_path / "ok", [0, 1, 2, 0], [2, 1])
    assert pfnas_process("data", "check", str(ok), timeout=120).returncode == 0
    bad = _vtab_task(tmp_path / "bad", [0, 1, 2, 0], [2, 1])
    (bad / "images" / "train_1.png").write_bytes(b"not a png")
    r = pfnas_process("data", "check", str(bad), timeout=120)
    assert r.returncode == 2 and "FAILED" in r.stdout
    one_error_line(r.stderr, str(bad))


@pytest.mark.slow
def test_vtab_label_gap_refused_for_any_task(tmp_path: Path) -> None:
    for name in ("toy", "svhn"):  # an unknown task and a known VTAB one
        _vtab_task(tmp_path / "v", [0, 2, 0, 2], [0, 2], name=name)  # label 1 never occurs
        expect_data_error(DataConfig(kind="vtab", root=str(tmp_path / "v"), task=name), "1", "gaps")
    _check_fails(tmp_path / "v" / "toy", "gaps")


@pytest.mark.slow
def test_vtab_class_only_in_test_refused(tmp_path: Path) -> None:
    _vtab_task(tmp_path / "v", [0, 1, 0, 1], [0, 1, 2])
    expect_data_error(DataConfig(kind="vtab", root=str(tmp_path / "v"), task="toy"), "test", "2",
                      "never occur in train")
    _check_fails(tmp_path / "v" / "toy", "never occur in train")


@pytest.mark.slow
def test_fgvc_label_only_in_test_refused(tmp_path: Path) -> None:
    task = tmp_path / "fgvc" / "birds"
    for split, labels in (("train", [3, 7, 3]), ("val", [3, 7]), ("test", [3, 7, 9])):
        entries = {}
        for i, lab in enumerate(labels):
            png(task / "images" / f"{split}_{i}.png", (i, lab, 0))
            entries[f"{split}_{i}.png"] = lab
        (task / f"{split}.json").write_text(json.dumps(entries))
    expect_data_error(DataConfig(kind="fgvc", root=str(task.parent), task="birds"), "'9'", "never occur in train")
    _check_fails(task, "never occur in train")


@pytest.mark.slow
def test_imagefolder_one_class_refused(tmp_path: Path) -> None:
    image_folder(tmp_path / "one", classes=1, per_class=10)
    expect_data_error(DataConfig(kind="imagefolder", root=str(tmp_path / "one")), "only one class", "class_0")
    _check_fails(tmp_path / "one", "only one class")
    image_folder(tmp_path / "split" / "train", 2, 3)  # class_1 has an (empty) train folder but test images
    for p in (tmp_path / "split" / "train" / "class_1").iterdir():
        p.unlink()
    image_folder(tmp_path / "split" / "test", 2, 1)
    expect_data_error(DataConfig(kind="imagefolder", root=str(tmp_path / "split")), "class_1", "never occur in train")


# ----------------------------------------------------------------------------- signals: SIGTERM is 143


@pytest.mark.slow
def test_sigterm_keeps_checkpoint_and_exits_143(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pfnas", "run", "--set", "train.epochs=50", "-o", str(out)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "search.pt").is_file():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err[-2000:]
    assert "terminated" in err and "Traceback" not in err
    state = torch.load(out / "search.pt", map_location="cpu", weights_only=True)
    assert state  # the last checkpoint is whole and loads


# ----------------------------------------------------------------------------- property tests: mutated inputs
# A mutated pfnas_model.json (predict) or config YAML (search) gives a result or one ``pfnas: error:`` line with
# exit 2 through the CLI (called in-process), never a traceback.

DEMO_YAML = REPO / "pfnas" / "configs" / "demo.yaml"
SETTINGS = settings(max_examples=50, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6))
GARBAGE = st.one_of(
    SCALAR,
    st.sampled_from([-1, 0, 1, 2, 3, 16, 2**31, 10**9, 10**18, 2**64, -(10**12), 3.0, -0.5, 1e300,
                     math.nan, math.inf, -math.inf, "4", "four", "", "../x", *OPS, "none", "conv"]),
    st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                       max_size=3), max_leaves=6),
)


def _paths(doc, prefix=()):
    """Every key path into the nested dicts and lists of ``doc`` (the root is ``()``)."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated(draw, base):
    """``base`` with 1-3 mutations: a value replaced by garbage (wrong type, negative, huge, NaN, nested), a key
    removed, or an extra key / item added (the whole document replaced only rarely)."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        if not isinstance(doc, (dict, list)) or draw(st.integers(0, 49)) == 0:
            doc = draw(GARBAGE)
            continue
        kind = draw(st.sampled_from(["replace", "delete", "extra"]))
        paths = [p for p in _paths(doc) if p and (kind != "extra" or isinstance(_at(doc, p), (dict, list)))]
        paths = sorted(paths, key=len, reverse=True) + ([()] if kind == "extra" else [])  # nested ones first
        if not paths:
            continue
        path = draw(st.sampled_from(paths))
        target = _at(doc, path)
        if kind == "extra":
            if isinstance(target, dict):
                target[draw(st.text(max_size=8))] = draw(GARBAGE)
            else:
                target.append(draw(GARBAGE))
        elif kind == "replace":
            _at(doc, path[:-1])[path[-1]] = draw(GARBAGE)
        else:
            del _at(doc, path[:-1])[path[-1]]
    return doc


def _at(doc, path):
    for key in path:
        doc = doc[key]
    return doc


def _cli(args: list[str]) -> tuple[int, str]:
    """``pfnas <args>`` in-process: exit code and stderr (stdout is dropped)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(args)
    return rc, err.getvalue()


def _assert_result_or_one_error(rc: int, stderr: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if rc == 0:
        return
    assert rc == 2, (rc, stderr)
    assert len(lines) == 1 and lines[0].startswith("pfnas: error: "), stderr


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A real export of a tiny 2-layer model, its json, and an image; the hub is offline (no downloads)."""
    root = tmp_path_factory.mktemp("untrusted")
    run_method(tiny_config(method={"kind": "fixed", "policy": ["add", "cross_attn"]}, train={"epochs": 1}),
               root / "run")
    Image.new("RGB", (24, 20), (10, 120, 200)).save(root / "img.png")
    folder = root / "run" / "retrain"
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield folder, json.loads((folder / META_FILE).read_text()), root / "img.png"
    if saved is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = saved


@pytest.mark.slow
def test_mutated_model_file_is_a_result_or_one_error(exported) -> None:
    folder, meta, image = exported
    assert _cli(["predict", "-m", str(folder), str(image)])[0] == 0  # the untouched export predicts
    original = (folder / META_FILE).read_text()
    outcomes = []

    @SETTINGS
    @given(mutated(meta))
    def check(doc) -> None:
        (folder / META_FILE).write_text(json.dumps(doc))
        rc, stderr = _cli(["predict", "-m", str(folder), str(image)])
        _assert_result_or_one_error(rc, stderr)
        outcomes.append(rc)

    try:
        check()
    finally:
        (folder / META_FILE).write_text(original)
    assert 2 in outcomes  # the mutations reached the validation


@pytest.fixture(scope="module")
def config_bases() -> list[dict]:
    """The demo config and the tests' tiny config, as the dicts their YAML files hold."""
    return [yaml.safe_load(DEMO_YAML.read_text()), tiny_config().model_dump(mode="json")]


@pytest.mark.slow
def test_mutated_config_yaml_is_a_config_or_one_error(config_bases, tmp_path_factory) -> None:
    folder = tmp_path_factory.mktemp("configs")
    blocker = folder / "a-file"
    blocker.write_text("")
    out = blocker / "out"  # `pfnas search` stops at its output folder once the config loaded: no training here
    outcomes = []

    @SETTINGS
    @given(st.sampled_from(range(len(config_bases))).flatmap(lambda i: mutated(config_bases[i])))
    def check(doc) -> None:
        path = folder / "config.yaml"
        path.write_text(yaml.safe_dump(doc))
        rc, stderr = _cli(["search", "-c", str(path), "-o", str(out)])
        _assert_result_or_one_error(rc, stderr)
        assert rc == 2
        try:
            load_config(path)
            loaded = True
        except ConfigError:
            loaded = False
        assert ("output folder" in stderr) == loaded, stderr  # a loadable config passed, every other one stopped
        outcomes.append(loaded)

    check()
    assert False in outcomes


@pytest.mark.slow
def test_sigterm_during_a_study_does_what_ctrl_c_does(tmp_path: Path) -> None:
    """``ray.init`` replaces the SIGTERM handler with ``sys.exit(15)`` (no resume line, Tune's loop unwound
    mid-step). While pfnas holds its Ray session, SIGTERM does what Ctrl-C would do at that moment (Tune's graceful
    stop, or KeyboardInterrupt in the main thread of several side-by-side studies); the caller's handler (the CLI's)
    comes back after."""
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent('''
        import os, signal, sys
        from pfnas.tune.study import _ray_session

        def mine(signum, frame):
            pass

        signal.signal(signal.SIGTERM, mine)
        seen = []
        with _ray_session(None, verbose=False):
            assert signal.getsignal(signal.SIGTERM) is not mine
            signal.signal(signal.SIGINT, lambda s, f: seen.append(s))  # as Tune's graceful stop during a fit
            os.kill(os.getpid(), signal.SIGTERM)
            assert seen == [signal.SIGINT], seen
            signal.signal(signal.SIGINT, signal.default_int_handler)  # several studies: the main thread's own
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                raise AssertionError("no KeyboardInterrupt")
            except KeyboardInterrupt:
                pass
        assert signal.getsignal(signal.SIGTERM) is mine
        print("ok")
    '''))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=180, check=False)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.stdout + r.stderr)[-3000:]
