"""The driver side: one Ray Tune study per plan (OptunaSearch or a grid), its MLflow parent run, the
Optuna storage, the finals, and :func:`run_tune`."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import ray
import yaml
from mlflow.entities import Metric, Param
from ray import tune
from ray.tune import Callback, ExperimentAnalysis
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from ..config import ConfigError, ExperimentConfig, PfnasError, RunDirError, merge_dotted
from ..data import check_data_paths
from ..provenance import provenance_tags
from ..runtime import try_lock
from ..tracking import (
    absolute_sqlite_url,
    compare_runs,
    config_hash,
    finite_scalar,
    format_value,
    get_experiment_id,
    make_client,
    method_tag,
    pareto_figure,
    resolve_tracking_uri,
    runs_table_url,
    set_runs_view,
    sqlite_corruption,
    sqlite_store_lock,
)
from .space import SpaceConfig, StudyPlan, load_space
from .cluster import Quiet, check_data_on_nodes, check_ray_address, check_trial_fits, data_configs
from .display import DISPLAY, FailedStudy, LiveTable, Progress, StudySummary, TaskBoard, TuneSummary
from .select import FinalsRecord, TrialRecord, pareto_trials, ranked, records
from .trial import TrialContext, error_line, pfnas_trial, trial_dirname, trial_name

log = logging.getLogger(__name__)


STATE_FILE = "pfnas_study.json"
OWNED_FILE = ".pfnas-owned"  # in every folder pfnas makes and may later replace (a study's finals): only those go
FINALS_SELECTION = "selected_trials.txt"  # a finals folder's chosen trials (an older pfnas's only mark of its own)
RESUME_HINT = "rerun with --resume to continue (finished trials are kept)"


def _write_file(path: Path, text: str, then: str = RESUME_HINT) -> None:
    """Write one of a study's own files; a write the OS refuses (disk full, permissions) is one line naming it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as e:
        raise PfnasError(f"cannot write {path}: {e.strerror or e}; fix that, then {then}") from None


def _check_replaceable(path: Path) -> None:
    """Refuse a folder pfnas would replace but did not make (no :data:`OWNED_FILE`, no finals selection, not empty)."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink() and (
            (path / OWNED_FILE).is_file() or (path / FINALS_SELECTION).is_file() or not any(path.iterdir())):
        return
    raise ConfigError(f"{path} exists and was not made by pfnas, which would replace it; move it away or pick "
                      "another --experiment or --storage")


def _fresh_owned_dir(path: Path) -> None:
    """``path`` empty but for its :data:`OWNED_FILE`: an earlier one removed only when pfnas made it."""
    _check_replaceable(path)
    try:
        if path.exists():
            shutil.rmtree(path)
    except OSError as e:
        raise PfnasError(f"cannot remove the old {path}: {e.strerror or e}") from None
    _write_file(path / OWNED_FILE, "made by pfnas tune: replaced whole when its study selects other trials\n")


def _lock_path(storage_root: str, study: str) -> Path:
    """The lock file of a local study: beside its folder, so a refused study leaves no folder behind."""
    return Path(storage_root) / f".{study}.pfnas-lock"


@contextmanager
def _study_lock(storage_root: str, study: str):
    """Hold study ``study`` of a local Tune storage for this ``run_tune``: an exclusive ``flock`` (the kernel drops it
    when the holder dies, so a killed study leaves no stale lock); a second ``pfnas tune`` of it is refused in one
    line naming the folder and the holder's pid (as run folders are, ``pfnas.engine.claim_run_dir``)."""
    path = _lock_path(storage_root, study)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, holder = try_lock(path)
    if fd < 0:
        raise RunDirError(f"study {Path(storage_root) / study} is in use by another pfnas tune"
                          f"{f' (pid {holder})' if holder else ''}; wait for it to end, or pick another --experiment "
                          "or --storage")
    try:
        yield
    finally:
        os.close(fd)  # releases the flock


def _suggest(trial: optuna.trial.Trial, name: str, dist: optuna.distributions.BaseDistribution) -> None:
    """``trial``'s value of ``name`` under ``dist``, sampled unless already stored (Optuna's public suggest API)."""
    if isinstance(dist, optuna.distributions.FloatDistribution):
        trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
    elif isinstance(dist, optuna.distributions.IntDistribution):
        trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)
    else:
        trial.suggest_categorical(name, dist.choices)


class PfnasOptunaSearch(OptunaSearch):
    """OptunaSearch that skips intermediate results which do not carry the metric yet (search epochs), and that after
    a restore adopts the trials its study asked after the last save (see :meth:`suggest`)."""

    def suggest(self, trial_id: str) -> dict | None:
        """Tune's next config. A process killed between Optuna's ask and Tune's next save leaves a RUNNING trial in
        the RDB study that the restored searcher never heard of; the next Tune trial runs it (its sampled params,
        and any the kill left unwritten drawn now) instead of asking again, so a resumed study keeps exactly
        num_samples trials."""
        if trial_id not in self._ot_trials and self._ot_study is not None and isinstance(self._space, dict):
            held = {t.number for t in self._ot_trials.values()}
            for frozen in self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                if frozen.number not in held and set(frozen.params) <= set(self._space):
                    trial = optuna.trial.Trial(self._ot_study, frozen._trial_id)
                    for name, dist in self._space.items():  # a stored param comes back as it is
                        _suggest(trial, name, dist)
                    self._ot_trials[trial_id] = trial
                    break
        return super().suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, str) and self.metric in result:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        super().on_trial_complete(trial_id, result, error or bool(result and result.get("error")))  # FAIL, not PRUNED


# in a local study's folder: its ASHA rungs (JSON), for a resume. Not *.json: Tune copies those into its driver
# staging folder on restore and back over the study folder at every save, which would put back the old rungs
ASHA_STATE = "asha_rungs.state"


