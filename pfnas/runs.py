"""One logged run (``pfnas run``, ``pfnas baseline ...``): claim the run folder, open its MLflow run, run the
method, close the run. Studies log their trials through :mod:`pfnas.tune` instead."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .methods import run_method
from .config import ExperimentConfig
from .errors import PfnasError
from .engine import Experiment, claim_run_dir
from .provenance import dataset_info
from .tracking import RunLogger, make_client, method_label, resolve_tracking_uri


def run_logged(cfg: ExperimentConfig, out_dir: str | Path, *, tracking_uri: str | None = None,
               experiment: str | None = None, progress: bool = True, source: str = "pfnas run",
               **kw: Any) -> dict[str, Any]:
    """:func:`~pfnas.methods.run_method` logged as one top-level MLflow run (``pfnas.kind=run``).

    The run id is kept in ``out_dir/mlflow_run_id``, so rerunning the command after a crash resumes the
    experiment from its checkpoints and continues the same MLflow run; what MLflow could not take (server
    down or restarting) waits in ``out_dir/mlflow_buffer.jsonl`` and is sent then. ``experiment`` defaults to
    ``<cfg.name>-<data.task>`` (or ``cfg.name``), so seeds and methods of one task land side by side.
    The folder is claimed first (lock, same configuration), so a refused rerun never touches the old MLflow run.
    ``source`` (``pfnas <verb>``) is the run's ``mlflow.source.name``; the decoded task is its dataset input.
    """
    uri = resolve_tracking_uri(tracking_uri)
    try:
        make_client(uri)  # a new sqlite store is created now; one that is not a database is refused before training
    except PfnasError:
        raise
    except Exception:  # noqa: BLE001 - a store that is down: the logger keeps the records and says so
        pass
    exp_name = experiment or (f"{cfg.name}-{cfg.data.task}" if cfg.data.task else cfg.name)
    with claim_run_dir(cfg, out_dir) as claim:
        out = claim.path
        if claim.replaced:  # the folder's earlier try (another config) never trained: its MLflow run is not ours
            for f in (RunLogger.RUN_ID, RunLogger.BUFFER, RunLogger.REJECTED):
                (out / f).unlink(missing_ok=True)
        logger = RunLogger(uri, exp_name, f"{method_label(cfg)}-seed{cfg.seed}", cfg, folder=out, source=source,
                           tags={"pfnas.kind": "run", "pfnas.task": str(cfg.data.task or cfg.data.kind)})
        with logger.recording():
            exp = kw.pop("exp", None) or Experiment.build(cfg)  # what run_method would build, first
            logger.log_dataset(dataset_info(cfg, exp.data))
            res = run_method(cfg, out, on_epoch=logger.log_epoch, progress=progress, exp=exp, **kw)
        logger.finish(res)
    return res
