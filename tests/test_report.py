"""``pfnas report``: methods x tasks from the finals of studies in a real sqlite MLflow store."""
from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import statistics
import time
from pathlib import Path

import pytest
from conftest import png, tiny_config, write_space

from pfnas import cli
from pfnas.tracking import get_experiment_id, make_client
from pfnas.tracking.report import build_report, method_name

EXP = "eep"
TASKS = ["dtd", "eurosat", "toy"]  # Natural, Specialized, and a task of no VTAB group
METHODS = {  # trial params of each method, and the tasks it has finals on
    "search": ({"method.kind": "search", "search.mode": "softmax"}, TASKS),
    "all-affine": ({"method.kind": "fixed", "method.op": "affine"}, TASKS),
    "linear probe": ({"method.kind": "probe"}, ["dtd"]),  # a method missing tasks
}
COST = {"search": 1200.0, "all-affine": 0.0, "linear probe": 0.0}
PCT = {"search": 0.5, "all-affine": 0.25, "linear probe": 0.01}


def _log_studies(uri: str) -> dict:
    """One study per task in experiment EXP, as `pfnas tune` logs a `tasks:` space: a parent run (kind study, its
    variants as params), a trial per variant, and 3 finals (seeds) of each variant's trial. Returns the test
    accuracies (percent) by (method, task) and the parent run ids."""
    client = make_client(uri)
    exp_id = get_experiment_id(client, EXP, uri)
    rng = random.Random(0)
    accs: dict[tuple[str, str], list[float]] = {}
    parents = []
    for task in TASKS:
        study = f"{EXP}-{task}"
        variants = [{"method.kind": "search"}, {"method.kind": "fixed", "method.op": "affine"}, {"method.kind": "probe"}]
        parent = client.create_run(exp_id, tags={"pfnas.kind": "study", "pfnas.study": study, "pfnas.task": task},
                                   run_name=study).info.run_id
        for i, v in enumerate(variants):
            client.log_param(parent, f"variant.{i}", json.dumps(v))
        parents.append(parent)
        for k, (name, (params, tasks)) in enumerate(METHODS.items()):
            if task not in tasks:
                continue
            trial = client.create_run(exp_id, run_name=f"t{k:02d}", tags={
                "pfnas.kind": "trial", "pfnas.study": study, "pfnas.trial_id": f"tr{k}", "pfnas.config_hash": f"h{k}",
                "mlflow.parentRunId": parent, "pfnas.stage": "select"}).info.run_id
            for key, val in {**params, "data.task": task, "train.optim.lr": "0.5"}.items():
                client.log_param(trial, key, val)
            client.log_metric(trial, "val_acc", 0.9)
            client.log_metric(trial, "cost_images", COST[name])
            client.set_terminated(trial)
            for seed in range(3):
                acc = round(rng.uniform(0.3, 0.95), 4)
                accs.setdefault((name, task), []).append(100 * acc)
                run = client.create_run(exp_id, run_name=f"final s{seed}", tags={
                    "pfnas.kind": "final", "pfnas.study": study, "pfnas.selected": f"h{k}",
                    "pfnas.selected_trial": f"tr{k}", "pfnas.label": f"{name} [train.optim.lr=0.5]",
                    "pfnas.method": "fixed", "pfnas.stage": "final", "mlflow.parentRunId": parent}).info.run_id
                for key, val in {"method.kind": "fixed", "method.policy": json.dumps(["affine", "affine"]),
                                 "data.task": task, "seed": str(seed)}.items():
                    client.log_param(run, key, val)
                for key, val in {"test_acc": acc, "tuned_percent": PCT[name], "tuned_params": 1000 * PCT[name],
                                 "cost_images": 0.0}.items():
                    client.log_metric(run, key, val)
                client.set_terminated(run)
        client.set_terminated(parent)
    # noise the report must leave out: an unfinished final, a final of another experiment
    other = get_experiment_id(client, "elsewhere", uri)
    for eid, status in ((exp_id, "FAILED"), (other, "FINISHED")):
        run = client.create_run(eid, tags={"pfnas.kind": "final", "pfnas.study": f"{EXP}-dtd",
                                           "pfnas.selected_trial": "tr0"}).info.run_id
        client.log_param(run, "data.task", "dtd")
        client.log_metric(run, "test_acc", 0.01)
        client.set_terminated(run, status)
    return {"accs": accs, "parents": parents}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{d}/mlflow.db"
    return {"uri": uri, "dir": d, **_log_studies(uri)}


def _cell(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f} ({len(xs)})"