class PfnasASHA(ASHAScheduler):
    """ASHA whose rungs (the scores recorded at each milestone, by trial id) are kept in a JSON file, so that a
    restored study continues with them. Tune restores its searcher and callbacks from the experiment folder but
    rebuilds the scheduler from the tuner pickled at the start, with empty rungs (ray-project/ray#30838): every
    trial would then pass the rungs it reaches after a resume."""

    def __init__(self, *args, state_file: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.state_file = state_file
        self._loaded = False

    def rungs(self) -> list[list[tuple[float, dict[str, float]]]]:
        """Per bracket, (milestone, {trial id: score x mode sign}) from the highest milestone down."""
        return [[(float(m), {str(k): float(v) for k, v in rec.items()}) for m, rec in b._rungs]
                for b in self._brackets]

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if not self.state_file or not os.path.isfile(self.state_file):
            return
        try:
            data = json.loads(Path(self.state_file).read_text())
            for bracket, saved in zip(self._brackets, data["brackets"]):
                by_milestone = {float(m): rec for m, rec in saved}
                for milestone, recorded in bracket._rungs:
                    for tid, v in by_milestone.get(float(milestone), {}).items():
                        recorded.setdefault(str(tid), float(v))
            self._num_stopped = int(data.get("num_stopped", 0))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("cannot read ASHA's saved rungs %s (%s); they start empty", self.state_file, e)

    def _save(self) -> None:
        if not self.state_file:
            return
        tmp = f"{self.state_file}.tmp"
        try:
            Path(tmp).write_text(json.dumps({"brackets": self.rungs(), "num_stopped": self._num_stopped}))
            os.replace(tmp, self.state_file)
        except OSError as e:
            log.warning("cannot save ASHA's rungs to %s: %s", self.state_file, e.strerror or e)

    def on_trial_add(self, tune_controller, trial) -> None:
        self._load()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._load()
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._load()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()


STOP_STUDIES = threading.Event()  # set while studies run in driver threads and the run is interrupted


class StudiesStopped(Exception):
    """Raised inside a study's Tune loop (a driver thread) to end it: see :class:`StopWhenAsked`."""


_START = threading.Lock()  # one study at a time from building its Tuner to its loop's first step
_START_HELD = threading.local()


@contextmanager
def _starting():
    """Hold :data:`_START` while a study builds and starts its Tuner: Ray Tune's trainable registry (filled by
    ``tune.with_parameters`` and at the start of ``fit``) is not thread-safe ("dictionary changed size during
    iteration" with two studies starting at once). The loop's first step (:class:`StopWhenAsked`) lets go."""
    _START.acquire()
    _START_HELD.on = True
    try:
        yield
    finally:
        _release_start()


def _release_start() -> None:
    if getattr(_START_HELD, "on", False):
        _START_HELD.on = False
        _START.release()


OLD_TRAINABLE = "pfnas_trial"  # the name every study's trainable had before studies ran side by side


def _trainable(ctx: TrialContext, resources: dict[str, float], name: str):
    """:func:`pfnas_trial` with ``ctx`` and ``resources``, registered with Tune as ``name``. Tune keeps trainables
    in one registry by name (``__name__``), and its actors fetch them by that name: two studies side by side under
    one name would both run the one registered last, with its study's context (task, parent run)."""
    fn = tune.with_resources(tune.with_parameters(pfnas_trial, ctx=ctx), resources)
    fn.__name__ = name
    return fn


def _restore(path: str, ctx: TrialContext, resources: dict[str, float], name: str):
    """``Tuner.restore`` of a study or its finals; one started by an older pfnas has the old trainable name."""
    try:
        return tune.Tuner.restore(path, trainable=_trainable(ctx, resources, name), resume_errored=True)
    except ValueError as e:
        if "Invalid `trainable` input" not in str(e):
            raise
        return tune.Tuner.restore(path, trainable=_trainable(ctx, resources, OLD_TRAINABLE), resume_errored=True)


class StopWhenAsked(Callback):
    """Ends a study's Tune loop once :data:`STOP_STUDIES` is set. Tune handles Ctrl-C itself only in the main thread;
    a study in another thread stops here, Tune stops its trials, and its last saved state is what --resume
    continues. Plain data: Tune pickles it with the run config, and a restored study's copy sees this process's
    event."""

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        _release_start()  # the loop runs: another study may start
        if STOP_STUDIES.is_set():
            raise StudiesStopped("interrupted")


def _space_digest(space: SpaceConfig, plan: StudyPlan) -> str:
    spec = space.model_dump(mode="json", exclude={"max_concurrent_studies"})  # how studies share the cluster
    blob = json.dumps([spec, plan.base.model_dump(mode="json"), sorted(plan.params)], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _parent_run(client, exp_id: str, plan: StudyPlan, space: SpaceConfig, space_path: Path,
                previous: str | None) -> str:
    """Reopen the study's parent run on resume, else create it with the space as params."""
    if previous:
        try:
            client.update_run(previous, status="RUNNING")
            if "pfnas.error" in client.get_run(previous).data.tags:  # what stopped the earlier try: over now
                client.delete_tag(previous, "pfnas.error")
            return previous
        except Exception as e:  # noqa: BLE001 - e.g. another tracking store: start a new parent
            log.warning("cannot reopen MLflow parent run %s (%s); starting a new one", previous, error_line(e))
    tags = {"pfnas.kind": "study", "pfnas.study": plan.name, "pfnas.space": str(space_path),
            **provenance_tags("pfnas tune", "LOCAL", plan.base)}
    if plan.task:
        tags["pfnas.task"] = plan.task
    run = client.create_run(exp_id, tags=tags, run_name=plan.name)
    params = {"space.metric": space.metric, "space.mode": space.mode, "space.num_samples": space.num_samples,
              "space.algorithm": space.algorithm, **{f"variant.{i}": json.dumps(v) for i, v in enumerate(plan.variants)},
              "space.seed": space.seed, "space.max_concurrent_trials": space.max_concurrent_trials,
              "space.scheduler": space.scheduler.type, "space.sync_batches": space.sync_batches,
              **{f"param.{k}": v.describe() for k, v in plan.params.items()}}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    client.log_dict(run.info.run_id, plan.base.model_dump(mode="json"), "base_config.yaml")
    try:  # the runs table shows this study's tuned params, its trials expanded under the parent
        tuned = [k for k in plan.param_keys if k != "variant"] + [k for v in plan.variants for k in v]
        set_runs_view(client, exp_id, list(dict.fromkeys(tuned)), expand=run.info.run_id)
    except Exception as e:  # noqa: BLE001 - a view is a convenience
        log.debug("no runs view on experiment %s: %s", exp_id, e)
    return run.info.run_id


def _close_orphans(client, exp_id: str, parent: str) -> int:
    """Mark KILLED the study's child runs still RUNNING once it is over: a trial killed with its driver before Tune
    recorded it is recreated under a new id on resume, and its first run would otherwise stay RUNNING forever."""
    found = client.search_runs([exp_id], max_results=5000, filter_string=(
        f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'RUNNING'"))
    for r in found:
        client.set_tag(r.info.run_id, "pfnas.error", "interrupted; its trial was not resumed")
        client.set_terminated(r.info.run_id, "KILLED")
    return len(found)


def default_optuna_storage(tracking_uri: str, storage_root: str) -> str | None:
    """``sqlite:///<dir>/optuna.db`` next to a sqlite MLflow db, else next to a local Tune storage folder; else None
    (an in-memory study)."""
    if tracking_uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(tracking_uri[len("sqlite:///"):]).parent / "optuna.db")
    if "://" not in storage_root:
        return "sqlite:///" + str(Path(storage_root) / "optuna.db")
    return None


def open_optuna_storage(url: str | None):
    """Optuna's RDBStorage at ``url``; a new sqlite file is created (tables, version) one process at a time, and
    one that is not a database is a PfnasError naming the cause."""
    if not url:
        return None

    kw = {"engine_kwargs": {"connect_args": {"timeout": 60}}} if url.startswith("sqlite:") else {}
    with sqlite_store_lock(url):
        try:
            return optuna.storages.RDBStorage(url, **kw)
        except Exception as e:
            corrupt = sqlite_corruption(f"Optuna storage {url}", e, "; move it aside or pass another --optuna-storage")
            if corrupt is None:
                raise
            raise corrupt from None


def _optuna_study_name(url: str, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``... when the storage already holds a study of that name (a fresh study never
    continues another's sampler history). A storage that cannot be opened is a PfnasError (the study would lose
    the sampler history it was asked to keep)."""

    try:
        taken = set(optuna.study.get_all_study_names(open_optuna_storage(url)))
    except PfnasError:
        raise
    except Exception as e:  # noqa: BLE001 - a bad URL, a missing driver, a server that is down
        raise PfnasError(f"cannot open Optuna storage {url}: {error_line(e)}; pass --optuna-storage none to keep "
                         "the study in memory") from None
    k, out = 1, name
    while out in taken:
        k += 1
        out = f"{name}-{k}"
    return out


def _n_trials(space: SpaceConfig, plan: StudyPlan, num_samples: int) -> int:
    """Trials a study will run: ``num_samples``, times the size of the grid for a grid study."""
    n = num_samples
    if space.algorithm == "grid":
        n *= max(len(plan.variants), 1)
        for p in plan.params.values():
            n *= len(p.values or [None])
    return n


RAY_RESTARTS = 2  # times a study continues by itself after Ray's own loop stopped (not a trial's failure)
RAY_RESTART_WAIT_S = 10.0  # before continuing: time for what crowded the node (memory) to go away


class RayStopped(PfnasError):
    """Tune's driver loop raised: not a trial's failure (a trial fails alone) but the run's. Ray 2.60 does this when
    its memory monitor kills a trial's worker ("Caught unexpected exception" from the actor manager)."""

    def __init__(self, what: str, reason: str):
        self.stopped = f"Ray stopped {what}: {reason.rstrip('.')}"
        super().__init__(f"{self.stopped}; rerun with --resume to continue it (finished trials are kept)")


def _fit(tuner, what: str):
    """``tuner.fit()``, closing the live table even when interrupted; an exception from Ray's own loop becomes
    :class:`RayStopped` (one line), since Tune kept the run's state and it can continue."""
    try:
        return tuner.fit()
    except PfnasError:
        raise
    except StudiesStopped:  # the run was interrupted while this study ran in a driver thread
        raise KeyboardInterrupt from None
    except OSError as e:  # the driver's own files (experiment state, a full disk): continuing by itself cannot help
        log.debug("%s stopped", what, exc_info=True)
        raise PfnasError(f"{what} stopped: cannot write {e.filename or 'its Tune files'}: {e.strerror or e}; fix that, "
                         f"then {RESUME_HINT}") from None
    except Exception as e:  # noqa: BLE001 - Tune catches a trial's errors itself: this one stopped the whole run
        log.debug("Ray stopped %s", what, exc_info=True)
        raise RayStopped(what, error_line(e)) from None
    finally:
        if DISPLAY:
            DISPLAY[-1].close()


def _tuner(plan: StudyPlan, space: SpaceConfig, trainable, storage: str, num_samples: int, *, verbose: bool = True,
           optuna_storage: str | None = None, optuna_study: str | None = None, progress: Any = None):
    """The study's Tuner: Optuna TPE (its study in ``optuna_storage`` when given: sqlite/RDB URL) or a grid.

    ``verbose`` keeps Ray's own per-trial output; otherwise Tune is silent and ``progress`` (a :class:`_Progress`
    callback) feeds pfnas's live table."""

    k = space.max_concurrent_trials
    sched = None
    if space.scheduler.type == "asha":
        s = space.scheduler
        local = "://" not in storage
        sched = PfnasASHA(time_attr="training_iteration", metric=s.metric, mode=s.mode, max_t=s.max_t,
                          grace_period=s.grace_period, reduction_factor=s.reduction_factor,
                          state_file=str(Path(storage) / plan.name / ASHA_STATE) if local else None)
    run_config = tune.RunConfig(name=plan.name, storage_path=storage,
                                failure_config=tune.FailureConfig(max_failures=space.max_failures),
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=space.keep_checkpoints),
                                verbose=1 if verbose else 0,
                                callbacks=[StopWhenAsked()] + ([progress] if progress is not None and not verbose
                                                               else []))
    if space.algorithm == "grid":  # the full cross product, num_samples repeats, in plan.grid_points' order
        points = plan.grid_points(num_samples)  # Tune presets them over the grid (each key must be in it)
        grid = {"variant": tune.grid_search(list(range(len(plan.variants))))} if plan.variants else {}
        grid.update({key: tune.grid_search(list(p.values)) for key, p in plan.params.items()})
        return tune.Tuner(trainable, param_space=grid, run_config=run_config,
                          tune_config=tune.TuneConfig(search_alg=BasicVariantGenerator(points_to_evaluate=points,
                                                                                        max_concurrent=k),
                                                      num_samples=len(points), scheduler=sched, reuse_actors=True,
                                                      trial_name_creator=trial_name,
                                                      trial_dirname_creator=trial_dirname))
    sampler = optuna.samplers.TPESampler(seed=space.seed, n_startup_trials=space.startup_trials)
    searcher = PfnasOptunaSearch(space={key: p.distribution() for key, p in plan.params.items()},
                                 metric=space.metric, mode=space.mode, sampler=sampler,  # str, or lists
                                 points_to_evaluate=plan.points or None, storage=open_optuna_storage(optuna_storage),
                                 study_name=optuna_study if optuna_storage else None)
    if space.sync_batches:
        searcher = ConcurrencyLimiter(searcher, max_concurrent=k, batch=True)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=sched, num_samples=num_samples,
                                    max_concurrent_trials=None if space.sync_batches else k,  # else: the limiter
                                    reuse_actors=True, trial_name_creator=trial_name,
                                    trial_dirname_creator=trial_dirname),
        run_config=run_config)


@dataclass
class StudyRun:
    """One study while it runs: where Tune keeps it, whether it resumes, its MLflow parent and Optuna study, and the
    trial context every trial gets."""

    plan: StudyPlan
    exp_path: str
    state_path: Path | None  # the pfnas state file (local storage only)
    restoring: bool
    client: Any
    exp_id: str
    parent: str
    optuna_study: str | None
    ctx: TrialContext
    resources: dict[str, float]
    notes: list[str] = field(default_factory=list)

    @property
    def local(self) -> bool:
        return self.state_path is not None


@dataclass
class StudyOutcome:
    """What a study's trials decided: the records, the selected trial, the Pareto front and the per-group picks."""

    recs: list[TrialRecord]
    interrupted: bool
    best: TrialRecord | None = None
    front: list[TrialRecord] = field(default_factory=list)
    groups: list[tuple[str, TrialRecord]] = field(default_factory=list)  # (label, pick): grid variants, front
    orders: list[list[TrialRecord]] = field(default_factory=list)  # the best's, then each group's: val order
    best_cfg: dict[str, Any] | None = None
    best_path: Path | None = None
    finals: FinalsRecord | None = None
    group_finals: list[FinalsRecord] = field(default_factory=list)


def _open_study(plan: StudyPlan, space: SpaceConfig, space_path: Path, *, storage: str, tracking_uri: str,
                mlflow_experiment: str, resume: bool, optuna_storage: str | None) -> StudyRun:
    """The study's Tune folder and state file, its MLflow parent run (the earlier one when resuming) and its Optuna
    study in RDB storage."""
    exp_path = f"{storage.rstrip('/')}/{plan.name}"
    state_path = Path(exp_path) / STATE_FILE if "://" not in storage else None
    previous: dict[str, Any] = {}
    if state_path is not None and state_path.is_file():
        previous = json.loads(state_path.read_text())
    restoring = resume and tune.Tuner.can_restore(exp_path)
    notes = []
    if restoring and previous.get("digest") not in (None, _space_digest(space, plan)):
        notes.append("note: the space or base config changed since this study started; the stored "
                     "search state (sampler, trial configs) continues, new base values apply to new trials")
    try:
        client = make_client(tracking_uri)
        exp_id = get_experiment_id(client, mlflow_experiment, tracking_uri)
        earlier = None
        if restoring:  # the parent this study logged to before (state file, else MLflow tags: URI storage)
            earlier = previous.get("parent_run_id") if previous.get("tracking_uri") == tracking_uri else None
            if earlier is None:
                found = client.search_runs([exp_id], max_results=1, order_by=["attributes.start_time DESC"],
                                           filter_string=f"tags.`pfnas.kind` = 'study' and "
                                                         f"tags.`pfnas.study` = '{plan.name}'")
                earlier = found[0].info.run_id if found else None
        optuna_study = None  # the sampler's study in RDB storage (optuna-dashboard); opened before the parent run
        if optuna_storage and space.algorithm == "optuna":  # exists, so a storage it cannot open leaves no parent
            optuna_study = previous.get("optuna_study") if restoring else _optuna_study_name(optuna_storage, plan.name)
        parent = _parent_run(client, exp_id, plan, space, space_path, earlier)
        if optuna_study:
            client.set_tag(parent, "pfnas.optuna_storage", optuna_storage)
            client.set_tag(parent, "pfnas.optuna_study", optuna_study)
    except PfnasError:
        raise
    except Exception as e:  # noqa: BLE001
        raise PfnasError(f"cannot use MLflow at {tracking_uri}: {error_line(e)}") from None
    ctx = TrialContext(study=plan.name, base=plan.base.model_dump(mode="json"), tracking_uri=tracking_uri,
                       experiment=mlflow_experiment, parent_run_id=parent, param_keys=plan.param_keys,
                       variants=plan.variants, search_cache=f"{exp_path}/search-cache" if state_path else None)
    resources = {"cpu": space.resources.cpu, **({"gpu": space.resources.gpu} if space.resources.gpu else {})}
    return StudyRun(plan, exp_path, state_path, restoring, client, exp_id, parent, optuna_study, ctx, resources, notes)


def _fit_trials(run: StudyRun, space: SpaceConfig, space_path: Path, storage: str, optuna_storage: str | None,
                num_samples: int, verbose: bool):
    """Write the state file, then run (or restore and continue) the study's Tune experiment; Tune's result grid."""
    plan = run.plan
    if run.state_path is not None:
        _write_file(run.state_path, json.dumps({
            "study": plan.name, "parent_run_id": run.parent, "tracking_uri": run.ctx.tracking_uri,
            "mlflow_experiment": run.ctx.experiment, "digest": _space_digest(space, plan), "space": str(space_path),
            "optuna_storage": optuna_storage if run.optuna_study else None, "optuna_study": run.optuna_study},
            indent=1), then="rerun the command")
    with _starting():
        name = f"pfnas_trial_{plan.name}"
        if run.restoring:  # the search state (OptunaSearch with its RDB study) comes back from Tune's folder
            tuner = _restore(run.exp_path, run.ctx, run.resources, name)
        else:
            trainable = _trainable(run.ctx, run.resources, name)
            tuner = _tuner(plan, space, trainable, storage, num_samples, verbose=verbose,
                           optuna_storage=optuna_storage if run.optuna_study else None, optuna_study=run.optuna_study,
                           progress=Progress(f"study {plan.name}", space.metrics[0], run.ctx,
                                             _n_trials(space, plan, num_samples), space.modes[0]))
        return _fit(tuner, f"study {plan.name}")


def _select(run: StudyRun, space: SpaceConfig, results) -> StudyOutcome:
    """Records of every trial, and (unless interrupted) the selected trial, the Pareto front and each grid
    variant's pick, all on the validation metric."""
    saved = _saved_trials(results)
    interrupted = _interrupted(results, saved)
    recs = records(results, space.metrics, run.plan.param_keys, _retries(saved))
    out = StudyOutcome(recs, interrupted)
    if interrupted:  # an interrupted study selects nothing yet
        return out
    primary, mode = space.metrics[0], space.modes[0]
    order = ranked(recs, mode, primary)
    if not order:
        return out
    out.best, out.orders = order[0], [order]
    out.front = pareto_trials(recs, space.modes) if len(space.metrics) > 1 else []
    if space.final.per_variant:
        for i, overrides in enumerate(run.plan.variants):
            vorder = ranked([r for r in recs if r.params.get("variant") == i], mode, primary)
            if vorder:
                out.groups.append((" ".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items()), vorder[0]))
                out.orders.append(vorder)
    for point in out.front:  # a front point has no next trial to fall back to
        out.groups.append(("front " + " ".join(f"{m}={format_value(v)}" for m, v in zip(space.metrics, point.values)),
                           point))
        out.orders.append([point])
    return out


