"""MLflow tracking: a parent run per study, a nested run per trial, and comparison of logged runs.

The engine never imports MLflow; :class:`RunLogger` turns its ``on_epoch`` metrics into MLflow calls.
Tags written on every pfnas run (and read back by :func:`compare_runs`):

* ``pfnas.kind``        ``study`` (parent), ``trial`` (one Tune trial, scored on val), ``final`` (the study's
                        val-selected trial retrained on train+val and tested, one run per seed) or ``run``
* ``pfnas.stage``       ``select`` (retrained on train, scored on val) or ``final`` (train+val, tested once)
* ``pfnas.selected``    on finals, the config hash of the trial they finalise (``pfnas compare`` joins on it)
* ``pfnas.label``       human label of the method and its tuned values (equal configs share a label)
* ``pfnas.config_hash`` hash of the config without seed/name/output_dir/device: runs that share it are
                        seeds of one configuration and are averaged by :func:`compare_runs`
* ``mlflow.parentRunId`` on trial runs, the study's parent run
* ``pfnas.policy``      once the run finished: the retrained policy, one op per layer, comma separated (also the
                        param ``policy``), so the runs table can show and filter it
* provenance            ``mlflow.source.*``, ``mlflow.user``, versions, backbone and dataset (``pfnas.provenance``)

Modules: ``store`` (URIs, experiments, client), ``values`` (params, labels, shared statistics),
``logger`` (:class:`RunLogger`), ``artifacts`` (``runs:/`` and ``models:/`` downloads, :func:`load_model`), ``compare`` (:func:`compare_runs`),
``report`` (:func:`~pfnas.tracking.report.build_report`: the methods x tasks table of ``pfnas report``).
"""
from __future__ import annotations

from pfnas.config import config_hash
from pfnas.tracking.compare import collect_rows, compare_runs, pareto_figure
from pfnas.tracking.logger import FINAL_METRICS, RunLogger, alpha_heatmap, method_tag
from pfnas.tracking.store import (
    DEFAULT_TRACKING_URI,
    absolute_sqlite_url,
    check_reachable,
    get_experiment_id,
    make_client,
    resolve_tracking_uri,
    runs_table_url,
    set_runs_view,
    sqlite_corruption,
    sqlite_store_lock,
)
from pfnas.tracking.values import (
    RESULT_METRICS,
    TEST_NAME,
    config_params,
    curated_params,
    finite_scalar,
    flatten,
    format_value,
    mean_std,
    method_label,
    metric_mode,
    pareto_front,
    policy_agreement,
    reads_test,
)

__all__ = [
    "DEFAULT_TRACKING_URI", "FINAL_METRICS", "RESULT_METRICS", "TEST_NAME", "RunLogger", "compare_runs",
    "collect_rows",
    "pareto_figure", "alpha_heatmap", "resolve_tracking_uri", "absolute_sqlite_url", "check_reachable",
    "get_experiment_id", "make_client", "sqlite_store_lock", "sqlite_corruption", "config_hash", "config_params", "flatten", "method_label", "metric_mode",
    "method_tag", "curated_params", "runs_table_url", "set_runs_view", "reads_test", "pareto_front", "policy_agreement", "format_value", "finite_scalar", "mean_std",
]
