"""``pfnas report``: the results table of logged studies, methods x tasks, from their finals in MLflow.

The report selects nothing. It reads the finals the studies already chose (runs tagged ``pfnas.kind=final``: the
val-selected trial of a study, or of each variant with ``final.per_variant``, retrained on train+val and tested once
per seed) and shows their ``test_acc``; rows are in a fixed method order (probe, fixed ops, random, evolution,
search), never ranked by a score. Accuracies are in percent.

* a row is a method, named by :func:`method_name` from the params of the trial a final finalises (tag
  ``pfnas.selected_trial`` of the same ``pfnas.study``): a final's own params are ``method.kind=fixed`` with the
  selected policy, so they do not tell the method. When two variants of a study get the same name, the overrides
  the name does not express follow in brackets (``search-gdas [centered=True]``), so ablation arms stay apart;
* a cell is mean ± sample std (n) of the method's finals on that task (n: finals, one per seed); the task of a
  final is its ``data.task`` param (else its ``pfnas.dataset`` tag);
* columns: VTAB-1k tasks in the order of :data:`VTAB_GROUPS`, then other tasks alphabetically; the means of the
  VTAB groups present ("Natural (2/7)": 2 of the group's 7 tasks are in the table), an "Other" group for the
  other tasks, the mean of the VTAB group means (over the groups present) and the plain mean over all tasks. The
  two summary means differ (papers report both). A method without a task shows "—" there; its means cover the
  tasks it has, marked with their count ("70.10 (1/2)"), and column ``tasks`` says how many it has;
* deployed params: the mean ``tuned_percent`` (of the backbone) and ``tuned_params`` of the method's finals;
* selection cost: the ``cost_images`` of the trial(s) each final finalises (training images the method spent
  choosing its policy: the search, or the candidates of random search / evolution; 0 for a fixed op or the
  probe), averaged over the method's tasks. The retrain grid and the finals, the same for every method, are not
  counted.

A method with finals of more than one selected configuration on one task (a Pareto front, a study run twice into
one experiment) is refused: the report would have to choose between them.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pfnas.config import ExperimentConfig, PfnasError
from pfnas.tracking.store import check_reachable, make_client, resolve_tracking_uri
from pfnas.tracking.values import finite_scalar, flatten, human_count, mean_std, method_label

VTAB_GROUPS: dict[str, tuple[str, ...]] = {
    "Natural": ("cifar100", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"),
    "Specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "Structured": ("clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi",
                   "smallnorb_ele"),
}
OTHER = "Other"
MISSING = "—"
REPORT_FILES = ("report.md", "report.csv", "report.tex", "report.png")
_KIND_ORDER = {"probe": 0, "fixed": 1, "random": 2, "evolution": 3, "search": 4}
_NAMED_BY_LABEL = ("method.kind", "method.op", "method.policy", "method.weight_sharing", "search.mode")


def _param_value(text: str | None) -> Any:
    """An MLflow param string back to a value: JSON where it parses, ``True``/``False``/``None``, else the text."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return {"True": True, "False": False, "None": None}.get(text, text)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def method_name(params: dict[str, str], variants: list[dict[str, Any]] | None = None) -> str:
    """Display name of the method a (trial) run's params describe: :func:`method_label`'s name with fixed ops as
    ``all-<op>`` (``all-prepend (VPT-deep)``), the probe as ``linear probe``. When other ``variants`` of its study
    (the parent's ``variant.*`` params) get the same name, the overrides of the run's own variant that the name
    leaves out follow in brackets (``search-gdas [centered=True]``), so ablation arms stay apart."""
    name = _base_name(params)
    mine = _own_variant(params, variants or [])
    if mine is None:
        return name
    twins = [v for v in variants or [] if _base_name({**params, **{k: json.dumps(x) for k, x in flatten(v).items()}})
             == name]
    extra = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in mine.items() if k not in _NAMED_BY_LABEL)
    return f"{name} [{extra}]" if len(twins) > 1 and extra else name