def _finalise(run: StudyRun, space: SpaceConfig, out: StudyOutcome, storage: str, verbose: bool) -> None:
    """The selected trial's final config, and its finals (with every group's pick: one Tune grid); then
    ``best_config.yaml`` in the study folder."""
    if out.best is None:
        return
    primary = space.metrics[0]
    if space.final.seeds:  # the selected trial and every group's pick: one Tune run, every slot kept busy
        _run_final_rounds(run, space, out, storage, verbose)
    final_cfg, _ = _final_context(run.ctx, run.plan, out.best, primary)
    out.best_cfg = final_cfg.model_dump(mode="json")
    if run.local:
        out.best_path = Path(run.exp_path) / "best_config.yaml"
        head = (f"# selected: trial {out.best.trial_id} of study {run.plan.name}, {primary}={out.best.value:.6g} "
                "(validation)\n")
        if out.finals is not None and out.finals.replaced:
            head += (f"# (the better-by-val {', '.join(out.finals.replaced)} diverged when retrained on train+val: "
                     "see the study's notes)\n")
        if out.finals is not None and out.finals.test_accs:
            head += f"# final: {out.finals.describe()}\n"
        _write_file(out.best_path, head + "# rerun the final: pfnas run -c best_config.yaml --set seed=N\n"
                    + yaml.safe_dump(out.best_cfg, sort_keys=False))


