"""Models logged to MLflow: download an artifact URI (``runs:/``, ``models:/``, ``mlflow-artifacts:/``) and load it.

:func:`load_model` is the public ``pfnas.load_model``: local folders go straight to :func:`pfnas.export.load_model`.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from pfnas.errors import PfnasError
from pfnas.export import MLFLOW_SCHEMES, PfnasModel, find_export
from pfnas.export import load_model as load_local_model
from pfnas.tracking.store import DEFAULT_TRACKING_URI, resolve_tracking_uri


def download(uri: str, dst: str, tracking_uri: str | None) -> Path:
    """Download an MLflow artifact URI (``runs:/<id>/model``, ``models:/name/1``) into ``dst``."""
    try:
        import mlflow.artifacts
    except ImportError:
        raise PfnasError(f"loading {uri} needs mlflow (pip install mlflow)") from None
    if not (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")) and not Path(DEFAULT_TRACKING_URI[10:]).is_file():
        # MLflow would create an empty ./mlflow.db and then not find the run in it
        raise PfnasError(f"{uri} names an MLflow run, but no tracking URI is set and there is no ./mlflow.db here; "
                         "pass --tracking-uri (or set MLFLOW_TRACKING_URI) to the store that holds it")
    tracking = resolve_tracking_uri(tracking_uri)
    registry = os.environ.get("MLFLOW_REGISTRY_URI") or tracking
    # models:/ URIs are resolved through mlflow's global tracking/registry URIs, not the arguments below
    env = {"MLFLOW_TRACKING_URI": tracking, "MLFLOW_REGISTRY_URI": registry,
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst, tracking_uri=tracking,
                                                    registry_uri=registry)
    except Exception as e:  # noqa: BLE001 - unknown run, missing artifact, unreachable server
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise PfnasError(f"cannot download {uri} from MLflow at {tracking}: {first}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Path(local)


def load_model(path: str | Path, *, device: str | torch.device = "cpu", tracking_uri: str | None = None,
               backbone_checkpoint: str | Path | None = None) -> PfnasModel:
    """Load an exported model: an export folder, a run folder (its ``retrain/`` is searched too), or an MLflow URI
    (``runs:/<run_id>/model``, ``models:/<name>/<version>``; ``tracking_uri`` defaults as for ``pfnas run``).

    The frozen backbone is rebuilt from the export's reference and refused (:class:`~pfnas.ModelError`) when the
    checkpoint file or the loaded weights differ from the ones the model was trained on. ``backbone_checkpoint``
    points at the checkpoint when it moved. Returns a :class:`~pfnas.export.PfnasModel` in eval mode on ``device``.
    """
    s = str(path)
    if s.startswith(MLFLOW_SCHEMES):
        with tempfile.TemporaryDirectory(prefix="pfnas-model-") as tmp:
            return load_local_model(find_export(download(s, tmp, tracking_uri)), device=device,
                                    backbone_checkpoint=backbone_checkpoint)
    return load_local_model(path, device=device, backbone_checkpoint=backbone_checkpoint)
