"""``pfnas compare``: logged runs averaged over seeds per configuration, ranked on a val metric, with the
finals beside them; CSV, plots and accuracy / cost Pareto fronts."""
from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pfnas.config import PfnasError
from pfnas.tracking.store import check_reachable, make_client, resolve_tracking_uri
from pfnas.tracking.values import human_count, mean_std, metric_mode, pareto_front, reads_test


def _iter_runs(client, experiment_ids: list[str]) -> Iterable[Any]:
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string="", max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            break


def _avg(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if r[key] is not None]
    return sum(vals) / len(vals) if vals else None


_OPS = {"prepend": "pre", "add": "add", "affine": "aff", "cross_attn": "xat", "none": "-"}


def short_policy(policy: str) -> str:
    """``prepend,prepend,add`` -> ``pre×2 add``: a per-layer policy in one short cell."""
    ops = [_OPS.get(op, op) for op in policy.split(",") if op]
    out: list[list[Any]] = []
    for op in ops:
        if out and out[-1][0] == op:
            out[-1][1] += 1
        else:
            out.append([op, 1])
    return " ".join(op if n == 1 else f"{op}×{n}" for op, n in out)


def collect_rows(tracking_uri: str | None, experiment: str | None, metric: str) -> list[dict[str, Any]]:
    """Finished pfnas trial/run records with ``metric``, grouped by config hash (seeds averaged).

    Each row also carries its final test score (``final_mean/std/n``): the study finals that name the row's
    config as selected (tag ``pfnas.selected``), or for a final-stage ``pfnas run`` its own ``test_acc``.
    """
    return collect(tracking_uri, experiment, metric)[0]