FINAL_FALLBACKS = 2  # per finalised slot: how many next-by-val configs replace one whose finals diverged


def _run_final_rounds(run: StudyRun, space: SpaceConfig, out: StudyOutcome, storage: str, verbose: bool) -> None:
    """The finals of the selected trial and of each group's pick; a config whose training diverges on train+val
    in any seed (a non-finite loss, or a collapse to one class: ``TrainingError``, decided before test is scored)
    is replaced by the next trial of its val order, up to :data:`FINAL_FALLBACKS` times. Test never decides: the
    next config is the next by val, and only train+val's own training rules one out. Each round is its own Tune
    grid (``<study>-final``, then ``-final2``, ...), so ``--resume`` replays the same rounds."""
    picks = [order[0] for order in out.orders]
    done: dict[str, FinalsRecord] = {}
    replaced: list[list[str]] = [[] for _ in picks]
    for rnd in range(FINAL_FALLBACKS + 1):
        chosen = list({r.trial_id: r for r in picks if r.trial_id not in done}.values())
        if chosen:
            got, out.interrupted = _run_finals(run.ctx, run.plan, chosen, space, storage, rnd,
                                               trainable_resources=run.resources, verbose=verbose)
            if out.interrupted:
                return
            done.update(got)
        moved = False
        for j, order in enumerate(out.orders):
            rec = done[picks[j].trial_id]
            if not rec.diverged or rnd == FINAL_FALLBACKS:
                continue
            later = order[order.index(picks[j]) + 1:]
            nxt = next((r for r in later if not (r.trial_id in done and done[r.trial_id].diverged)), None)
            if nxt is None:
                continue
            seeds = ", ".join(f"seed {seed}: {err}" for seed, err in rec.errors if seed in rec.diverged)
            note = (f"finals of trial {picks[j].name} diverged on train+val ({seeds}); finalised {nxt.name}, "
                    f"the next by {space.metrics[0]}")
            if note not in run.notes:
                run.notes.append(note)
            replaced[j].append(picks[j].name)
            picks[j], moved = nxt, True
        if not moved:
            break
    out.best = picks[0]
    out.finals = replace(done[picks[0].trial_id], replaced=replaced[0])
    out.groups = [(label, pick) for (label, _), pick in zip(out.groups, picks[1:])]
    out.group_finals = [replace(done[pick.trial_id], label=label, replaced=rep)
                        for (label, _), pick, rep in zip(out.groups, picks[1:], replaced[1:])]