def _base_name(params: dict[str, str]) -> str:
    method = {k.split(".", 1)[1]: _param_value(v) for k, v in params.items()
              if k.startswith("method.") and k.count(".") == 1}
    try:
        cfg = ExperimentConfig.model_validate({"method": method,
                                               "search": {"mode": _param_value(params.get("search.mode"))
                                                          or "softmax"}})
        label = method_label(cfg)
    except Exception:  # noqa: BLE001 - params of another pfnas version: the kind is still shown
        label = str(method.get("kind") or "unknown")
    policy = method.get("policy") if isinstance(method.get("policy"), list) else None
    if label == "fixed:policy" and policy and len(set(policy)) == 1:
        label = f"fixed:{policy[0]}"
    return display_name(label)


def display_name(label: str) -> str:
    """:func:`method_label`'s name as the tables show it: ``fixed:affine`` -> ``all-affine``, ``fixed:prepend`` ->
    ``all-prepend (VPT-deep)``, ``probe`` -> ``linear probe``; others unchanged."""
    if label in ("probe", "fixed:none"):
        return "linear probe"
    if label == "fixed:prepend":
        return "all-prepend (VPT-deep)"
    if label == "fixed:policy":
        return "fixed policy"
    return "all-" + label.split(":", 1)[1] if label.startswith("fixed:") else label


