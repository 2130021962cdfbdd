"""Where runs go: the tracking URI (explicit > ``MLFLOW_TRACKING_URI`` > sqlite), experiments, the client."""
from __future__ import annotations

import logging
import os
import re
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


def get_experiment_id(client, name: str, tracking_uri: str) -> str:
    """Id of MLflow experiment ``name``, created (artifacts next to a sqlite file) if missing."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    db = _sqlite_path(tracking_uri)
    if db is not None:  # keep artifacts beside the database, not in whatever the cwd is
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "default"
        location = (db.parent / "mlruns" / safe).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
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
    from mlflow import MlflowClient

    for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):  # schema set-up chatter on a new sqlite file
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=tracking_uri)