def _study_notes(run: StudyRun, space: SpaceConfig, out: StudyOutcome) -> None:
    """What the summary says beside the table: an interruption, unfinished trials, a metric nobody reported."""
    recs = out.recs
    if out.interrupted:
        run.notes.append("interrupted: rerun with --resume to continue (finished trials and finals are kept)")
    elif any(r.status == "STOPPED" for r in recs) and space.scheduler.type == "none":
        run.notes.append("some trials did not finish; rerun with --resume to continue them")
    if not any(r.value is not None for r in recs) and any(r.status == "TERMINATED" for r in recs):
        keys = sorted({k for r in recs for k in r.metrics if "/" not in k})
        run.notes.append(f"warning: no trial reported metric {space.metrics[0]!r} (final keys: {', '.join(keys)})")


def _log_parent(run: StudyRun, space: SpaceConfig, out: StudyOutcome) -> None:
    """The study's MLflow parent run: the trials table, the Pareto front, counts, the best config and the finals'
    test mean ± std; then closed FINISHED (KILLED when trials are left to resume)."""
    client, parent, recs, primary = run.client, run.parent, out.recs, space.metrics[0]
    try:
        table = [{"index": r.index, "trial_id": r.trial_id, "status": r.status, "params": r.params,
                  **dict(zip(space.metrics, r.values or [r.value])), "error": r.error, "retries": r.retries,
                  "pareto": any(r is p for p in out.front)} for r in recs]
        client.log_dict(parent, {"trials": table}, "trials.json")
        if out.front:  # the front as a table and a plot (first objective against the second)
            pts = [r for r in recs if r.values is not None]
            client.log_dict(parent, {"objectives": space.metrics, "modes": space.modes,
                                     "front": [{"trial_id": r.trial_id, "params": r.params,
                                                **dict(zip(space.metrics, r.values))} for r in out.front]},
                            "pareto_front.json")
            fig = pareto_figure([(r.values[1], r.values[0]) for r in pts], [pts.index(r) for r in out.front],
                                [r.trial_id for r in pts], space.metrics[1], space.metrics[0],
                                f"study {run.plan.name}: Pareto front")
            client.log_figure(parent, fig, "pareto_front.png")
        metrics = [Metric("n_trials", len(recs), 0, 0),
                   Metric("n_errored", sum(r.status == "ERROR" for r in recs), 0, 0),
                   Metric("n_retried", sum(r.retries > 0 for r in recs), 0, 0),  # trials Tune retried
                   Metric("n_retries", sum(r.retries for r in recs), 0, 0)]  # their retries in all
        if out.best is not None:
            metrics.append(Metric(f"best_{primary}", out.best.value, 0, 0))
            if primary == "val_acc":  # the parent's row in the runs table: the selected trial's val score
                metrics.append(Metric("val_acc", out.best.value, 0, 0))
            client.set_tag(parent, "pfnas.best_trial", out.best.name)  # the run name the MLflow UI shows
            client.log_dict(parent, out.best_cfg, "best_config.yaml")
        if out.finals is not None and out.finals.test_accs:
            mean, std = out.finals.mean_std()
            metrics += [Metric("final_test_acc_mean", mean, 0, 0), Metric("final_test_acc_std", std, 0, 0),
                        Metric("final_n", len(out.finals.test_accs), 0, 0),
                        Metric("test_acc", mean, 0, 0)]  # the parent's row: the finals' mean test score
        client.log_batch(parent, metrics=metrics)
        client.set_tag(parent, "mlflow.note.content", _parent_description(run, space, out))
        if out.best is not None:
            client.set_tag(parent, "pfnas.policy", str(out.best.metrics.get("policy", "")))
        _log_compare(run, space)
        if run.ctx.tracking_uri.startswith(("http://", "https://")):
            run.notes.append(f"MLflow runs table: {runs_table_url(run.ctx.tracking_uri, run.exp_id)}")
        unfinished = out.interrupted or (any(r.status == "STOPPED" for r in recs) and space.scheduler.type == "none")
        orphans = _close_orphans(client, run.exp_id, parent)
        if orphans:
            run.notes.append(f"closed {orphans} MLflow trial run(s) left RUNNING by an interrupted, unresumed trial")
        client.set_terminated(parent, "KILLED" if unfinished else "FINISHED")
    except Exception as e:  # noqa: BLE001 - the study itself is done; say so instead of failing
        run.notes.append(f"warning: could not finish the MLflow parent run: {error_line(e)}")


def _parent_description(run: StudyRun, space: SpaceConfig, out: StudyOutcome) -> str:
    """The parent run's description (markdown, MLflow's "Description"): the study, how it selects, the selected
    trial by its run name with its policy and val score, and the finals' test mean ± std."""
    plan, primary = run.plan, space.metrics[0]
    tuned = ", ".join(f"`{k}`" for k in plan.param_keys) or "no params"
    lines = [f"Study **{plan.name}**: {len(out.recs)} trials ({space.algorithm} over {tuned}"
             + (f", {len(plan.variants)} variants" if plan.variants else "") + "), nested below as `t01`, `t02`...",
             f"Selection: the finished trial with the {'highest' if space.modes[0] == 'max' else 'lowest'} "
             f"**{primary}** on the validation split; test is never read to select."]
    if out.best is not None:
        best = out.best
        lines.append(f"Selected: **{best.name}** ({run.ctx.label(run.ctx.config(best.params, 'x'), best.params)}), "
                     f"{primary} = {best.value:.4f}, policy `{best.metrics.get('policy', '?')}`.")
        if out.finals is not None and out.finals.test_accs:
            mean, std = out.finals.mean_std()
            lines.append(f"Finals (`{best.name} final s*`): {best.name}'s config and policy retrained on train+val, "
                         f"**test_acc {mean:.4f} ± {std:.4f}** (n={len(out.finals.test_accs)} seeds).")
        else:
            lines.append("Finals: none" + (" yet (interrupted)" if out.interrupted else "") + ".")
    else:
        lines.append("Selected: nothing" + (" yet (interrupted)." if out.interrupted else " (no trial finished)."))
    lines.append("Artifacts: `compare/` (the experiment's `pfnas compare` table and plot), `trials.json`, "
                 "`best_config.yaml`.")
    return "\n\n".join(lines)


def _log_compare(run: StudyRun, space: SpaceConfig) -> None:
    """``pfnas compare`` of the study's experiment (table CSV and plot) as the parent's ``compare/`` artifacts."""
    import tempfile

    try:
        with tempfile.TemporaryDirectory(prefix="pfnas-compare-") as tmp:
            compare_runs(run.ctx.tracking_uri, run.ctx.experiment, space.metrics[0], out_dir=tmp)
            run.client.log_artifacts(run.parent, tmp, "compare")
    except Exception as e:  # noqa: BLE001 - the study is done; the table is a convenience
        run.notes.append(f"note: no compare table on the MLflow parent run: {error_line(e)}")


