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
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .config import ExperimentConfig, PfnasError, config_hash
from .provenance import dataset_info, dataset_input, dataset_tags, provenance_tags

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# a run's final metrics: val_acc (stage select) or test_acc (stage final) of the retrained policy, and the
# score that selected its policy inside the method (search's supernet val, random/evolution's best candidate)
FINAL_METRICS = ("test_acc", "val_acc", "select_val_acc", "tuned_params", "tuned_percent", "cost_images",
                 "search_time_s", "retrain_time_s", "time_s", "cost_step_s", "infer_images_per_s",
                 "infer_ms_per_image")


# ----------------------------------------------------------------------------- URIs and experiments
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


# ----------------------------------------------------------------------------- config helpers
def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> dotted keys (lists and tuples stay values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_params(cfg: ExperimentConfig) -> dict[str, str]:
    """The flattened dotted config as MLflow param strings."""
    return {k: (json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v))[:6000]
            for k, v in flatten(cfg.model_dump(mode="json")).items()}


# config_hash (pfnas.config): what defines a configuration's result, without seed, bookkeeping, eval cadence or
# the fields its method does not read; runs that share it are seeds of one configuration


def method_label(cfg: ExperimentConfig) -> str:
    """Short name of what ``cfg`` runs: ``search``, ``fixed:prepend``, ``probe``, ``random+ws``..."""
    m = cfg.method
    if m.kind == "search":
        return "search" + {"gumbel": "-gdas", "sigmoid": "-sigmoid"}.get(cfg.search.mode, "")
    if m.kind == "fixed":
        return "fixed:policy" if m.policy else f"fixed:{m.op}"
    if m.kind == "random":
        return "random" + ("+ws" if m.weight_sharing else "")
    return m.kind


TEST_NAME = re.compile(r"(^|[/_.])test($|[/_.])")


def reads_test(metric: str) -> bool:
    """True for a metric computed on the test split (``test_acc``, ``retrain/test_loss``...)."""
    return bool(TEST_NAME.search(metric))


def pareto_front(points: list[list[float]], modes: list[str]) -> list[int]:
    """Indices (ascending) of the non-dominated ``points``: no other point is at least as good in every
    objective (``max``/``min`` per entry of ``modes``) and strictly better in one. Equal points are all kept."""
    sign = [1.0 if m == "max" else -1.0 for m in modes]
    keyed = [[s * v for s, v in zip(sign, p)] for p in points]

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [i for i, p in enumerate(keyed) if not any(dominates(q, p) for j, q in enumerate(keyed) if j != i)]


def policy_agreement(policies: list[list[str]]) -> float | None:
    """How reproducible a search is: over every pair of ``policies`` (one per seed), the fraction of layers that
    chose the same op, averaged (1 = identical policies; chance is 1 / number of ops). None for fewer than two."""
    pairs = [(a, b) for i, a in enumerate(policies) for b in policies[i + 1:]]
    if not pairs:
        return None
    if any(len(a) != len(b) or not a for a, b in pairs):
        raise ValueError("policies to compare need the same, non-zero number of layers")
    return sum(sum(x == y for x, y in zip(a, b)) / len(a) for a, b in pairs) / len(pairs)


def format_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def finite_scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


