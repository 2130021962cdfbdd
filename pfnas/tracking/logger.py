"""Logging one run to MLflow: :class:`RunLogger` turns the engine's ``on_epoch`` metrics into MLflow calls."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pfnas.config import ExperimentConfig, RunFileError, config_hash
from pfnas.provenance import dataset_input, dataset_tags, provenance_tags
from pfnas.runtime import write_atomic
from pfnas.tracking.store import get_experiment_id, make_client
from pfnas.tracking.report import display_name
from pfnas.tracking.values import curated_params, finite_scalar, method_label

log = logging.getLogger("pfnas.tracking")  # one logger name for the package

# a run's final metrics: val_acc (stage select) or test_acc (stage final) of the retrained policy, and the
# score that selected its policy inside the method (search's supernet val, random/evolution's best candidate)
FINAL_METRICS = ("test_acc", "val_acc", "select_val_acc", "tuned_params", "tuned_percent", "cost_images",
                 "search_time_s", "retrain_time_s", "time_s", "cost_step_s", "infer_images_per_s",
                 "infer_ms_per_image", "eval_images", "kendall_tau")  # kendall_tau: one-shot's supernet diagnostic


def method_tag(cfg: ExperimentConfig) -> str:
    """The ``pfnas.method`` tag: the method as tables name it (``search-gdas``, ``all-add``, ``linear probe``)."""
    return display_name(method_label(cfg))


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


LIVE_ONLY = ("select_epochs_done", "select_epochs_planned")  # a selection's progress for a study's live view
# (methods.budget.with_selection_progress): not a result, so not an MLflow metric


class RunLogger:
    """One MLflow run fed by the engine's epoch callback; never raises.

    Any MLflow error (server down or restarting, locked database) logs one warning and pauses MLflow calls for
    ``retry_s`` seconds. Everything not sent yet (the run's creation and params, epoch metrics, tags, artifacts
    given as data, the final status) waits in an ordered backlog, mirrored to ``<folder>/mlflow_buffer.jsonl``
    when a run ``folder`` is given, and is replayed on the next successful call, at :meth:`finish` (a few short
    tries) and by a later logger on the same folder (rerunning the command). Metric timestamps are kept, so a
    replay never adds a point twice; a run reopened on resume skips metric points at steps it already has.
    The run id is kept in ``<folder>/mlflow_run_id``.

    The buffer file is not trusted: a record that is not one of ours, an artifact file outside the run folder,
    or a record that fails ``BAD_TRIES`` times while MLflow answers is set aside in
    ``<folder>/mlflow_buffer.rejected.jsonl`` (one warning naming it) and the records after it are sent.

    Pass ``run_id`` to continue an existing run (a resumed trial), or ``reuse_tags`` to continue the run
    under the same parent whose tags match (a trial retried before its first checkpoint).
    """

    BUFFER = "mlflow_buffer.jsonl"
    REJECTED = "mlflow_buffer.rejected.jsonl"  # the dead letters: records MLflow will never take, with the reason
    RUN_ID = "mlflow_run_id"
    KINDS = ("metrics", "tag", "dict", "heatmap", "artifacts", "dataset", "param", "status")
    BAD_TRIES = 3  # a record that fails this often while MLflow answers is set aside

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, cfg: ExperimentConfig | None = None,
                 *, parent_run_id: str | None = None, run_id: str | None = None, tags: dict[str, str] | None = None,
                 reuse_tags: dict[str, str] | None = None, retry_s: float = 60.0, folder: str | Path | None = None,
                 finish_tries: int = 3, finish_wait_s: float = 1.0, source: str = "pfnas run",
                 source_type: str = "LOCAL", tuned: list[str] | tuple[str, ...] = ()):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # fail fast when a server is down
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.tracking_uri, self.experiment, self.run_name, self.cfg = tracking_uri, experiment, run_name, cfg
        self.parent_run_id, self.run_id, self.retry_s = parent_run_id, run_id, retry_s
        self.finish_tries, self.finish_wait_s = finish_tries, finish_wait_s
        self.tags = dict(tags or {})
        self.tuned = tuple(tuned)  # a study's tuned keys: the first param columns (curated_params)
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
        self._last_error = ""  # first line of the latest MLflow error
        self._rejected = 0  # records set aside
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
        self._last_error = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        if not self._warned:
            self._warned = True
            log.warning("MLflow %s failed for run %s (%s); training continues, logging retries later",
                        what, self.run_name, self._last_error)

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
                    tags.setdefault("pfnas.method", method_tag(self.cfg))
                    tags.setdefault("pfnas.config_hash", config_hash(self.cfg))
                    tags.setdefault("pfnas.stage", self.cfg.train.stage)  # select: scored on val; final: on test
                run = self.client.create_run(exp_id, tags=tags, run_name=self.run_name)
                self.run_id, self._need_params, self._seen_steps = run.info.run_id, self.cfg is not None, {}
                self._save_run_id()
            if self._need_params:  # retried until logged: a run never ends up without its config
                params = [Param(k, v) for k, v in curated_params(self.cfg, self.tuned).items()]
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
            write_atomic(path, "".join(json.dumps(op) + "\n" for op in self._ops))
            self._journaled = True
        except (OSError, RunFileError) as e:  # a full disk must not stop training either
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

    def _refusal(self, op: Any) -> str | None:
        """Why a (maybe hand-edited) backlog record must not be sent, or None: not one of ours, or artifact
        files outside the run folder (only the run's own files are uploaded)."""
        if not isinstance(op, dict) or op.get("op") not in self.KINDS:
            return "not a pfnas MLflow record"
        if op["op"] == "artifacts":
            files = op.get("files")
            if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
                return "malformed artifacts record"
            if self.folder is not None:
                root = self.folder.resolve()
                outside = [f for f in files if not Path(f).resolve().is_relative_to(root)]
                if outside:
                    return f"file(s) outside the run folder {root}: {', '.join(outside)}"
        return None

    def _bad_record(self, op: dict[str, Any], err: BaseException) -> str | None:
        """After ``op`` raised: the reason to set it aside when it is the record that fails (MLflow still answers,
        and this record failed ``BAD_TRIES`` times, counted across reruns), else None (MLflow is failing: wait)."""
        try:
            self.client.get_run(self.run_id)
        except Exception:  # noqa: BLE001 - MLflow itself is failing: keep the record
            return None
        tries = op.get("tries")
        op["tries"] = (tries if isinstance(tries, int) else 0) + 1
        if op["tries"] < self.BAD_TRIES:
            return None
        return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]

    def _set_aside(self, op: Any, reason: str) -> None:
        """Move a record MLflow must not or will not take to the dead-letter file; one warning naming it."""
        self._rejected += 1
        where = "dropped"
        if self.folder is not None:
            path = self.folder / self.REJECTED
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a") as f:
                    f.write(json.dumps({"reason": reason, "record": op}) + "\n")
                where = f"set aside in {path}"
            except OSError as e:
                log.debug("cannot write %s: %s", path, e)
        if self._rejected == 1:
            log.warning("MLflow record of run %s not sent (%s); %s", self.run_name, " ".join(reason.split())[:300],
                        where)

    def _drain(self, force: bool = False) -> bool:
        """Send the backlog in order. False when MLflow failed: the rest stays queued (and on disk). A record that
        must not or cannot be sent is set aside, so the ones after it still go."""
        if not self._ops:
            return True
        if not self._ensure_run(force):
            self._journal_write()
            return False
        done, ok = 0, True
        for op in self._ops:
            reason = self._refusal(op)
            if reason is None:
                try:
                    self._apply(op)
                except Exception as e:  # noqa: BLE001 - tracking must never stop training
                    reason = self._bad_record(op, e)
                    if reason is None:
                        self._fail(f"{op.get('op', '?')} logging", e)
                        ok = False
                        break
            if reason is not None:
                self._set_aside(op, reason)
            done += 1
        del self._ops[:done]
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
        self.log_metrics({f"{phase}/{k}": v for k, v in m.items() if k not in ("phase", "epoch") + LIVE_ONLY}, step)
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

    def _log_model(self, model_files: list[str] | None) -> None:
        """The retrain's export (``model.safetensors`` + ``pfnas_model.json``, named by the result's
        ``model_files``) as the artifact folder ``model/``, so ``pfnas.load_model("runs:/<run_id>/model")``
        rebuilds the model."""
        files = [Path(f) for f in model_files or ()]
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
            self._log_model(result.get("model_files"))
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
            log.warning("MLflow at %s failed (%s): %d record(s) of run %s %s", self.tracking_uri, self._last_error,
                        len(self._ops), self.run_name, where)