def test_method_names_from_trial_params():
    assert method_name({"method.kind": "fixed", "method.op": "prepend"}) == "all-prepend (VPT-deep)"
    assert method_name({"method.kind": "fixed", "method.op": "affine"}) == "all-affine"
    assert method_name({"method.kind": "probe"}) == "linear probe"
    assert method_name({"method.kind": "search", "search.mode": "gumbel"}) == "search-gdas"
    assert method_name({"method.kind": "random", "method.weight_sharing": "True"}) == "random+ws"
    # ablation arms of one method stay apart: the variant's overrides the name leaves out, in brackets
    variants = [{"search.mode": "gumbel"}, {"search": {"mode": "gumbel", "centered": True}}, {"search.mode": "softmax"}]
    assert method_name({"method.kind": "search", "search.mode": "gumbel", "search.centered": "True"},
                       variants) == "search-gdas [centered=True]"
    assert method_name({"method.kind": "search", "search.mode": "gumbel", "search.centered": "False"},
                       variants) == "search-gdas"
    # ... and only when another variant gets the same name
    methods = [{"method.kind": "random", "method.samples": 4}, {"method.kind": "evolution", "method.population": 4}]
    assert method_name({"method.kind": "random", "method.samples": "4"}, methods) == "random"


@pytest.mark.slow
def test_table_cells_group_means_and_means(store):
    rep = build_report(store["uri"], [EXP])
    accs = store["accs"]
    assert rep.tasks == TASKS
    assert [g for g, _ in rep.groups] == ["Natural", "Specialized", "Other"]
    assert [r.name for r in rep.rows] == ["linear probe", "all-affine", "search"]  # kind order, not a ranking
    for row in rep.rows:
        s = rep.summary(row)
        has = [t for t in TASKS if (row.name, t) in accs]
        for t in TASKS:
            if t in has:
                xs = accs[(row.name, t)]
                mean, std, n = s["cells"][t]
                assert (mean, std, n) == (pytest.approx(statistics.mean(xs)), pytest.approx(statistics.stdev(xs)), 3)
            else:
                assert s["cells"][t] is None
        cell_mean = {t: statistics.mean(accs[(row.name, t)]) for t in has}
        assert s["groups"]["Natural"] == (pytest.approx(cell_mean["dtd"]), 1)
        groups = [cell_mean[t] for t in ("dtd", "eurosat") if t in has]  # one task per VTAB group here
        assert s["mean_of_groups"] == (pytest.approx(statistics.mean(groups)), len(groups))
        assert s["mean"] == (pytest.approx(statistics.mean(cell_mean.values())), len(has))
        assert s["tasks"] == len(has)
        assert s["tuned_percent"] == pytest.approx(PCT[row.name])
        assert s["cost_images"] == pytest.approx(COST[row.name])  # the selecting trial's, not the final's 0
    assert len(rep.parent_run_ids) == 3


def test_outputs_parse_and_parents_get_the_files(store, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["report", "--experiment", EXP, "--tracking-uri", store["uri"], "--out", str(out),
                   "--format", "markdown"])
    md = capsys.readouterr().out
    assert rc == 0
    assert md == (out / "report.md").read_text()
    accs = store["accs"]
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[:5] == ["method", "tasks", "dtd", "eurosat", "toy"]
    assert "Natural (1/7)" in head and "Specialized (1/4)" in head and "Other (1)" in head
    assert "mean of groups (2/3)" in head and "mean (3 tasks)" in head
    rows = {c[0]: c for c in ([x.strip() for x in ln.strip("|").split("|")] for ln in lines[2:])}
    assert rows["search"][2:5] == [_cell(accs[("search", t)]) for t in TASKS]
    assert rows["linear probe"][1:5] == ["1/3", _cell(accs[("linear probe", "dtd")]), "—", "—"]
    probe_dtd = statistics.mean(accs[("linear probe", "dtd")])
    assert rows["linear probe"][head.index("mean (3 tasks)")] == f"{probe_dtd:.2f} (1/3)"  # marked with its count
    assert rows["linear probe"][head.index("mean of groups (2/3)")] == f"{probe_dtd:.2f} (1/2)"

    table = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    by = {r["method"]: r for r in table}
    for name in ("search", "all-affine"):
        for t in TASKS:
            xs = accs[(name, t)]
            assert float(by[name][f"{t}_mean"]) == pytest.approx(statistics.mean(xs), abs=1e-4)
            assert float(by[name][f"{t}_std"]) == pytest.approx(statistics.stdev(xs), abs=1e-4)
            assert by[name][f"{t}_n"] == "3"
        plain = statistics.mean(statistics.mean(accs[(name, t)]) for t in TASKS)
        assert float(by[name]["mean_over_tasks"]) == pytest.approx(plain, abs=1e-4)
    assert by["linear probe"]["eurosat_mean"] == "" and by["linear probe"]["tasks"] == "1"

    tex = (out / "report.tex").read_text()
    assert r"\begin{tabular}" in tex and r"\end{tabular}" in tex
    body = [ln for ln in tex.splitlines() if ln.endswith(r"\\")]
    assert all(ln.count(" & ") == len(head) - 1 for ln in body)  # every row has every column
    xs = accs[("all-affine", "eurosat")]
    assert f"{statistics.mean(xs):.2f} $\\pm$ {statistics.stdev(xs):.2f} (3)" in tex
    assert r"linear probe & 1/3 &" in tex and "Natural (1/7)" in tex

    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = make_client(store["uri"])
    for parent in store["parents"]:
        logged = sorted(Path(a.path).name for a in client.list_artifacts(parent, "report"))
        assert logged == ["report.csv", "report.md", "report.png", "report.tex"]