# ----------------------------------------------------------------------------- figures
def alpha_heatmap(alpha: list[list[float]], ops: list[str], title: str = "softmax(alpha)"):
    """Matplotlib figure (no pyplot state) of the layers x ops architecture weights."""
    from matplotlib.figure import Figure

    n_layers = len(alpha)
    fig = Figure(figsize=(1.2 + 1.1 * len(ops), 0.9 + 0.35 * n_layers), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(alpha, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(ops)), labels=ops)
    ax.set_yticks(range(n_layers), labels=[str(i) for i in range(n_layers)])
    ax.set_xlabel("operator")
    ax.set_ylabel("layer")
    for i, row in enumerate(alpha):
        for j, p in enumerate(row):
            ax.text(j, i, f"{p:.2f}", ha="center", va="center", fontsize=7, color="w" if p < 0.6 else "k")
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- run logger
class RunLogger:
    """One MLflow run fed by the engine's epoch callback; never raises.

    Any MLflow error (server down or restarting, locked database) logs one warning and pauses MLflow calls for
    ``retry_s`` seconds. Everything not sent yet (the run's creation and params, epoch metrics, tags, artifacts
    given as data, the final status) waits in an ordered backlog, mirrored to ``<folder>/mlflow_buffer.jsonl``
    when a run ``folder`` is given, and is replayed on the next successful call, at :meth:`finish` (a few short
    tries) and by a later logger on the same folder (rerunning the command). Metric timestamps are kept, so a
    replay never adds a point twice; a run reopened on resume skips metric points at steps it already has.
    The run id is kept in ``<folder>/mlflow_run_id``.

    Pass ``run_id`` to continue an existing run (a resumed trial), or ``reuse_tags`` to continue the run
    under the same parent whose tags match (a trial retried before its first checkpoint).
    """

    BUFFER = "mlflow_buffer.jsonl"
    RUN_ID = "mlflow_run_id"

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, cfg: ExperimentConfig | None = None,
                 *, parent_run_id: str | None = None, run_id: str | None = None, tags: dict[str, str] | None = None,
                 reuse_tags: dict[str, str] | None = None, retry_s: float = 60.0, folder: str | Path | None = None,
                 finish_tries: int = 3, finish_wait_s: float = 1.0, source: str = "pfnas run",
                 source_type: str = "LOCAL"):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # fail fast when a server is down
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.tracking_uri, self.experiment, self.run_name, self.cfg = tracking_uri, experiment, run_name, cfg
        self.parent_run_id, self.run_id, self.retry_s = parent_run_id, run_id, retry_s
        self.finish_tries, self.finish_wait_s = finish_tries, finish_wait_s
        self.tags = dict(tags or {})
        self.source, self.source_type = source, source_type  # provenance tags at run creation (pfnas.provenance)
        self.reuse_tags = dict(reuse_tags or {})
        self.folder = Path(folder) if folder is not None else None
        self.client = None
        self._ready = False  # the run exists (created with its params, or reopened) in this process
        self._need_params = False  # created, but its params / config.yaml are not logged yet
        self._seen_steps: dict[str, int] = {}  # reopened run: latest step of each metric already logged
        self._ops: list[dict[str, Any]] = []  # backlog, in order
        self._journaled = False
        self._paused_until = 0.0
        self._warned = False
        self._alpha: list[list[float]] | None = None
        self._heatmap_logged = False
        self._throughput: dict[str, list[float]] = {}
        if self.folder is not None:
            rid, buf = self.folder / self.RUN_ID, self.folder / self.BUFFER
            if self.run_id is None and rid.is_file():
                self.run_id = rid.read_text().strip() or None
            if buf.is_file():  # left by an earlier process that could not reach MLflow
                self._journaled = True
                for line in buf.read_text().splitlines():
                    try:
                        self._ops.append(json.loads(line))
                    except json.JSONDecodeError:  # a torn last line
                        pass
        self._ensure_run()
        self._drain()

    @property
    def _pending(self) -> list[dict[str, Any]]:
        return self._ops

    @property
    def buffer_path(self) -> Path | None:
        return self.folder / self.BUFFER if self.folder is not None else None

    # --- plumbing
    def _ok(self) -> bool:
        return time.monotonic() >= self._paused_until

    def _fail(self, what: str, err: BaseException) -> None:
        self._paused_until = time.monotonic() + self.retry_s
        if not self._warned:
            self._warned = True
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            log.warning("MLflow %s failed for run %s (%s); training continues, logging retries later",
                        what, self.run_name, first)

    def _call(self, what: str, fn) -> bool:
        """Run ``fn()`` (which may use ``self.client``/``self.run_id``) unless MLflow is paused; not buffered."""
        if not self._ok() or not self._ensure_run():
            return False
        try:
            fn()
            return True
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            self._fail(what, e)
            return False

    def _save_run_id(self) -> None:
        if self.folder is not None and self.run_id:
            with contextlib.suppress(OSError):
                self.folder.mkdir(parents=True, exist_ok=True)
                (self.folder / self.RUN_ID).write_text(self.run_id)

    def _attach(self, run_id: str) -> None:
        """Continue ``run_id``: note the steps it already has (never logged twice), mark it RUNNING."""
        run = self.client.get_run(run_id)
        seen: dict[str, int] = {}
        for m in getattr(run.data, "_metric_objs", None) or []:  # latest point of each metric: its largest step
            seen[m.key] = max(seen.get(m.key, m.step), m.step)
        self._seen_steps = seen
        if run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        self._need_params = self.cfg is not None and not run.data.params  # created by a process that died early
        self._save_run_id()

    def _ensure_run(self, force: bool = False) -> bool:
        if self._ready:
            return True
        if not force and not self._ok():
            return False
        from mlflow.exceptions import MlflowException

        try:
            from mlflow.entities import Param

            self.client = self.client or make_client(self.tracking_uri)
            if self.run_id is not None and not self._need_params:  # resumed: reopen the run
                try:
                    self._attach(self.run_id)
                except MlflowException as e:
                    if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                        raise
                    self.run_id = None  # the run lives in another store: start a new one here
            if self.run_id is None:
                exp_id = get_experiment_id(self.client, self.experiment, self.tracking_uri)
                if self.reuse_tags:
                    match = dict(self.reuse_tags, **({"mlflow.parentRunId": self.parent_run_id} if self.parent_run_id else {}))
                    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in match.items())
                    found = self.client.search_runs([exp_id], filter_string=flt, max_results=1,
                                                    order_by=["attributes.start_time DESC"])
                    if found:
                        self._attach(found[0].info.run_id)
            if self.run_id is None:
                tags = dict(self.tags)
                for k, v in provenance_tags(self.source, self.source_type, self.cfg).items():
                    tags.setdefault(k, v)
                if self.parent_run_id:
                    tags["mlflow.parentRunId"] = self.parent_run_id
                if self.cfg is not None:
                    tags.setdefault("pfnas.label", method_label(self.cfg))
                    tags.setdefault("pfnas.method", self.cfg.method.kind)
                    tags.setdefault("pfnas.config_hash", config_hash(self.cfg))
                    tags.setdefault("pfnas.stage", self.cfg.train.stage)  # select: scored on val; final: on test
                run = self.client.create_run(exp_id, tags=tags, run_name=self.run_name)
                self.run_id, self._need_params, self._seen_steps = run.info.run_id, self.cfg is not None, {}
                self._save_run_id()
            if self._need_params:  # retried until logged: a run never ends up without its config
                params = [Param(k, v) for k, v in config_params(self.cfg).items()]
                for i in range(0, len(params), 100):
                    self.client.log_batch(self.run_id, params=params[i:i + 100])
                self.client.log_dict(self.run_id, self.cfg.model_dump(mode="json"), "config.yaml")
                self._need_params = False
            self._ready = True
            return True
        except Exception as e:  # noqa: BLE001
            self._fail("run creation", e)
            return False

    def _journal_write(self) -> None:
        """Mirror the backlog to the run folder (atomically), or remove the file once it is empty."""
        path = self.buffer_path
        if path is None or (not self._ops and not self._journaled):
            return
        try:
            if not self._ops:
                path.unlink(missing_ok=True)
                self._journaled = False
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(json.dumps(op) + "\n" for op in self._ops))
            os.replace(tmp, path)
            self._journaled = True
        except OSError as e:  # a full disk must not stop training either
            log.debug("cannot write %s: %s", path, e)

    def _apply(self, op: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        kind = op["op"]
        if kind == "metrics":
            ms = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in op["m"]
                  if int(step) > self._seen_steps.get(k, -1)]
            for i in range(0, len(ms), 500):
                self.client.log_batch(self.run_id, metrics=ms[i:i + 500])
                for m in ms[i:i + 500]:  # one point per metric and step: a rerun's repeats are skipped
                    self._seen_steps[m.key] = max(self._seen_steps.get(m.key, m.step), m.step)
        elif kind == "tag":
            self.client.set_tag(self.run_id, op["key"], op["value"])
        elif kind == "dict":
            self.client.log_dict(self.run_id, op["obj"], op["path"])
        elif kind == "heatmap":
            fig = alpha_heatmap(op["alpha"], op["ops"], op["title"])
            self.client.log_figure(self.run_id, fig, "alpha_heatmap.png")
            self.client.log_dict(self.run_id, {"ops": op["ops"], "alpha": op["alpha"]}, "alpha.json")
        elif kind == "artifacts":  # local files (the retrain's export) into one artifact folder
            for f in op["files"]:
                if Path(f).is_file():
                    self.client.log_artifact(self.run_id, f, op["path"])
        elif kind == "dataset":  # the decoded task: an MLflow dataset input (metadata only) and its tags
            from mlflow.entities import RunTag

            self.client.log_inputs(self.run_id, [dataset_input(op["info"])])
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in dataset_tags(op["info"]).items()])
        elif kind == "param":
            from mlflow.exceptions import MlflowException

            try:
                self.client.log_param(self.run_id, op["key"], op["value"])
            except MlflowException as e:  # a reopened run that logged another value: the first one stays
                if e.error_code != "INVALID_PARAMETER_VALUE":
                    raise
                log.debug("param %s of run %s kept: %s", op["key"], self.run_id, e)
        elif kind == "status":
            self.client.set_terminated(self.run_id, op["status"])

    def _drain(self, force: bool = False) -> bool:
        """Send the backlog in order. False when MLflow failed: the rest stays queued (and on disk)."""
        if not self._ops:
            return True
        if not self._ensure_run(force):
            self._journal_write()
            return False
        sent, ok = 0, True
        try:
            for op in self._ops:
                self._apply(op)
                sent += 1
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            self._fail(f"{self._ops[sent].get('op', '?')} logging", e)
            ok = False
        del self._ops[:sent]
        self._journal_write()
        return ok

    def _submit(self, op: dict[str, Any]) -> bool:
        self._ops.append(op)
        return self._drain()

    def log_metrics(self, metrics: dict[str, Any], step: int = 0) -> None:
        """Queue finite scalars at ``step`` and try to send everything queued."""
        ts = int(time.time() * 1000)
        ms = [[k, float(v), ts, int(step)] for k, v in metrics.items() if finite_scalar(v)]
        if ms:
            self._submit({"op": "metrics", "m": ms})

    def log_dataset(self, info: dict[str, Any]) -> None:
        """The decoded task (``pfnas.provenance.dataset_info``): ``mlflow.log_input`` plus ``pfnas.dataset.*`` tags."""
        self._submit({"op": "dataset", "info": info})

    # --- engine callbacks
    def log_epoch(self, m: dict[str, Any]) -> None:
        """``on_epoch`` metrics: scalars as ``<phase>/<name>`` at ``step=epoch``; alpha heatmap at search end."""
        phase = str(m.get("phase", "run"))
        step = int(m.get("epoch", m.get("candidate", 0)))  # random/evolution report once per candidate
        self.log_metrics({f"{phase}/{k}": v for k, v in m.items() if k not in ("phase", "epoch")}, step)
        if finite_scalar(m.get("images_per_s")):
            self._throughput.setdefault(phase, []).append(float(m["images_per_s"]))
        if phase == "search" and isinstance(m.get("alpha"), list):
            self._alpha = m["alpha"]
            if self.cfg is not None and self.cfg.method.kind == "search" and step >= self.cfg.search.epochs:
                self._log_heatmap(m.get("policy"))

    def _log_heatmap(self, policy: Any = None) -> None:
        if self._alpha is None or self._heatmap_logged:
            return
        ops = list(self.cfg.prompts.ops) if self.cfg is not None else [str(i) for i in range(len(self._alpha[0]))]
        title = "softmax(alpha)"
        if isinstance(policy, dict):
            title += "  policy: " + " ".join(str(v)[:4] for _, v in sorted(policy.items(), key=lambda kv: int(kv[0])))
        self._heatmap_logged = True  # queued: drawn and sent (with alpha.json) when MLflow answers
        self._submit({"op": "heatmap", "alpha": self._alpha, "ops": ops, "title": title})

    @contextmanager
    def recording(self):
        """Close the run as KILLED on an interrupt (Ctrl-C, a scheduler's stop) or FAILED with the error line."""
        try:
            yield self
        except (KeyboardInterrupt, SystemExit):
            self.finish(status="KILLED")
            raise
        except BaseException as e:
            self.finish(status="FAILED", error=f"{type(e).__name__}: {e}")
            raise

    def _log_model(self, model_dir: str | None) -> None:
        """The retrain's export (``model.safetensors`` + ``pfnas_model.json``) as the artifact folder ``model/``,
        so ``pfnas.load_model("runs:/<run_id>/model")`` rebuilds the model."""
        from .export import EXPORT_FILES

        files = [Path(model_dir) / f for f in EXPORT_FILES] if model_dir else []
        if files and all(f.is_file() for f in files):
            self._submit({"op": "artifacts", "files": [str(f) for f in files], "path": "model"})

    def finish(self, result: dict[str, Any] | None = None, status: str = "FINISHED", error: str | None = None) -> None:
        """Final metrics (test_acc, tuned params/percent, cost, throughput), the policy, and the run status."""
        if result:
            final = {k: result.get(k) for k in FINAL_METRICS}
            for phase, vals in self._throughput.items():
                final[f"{phase}_images_per_s"] = sum(vals) / len(vals)
            if "retrain" in self._throughput:
                final["images_per_s"] = final["retrain_images_per_s"]
            self.log_metrics(final)
            self._log_heatmap(result.get("policy"))
            if isinstance(result.get("policy"), dict):
                policy = {str(k): v for k, v in result["policy"].items()}
                self._submit({"op": "dict", "obj": policy, "path": "policy.json"})
                ops = ",".join(str(v) for _, v in sorted(policy.items(), key=lambda kv: int(kv[0])))
                self._submit({"op": "tag", "key": "pfnas.policy", "value": ops[:5000]})  # runs table: show, filter
                self._submit({"op": "param", "key": "policy", "value": ops[:6000]})
            self._log_model(result.get("model_dir"))
        if error:
            self._submit({"op": "tag", "key": "pfnas.error", "value": error[:5000]})
        self._submit({"op": "status", "status": status})
        # MLflow may be back (a restarted server) before the pause ends: a few short tries, then keep the backlog
        for _ in range(self.finish_tries if status == "FINISHED" else 1):
            if not self._ops or self._drain(force=True):
                break
            time.sleep(self.finish_wait_s)
        if self._ops:
            where = (f"kept in {self.buffer_path}; rerun the same command to send them" if self.buffer_path
                     else "not logged")
            log.warning("MLflow at %s is unreachable: %d record(s) of run %s %s", self.tracking_uri, len(self._ops),
                        self.run_name, where)