def collect(tracking_uri: str | None, experiment: str | None,
            metric: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """:func:`collect_rows`' ranked rows, and the final-stage runs without ``metric`` (``pfnas baseline``,
    ``pfnas run``: trained on train+val, so no val score), grouped by config hash: test mean ± std, n. Those are
    listed apart and never ranked: with no val score they cannot be selected."""
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a server that dies mid-way: seconds, not minutes
    client = make_client(uri)
    try:
        if experiment:
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                names = sorted(e.name for e in client.search_experiments())
                raise PfnasError(f"MLflow experiment {experiment!r} not found at {uri} (have: {', '.join(names) or 'none'})")
            exp_ids = [exp.experiment_id]
        else:
            exp_ids = [e.experiment_id for e in client.search_experiments()]
    except PfnasError:
        raise
    except Exception as e:  # noqa: BLE001 - unreachable server, bad URI
        raise PfnasError(f"cannot read MLflow at {uri}: {str(e).splitlines()[0][:200]}") from None
    groups: dict[str, dict[str, Any]] = {}
    final_only: dict[str, dict[str, Any]] = {}  # config hash -> final-stage runs with a test score but no metric
    finals: dict[str, list[dict[str, Any]]] = {}  # selected config hash -> final runs
    for run in _iter_runs(client, exp_ids) if exp_ids else []:
        tags, metrics = run.data.tags, run.data.metrics
        if run.info.status != "FINISHED":
            continue
        if tags.get("pfnas.kind") == "final" and "test_acc" in metrics and tags.get("pfnas.selected"):
            finals.setdefault(tags["pfnas.selected"], []).append(
                {"run_id": run.info.run_id, "test_acc": metrics["test_acc"]})
            continue
        key = tags.get("pfnas.config_hash") or run.info.run_id
        head = {"label": tags.get("pfnas.label") or run.info.run_name, "config_hash": key,
                "method": tags.get("pfnas.method", ""), "runs": []}
        if (tags.get("pfnas.kind") == "run" and tags.get("pfnas.stage") == "final" and metric not in metrics
                and "test_acc" in metrics):
            final_only.setdefault(key, dict(head))["runs"].append(
                {"run_id": run.info.run_id, "run_name": run.info.run_name, "test_acc": metrics["test_acc"],
                 "policy": tags.get("pfnas.policy", ""), "tuned_params": metrics.get("tuned_params"),
                 "cost_images": metrics.get("cost_images")})
            continue
        if tags.get("pfnas.kind") not in ("trial", "run") or metric not in metrics:
            continue
        g = groups.setdefault(key, {**head, "runs": []})
        g["runs"].append({"run_id": run.info.run_id, "value": metrics[metric], "test_acc": metrics.get("test_acc"),
                          "run_name": run.info.run_name, "policy": tags.get("pfnas.policy", ""),
                          "final_stage": tags.get("pfnas.stage") == "final",
                          "tuned_params": metrics.get("tuned_params"), "tuned_percent": metrics.get("tuned_percent"),
                          "cost_images": metrics.get("cost_images"), "study": tags.get("pfnas.study", ""),
                          "infer_ms_per_image": metrics.get("infer_ms_per_image"),
                          "artifact_uri": run.info.artifact_uri})
    lower = metric_mode(metric) == "min"
    rows = []
    for g in groups.values():
        runs = g.pop("runs")
        mean, std = mean_std([r["value"] for r in runs])
        best = (min if lower else max)(runs, key=lambda r: r["value"])
        fin = finals.get(g["config_hash"], [])
        tests = [f["test_acc"] for f in fin] or [r["test_acc"] for r in runs
                                                  if r["final_stage"] and r["test_acc"] is not None]
        fmean, fstd = mean_std(tests) if tests else (None, None)
        rows.append({**g, "n": len(runs), "mean": mean, "std": std, "final_mean": fmean, "final_std": fstd,
                     "final_n": len(tests), "final_run_ids": [f["run_id"] for f in fin], "tuned_params": _avg(runs, "tuned_params"),
                     "tuned_percent": _avg(runs, "tuned_percent"), "cost_images": _avg(runs, "cost_images"),
                     "infer_ms_per_image": _avg(runs, "infer_ms_per_image"),
                     "best_run_id": best["run_id"], "run_ids": [r["run_id"] for r in runs],
                     "run_name": best["run_name"], "policy": best["policy"],
                     "study": ",".join(sorted({r["study"] for r in runs if r["study"]}))})
    sign = -1 if lower else 1
    # ties: the study's own selection (it has finals), then fewer params
    rows.sort(key=lambda r: (sign * r["mean"], r["final_n"] > 0, -(r["tuned_params"] or 0)), reverse=True)
    apart = []
    for g in final_only.values():
        runs = g.pop("runs")
        fmean, fstd = mean_std([r["test_acc"] for r in runs])
        names = sorted(r["run_name"] for r in runs)
        apart.append({**g, "final_mean": fmean, "final_std": fstd, "final_n": len(runs),
                      "run_name": names[0] + (f" +{len(names) - 1}" if len(names) > 1 else ""),
                      "policy": runs[0]["policy"], "tuned_params": _avg(runs, "tuned_params"),
                      "cost_images": _avg(runs, "cost_images"), "run_ids": [r["run_id"] for r in runs]})
    apart.sort(key=lambda r: (r["method"], r["label"]))  # not ranked: no val score to rank on
    return rows, apart


def pareto_figure(points: list[tuple[float, float]], front: list[int], labels: list[str], xlabel: str, ylabel: str,
                  title: str, baseline: list[bool] | None = None):
    """Scatter of (x, y) points with the Pareto front drawn as a step line; ``baseline`` points (single-op
    policies, the probe) are drawn as squares with their labels, the rest as dots. Returns the figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5), dpi=110)
    ax = fig.add_subplot()
    baseline = baseline or [False] * len(points)
    for kind, marker, color in ((False, "o", "tab:blue"), (True, "s", "tab:orange")):
        idx = [i for i in range(len(points)) if baseline[i] == kind and i not in front]
        ax.scatter([points[i][0] for i in idx], [points[i][1] for i in idx], marker=marker, color=color, alpha=0.45,
                   label=("single-op / probe" if kind else "trials / configurations"))
    fr = sorted(front, key=lambda i: points[i][0])
    ax.step([points[i][0] for i in fr], [points[i][1] for i in fr], where="post", color="tab:red", alpha=0.6)
    ax.scatter([points[i][0] for i in fr], [points[i][1] for i in fr], color="tab:red", zorder=3, label="Pareto front")
    for i, lab in enumerate(labels):
        if baseline[i] or i in front:
            ax.annotate(lab[:28], points[i], textcoords="offset points", xytext=(4, 3), fontsize=7)
    xs = [p[0] for p in points if p[0] > 0]
    if xs and max(xs) > 20 * min(xs):
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig


def _plot(rows: list[dict[str, Any]], metric: str, path: Path, legend_max: int = 20) -> None:
    """Scatter of ``metric`` vs tuned parameters; points carry their rank, the legend maps rank -> label."""
    from matplotlib.figure import Figure

    pts = [(i, r) for i, r in enumerate(rows, 1) if r["tuned_params"]]
    n_legend = min(len(pts), legend_max)
    height = 4.5 + 0.17 * n_legend  # inches: the plot plus one legend line per shown configuration
    fig = Figure(figsize=(8, height), dpi=110)
    ax = fig.add_axes((0.1, 0.1 + 0.17 * n_legend / height, 0.85, 0.8 * 4.5 / height))
    for k, (i, r) in enumerate(pts):
        label = f"{i}. {r['label'][:90]}" + (f" (n={r['n']})" if r["n"] > 1 else "")
        ax.errorbar(r["tuned_params"], r["mean"], yerr=r["std"] if r["n"] > 1 else None, fmt="o", capsize=3,
                    label=label if k < legend_max else None)
        ax.annotate(str(i), (r["tuned_params"], r["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if pts and max(r["tuned_params"] for _, r in pts) > 20 * min(r["tuned_params"] for _, r in pts):
        ax.set_xscale("log")
    ax.set_xlabel("tuned parameters")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs tuned parameters ({len(rows)} configurations)")
    ax.grid(True, alpha=0.3)
    if n_legend:
        fig.legend(loc="lower left", fontsize=6.5, frameon=False, bbox_to_anchor=(0.02, 0.0))
    fig.savefig(path)


def _pareto(rows: list[dict[str, Any]], metric: str, cost: str, out: Path, where: str) -> None:
    """Front of (``metric``, ``cost``) over the rows that have both; writes pareto.png and pareto.csv."""
    have = [r for r in rows if r.get(cost) is not None]
    if not have:
        raise PfnasError(f"no configuration logged {cost!r}; --pareto takes tuned_params or infer_ms_per_image")
    front = pareto_front([[r["mean"], r[cost]] for r in have], [metric_mode(metric) or "max", "min"])
    for i, r in enumerate(have):
        r["pareto"] = i in front
    base = [r["label"].startswith(("fixed:", "probe")) for r in have]
    fig = pareto_figure([(r[cost], r["mean"]) for r in have], front, [r["label"] for r in have],
                        cost.replace("_", " "), metric, f"{metric} vs {cost} ({where})", base)
    fig.savefig(out / "pareto.png")
    with open(out / "pareto.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", f"{metric}_mean", cost, "final_test_acc_mean", "pareto", "config_hash"])
        for r in sorted(have, key=lambda r: r[cost]):
            w.writerow([r["label"], r["mean"], r[cost], r["final_mean"], r["pareto"], r["config_hash"]])


def compare_runs(tracking_uri: str | None = None, experiment: str | None = None, metric: str = "val_acc",
                 out_dir: str | Path = "compare", console=None, pareto: str | None = None) -> list[dict[str, Any]]:
    """Table of logged pfnas runs ranked by ``metric`` (mean +- std over seeds of one config), with each
    configuration's final test accuracy (its study finals, or a final-stage run's own test) beside it.

    Writes ``compare.csv``, ``acc_vs_params.png`` and ``best_config.yaml`` (the top row's final config when
    it has finals, else its own) to ``out_dir``. A test metric may be shown but never picks a best config.
    Metrics that improve downward (``metric_mode``: losses, params, costs, times) sort ascending. ``pareto``
    (``tuned_params`` or ``infer_ms_per_image``) also writes ``pareto.png`` / ``pareto.csv``: the front of
    ``metric`` against that cost over every configuration, single-op baselines marked; rows get ``pareto: True``
    when on it.
    """
    rows, apart = collect(tracking_uri, experiment, metric)
    where = f"experiment {experiment!r}" if experiment else "any experiment"
    if not rows and not apart:
        hint = ("; `pfnas run`/`pfnas baseline` runs are final-stage (train+val -> test): list them with "
                "--metric test_acc, or select with a study (`pfnas tune`)") if metric == "val_acc" else ""
        raise PfnasError(f"no finished pfnas runs with metric {metric!r} in {where} at "
                         f"{resolve_tracking_uri(tracking_uri)}{hint}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "compare.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "label", "method", "n", f"{metric}_mean", f"{metric}_std", "final_test_acc_mean",
                    "final_test_acc_std", "final_n", "tuned_params", "tuned_percent", "cost_images", "study",
                    "config_hash", "best_run_id", "run_ids", "run_name", "policy"])
        for i, r in enumerate(rows, 1):
            w.writerow([i, r["label"], r["method"], r["n"], r["mean"], r["std"], r["final_mean"], r["final_std"],
                        r["final_n"], r["tuned_params"], r["tuned_percent"], r["cost_images"], r["study"],
                        r["config_hash"], r["best_run_id"], " ".join(r["run_ids"]), r["run_name"], r["policy"]])
        for r in apart:  # final-stage runs: no val score, no rank
            w.writerow(["no val", r["label"], r["method"], 0, "", "", r["final_mean"], r["final_std"], r["final_n"],
                        r["tuned_params"], "", r["cost_images"], "", r["config_hash"], "", " ".join(r["run_ids"]),
                        r["run_name"], r["policy"]])
    if rows:
        _plot(rows, metric, out / "acc_vs_params.png")
    if pareto and rows:
        _pareto(rows, metric, pareto, out, where)
    best_cfg = None
    bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        client = make_client(resolve_tracking_uri(tracking_uri))
        if reads_test(metric) or not rows:
            raise PfnasError("ranked on a test metric, or nothing ranked: no best config")
        top = rows[0]
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(client.download_artifacts((top["final_run_ids"] or [top["best_run_id"]])[0], "config.yaml", tmp))
            best_cfg = out / "best_config.yaml"
            head = f"# selected by {metric}={top['mean']:.6g}: {top['label']}\n"
            if top["final_n"]:
                head += f"# final test_acc {top['final_mean']:.4f} ± {top['final_std']:.4f} (n={top['final_n']})\n"
            best_cfg.write_text(head + p.read_text())
    except Exception:  # noqa: BLE001 - the run logged no config
        best_cfg = None
    finally:
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar
    if console is not None:
        from rich.table import Table
        from rich.text import Text

        t = Table(title=f"pfnas runs in {where} by {metric}")
        for col in ("#", "run", "method", "policy", "n", metric, "final test (n)", "tuned params", "search cost"):
            t.add_column(col, justify="left" if col in ("run", "method", "policy") else "right", overflow="fold")
        for i, r in enumerate(rows, 1):
            val = f"{r['mean']:.4f}" + (f" ± {r['std']:.4f}" if r["n"] > 1 else "")
            fin = "-" if not r["final_n"] else f"{r['final_mean']:.4f} ± {r['final_std']:.4f} ({r['final_n']})"
            t.add_row(str(i), Text(r["run_name"]), Text(r["method"]), Text(short_policy(r["policy"]) or "-"),
                      str(r["n"]), val, fin, human_count(r["tuned_params"]),
                      human_count(r["cost_images"]) + (" img" if r["cost_images"] else ""))
        if rows:
            console.print(t)
        if apart:
            f = Table(title=f"final-stage runs in {where} (train+val -> test; no val: not selectable, not ranked)")
            for col in ("run", "method", "policy", "test mean ± std", "n", "tuned params"):
                f.add_column(col, justify="left" if col in ("run", "method", "policy") else "right", overflow="fold")
            for r in apart:
                f.add_row(Text(r["run_name"]), Text(r["method"]), Text(short_policy(r["policy"]) or "-"),
                          f"{r['final_mean']:.4f} ± {r['final_std']:.4f}", str(r["final_n"]), human_count(r["tuned_params"]))
            console.print(f)
        if reads_test(metric):
            console.print(f"note: {metric} is a test metric; this ranking selects nothing (no best config)")
        console.print(f"wrote {out / 'compare.csv'}" + (f", {out / 'acc_vs_params.png'}" if rows else "")
                      + (f", {best_cfg}" if best_cfg else ""))
    return rows