def _own_variant(params: dict[str, str], variants: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The flattened overrides of the most specific variant the params match (None: no variant matches)."""
    best: dict[str, Any] | None = None
    for v in variants:
        flat = flatten(v)
        if all(k in params and _same(_param_value(params[k]), val) for k, val in flat.items()):
            if best is None or len(flat) > len(best):
                best = flat
    return best


@dataclass
class MethodRow:
    """One method's finals: test accuracies (percent) per task, deployed params, selection cost per task."""

    name: str
    kind: str
    accs: dict[str, list[float]] = field(default_factory=dict)
    tuned_percent: list[float] = field(default_factory=list)
    tuned_params: list[float] = field(default_factory=list)
    cost: dict[str, float] = field(default_factory=dict)  # task -> cost_images of the selecting trial

    def cell(self, task: str) -> tuple[float, float, int] | None:
        xs = self.accs.get(task)
        if not xs:
            return None
        mean, std = mean_std(xs)
        return mean, std, len(xs)

    def mean_over(self, tasks: list[str]) -> tuple[float | None, int]:
        """Mean of the cell means over those of ``tasks`` this method has, and how many it has."""
        means = [self.cell(t)[0] for t in tasks if t in self.accs]
        return (sum(means) / len(means) if means else None), len(means)


@dataclass
class Report:
    """The table: task columns, their groups, one row per method, and the studies' parent runs."""

    experiments: list[str]
    tasks: list[str]
    groups: list[tuple[str, list[str]]]  # present groups in order, each with its present tasks; "Other" last
    rows: list[MethodRow]
    parent_run_ids: list[str]
    tracking_uri: str

    @property
    def vtab_groups(self) -> list[tuple[str, list[str]]]:
        return [(g, ts) for g, ts in self.groups if g != OTHER]

    def group_header(self, group: str, tasks: list[str]) -> str:
        return f"{group} ({len(tasks)})" if group == OTHER else f"{group} ({len(tasks)}/{len(VTAB_GROUPS[group])})"

    def mean_of_groups(self, row: MethodRow) -> tuple[float | None, int]:
        """Mean of the row's VTAB group means over the groups it has a task of, and how many those are."""
        means = [m for _, ts in self.vtab_groups for m in [row.mean_over(ts)[0]] if m is not None]
        return (sum(means) / len(means) if means else None), len(means)

    def summary(self, row: MethodRow) -> dict[str, Any]:
        """Every number of ``row`` (None where it has nothing): cells, group means, the two means, params, cost."""
        pct = row.tuned_percent
        return {
            "cells": {t: row.cell(t) for t in self.tasks},
            "groups": {g: row.mean_over(ts) for g, ts in self.groups},
            "mean_of_groups": self.mean_of_groups(row) if self.vtab_groups else (None, 0),
            "mean": row.mean_over(self.tasks),
            "tasks": sum(t in row.accs for t in self.tasks),
            "tuned_percent": sum(pct) / len(pct) if pct else None,
            "tuned_params": sum(row.tuned_params) / len(row.tuned_params) if row.tuned_params else None,
            "cost_images": sum(row.cost.values()) / len(row.cost) if row.cost else None,
        }

    # ----------------------------------------------------------------------------- rendering
    def header(self) -> list[str]:
        cols = ["method", "tasks", *self.tasks, *(self.group_header(g, ts) for g, ts in self.groups)]
        if self.vtab_groups:
            cols.append(f"mean of groups ({len(self.vtab_groups)}/{len(VTAB_GROUPS)})")
        cols += [f"mean ({len(self.tasks)} tasks)", "params %", "params", "selection cost (img/task)"]
        return cols

    def text_rows(self) -> list[list[str]]:
        """The table as strings (what markdown, LaTeX and the terminal show)."""
        out = []
        for row in self.rows:
            s = self.summary(row)
            cells = [MISSING if c is None else (f"{c[0]:.2f} ± {c[1]:.2f} ({c[2]})" if c[2] > 1
                                                else f"{c[0]:.2f} ({c[2]})") for c in s["cells"].values()]
            groups = [_counted(*s["groups"][g], len(ts)) for g, ts in self.groups]
            line = [row.name, f"{s['tasks']}/{len(self.tasks)}", *cells, *groups]
            if self.vtab_groups:
                line.append(_counted(*s["mean_of_groups"], len(self.vtab_groups)))
            line += [_counted(*s["mean"], len(self.tasks)),
                     "-" if s["tuned_percent"] is None else f"{s['tuned_percent']:.3f}",
                     human_count(s["tuned_params"]), human_count(s["cost_images"])]
            out.append(line)
        return out

    def markdown(self) -> str:
        head = self.header()
        lines = ["| " + " | ".join(head) + " |",
                 "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in self.text_rows()]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        head = ["method", "tasks"]
        for t in self.tasks:
            head += [f"{t}_mean", f"{t}_std", f"{t}_n"]
        for g, _ in self.groups:
            head += [f"{g}_mean", f"{g}_tasks"]
        if self.vtab_groups:
            head += ["mean_of_groups", "groups"]
        head += ["mean_over_tasks", "tuned_percent", "tuned_params", "selection_cost_images"]
        w.writerow(head)
        for row in self.rows:
            s = self.summary(row)
            line: list[Any] = [row.name, s["tasks"]]
            for t in self.tasks:
                c = s["cells"][t]
                line += ["", "", 0] if c is None else [_num(c[0]), _num(c[1]), c[2]]
            for g, _ in self.groups:
                line += [_num(s["groups"][g][0]), s["groups"][g][1]]
            if self.vtab_groups:
                line += [_num(s["mean_of_groups"][0]), s["mean_of_groups"][1]]
            line += [_num(s["mean"][0]), _num(s["tuned_percent"]), _num(s["tuned_params"]), _num(s["cost_images"])]
            w.writerow(line)
        return buf.getvalue()

    def latex(self) -> str:
        head = self.header()
        rows = [[_tex(c) for c in r] for r in self.text_rows()]
        lines = ["% pfnas report: test accuracy (%) of the studies' finals, mean ± std (n seeds); needs booktabs",
                 r"\begin{tabular}{l" + "r" * (len(head) - 1) + "}", r"\toprule",
                 " & ".join(_tex(h) for h in head) + r" \\", r"\midrule"]
        lines += [" & ".join(r) + r" \\" for r in rows]
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"

    def figure(self):
        """Mean test accuracy over tasks against deployed params (% of the backbone), one point per method; a
        method without every task is hollow and says how many it has."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7.5, 5), dpi=110)
        ax = fig.add_subplot()
        xs = []
        for row in self.rows:
            s = self.summary(row)
            mean, k = s["mean"]
            if s["tuned_percent"] is None or mean is None:
                continue
            full = k == len(self.tasks)
            ax.scatter([s["tuned_percent"]], [mean], marker="o", s=40, edgecolors="tab:blue",
                       facecolors="tab:blue" if full else "none")
            ax.annotate(row.name[:32] + ("" if full else f" ({k}/{len(self.tasks)})"), (s["tuned_percent"], mean),
                        textcoords="offset points", xytext=(4, 3), fontsize=7)
            xs.append(s["tuned_percent"])
        if xs and min(xs) > 0 and max(xs) > 20 * min(xs):
            ax.set_xscale("log")
        ax.set_xlabel("deployed tuned parameters (% of the backbone)")
        ax.set_ylabel(f"test accuracy (%), mean over {len(self.tasks)} task(s)")
        ax.set_title(f"{', '.join(self.experiments)}: finals per method")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        return fig

    def rich_table(self):
        from rich.table import Table
        from rich.text import Text

        t = Table(title=f"test accuracy (%) of the finals in {', '.join(self.experiments)}: mean ± std (n)")
        for col in self.header():
            t.add_column(col, justify="left" if col == "method" else "right", overflow="fold")
        for r in self.text_rows():
            t.add_row(*(Text(c) for c in r))
        return t

    def write(self, out_dir: str | Path) -> list[Path]:
        """report.md, report.csv, report.tex and report.png in ``out_dir`` (created)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(self.markdown())
        (out / "report.csv").write_text(self.csv())
        (out / "report.tex").write_text(self.latex())
        self.figure().savefig(out / "report.png")
        return [out / f for f in REPORT_FILES]

    def log_to_parents(self, files: list[Path]) -> None:
        """The report files as artifacts ``report/`` of each study's parent run."""
        client = make_client(self.tracking_uri)
        bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        try:
            for run_id in self.parent_run_ids:
                for f in files:
                    client.log_artifact(run_id, str(f), "report")
        except Exception as e:  # noqa: BLE001 - artifact store not writable / unreachable
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise PfnasError(f"cannot log the report on parent run {run_id}: {first}") from None
        finally:
            if bar is None:
                os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
            else:
                os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


def _counted(value: float | None, have: int, of: int) -> str:
    if value is None:
        return MISSING
    return f"{value:.2f}" + ("" if have == of else f" ({have}/{of})")


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.6g}"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "—": "--", "±": r"$\pm$"}


def _tex(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in text)


# ----------------------------------------------------------------------------- reading MLflow
def _runs(client, exp_ids: list[str], kind: str):
    token = None
    while True:
        page = client.search_runs(exp_ids, filter_string=f"tags.`pfnas.kind` = '{kind}'", max_results=1000,
                                  page_token=token)
        yield from page
        token = page.token
        if not token:
            break


def _experiments(client, uri: str, names: list[str], prefix: str | None) -> list[Any]:
    every = client.search_experiments()
    by_name = {e.name: e for e in every}
    picked = []
    for name in names:
        if name not in by_name:
            have = ", ".join(sorted(by_name)) or "none"
            raise PfnasError(f"MLflow experiment {name!r} not found at {uri} (have: {have})")
        picked.append(by_name[name])
    if prefix is not None:
        matched = [e for e in every if e.name.startswith(prefix)]
        if not matched:
            have = ", ".join(sorted(by_name)) or "none"
            raise PfnasError(f"no MLflow experiment named {prefix}* at {uri} (have: {have})")
        picked += sorted(matched, key=lambda e: e.name)
    return list({e.experiment_id: e for e in picked}.values())


def _task(run) -> str:
    task = _param_value(run.data.params.get("data.task"))
    return str(task) if task else run.data.tags.get("pfnas.dataset", "unknown")


def build_report(tracking_uri: str | None = None, experiments: list[str] | None = None,
                 experiment_prefix: str | None = None) -> Report:
    """The :class:`Report` of the finished finals in ``experiments`` and those named ``experiment_prefix*``."""
    names = list(experiments or [])
    if not names and experiment_prefix is None:
        raise PfnasError("name the studies' MLflow experiments: --experiment NAME (repeatable) or "
                         "--experiment-prefix NAME")
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    client = make_client(uri)
    try:
        exps = _experiments(client, uri, names, experiment_prefix)
        exp_ids = [e.experiment_id for e in exps]
        parents = list(_runs(client, exp_ids, "study"))
        trials = {(r.data.tags.get("pfnas.study"), r.data.tags.get("pfnas.trial_id")): r
                  for r in _runs(client, exp_ids, "trial")}
        finals = [r for r in _runs(client, exp_ids, "final")
                  if r.info.status == "FINISHED" and finite_scalar(r.data.metrics.get("test_acc"))]
    except PfnasError:
        raise
    except Exception as e:  # noqa: BLE001 - unreachable server, bad URI
        raise PfnasError(f"cannot read MLflow at {uri}: {str(e).splitlines()[0][:200]}") from None
    where = ", ".join(e.name for e in exps)
    if not finals:
        raise PfnasError(f"no finished finals (runs tagged pfnas.kind=final with test_acc) in {where} at {uri}: "
                         "a study logs them when its space has final.seeds > 0")
    variants: dict[str, list[dict[str, Any]]] = {}
    for p in parents:
        vs = sorted((k for k in p.data.params if k.startswith("variant.")), key=lambda k: int(k.split(".")[1]))
        variants[p.data.tags.get("pfnas.study", "")] = [json.loads(p.data.params[k]) for k in vs]
    rows: dict[str, MethodRow] = {}
    configs: dict[tuple[str, str], set[str]] = {}  # (method, task) -> selected configurations
    for f in finals:
        tags, metrics = f.data.tags, f.data.metrics
        study = tags.get("pfnas.study", "")
        trial = trials.get((study, tags.get("pfnas.selected_trial")))
        if trial is not None:
            name = method_name(trial.data.params, variants.get(study))
            kind = str(_param_value(trial.data.params.get("method.kind")))
        else:  # its trial run is gone: the label's method part (method_label of the trial's config)
            label = tags.get("pfnas.label", "unknown").split(" [")[0]
            name, kind = display_name(label), label.split(":")[0].split("-")[0].split("+")[0]
        task = _task(f)
        row = rows.setdefault(name, MethodRow(name, kind))
        row.accs.setdefault(task, []).append(100.0 * float(metrics["test_acc"]))
        for key, into in (("tuned_percent", row.tuned_percent), ("tuned_params", row.tuned_params)):
            if finite_scalar(metrics.get(key)):
                into.append(float(metrics[key]))
        cost = trial.data.metrics.get("cost_images") if trial is not None else None
        if finite_scalar(cost):
            row.cost[task] = float(cost)
        configs.setdefault((name, task), set()).add(f"{study}/{tags.get('pfnas.selected', '?')}")
    for (name, task), picked in configs.items():
        if len(picked) > 1:
            raise PfnasError(f"method {name!r} has finals of {len(picked)} selected configurations on task {task!r} "
                             f"({', '.join(sorted(picked))}): report one study per task (--experiment)")
    present = {t for r in rows.values() for t in r.accs}
    groups = [(g, [t for t in ts if t in present]) for g, ts in VTAB_GROUPS.items()]
    groups = [(g, ts) for g, ts in groups if ts]
    vtab = {t for ts in VTAB_GROUPS.values() for t in ts}
    other = sorted(present - vtab)
    if other:
        groups.append((OTHER, other))
    tasks = [t for _, ts in groups for t in ts]
    ordered = sorted(rows.values(), key=lambda r: (_KIND_ORDER.get(r.kind, len(_KIND_ORDER)), r.name))
    return Report([e.name for e in exps], tasks, groups, ordered, [p.info.run_id for p in parents], uri)


def write_report(report: Report, out_dir: str | Path | None = None, log_to_parent: bool = True) -> list[Path]:
    """Write the report files to ``out_dir`` (None: a temporary folder, for the parents only) and, with
    ``log_to_parent``, log them on every study's parent run. Returns the written paths (none kept for None)."""
    if out_dir is not None:
        files = report.write(out_dir)
        if log_to_parent:
            report.log_to_parents(files)
        return files
    if log_to_parent:
        with tempfile.TemporaryDirectory(prefix="pfnas-report-") as tmp:
            report.log_to_parents(report.write(tmp))
    return []
