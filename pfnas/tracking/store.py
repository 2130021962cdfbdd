"""Where runs go: the tracking URI (explicit > ``MLFLOW_TRACKING_URI`` > sqlite), experiments, the client."""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pfnas.config import PfnasError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(uri: str | None = None, base_dir: str | Path | None = None) -> str:
    """Absolute tracking URI: ``uri``, else env ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``.

    Relative sqlite files and plain paths are made absolute against ``base_dir`` (default: the
    current directory) so worker processes in other directories write to the same store.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    if uri.startswith("sqlite:///"):
        return absolute_sqlite_url(uri, base)
    if "://" not in uri and not uri.startswith(("file:", "databricks")):
        return Path(os.path.normpath(base / Path(uri).expanduser())).as_uri()
    return uri


def absolute_sqlite_url(url: str, base: str | Path | None = None) -> str:
    """A relative ``sqlite:///file.db`` made absolute against ``base`` (default: the cwd); other URLs unchanged."""
    rest = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
    if rest and rest != ":memory:" and not rest.startswith("/"):
        return "sqlite:///" + os.path.normpath(str(Path(base or Path.cwd()) / Path(rest).expanduser()))
    return url


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:////") else None


@contextmanager
def sqlite_store_lock(url: str) -> Iterator[None]:
    """Exclusive ``flock`` on ``<file>.lock`` beside the file of a ``sqlite:///`` URL, waiting for a holder (the
    kernel drops it when the holder dies): MLflow and Optuna create and migrate a new sqlite store in several
    statements, which two processes must not run at once. No lock for other URLs, or where none can be created
    (a read-only folder, no ``fcntl`` on this platform)."""
    rest = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
    fd = None
    if rest and rest != ":memory:":
        db = Path(rest).expanduser()
        try:
            db.parent.mkdir(parents=True, exist_ok=True)  # the store would create it anyway
            fd = os.open(db.with_name(db.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock


def sqlite_corruption(url: str, err: BaseException, hint: str = "") -> PfnasError | None:
    """The error for a sqlite store whose file is not (or no longer) a database, naming sqlite's cause
    (``file is not a database``, ``database disk image is malformed``); None for any other error (a locked
    database, a server that is down): those may pass."""
    import sqlite3

    seen, depth = err, 0
    while seen is not None and depth < 10:
        for e in (seen, getattr(seen, "orig", None)):
            if type(e) is sqlite3.DatabaseError:  # its subclasses: locked (Operational), constraints (Integrity)...
                return PfnasError(f"{url} is not a valid database ({e}){hint}")
        seen, depth = seen.__cause__ or seen.__context__, depth + 1
    return None


EXPERIMENT_KIND = "custom_model_development"  # MLflow 3's UI opens such an experiment on its runs table, not on traces
EXPERIMENT_DESCRIPTION = (
    "pfnas runs (prompt fusion search on a frozen ViT).\n\n"
    "* A study is one parent run (`pfnas.kind=study`); its description names the selected trial, its policy, its "
    "val score and the finals' test mean ± std, and its artifacts hold the compare table and plot.\n"
    "* Its trials `t01`, `t02`... are nested under it: each searched/trained on train and scored on **val_acc**, "
    "the only score a study selects on.\n"
    "* The finals (`t01 final s0`...) retrain the selected trial's policy on train+val and report **test_acc** "
    "once per seed.\n"
    "* `pfnas run` / `pfnas baseline` runs are top-level (`pfnas.kind=run`); final-stage ones report test_acc only "
    "and are not selectable.\n\n"
    "Params show the tuned values, method, op, policy, prompt length and learning rates; every run's full config "
    "is its `config.yaml` artifact. `pfnas compare --experiment <name>` prints the same table.")


RUNS_VIEW = "pfnas"  # share key of the runs-table view pfnas keeps on each experiment (``runs_table_url``)
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW}"
VIEW_METRICS = ("val_acc", "test_acc", "tuned_params")
VIEW_TAGS = ("pfnas.method", "pfnas.policy")


def set_runs_view(client, experiment_id: str, params: list[str] | tuple[str, ...] = (),
                  expand: str | None = None) -> None:
    """The experiment's shared runs-table view (an MLflow "shared view": experiment tag
    ``mlflow.sharedViewState.pfnas``): sorted by val_acc, showing val_acc, test_acc and tuned params, the
    method and policy tags and the ``params`` given (a study's tuned keys; earlier ones kept), and ``expand``
    (a study's parent run) expanded so its trials show. :func:`runs_table_url` opens it."""
    import json

    old: dict = {}
    exp = client.get_experiment(experiment_id)
    if RUNS_VIEW_TAG in (exp.tags or {}):
        try:
            old = json.loads(exp.tags[RUNS_VIEW_TAG])
        except ValueError:
            old = {}
    cols = [f"metrics.`{m}`" for m in VIEW_METRICS] + [f"params.`{p}`" for p in params]
    cols += [c for c in old.get("selectedColumns", []) if c.startswith("params.") and c not in cols]
    cols += [f"tags.`{t}`" for t in VIEW_TAGS]
    expanded = dict(old.get("runsExpanded") or {}, **({expand: True} if expand else {}))
    state = {"selectedColumns": cols, "orderByKey": "metrics.`val_acc`", "orderByAsc": False,
             "runsExpanded": expanded}
    client.set_experiment_tag(experiment_id, RUNS_VIEW_TAG, json.dumps(state))


def runs_table_url(ui_url: str, experiment_id: str) -> str:
    """The MLflow UI address of an experiment's runs table in pfnas's view (``ui_url``: the server's base URL):
    the "Model training" side of the UI (a fresh browser opens MLflow 3 on its GenAI side)."""
    return (f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={RUNS_VIEW}")


def _label_experiment(client, exp) -> None:
    """Give an experiment pfnas made (or logs to) its kind and description when it has none yet."""
    tags = getattr(exp, "tags", None) or {}
    if tags.get("mlflow.experimentKind") is None:
        client.set_experiment_tag(exp.experiment_id, "mlflow.experimentKind", EXPERIMENT_KIND)
    if not tags.get("mlflow.note.content"):
        client.set_experiment_tag(exp.experiment_id, "mlflow.note.content", EXPERIMENT_DESCRIPTION)
    if RUNS_VIEW_TAG not in tags:
        set_runs_view(client, exp.experiment_id)


def get_experiment_id(client, name: str, tracking_uri: str) -> str:
    """Id of MLflow experiment ``name``, created (artifacts next to a sqlite file) if missing; it is tagged
    ``mlflow.experimentKind=custom_model_development`` (the UI opens on its runs) and described, unless it already
    has a kind or description of its own."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        _label_experiment(client, exp)
        return exp.experiment_id
    location = None
    db = _sqlite_path(tracking_uri)
    if db is not None:  # keep artifacts beside the database, not in whatever the cwd is
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "default"
        location = (db.parent / "mlruns" / safe).as_uri()
    try:
        exp_id = client.create_experiment(name, artifact_location=location, tags={
            "mlflow.experimentKind": EXPERIMENT_KIND, "mlflow.note.content": EXPERIMENT_DESCRIPTION})
        set_runs_view(client, exp_id)
        return exp_id
    except MlflowException:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """For an http(s) tracking URI, one quick ``/health`` request: a server that is down is a one-line PfnasError
    in seconds (MLflow's own client retries with backoff for minutes). Any HTTP answer counts as up."""
    if not uri.startswith(("http://", "https://")):
        return
    import ssl
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # it answers (auth, a proxy's own status...): let the MLflow client deal with it
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, ssl.SSLError):
            return  # custom CA / client certificates: MLflow's own TLS settings apply
        raise PfnasError(f"cannot reach MLflow at {uri}: {reason}; is the tracking server running?") from None


def make_client(tracking_uri: str):
    """An ``MlflowClient``; a new sqlite store is created (tables, migrations) here, one process at a time, and a
    sqlite file that is not a database is a PfnasError naming the cause."""
    from mlflow import MlflowClient

    for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):  # schema set-up chatter on a new sqlite file
        logging.getLogger(name).setLevel(logging.WARNING)
    with sqlite_store_lock(tracking_uri):
        try:
            return MlflowClient(tracking_uri=tracking_uri)  # builds (and caches) the store: creates a new sqlite db
        except Exception as e:
            corrupt = sqlite_corruption(tracking_uri, e, "; move it aside or pass another --tracking-uri")
            if corrupt is None:
                raise
            raise corrupt from None