def run_logged(cfg: ExperimentConfig, out_dir: str | Path, *, tracking_uri: str | None = None,
               experiment: str | None = None, progress: bool = True, source: str = "pfnas run",
               **kw: Any) -> dict[str, Any]:
    """``baselines.run_method`` logged as one top-level MLflow run (``pfnas.kind=run``).

    The run id is kept in ``out_dir/mlflow_run_id``, so rerunning the command after a crash resumes the
    experiment from its checkpoints and continues the same MLflow run; what MLflow could not take (server
    down or restarting) waits in ``out_dir/mlflow_buffer.jsonl`` and is sent then. ``experiment`` defaults to
    ``<cfg.name>-<data.task>`` (or ``cfg.name``), so seeds and methods of one task land side by side.
    The folder is claimed first (lock, same configuration), so a refused rerun never touches the old MLflow run.
    ``source`` (``pfnas <verb>``) is the run's ``mlflow.source.name``; the decoded task is its dataset input.
    """
    from .baselines import run_method
    from .engine import Experiment, claim_run_dir

    uri = resolve_tracking_uri(tracking_uri)
    exp_name = experiment or (f"{cfg.name}-{cfg.data.task}" if cfg.data.task else cfg.name)
    with claim_run_dir(cfg, out_dir) as claim:
        out = claim.path
        if claim.replaced:  # the folder's earlier try (another config) never trained: its MLflow run is not ours
            for f in (RunLogger.RUN_ID, RunLogger.BUFFER):
                (out / f).unlink(missing_ok=True)
        logger = RunLogger(uri, exp_name, f"{method_label(cfg)}-seed{cfg.seed}", cfg, folder=out, source=source,
                           tags={"pfnas.kind": "run", "pfnas.task": str(cfg.data.task or cfg.data.kind)})
        with logger.recording():
            exp = kw.pop("exp", None) or Experiment.build(cfg)  # what run_method would build, first
            logger.log_dataset(dataset_info(cfg, exp.data))
            res = run_method(cfg, out, on_epoch=logger.log_epoch, progress=progress, exp=exp, **kw)
        logger.finish(res)
    return res