def _run_study(plan: StudyPlan, space: SpaceConfig, space_path: Path, *, storage: str, tracking_uri: str,
               mlflow_experiment: str, resume: bool, num_samples: int, verbose: bool = False,
               optuna_storage: str | None = None) -> StudySummary:
    """One task's study, step by step: open it, run its trials, select on val, run the finals, log the parent."""
    run = _open_study(plan, space, space_path, storage=storage, tracking_uri=tracking_uri,
                      mlflow_experiment=mlflow_experiment, resume=resume, optuna_storage=optuna_storage)
    try:  # from here an error closes the parent run FAILED (--resume reopens it)
        results = _fit_trials(run, space, space_path, storage, optuna_storage, num_samples, verbose)
        out = _select(run, space, results)
        _finalise(run, space, out, storage, verbose)
        _study_notes(run, space, out)
        _log_parent(run, space, out)  # reads each trial's config from its params: the variant still an index here
        for r in out.recs:  # the summary shows a grid variant as its overrides, not its index
            if plan.variants and isinstance(r.params.get("variant"), int):
                r.params["variant"] = " ".join(f"{k.split('.')[-1]}={v}"
                                               for k, v in plan.variants[r.params["variant"]].items())
        for rec in {f.trial_id: f for f in [out.finals, *out.group_finals] if f is not None}.values():
            run.notes += [f"final seed {seed} of trial {rec.trial_id} failed: {err}" for seed, err in rec.errors]
        return StudySummary(plan.name, space.metrics[0], space.modes[0], plan.param_keys, out.recs, out.best,
                            out.best_path, run.exp_path, tracking_uri, mlflow_experiment, run.parent, run.notes,
                            out.finals, out.group_finals, objectives=space.metrics, front=out.front,
                            optuna_storage=optuna_storage if run.optuna_study else None,
                            optuna_study=run.optuna_study, interrupted=out.interrupted)
    except BaseException as e:
        _close_parent(run.client, run.parent, e)
        raise


def _close_parent(client, parent: str, err: BaseException) -> None:
    """Close the MLflow parent run of a study that ``err`` stopped: FAILED (KILLED for Ctrl-C) with ``err`` as its
    ``pfnas.error`` tag, so it does not stay RUNNING; ``--resume`` reopens it."""
    try:
        client.set_tag(parent, "pfnas.error", error_line(err) if not isinstance(err, PfnasError) else str(err)[:500])
        client.set_terminated(parent, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
    except Exception as e:  # noqa: BLE001 - MLflow may be what failed: the error itself is what the user sees
        log.warning("could not close MLflow parent run %s: %s", parent, error_line(e))


_QUIET_ANALYSIS = threading.Lock()


def _saved_trials(results) -> list | None:
    """The trials in the experiment state Tune saved for a resume (statuses, failure counts); None if unreadable."""
    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    with _QUIET_ANALYSIS:  # studies in other threads change the same logger's level
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # "failed to fetch metrics" of trials that never started
        try:
            return ExperimentAnalysis(results.experiment_path, storage_filesystem=results.filesystem).trials
        except Exception:  # noqa: BLE001 - no saved state to read
            return None
        finally:
            quiet.setLevel(level)


def _interrupted(results, saved: list | None) -> bool:
    """Whether Tune returned with trials left to run (Ctrl-C): the experiment state it saved for a resume
    (``saved``, :func:`_saved_trials`) still lists them pending or running. (The returned grid cannot tell: Tune
    stops those trials before returning, which marks them terminated.)"""
    if saved is None:  # judge by what Tune returned
        return len(results) > results.num_terminated + results.num_errors
    return any(t.status not in ("TERMINATED", "ERROR") for t in saved)


def _retries(saved: list | None) -> dict[str, tuple[int, str | None]]:
    """Trial id -> (times Tune retried it after a failure, e.g. its worker killed; that failure's line). A trial
    that ended in an error was not retried after its last failure."""
    out = {}
    for t in saved or []:
        n = int(getattr(t, "num_failures", 0) or 0) - (t.status == "ERROR")
        if n > 0:
            try:
                why = error_line(t.get_error()).split(". ")[0].rstrip(".")  # its first sentence (Ray's run on)
            except Exception:  # noqa: BLE001 - the error file is gone: the count stands alone
                why = None
            out[t.trial_id] = (n, why)
    return out


def _final_context(ctx: TrialContext, plan: StudyPlan, best: TrialRecord,
                   metric: str) -> tuple[ExperimentConfig, TrialContext]:
    """The final config (selected trial's values, its policy as a fixed method, stage final) and its context."""
    trial_cfg = ctx.config(best.params, f"{plan.name}-{best.trial_id}")
    policy = [op for op in str(best.metrics.get("policy", "")).split(",") if op]
    final = merge_dotted(trial_cfg, {"name": f"{plan.name}-final", "train.stage": "final",
                                     **({"method.kind": "fixed", "method.policy": policy} if policy else {})})
    tags = {"pfnas.label": ctx.label(trial_cfg, best.params), "pfnas.selected": config_hash(trial_cfg),
            "pfnas.selected_trial": best.trial_id, "pfnas.selected_run": best.name,
            "pfnas.method": method_tag(trial_cfg),  # the method that chose the policy, not the final's fixed one
            f"pfnas.selected_{metric}": f"{best.value:.6g}"}
    fctx = TrialContext(study=ctx.study, base=final.model_dump(mode="json"), tracking_uri=ctx.tracking_uri,
                        experiment=ctx.experiment, parent_run_id=ctx.parent_run_id, param_keys=["seed"],
                        kind="final", tags=tags)
    return final, fctx


def finals_name(study: str, rnd: int = 0) -> str:
    """The Tune experiment of a study's finals: ``<study>-final``, a fallback round's ``<study>-final2``, ..."""
    return f"{study}-final" + (str(rnd + 1) if rnd else "")


def _run_finals(ctx: TrialContext, plan: StudyPlan, chosen: list[TrialRecord], space: SpaceConfig, storage: str,
                rnd: int = 0, *, trainable_resources: dict[str, float],
                verbose: bool = False) -> tuple[dict[str, FinalsRecord], bool]:
    """Retrain each chosen trial's config on train+val and test it once per seed; returns each one's record and
    whether the run was interrupted (then the records are incomplete).

    All (config, seed) pairs are one Tune grid in ``<storage>/<study>-final`` (round ``rnd`` of
    :func:`_run_final_rounds`: :func:`finals_name`), so a slot that finishes one config's seeds starts the next
    config's instead of idling. A resumed study continues them when the chosen trials are unchanged and starts
    them afresh otherwise.
    """
    name = finals_name(plan.name, rnd)
    path = f"{storage.rstrip('/')}/{name}"
    contexts, runs = [], []
    for i, rec in enumerate(chosen):
        final_cfg, fctx = _final_context(ctx, plan, rec, space.metrics[0])
        contexts.append(fctx)
        runs += [{"config": i, "seed": final_cfg.seed + k} for k in range(space.final.seeds)]
    mctx = TrialContext(study=ctx.study, base=contexts[0].base, tracking_uri=ctx.tracking_uri,
                        experiment=ctx.experiment, parent_run_id=ctx.parent_run_id, param_keys=["seed"],
                        kind="final", finals=contexts)
    selection = Path(path) / FINALS_SELECTION if "://" not in storage else None
    ids = "\n".join(r.trial_id for r in chosen)
    out = {r.trial_id: FinalsRecord(r.trial_id, [], [], name=r.name) for r in chosen}
    with _starting():  # one study at a time through Ray's trainable registry
        same = selection is not None and selection.is_file() and selection.read_text().strip() == ids
        tname = f"pfnas_trial_{name}"
        if same and tune.Tuner.can_restore(path):
            tuner = _restore(path, mctx, trainable_resources, tname)
        else:
            trainable = _trainable(mctx, trainable_resources, tname)
            if selection is not None:  # another selection's finals: replaced, if pfnas made that folder
                _fresh_owned_dir(selection.parent)
                _write_file(selection, ids)
            title = (f"finals of trial {chosen[0].name}" if len(chosen) == 1
                     else f"finals of {len(chosen)} configs")
            tuner = tune.Tuner(
                trainable, param_space={"final": tune.grid_search(runs)},
                tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=space.max_concurrent_trials,
                                            reuse_actors=True, trial_name_creator=trial_name,
                                            trial_dirname_creator=trial_dirname),
                run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1 if verbose else 0,
                                          callbacks=[StopWhenAsked()] + ([] if verbose else [
                                              Progress(title, "test_acc", mctx, len(runs))]),
                                          failure_config=tune.FailureConfig(max_failures=space.max_failures),
                                          checkpoint_config=tune.CheckpointConfig(
                                              num_to_keep=space.keep_checkpoints)))
        grid = _fit(tuner, f"the finals of study {ctx.study}")
    results = [(dict((r.config or {}).get("final") or {}), r) for r in grid]
    for pick, r in sorted(results, key=lambda x: (x[0].get("config", -1), x[0].get("seed", -1))):
        if "config" not in pick:
            continue
        rec, seed = out[chosen[int(pick["config"])].trial_id], int(pick.get("seed", -1))
        acc = (r.metrics or {}).get("test_acc")
        if r.error is None and finite_scalar(acc):
            rec.seeds.append(seed)
            rec.test_accs.append(float(acc))
        else:
            why = r.error if r.error is not None else (r.metrics or {}).get("error")
            rec.errors.append((seed, error_line(why) if why else "no test_acc reported"))
            if r.error is None and (r.metrics or {}).get("diverged"):
                rec.diverged.append(seed)
    return out, _interrupted(grid, _saved_trials(grid))