def test_prefix_default_table_and_no_logging(store, tmp_path, capsys, monkeypatch):
    from rich.console import Console

    monkeypatch.setattr(cli, "console", Console(width=300))  # the table unfolded
    client = make_client(store["uri"])
    before = {p: len(client.list_artifacts(p)) for p in store["parents"]}
    rc = cli.main(["report", "--experiment-prefix", "ee", "--tracking-uri", store["uri"], "--no-log-to-parent",
                   "--format", "csv"])
    out = capsys.readouterr().out
    assert rc == 0 and out.splitlines()[0].startswith("method,tasks,dtd_mean")
    assert {p: len(client.list_artifacts(p)) for p in store["parents"]} == before
    rc = cli.main(["report", "--experiment", EXP, "--tracking-uri", store["uri"], "--no-log-to-parent"])
    text = capsys.readouterr().out
    probe = next(ln for ln in text.splitlines() if "linear probe" in ln)
    assert rc == 0 and "eurosat" in text and _cell(store["accs"][("linear probe", "dtd")]) in probe


def _vtab_task(root: Path, task: str, shade: int) -> None:
    """A 3-class VTAB-layout task of 8 px images: train 6, val 6, test 6."""
    lines = []
    for i in range(18):
        png(root / task / "images" / f"{i:03d}.png", ((i % 3) * 80 + shade, i * 5, 0))
        lines.append(f"images/{i:03d}.png {i % 3}")
    (root / task / "train800.txt").write_text("\n".join(lines[:6]) + "\n")
    (root / task / "val200.txt").write_text("\n".join(lines[6:12]) + "\n")
    (root / task / "train800val200.txt").write_text("\n".join(lines[:12]) + "\n")
    (root / task / "test.txt").write_text("\n".join(lines[12:]) + "\n")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("PFNAS_SLOW_TESTS"), reason=(
    "a real two-task study is 4 Tune runs (trials and finals of 2 studies): ~3 min on a 2-core machine, over the "
    "90 s a test may take; PFNAS_SLOW_TESTS=1 runs it"))
def test_report_of_a_real_two_task_study(ray_session, tmp_path, capsys):
    """A real `tasks:` study (two tasks, two method variants, one final seed each): the report shows both tasks."""
    from pfnas.tune import run_tune

    _vtab_task(tmp_path / "vtab", "dtd", 0)
    _vtab_task(tmp_path / "vtab", "toy", 20)
    base = tiny_config(data={"kind": "vtab", "root": str(tmp_path / "vtab"), "task": "dtd", "batch_size": 6},
                       search={"epochs": 1}, train={"epochs": 1}).model_dump(mode="json")
    base["data"].pop("synthetic_classes", None)
    base["data"].pop("synthetic_per_class", None)
    space = write_space(tmp_path, "two", base=base, tasks=["dtd", "toy"], algorithm="grid", num_samples=None,
                        startup_trials=0, params={}, final={"seeds": 1, "per_variant": True},
                        variants=[{"method.kind": "fixed", "method.op": "affine"}, {"method.kind": "probe"}])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    t0 = time.monotonic()
    run_tune(space, storage=str(tmp_path / "ray"), tracking_uri=uri)
    assert time.monotonic() - t0 < 600
    capsys.readouterr()
    assert cli.main(["report", "--experiment", "two", "--tracking-uri", uri, "--format", "markdown"]) == 0
    md = capsys.readouterr().out
    head = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    assert head[:4] == ["method", "tasks", "dtd", "toy"] and "Natural (1/7)" in head and "Other (1)" in head
    rows = {r[0]: r for r in ([c.strip() for c in ln.strip("|").split("|")] for ln in md.splitlines()[2:])}
    assert sorted(rows) == ["all-affine", "linear probe"]
    for r in rows.values():
        assert r[1] == "2/2" and all(re.fullmatch(r"\d+\.\d\d \(1\)", c) for c in r[2:4])