# ----------------------------------------------------------------------------- compare
def _iter_runs(client, experiment_ids: list[str]) -> Iterable[Any]:
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string="", max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            break


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _avg(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if r[key] is not None]
    return sum(vals) / len(vals) if vals else None


def _human(n: float | None) -> str:
    if n is None or not math.isfinite(n):
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def collect_rows(tracking_uri: str | None, experiment: str | None, metric: str) -> list[dict[str, Any]]:
    """Finished pfnas trial/run records with ``metric``, grouped by config hash (seeds averaged).

    Each row also carries its final test score (``final_mean/std/n``): the study finals that name the row's
    config as selected (tag ``pfnas.selected``), or for a final-stage ``pfnas run`` its own ``test_acc``.
    """
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
    finals: dict[str, list[dict[str, Any]]] = {}  # selected config hash -> final runs
    for run in _iter_runs(client, exp_ids) if exp_ids else []:
        tags, metrics = run.data.tags, run.data.metrics
        if run.info.status != "FINISHED":
            continue
        if tags.get("pfnas.kind") == "final" and "test_acc" in metrics and tags.get("pfnas.selected"):
            finals.setdefault(tags["pfnas.selected"], []).append(
                {"run_id": run.info.run_id, "test_acc": metrics["test_acc"]})
            continue
        if tags.get("pfnas.kind") not in ("trial", "run") or metric not in metrics:
            continue
        key = tags.get("pfnas.config_hash") or run.info.run_id
        g = groups.setdefault(key, {"label": tags.get("pfnas.label") or run.info.run_name, "config_hash": key,
                                    "method": tags.get("pfnas.method", ""), "runs": []})
        g["runs"].append({"run_id": run.info.run_id, "value": metrics[metric], "test_acc": metrics.get("test_acc"),
                          "final_stage": tags.get("pfnas.stage") == "final",
                          "tuned_params": metrics.get("tuned_params"), "tuned_percent": metrics.get("tuned_percent"),
                          "cost_images": metrics.get("cost_images"), "study": tags.get("pfnas.study", ""),
                          "infer_ms_per_image": metrics.get("infer_ms_per_image"),
                          "artifact_uri": run.info.artifact_uri})
    rows = []
    for g in groups.values():
        runs = g.pop("runs")
        mean, std = _mean_std([r["value"] for r in runs])
        best = max(runs, key=lambda r: r["value"]) if "loss" not in metric else min(runs, key=lambda r: r["value"])
        fin = finals.get(g["config_hash"], [])
        tests = [f["test_acc"] for f in fin] or [r["test_acc"] for r in runs
                                                  if r["final_stage"] and r["test_acc"] is not None]
        fmean, fstd = _mean_std(tests) if tests else (None, None)
        rows.append({**g, "n": len(runs), "mean": mean, "std": std, "final_mean": fmean, "final_std": fstd,
                     "final_n": len(tests), "final_run_ids": [f["run_id"] for f in fin], "tuned_params": _avg(runs, "tuned_params"),
                     "tuned_percent": _avg(runs, "tuned_percent"), "cost_images": _avg(runs, "cost_images"),
                     "infer_ms_per_image": _avg(runs, "infer_ms_per_image"),
                     "best_run_id": best["run_id"], "run_ids": [r["run_id"] for r in runs],
                     "study": ",".join(sorted({r["study"] for r in runs if r["study"]}))})
    sign = 1 if "loss" not in metric else -1  # ties: the study's own selection (it has finals), then fewer params
    rows.sort(key=lambda r: (sign * r["mean"], r["final_n"] > 0, -(r["tuned_params"] or 0)), reverse=True)
    return rows


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
    front = pareto_front([[r["mean"], r[cost]] for r in have], ["min" if "loss" in metric else "max", "min"])
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
    Loss-like metrics (name containing ``loss``) sort ascending. ``pareto`` (``tuned_params`` or
    ``infer_ms_per_image``) also writes ``pareto.png`` / ``pareto.csv``: the front of ``metric`` against that
    cost over every configuration, single-op baselines marked; rows get ``pareto: True`` when on it.
    """
    rows = collect_rows(tracking_uri, experiment, metric)
    where = f"experiment {experiment!r}" if experiment else "any experiment"
    if not rows:
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
                    "config_hash", "best_run_id", "run_ids"])
        for i, r in enumerate(rows, 1):
            w.writerow([i, r["label"], r["method"], r["n"], r["mean"], r["std"], r["final_mean"], r["final_std"],
                        r["final_n"], r["tuned_params"], r["tuned_percent"], r["cost_images"], r["study"],
                        r["config_hash"], r["best_run_id"], " ".join(r["run_ids"])])
    _plot(rows, metric, out / "acc_vs_params.png")
    if pareto:
        _pareto(rows, metric, pareto, out, where)
    best_cfg = None
    bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        client = make_client(resolve_tracking_uri(tracking_uri))
        if reads_test(metric):
            raise PfnasError("ranked on a test metric: no best config")
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
        for col in ("#", "label", "n", metric, "final test (n)", "tuned params", "tuned %", "search cost"):
            t.add_column(col, justify="left" if col == "label" else "right", overflow="fold")
        for i, r in enumerate(rows, 1):
            val = f"{r['mean']:.4f}" + (f" ± {r['std']:.4f}" if r["n"] > 1 else "")
            fin = "-" if not r["final_n"] else f"{r['final_mean']:.4f} ± {r['final_std']:.4f} ({r['final_n']})"
            pct = f"{r['tuned_percent']:.3f}" if r["tuned_percent"] is not None else "-"
            t.add_row(str(i), Text(r["label"]), str(r["n"]), val, fin, _human(r["tuned_params"]), pct,
                      _human(r["cost_images"]) + (" img" if r["cost_images"] else ""))
        console.print(t)
        if reads_test(metric):
            console.print(f"note: {metric} is a test metric; this ranking selects nothing (no best config)")
        console.print(f"wrote {out / 'compare.csv'}, {out / 'acc_vs_params.png'}"
                      + (f", {best_cfg}" if best_cfg else ""))
    return rows