def _storage_root(storage: str | None) -> str:
    if storage and "://" in storage:
        return storage
    return str(Path(storage or "ray_results").expanduser().resolve())


@dataclass
class Stores:
    """Where a ``run_tune`` call keeps things: the MLflow tracking URI and experiment, the Tune storage root and the
    Optuna RDB URL (None: in memory)."""

    tracking_uri: str
    mlflow_experiment: str
    root: str
    optuna: str | None

    def study_path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"


def _resolve_stores(space: SpaceConfig, space_path: Path, *, tracking_uri: str | None, experiment: str | None,
                    storage: str | None, optuna_storage: str | None) -> Stores:
    """Tracking URI (explicit > env > the space's > ``sqlite:///mlflow.db``), MLflow experiment, Tune root and
    Optuna storage (explicit > the space's > beside the MLflow db or the Tune root; ``none``/``memory``: None)."""
    if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        uri = resolve_tracking_uri(tracking_uri)
    else:
        uri = resolve_tracking_uri(space.mlflow.tracking_uri, base_dir=space_path.resolve().parent
                                   if space.mlflow.tracking_uri else None)
    root = _storage_root(storage)
    if optuna_storage:
        ostore = absolute_sqlite_url(optuna_storage)
    elif space.optuna_storage:
        ostore = absolute_sqlite_url(space.optuna_storage, space_path.resolve().parent)
    else:
        ostore = default_optuna_storage(uri, root)
    if ostore and ostore.strip().lower() in ("none", "memory"):
        ostore = None
    return Stores(uri, experiment or space.mlflow.experiment or space.name, root, ostore)


def _hold_studies(held: ExitStack, space: SpaceConfig, plans: list[StudyPlan], stores: Stores,
                  resume: bool) -> set[str]:
    """Lock every local study of this call (a second ``pfnas tune`` of one is refused), check that no finals folder
    pfnas did not make would be replaced, and check ``--resume`` against what exists; the studies that exist."""
    if "://" not in stores.root:
        for p in plans:
            held.enter_context(_study_lock(stores.root, p.name))
            if space.final.seeds:  # never replace a finals folder pfnas did not make
                for rnd in range(FINAL_FALLBACKS + 1):
                    _check_replaceable(Path(stores.root) / finals_name(p.name, rnd))
    existing = {p.name for p in plans if tune.Tuner.can_restore(stores.study_path(p.name))}
    if resume and not existing:
        raise ConfigError("nothing to resume: no Tune study at "
                          + " or ".join(stores.study_path(p.name) for p in plans))
    if not resume and existing:
        first = next(p.name for p in plans if p.name in existing)
        raise ConfigError(f"study {stores.study_path(first)} already exists; pass --resume to continue it, or pick "
                          "another --experiment name or --storage")
    return existing


def _sigterm_as_ctrl_c(signum, frame) -> None:
    """SIGTERM while a study holds Ray: what Ctrl-C would do now (Tune's graceful stop during a fit in this thread;
    KeyboardInterrupt in the main thread of side-by-side studies), so the study saves its state and the command
    ends with the line naming ``--resume``."""
    handler = signal.getsignal(signal.SIGINT)  # Python's default one raises KeyboardInterrupt itself
    if not callable(handler):  # SIG_IGN (a background job) or SIG_DFL: still stop
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)


@contextmanager
def _ray_session(address: str | None, verbose: bool):
    """Ray connected (started locally when ``address`` is None and none is up; shut down afterwards), Ray/Tune/Optuna
    quiet unless ``verbose``, and the environment Tune runs under for pfnas."""
    quiet = Quiet(not verbose)
    started = False
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
           # a checkpoint per epoch with num_to_keep forces frequent state snapshots (wanted, for resume): no warning
           "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    strict = os.environ.get("TUNE_DISABLE_STRICT_METRIC_CHECKING")
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # the study metric only appears once it is real
    main = threading.current_thread() is threading.main_thread()
    caller_sigterm = signal.getsignal(signal.SIGTERM) if main else None
    try:
        if not ray.is_initialized():
            check_ray_address(address)
            ray.init(address=address, ignore_reinit_error=True, **quiet.init_kwargs())
            started = True
            if main:  # ray.init made SIGTERM sys.exit(15): Tune's loop unwound mid-step, no resume line
                signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c)
        yield
    finally:
        if started and main and caller_sigterm is not None:
            signal.signal(signal.SIGTERM, caller_sigterm)
        quiet.restore()
        if strict is None:
            os.environ.pop("TUNE_DISABLE_STRICT_METRIC_CHECKING", None)
        else:
            os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = strict
        if started:
            ray.shutdown()


def study_slots(space: SpaceConfig, n_studies: int) -> int:
    """How many studies run at once: ``max_concurrent_studies``, else as many as the Ray cluster's CPUs and GPUs hold
    at ``max_concurrent_trials`` x ``resources`` each; at least 1, at most ``n_studies``."""
    if space.max_concurrent_studies is not None:
        return max(1, min(space.max_concurrent_studies, n_studies))
    have = ray.cluster_resources()
    fits = []
    for key, per_trial in (("CPU", space.resources.cpu), ("GPU", space.resources.gpu)):
        if per_trial:
            fits.append(int(float(have.get(key, 0.0)) // (per_trial * space.max_concurrent_trials) + 1e-9))
    return max(1, min([n_studies, *fits]))


def _run_with_restarts(plan: StudyPlan, space: SpaceConfig, space_path: Path, stores: Stores, *, resume: bool,
                       num_samples: int, verbose: bool) -> StudySummary:
    """One study; when Ray's own loop stops it, continued from its saved state (what --resume would do) up to
    :data:`RAY_RESTARTS` times."""
    for restart in range(RAY_RESTARTS + 1):
        try:
            return _run_study(plan, space, space_path, storage=stores.root, tracking_uri=stores.tracking_uri,
                              mlflow_experiment=stores.mlflow_experiment, resume=resume, num_samples=num_samples,
                              verbose=verbose, optuna_storage=stores.optuna)
        except RayStopped as e:  # the run's state is in Tune's folder
            if restart == RAY_RESTARTS or not tune.Tuner.can_restore(stores.study_path(plan.name)):
                raise
            log.warning("%s; continuing it from its saved state in %.0f s (restart %d of %d)",
                        e.stopped, RAY_RESTART_WAIT_S, restart + 1, RAY_RESTARTS)
            time.sleep(RAY_RESTART_WAIT_S)
            resume = True
    raise AssertionError("unreachable")


def _failed(name: str, err: BaseException) -> FailedStudy:
    return FailedStudy(name, str(err) if isinstance(err, PfnasError) else error_line(err))


def _run_in_turn(plans: list[StudyPlan], run_one) -> list:
    """The studies one after another in this thread (Tune's own Ctrl-C handling: the study returns interrupted and
    the rest do not start). With several studies an error ends only its own study; a single study's error is
    raised as before."""
    out: list = []
    for p in plans:
        if out and getattr(out[-1], "interrupted", False):
            out.append(FailedStudy(p.name, "not started: the run was interrupted; rerun with --resume"))
            continue
        try:
            out.append(run_one(p))
        except Exception as e:  # noqa: BLE001 - reported in the summary; the other studies go on
            if len(plans) == 1:
                raise
            log.debug("study %s failed", p.name, exc_info=True)
            out.append(_failed(p.name, e))
    return out


def _run_side_by_side(plans: list[StudyPlan], run_one, slots: int) -> list:
    """At most ``slots`` studies at once, each ``Tuner.fit`` in its own driver thread (Tune installs no signal handler
    off the main thread: Ctrl-C or SIGTERM here sets :data:`STOP_STUDIES`, each study's :class:`StopWhenAsked`
    ends its loop, its parent run is closed KILLED, and the interrupt is raised once all have stopped). An error
    ends only its own study (a :class:`FailedStudy` in the summary)."""
    results: dict[str, Any] = {}
    threads: dict[str, threading.Thread] = {}

    def work(p: StudyPlan) -> None:
        try:
            results[p.name] = run_one(p)
        except BaseException as e:  # noqa: BLE001 - the main thread decides
            results[p.name] = e

    STOP_STUDIES.clear()
    waiting = list(plans)
    stop: BaseException | None = None
    while waiting or any(t.is_alive() for t in threads.values()):
        try:
            while waiting and stop is None and sum(t.is_alive() for t in threads.values()) < slots:
                p = waiting.pop(0)
                threads[p.name] = threading.Thread(target=work, args=(p,), name=f"pfnas-study-{p.name}", daemon=True)
                threads[p.name].start()
            if stop is not None:
                waiting.clear()
            for t in list(threads.values()):
                t.join(timeout=0.2)  # short: signals reach the main thread between joins
        except BaseException as e:  # Ctrl-C, SIGTERM: stop every study where Tune kept its state
            if stop is not None:  # a second one: stop waiting
                STOP_STUDIES.clear()
                raise
            stop = e
            STOP_STUDIES.set()
    STOP_STUDIES.clear()
    if stop is not None:
        raise stop
    out = []
    for p in plans:
        r = results.get(p.name)
        if isinstance(r, KeyboardInterrupt):
            raise r
        if isinstance(r, BaseException):
            if not isinstance(r, Exception):
                raise r
            out.append(_failed(p.name, r))
        else:
            out.append(r if r is not None else FailedStudy(p.name, "not started"))
    return out


def run_tune(space_path: str | Path, *, address: str | None = None, tracking_uri: str | None = None,
             experiment: str | None = None, storage: str | None = None, resume: bool = False,
             overrides: list[str] | None = None, num_samples: int | None = None, optuna_storage: str | None = None,
             verbose: bool = False, console=None, max_concurrent_studies: int | None = None) -> TuneSummary:
    """Run (or with ``resume`` continue) the studies of a space YAML; returns a printable summary.

    ``address``: Ray cluster (``auto``, ``ray://host:10001``); None starts a local Ray unless one is
    already initialised. ``tracking_uri``: explicit > env ``MLFLOW_TRACKING_URI`` > the space's
    ``mlflow.tracking_uri`` > ``sqlite:///mlflow.db``, made absolute and handed to every trial.
    ``experiment`` names both the study and the MLflow experiment. ``storage``: Tune storage path
    (default ``./ray_results``); ``<storage>/<study>/best_config.yaml`` receives the best config.
    ``optuna_storage``: the RDB URL of the Optuna study (explicit > the space's ``optuna_storage`` > ``optuna.db``
    next to a sqlite MLflow db, else in the Tune storage folder; ``none``: in memory). ``verbose`` keeps Ray Tune's
    own output (per-trial tables and results); otherwise Ray, Tune and Optuna stay quiet and a live pfnas view is
    drawn on ``console`` (:class:`LiveTable` for one study at a time, :class:`TaskBoard` for studies side by side).
    ``max_concurrent_studies`` overrides the space's field of that name.

    The studies of a ``tasks`` space run side by side (:func:`study_slots` at once), each with its own Tune
    experiment, Optuna study, MLflow parent, state file and lock; ``resume`` continues every unfinished one.
    """
    space_path = Path(space_path)
    space, plans = load_space(space_path, overrides, experiment)
    if num_samples is not None and num_samples < 1:
        raise ConfigError("--num-samples must be >= 1")
    if max_concurrent_studies is not None:
        if max_concurrent_studies < 1:
            raise ConfigError("--max-concurrent-studies must be >= 1")
        space = space.model_copy(update={"max_concurrent_studies": max_concurrent_studies})
    stores = _resolve_stores(space, space_path, tracking_uri=tracking_uri, experiment=experiment, storage=storage,
                             optuna_storage=optuna_storage)
    data_cfgs = data_configs(plans)
    if address is None:  # a local study reads data on this machine: a missing path fails here, before Ray starts
        for d in data_cfgs:
            check_data_paths(d)
    samples = num_samples or space.num_samples or (1 if space.algorithm == "grid" else 8)
    with ExitStack() as held:
        existing = _hold_studies(held, space, plans, stores, resume)
        held.enter_context(_ray_session(address, verbose))
        check_trial_fits(space, local=address is None)
        if address is not None:  # a cluster study: the data must be there on every node a trial may land on
            check_data_on_nodes(data_cfgs)
        slots = study_slots(space, len(plans))

        display = None
        if not verbose:
            display = TaskBoard(console, [p.name for p in plans], slots) if slots > 1 else LiveTable(console)
            DISPLAY.append(display)

        def run_one(p: StudyPlan) -> StudySummary:
            try:
                return _run_with_restarts(p, space, space_path, stores, resume=resume and p.name in existing,
                                          num_samples=samples, verbose=verbose)
            finally:
                if isinstance(display, TaskBoard):
                    display.study_ended(p.name)
        try:
            studies = _run_side_by_side(plans, run_one, slots) if slots > 1 else _run_in_turn(plans, run_one)
        finally:
            if display is not None:
                DISPLAY.remove(display)
                display.close()
                if isinstance(display, TaskBoard):
                    display.finish()
        return TuneSummary(studies)
