"""Ray Tune studies over the outer hyperparameters of an experiment, with Optuna TPE and MLflow.

A *space* YAML (``search_spaces/*.yaml``, schema :class:`SpaceConfig`) names a base
:class:`~pfnas.config.ExperimentConfig` and distributions over dotted config keys. :func:`run_tune`
runs one Tune study per space (or one per entry of ``tasks``): every trial builds its config
(base + ``--set`` overrides + sampled values), runs :func:`pfnas.baselines.run_method` (or the engine's
``run_experiment`` when baselines are absent) in its own directory, reports every epoch to Tune with a
checkpoint of that directory (so a restored trial resumes mid-phase), and logs to a nested MLflow run
under the study's parent run.

Reproducibility: the TPE sampler is seeded and, with ``sync_batches`` (default), configs are suggested
in synchronous batches of ``max_concurrent_trials``, so the sampler's history at every suggestion and
therefore the sequence of configs do not depend on which trial happens to finish first.

Metrics reported per epoch: every scalar as ``<phase>/<name>`` (latest value of each, carried across
phases), ``val_acc`` (latest search validation accuracy), ``test_acc`` (retrain epochs), ``restored``;
the final report adds ``test_acc``, ``tuned_params``, ``tuned_percent``, ``cost_images`` and ``complete``.
A trial whose loss turns non-finite fails the same way on every try: it ends with a report carrying ``error``
(and no metric), its MLflow run FAILED, instead of raising (which Ray would retry under ``max_failures``).
The study metric is only reported once it is real, so Tune's strict metric check is turned off.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from .config import (ConfigError, ExperimentConfig, PfnasError, TrainingError, apply_overrides, merge_dotted, read_yaml,
                     validate)
from .provenance import dataset_info, provenance_tags
from .tracking import (
    RunLogger,
    finite_scalar,
    flatten,
    format_value,
    get_experiment_id,
    make_client,
    method_label,
    reads_test,
    resolve_tracking_uri,
)

log = logging.getLogger(__name__)

PATH_KEYS = ("backbone.checkpoint", "data.root")  # resolved against the file (or cwd) that names them
FINAL_KEYS = ("test_acc", "val_acc", "select_val_acc", "tuned_params", "tuned_percent", "cost_images",
              "cost_step_s", "infer_images_per_s", "infer_ms_per_image",
              "search_time_s", "retrain_time_s", "time_s")
STATE_FILE = "pfnas_study.json"


# ----------------------------------------------------------------------------- space schema
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParamSpec(_Strict):
    """One tuned dimension: ``loguniform``/``uniform``/``quniform`` floats, ``int`` or ``choice``."""

    type: Literal["loguniform", "uniform", "int", "choice", "quniform"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None
    step: float | None = None

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        if self.type == "choice":
            if not self.values:
                raise ValueError("choice needs a non-empty 'values' list")
            if self.low is not None or self.high is not None or self.step is not None:
                raise ValueError("choice takes 'values' only (no low/high/step)")
            bad = [v for v in self.values if v is not None and not isinstance(v, (bool, int, float, str))]
            if bad:
                raise ValueError(f"choice values must be scalars, got {bad[0]!r}")
            return self
        if self.values is not None:
            raise ValueError(f"{self.type} takes low/high, not 'values'")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs 'low' and 'high'")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError("loguniform needs low > 0")
        if self.type == "quniform" and not (self.step and self.step > 0):
            raise ValueError("quniform needs step > 0")
        if self.type == "int":
            if any(v is not None and float(v) != int(v) for v in (self.low, self.high, self.step)):
                raise ValueError("int needs integer low/high/step")
            if self.step is not None and self.step < 1:
                raise ValueError("int step must be >= 1")
        elif self.type != "quniform" and self.step is not None:
            raise ValueError(f"{self.type} takes no step (use quniform)")
        return self

    def candidates(self) -> list[Any]:
        """Values that must each give a valid config (the bounds, or every choice)."""
        if self.type == "choice":
            return list(self.values)
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]

    def distribution(self):
        import optuna.distributions as od

        if self.type == "choice":
            return od.CategoricalDistribution(self.values)
        if self.type == "int":
            return od.IntDistribution(int(self.low), int(self.high), step=int(self.step or 1))
        if self.type == "quniform":
            return od.FloatDistribution(self.low, self.high, step=self.step)
        return od.FloatDistribution(self.low, self.high, log=self.type == "loguniform")

    def describe(self) -> str:
        if self.type == "choice":
            return f"choice{self.values}"
        return f"{self.type}[{format_value(self.low)}, {format_value(self.high)}" + (
            f", step {format_value(self.step)}]" if self.step else "]")


class SchedulerSpec(_Strict):
    """``none`` or ASHA on ``metric`` with Tune's monotone ``training_iteration`` (one per report)."""

    type: Literal["none", "asha"] = "none"
    metric: str = "val_acc"  # reported every epoch once the search has validated (carried into retrain)
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(2, ge=1)
    reduction_factor: float = Field(3.0, gt=1)
    max_t: int = Field(100_000, ge=1)


class ResourcesSpec(_Strict):
    """Per-trial resources; a fractional ``gpu`` packs several trials on one device."""

    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)


class FinalSpec(_Strict):
    """Finals: the val-selected trial's config and policy, retrained on train+val and tested once per seed."""

    seeds: int = Field(3, ge=0)  # 0: no finals
    per_variant: bool = False  # grid: finals for the val-best trial of every variant too (a method comparison)


class MlflowSpec(_Strict):
    tracking_uri: str | None = None  # relative sqlite files resolve against the space YAML
    experiment: str | None = None  # default: the study name


class SpaceConfig(_Strict):
    """A search-space YAML.

    Relative paths (``base_config``, ``backbone.checkpoint``, ``data.root``, a sqlite tracking file)
    resolve against the directory of the file that names them; ``--set`` values resolve against the cwd.
    ``tasks`` runs one study per task (``<name>-<task>``, ``data.task`` set), since per-task optima differ
    and Tune does not combine ``grid_search`` with Optuna.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    base: dict[str, Any] | None = None
    base_config: str | None = None
    tasks: list[str] | None = None
    algorithm: Literal["optuna", "grid"] = "optuna"  # grid: every combination of variants x choice params
    variants: list[dict[str, Any]] = Field(default_factory=list)  # grid: dotted overrides, one config each
    params: dict[str, ParamSpec] = Field(default_factory=dict)
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)
    metric: str | list[str] = "val_acc"  # a validation score; a list (e.g. [val_acc, tuned_params]): Pareto study
    mode: Literal["max", "min"] | list[Literal["max", "min"]] = "max"
    final: FinalSpec = Field(default_factory=FinalSpec)
    num_samples: int | None = Field(None, ge=1)  # optuna: trials (8); grid: repeats of the grid (1)
    max_concurrent_trials: int = Field(1, ge=1)
    sync_batches: bool = True
    seed: int = 0
    startup_trials: int = Field(10, ge=0)  # TPE's random warm-up trials
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    max_failures: int = Field(1, ge=0)  # retries of a crashed trial from its last checkpoint
    keep_checkpoints: int = Field(2, ge=1)
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec)
    # Optuna study storage (RDB URL; a relative sqlite file resolves against this YAML; "none": in memory).
    # Default: optuna.db next to a sqlite MLflow db, else in the Tune storage folder. --optuna-storage overrides.
    optuna_storage: str | None = None

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_shorthand(cls, v: Any) -> Any:
        return {"type": v} if isinstance(v, str) else v

    @property
    def metrics(self) -> list[str]:
        """The objectives; the first (a validation score) ranks single trials and drives ASHA."""
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    @property
    def modes(self) -> list[str]:
        return [self.mode] if isinstance(self.mode, str) else list(self.mode)

    @model_validator(mode="after")
    def _check(self) -> SpaceConfig:
        if len(self.metrics) != len(self.modes) or len(set(self.metrics)) != len(self.metrics) or not self.metrics:
            raise ValueError(f"metric {self.metric} and mode {self.mode} must name distinct objectives, one mode each")
        if len(self.metrics) > 1 and self.algorithm != "optuna":
            raise ValueError("several objectives (a Pareto study) need algorithm: optuna")
        for where, m in [*(("metric", m) for m in self.metrics), ("scheduler.metric", self.scheduler.metric)]:
            if reads_test(m):
                raise ValueError(f"{where} {m!r} reads the test split; a study selects on validation "
                                 "(val_acc) and tests only its finals")
        if self.base is not None and self.base_config is not None:
            raise ValueError("give either 'base' or 'base_config', not both")
        if self.algorithm == "grid":
            bad = [k for k, p in self.params.items() if p.type != "choice"]
            if bad:
                raise ValueError(f"params.{bad[0]}: algorithm grid takes choice params only")
            if not self.params and not self.variants:
                raise ValueError("algorithm grid needs variants or choice params")
            if self.points_to_evaluate:
                raise ValueError("points_to_evaluate is for algorithm optuna")
        elif self.variants:
            raise ValueError("variants need algorithm: grid")
        elif not self.params:
            raise ValueError("params: at least one parameter to tune is required")
        if self.tasks is not None:
            if not self.tasks or len(set(self.tasks)) != len(self.tasks):
                raise ValueError("tasks must be a non-empty list without duplicates")
            if "data.task" in self.params:
                raise ValueError("tune data.task either with 'tasks' or as a param, not both")
        for i, p in enumerate(self.points_to_evaluate):
            unknown = sorted(set(p) - set(self.params))
            if unknown:
                raise ValueError(f"points_to_evaluate[{i}]: {unknown[0]!r} is not in params")
        return self


@dataclass
class StudyPlan:
    """One study to run: its name, validated base config and the distributions left to tune."""

    name: str
    task: str | None
    base: ExperimentConfig
    params: dict[str, ParamSpec]
    points: list[dict[str, Any]]
    variants: list[dict[str, Any]] = field(default_factory=list)

    @property
    def param_keys(self) -> list[str]:
        """Keys of a trial's config: ``variant`` (an index into ``variants``) first, then the params."""
        return (["variant"] if self.variants else []) + list(self.params)


def _resolve_path(value: Any, root: Path) -> Any:
    if not isinstance(value, str) or not value or "://" in value:
        return value
    p = Path(value).expanduser()
    return value if p.is_absolute() else os.path.normpath(root / p)


def _resolve_paths(raw: dict[str, Any], root: Path) -> dict[str, Any]:
    out = json.loads(json.dumps(raw))
    for key in PATH_KEYS:
        sec, leaf = key.split(".")
        if isinstance(out.get(sec), dict) and leaf in out[sec]:
            out[sec][leaf] = _resolve_path(out[sec][leaf], root)
    return out


def load_space(path: str | Path, overrides: list[str] | None = None,
               study_name: str | None = None) -> tuple[SpaceConfig, list[StudyPlan]]:
    """Validate a space YAML and build its studies; errors are one-line :class:`ConfigError` s."""
    path = Path(path)
    space = validate(SpaceConfig, read_yaml(path))
    root = path.resolve().parent
    if space.base_config:
        base_path = Path(_resolve_path(space.base_config, root))
        base_raw, base_root = read_yaml(base_path), base_path.parent
    else:
        base_raw, base_root = space.base or {}, root
    base = validate(ExperimentConfig, _resolve_paths(base_raw, base_root), prefix="base.")
    pinned = flatten(_resolve_paths(apply_overrides({}, overrides), Path.cwd()))
    if pinned:
        try:
            base = merge_dotted(base, pinned)
        except ConfigError as e:
            raise ConfigError(f"--set {e}") from None
    tuned_keys = set(space.params) | {k for v in space.variants for k in flatten(v)}
    if "train.stage" in tuned_keys:
        raise ConfigError("train.stage is set by the study (select for trials, final for finals); do not tune it")
    base = merge_dotted(base, {"train.stage": "select", "train.test_every": None})  # trials never read test
    params = {}
    for key, spec in space.params.items():
        if key in pinned:
            log.warning("--set %s pins a tuned parameter; it is left out of the search", key)
            continue
        if spec.type == "choice" and key in PATH_KEYS:
            spec = spec.model_copy(update={"values": [_resolve_path(v, root) for v in spec.values]})
        for v in spec.candidates():
            try:
                merge_dotted(base, {key: v})
            except ConfigError as e:
                raise ConfigError(f"params.{key}: value {v!r} gives an invalid config ({e})") from None
        params[key] = spec
    variants = []
    for i, v in enumerate(space.variants):
        v = {k: (_resolve_path(x, root) if k in PATH_KEYS else x) for k, x in flatten(v).items()}
        try:
            merge_dotted(base, v)
        except ConfigError as e:
            raise ConfigError(f"variants[{i}]: {e}") from None
        variants.append(v)
    if not params and not variants:
        raise ConfigError("params: every tuned parameter is pinned by --set; nothing left to search")
    points = [{k: v for k, v in p.items() if k in params} for p in space.points_to_evaluate]
    name = study_name or space.name
    if not space.tasks:
        return space, [StudyPlan(name, base.data.task, base, params, points, variants)]
    plans = []
    for task in space.tasks:
        try:
            task_base = merge_dotted(base, {"data.task": task})
        except ConfigError as e:
            raise ConfigError(f"tasks: {e}") from None
        plans.append(StudyPlan(f"{name}-{task}", task, task_base, params, points, variants))
    return space, plans


# ----------------------------------------------------------------------------- trial side
@dataclass
class TrialContext:
    """What every trial needs besides its sampled values (shipped to workers with the trainable)."""

    study: str
    base: dict[str, Any]
    tracking_uri: str
    experiment: str
    parent_run_id: str | None
    param_keys: list[str]
    variants: list[dict[str, Any]] = field(default_factory=list)
    kind: str = "trial"  # "final": a seed of the selected config retrained on train+val and tested
    tags: dict[str, str] = field(default_factory=dict)  # extra MLflow tags (finals: the trial they finalise)

    def _values(self, params: dict[str, Any]) -> dict[str, Any]:
        """Dotted config values of a trial: its variant's overrides, then its sampled params."""
        out = dict(self.variants[int(params["variant"])]) if self.variants and "variant" in params else {}
        out.update({k: params[k] for k in self.param_keys if k in params and k != "variant"})
        return out

    def config(self, params: dict[str, Any], name: str) -> ExperimentConfig:
        base = ExperimentConfig.model_validate(self.base)
        return merge_dotted(base, {**self._values(params), "name": name})

    def run_name(self, params: dict[str, Any], trial_id: str, index: int | None = None) -> str:
        """``final s1`` for a final; for a trial ``t03 gumbel len8``: its index, the method and its sampled values."""
        if self.kind == "final":
            return f"final s{params['seed']}"
        try:
            cfg = self.config(params, "name")
        except Exception:  # noqa: BLE001 - a name never fails a trial
            return trial_id
        return readable_name(index, cfg, self._values(params)) if index else trial_id

    def label(self, cfg: ExperimentConfig, params: dict[str, Any]) -> str:
        """Method label plus the values that make this configuration (seeds and method fields left out)."""
        if "pfnas.label" in self.tags:
            return self.tags["pfnas.label"]
        tuned = ", ".join(f"{k}={format_value(v)}" for k, v in self._values(params).items()
                          if k != "seed" and not k.startswith("method."))
        return f"{method_label(cfg)} [{tuned}]" if tuned else method_label(cfg)


_ABBREV = {"prompts.length": "len", "prompts.fusion_dim": "r", "prompts.dropout": "drop", "search.arch_lr": "alr",
           "search.optim.lr": "slr", "train.optim.lr": "lr", "search.epochs": "se", "train.epochs": "te",
           "search.tau.start": "tau", "search.tau.end": "tauend", "search.order": "ord", "search.cost_weight": "cw",
           "pae.enabled": "pae", "data.task": "", "seed": "s"}


def _short_method(cfg: ExperimentConfig) -> str:
    m = cfg.method
    if m.kind == "search":
        return cfg.search.mode  # softmax | gumbel
    if m.kind == "fixed":
        return m.op or "policy"
    if m.kind == "random":
        return "random" + ("+ws" if m.weight_sharing else "")
    return {"evolution": "evo"}.get(m.kind, m.kind)


def _abbrev(key: str, value: Any) -> str:
    """``prompts.length=8`` -> ``len8``, ``search.arch_lr=0.00413`` -> ``alr0.0041``, a string value as itself."""
    if isinstance(value, str) or value is None:
        return str(value)
    leaf = key.split(".")[-1]
    short = _ABBREV.get(key, "".join(w[0] for w in leaf.split("_")) if "_" in leaf else leaf[:4])
    if isinstance(value, bool):
        return short if value else f"no{short}"
    if isinstance(value, float):
        text = f"{value:.2g}"
        text = re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m.group(1) == "-" else "") + m.group(2), text)
        return short + text
    if isinstance(value, (list, tuple)):
        return short + "-".join(map(str, value))
    return f"{short}{value}"


def readable_name(index: int, cfg: ExperimentConfig, values: dict[str, Any], limit: int = 60) -> str:
    """A trial's MLflow run name: ``t03 gumbel len8 alr0.0041``."""
    parts = [f"t{index:02d}", _short_method(cfg)]
    parts += [_abbrev(k, v) for k, v in values.items()
              if k not in ("search.mode", "name") and not k.startswith("method.")]
    name = " ".join(p for p in parts if p)
    return name if len(name) <= limit else name[:limit - 1] + "…"


_CACHE: dict[str, tuple[str, Any]] = {}


def _cached_experiment(cfg: ExperimentConfig):
    """Experiment for ``cfg``, reusing the backbone and decoded data of the previous trial in this process.

    Reused actors run many trials; rebuilding a hub ViT and re-decoding a data set for each is waste.
    Random-init backbones depend on the seed, so the seed is part of their key.
    """
    from .engine import Experiment

    bb = cfg.backbone
    random_init = not (bb.pretrained or bb.checkpoint)
    bkey = json.dumps([bb.model_dump(mode="json"), cfg.seed if random_init else None, cfg.device], sort_keys=True)
    dkey = json.dumps([bkey, cfg.data.model_dump(mode="json"), cfg.seed], sort_keys=True)
    backbone = _CACHE["backbone"][1] if _CACHE.get("backbone", ("",))[0] == bkey else None
    data = _CACHE["data"][1] if backbone is not None and _CACHE.get("data", ("",))[0] == dkey else None
    if backbone is None:
        _CACHE.clear()  # free the old backbone/data before building the new ones
    exp = Experiment.build(cfg, data=data, backbone=backbone)
    _CACHE["backbone"], _CACHE["data"] = (bkey, exp.backbone), (dkey, exp.data)
    return exp


def run_trial_method(cfg: ExperimentConfig, out_dir: str | Path, on_epoch=None, on_data=None) -> dict[str, Any]:
    """``baselines.run_method`` (every ``method.kind``) on the experiment cached in this worker; ``on_data`` gets the
    decoded task (``TaskData``) first."""
    from .baselines import run_method

    exp = _cached_experiment(cfg)
    if on_data is not None:
        on_data(exp.data)
    return run_method(cfg, out_dir, on_epoch=on_epoch, exp=exp)


def _policy_str(policy: Any) -> str:
    if isinstance(policy, dict):
        return ",".join(str(v) for _, v in sorted(policy.items(), key=lambda kv: int(kv[0])))
    return ",".join(map(str, policy)) if isinstance(policy, list) else ""


class _TrialReporter:
    """Engine ``on_epoch`` -> MLflow + ``tune.report`` with a checkpoint of the trial's work dir."""

    def __init__(self, work: Path, logger: RunLogger, restored: bool):
        self.work, self.logger, self.restored = work, logger, int(restored)
        self.carry: dict[str, float] = {}
        self.val_acc: float | None = None  # latest val score of any phase (ASHA's signal); the last is the objective

    def _payload(self, head: dict[str, Any]) -> dict[str, Any]:
        """``head`` first (progress tables show the leading metrics), then every carried scalar."""
        p: dict[str, Any] = dict(head)
        if self.val_acc is not None:
            p.setdefault("val_acc", self.val_acc)
        p.update(self.carry)
        p["restored"] = self.restored
        return p

    def _report(self, payload: dict[str, Any]) -> None:
        from ray import tune

        if self.logger.run_id and not (self.work / "mlflow_run_id").exists():
            (self.work / "mlflow_run_id").write_text(self.logger.run_id)
        tune.report(payload, checkpoint=tune.Checkpoint.from_directory(str(self.work)))

    def on_epoch(self, m: dict[str, Any]) -> None:
        self.logger.log_epoch(m)
        phase = str(m.get("phase", "run"))
        self.carry.update({f"{phase}/{k}": float(v) for k, v in m.items() if k not in ("phase", "epoch") and finite_scalar(v)})
        if finite_scalar(m.get("val_acc")):
            self.val_acc = float(m["val_acc"])
        self._report(self._payload({"phase": phase, "epoch": int(m.get("epoch", 0))}))

    def final(self, res: dict[str, Any]) -> None:
        head = {k: float(res[k]) for k in FINAL_KEYS if finite_scalar(res.get(k))}
        self._report(self._payload({**head, "phase": "done", "policy": _policy_str(res.get("policy")), "complete": 1}))

    def failed(self, err: BaseException) -> None:
        """Last report of a trial that fails the same way on every try: ``error``, and no metric (nothing to select)."""
        from ray import tune

        tune.report({"phase": "failed", "error": f"{type(err).__name__}: {err}"[:2000], "complete": 0,
                     "restored": self.restored})


def _error_line(err: BaseException | str | None) -> str:
    text = str(err or "").strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    hits = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", ln)]
    line = hits[-1] if hits else (lines[-1] if lines else type(err).__name__)
    return re.sub(r"^(\w+\.)+(?=\w+(Error|Exception))", "", line)[:200]  # pfnas.config.TrainingError -> TrainingError


def pfnas_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """Tune function trainable: one experiment in the trial's own dir, resumable from Tune checkpoints."""
    from ray import tune

    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # one INFO line per checkpoint
    tctx = tune.get_context()
    trial_id = tctx.get_trial_id()
    work = Path(tctx.get_trial_dir()) / "work"
    shutil.rmtree(work, ignore_errors=True)  # a retry starts from the checkpoint, never from stale files
    work.mkdir(parents=True)
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        ckpt.to_directory(str(work))
    cfg = ctx.config(config, f"{ctx.study}-{trial_id}")
    rid = work / "mlflow_run_id"
    m = re.match(r"(\d+)_", Path(tctx.get_trial_dir()).name)  # trial_dirname: 0003_<id>
    logger = RunLogger(ctx.tracking_uri, ctx.experiment, ctx.run_name(config, trial_id, int(m.group(1)) if m else None),
                       cfg, parent_run_id=ctx.parent_run_id, run_id=rid.read_text().strip() if rid.is_file() else None,
                       reuse_tags={"pfnas.trial_id": trial_id}, folder=work, source="pfnas tune", source_type="JOB",
                       tags={**ctx.tags, "pfnas.kind": ctx.kind, "pfnas.study": ctx.study, "pfnas.trial_id": trial_id,
                             "pfnas.label": ctx.label(cfg, config)})
    reporter = _TrialReporter(work, logger, restored=ckpt is not None)
    try:
        with logger.recording():  # a scheduler's stop (SystemExit) closes the run as KILLED, an error as FAILED
            res = run_trial_method(cfg, work, reporter.on_epoch,
                                   on_data=lambda data: logger.log_dataset(dataset_info(cfg, data)))
    except TrainingError as e:
        if not e.deterministic:  # e.g. out of memory: another try (FailureConfig) may fit
            raise
        # a non-finite loss comes back on every retry of this config: end the trial here (its MLflow run is FAILED)
        # instead of raising, which Ray would retry; the study sees it as an errored trial (``error``)
        reporter.failed(e)
        return
    logger.finish(res)  # before the final report, so MLflow is complete when Tune marks the trial done
    reporter.final(res)


# ----------------------------------------------------------------------------- driver side
class PfnasOptunaSearch(OptunaSearch):
    """OptunaSearch that skips intermediate results which do not carry the metric yet (search epochs)."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, str) and self.metric in result:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        super().on_trial_complete(trial_id, result, error or bool(result and result.get("error")))  # FAIL, not PRUNED


def _trial_index(trial) -> int:
    m = re.match(r"(\d+)", getattr(trial, "experiment_tag", "") or "")
    return int(m.group(1)) if m else 0


def trial_dirname(trial) -> str:
    """``0003_<trial id>``: creation order first, so listings sort like the study ran."""
    return f"{_trial_index(trial):04d}_{trial.trial_id}"


def trial_name(trial) -> str:
    return trial.trial_id


def _space_digest(space: SpaceConfig, plan: StudyPlan) -> str:
    blob = json.dumps([space.model_dump(mode="json"), plan.base.model_dump(mode="json"), sorted(plan.params)],
                      sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _short_names(keys: list[str]) -> list[str]:
    """Shortest dotted suffix of each key that is still unique (``search.arch_lr`` -> ``arch_lr``)."""
    out = []
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            cand = ".".join(parts[-n:])
            if sum(k == cand or k.endswith("." + cand) for k in keys) == 1:
                break
        out.append(cand)
    return out


_OP_ABBREV = {"prepend": "pre", "add": "add", "affine": "aff", "cross_attn": "xat", "none": "-"}
_STATUS = {"TERMINATED": "done", "STOPPED": "stopped", "ERROR": "error"}


@dataclass
class TrialRecord:
    index: int
    trial_id: str
    status: str  # TERMINATED (completed), STOPPED (by the scheduler / interrupted), ERROR
    params: dict[str, Any]
    value: float | None  # the first objective
    metrics: dict[str, Any]
    error: str | None = None
    values: list[float] | None = None  # every objective, when all are finite


class _FitTable:
    """A table that takes the wide layout when it fits the console and the compact one otherwise (80 columns: the
    tuned params wrap in one column, the policy keeps its own)."""

    def __init__(self, build):
        self.build = build
        self.title = build(False).title

    def __rich_console__(self, console, options):
        from rich.measure import Measurement

        wide = self.build(False)
        natural = Measurement.get(console, options.update_width(100_000), wide).maximum
        yield wide if natural <= options.max_width else self.build(True)


@dataclass
class StudySummary:
    """Outcome of one study; renders as a rich table (``console.print(summary)``)."""

    name: str
    metric: str
    mode: str
    param_keys: list[str]
    trials: list[TrialRecord]
    best: TrialRecord | None
    best_config_path: Path | None
    experiment_path: str
    tracking_uri: str
    mlflow_experiment: str
    parent_run_id: str | None
    notes: list[str] = field(default_factory=list)
    finals: FinalsRecord | None = None
    group_finals: list[FinalsRecord] = field(default_factory=list)  # per grid variant / per Pareto-front point
    objectives: list[str] = field(default_factory=list)
    front: list[TrialRecord] = field(default_factory=list)  # Pareto studies: the non-dominated trials
    optuna_storage: str | None = None  # RDB URL of the Optuna study (optuna.load_study, optuna-dashboard)
    optuna_study: str | None = None

    def _table(self, compact: bool):
        """The trials table: one column per tuned param, or (``compact``) the params as one wrapped ``k=v`` column."""
        from rich import box
        from rich.table import Table
        from rich.text import Text

        counts = {s: sum(t.status == s for t in self.trials) for s in ("TERMINATED", "STOPPED", "ERROR")}
        title = (f"study {self.name}: {len(self.trials)} trials ({counts['TERMINATED']} finished, "
                 f"{counts['STOPPED']} stopped, {counts['ERROR']} errored)")
        t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for col in ["#", "trial", "state"]:
            t.add_column(col, no_wrap=True)
        short = _short_names(self.param_keys)
        if compact:
            t.add_column("config", ratio=1, min_width=12)
        else:
            for key in short:
                t.add_column(key.replace(".", ".\n"), no_wrap=True)
        t.add_column(self.metric.replace("_", "\n"), no_wrap=True)
        entropy = any(finite_scalar(r.metrics.get("search/alpha_entropy")) for r in self.trials)
        if entropy:  # mean normalised entropy of softmax(alpha) after the search: 1 = uniform, 0 = decided
            t.add_column("H(α)", no_wrap=True)
        t.add_column("tuned\nparams", no_wrap=True)
        t.add_column("policy", ratio=1, min_width=15)  # wraps between ops: one or more lines per trial
        for r in self.trials:
            star = "*" if self.best is not None and r.trial_id == self.best.trial_id else ""
            star += "+" if any(r is p for p in self.front) else ""
            policy = " ".join(_OP_ABBREV.get(op, op) for op in str(r.metrics.get("policy", "")).split(",") if op)
            tp = r.metrics.get("tuned_params")
            h = r.metrics.get("search/alpha_entropy")
            values = [format_value(r.params.get(k, "")) for k in self.param_keys]
            t.add_row(str(r.index), r.trial_id + star, _STATUS.get(r.status, r.status),
                      *([Text(" ".join(f"{k}={v}" for k, v in zip(short, values)))] if compact
                        else [Text(v) for v in values]),
                      f"{r.value:.4f}" if r.value is not None else "-",
                      *([f"{h:.2f}" if finite_scalar(h) else "-"] if entropy else []),
                      f"{int(tp)}" if finite_scalar(tp) else "-", "-" if r.error else policy)
        return t

    def __rich__(self):
        from rich.console import Group
        from rich.text import Text

        t = _FitTable(self._table)
        lines = ["policy per layer: pre=prepend add=add aff=affine xat=cross_attn; * best trial"]
        lines += [f"trial {r.trial_id} failed: {r.error}" for r in self.trials if r.error]
        if self.best is not None:
            lines.append(f"selected on validation: trial {self.best.trial_id} {self.metric}={self.best.value:.4f}, "
                         f"policy {self.best.metrics.get('policy', '?')}; config -> {self.best_config_path}")
            if self.finals is not None and self.finals.test_accs:
                lines.append(f"final: {self.finals.describe()}")
        else:
            lines.append(f"no trial reported {self.metric}")
        if self.front:
            lines.append(f"Pareto front of ({', '.join(self.objectives)}), + in the table: "
                         + "; ".join(f"{r.trial_id} (" + ", ".join(format_value(v) for v in r.values) + ")"
                                     for r in self.front))
        for f in self.group_finals:
            if f.test_accs:
                mean, std = f.mean_std()
                lines.append(f"final [{f.label}]: test_acc {mean:.4f} ± {std:.4f} (n={len(f.test_accs)}, "
                             f"trial {f.trial_id})")
        lines.append(f"MLflow: {self.tracking_uri} experiment {self.mlflow_experiment!r} parent run {self.parent_run_id}")
        lines.append(f"Tune: {self.experiment_path}")
        if self.optuna_study:
            lines.append(f"Optuna: study {self.optuna_study!r} in {self.optuna_storage} "
                         f"(optuna-dashboard {self.optuna_storage})")
        lines += self.notes
        return Group(t, Text("\n".join(lines)))


@dataclass
class TuneSummary:
    """All studies of one ``run_tune`` call."""

    studies: list[StudySummary]

    def __rich__(self):
        from rich.console import Group

        return Group(*self.studies)

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        Console(file=buf, width=160, color_system=None).print(self)
        return buf.getvalue()


def _records(results, objectives: list[str], param_keys: list[str]) -> list[TrialRecord]:
    recs = []
    for r in results:
        name = Path(str(r.path)).name
        m = re.match(r"(\d+)_(\w+)$", name)
        idx, tid = (int(m.group(1)), m.group(2)) if m else (0, r.metrics.get("trial_id", name))
        metrics = dict(r.metrics or {})
        if r.error is not None:
            status, err = "ERROR", _error_line(r.error)
        elif metrics.get("error"):  # failed deterministically (NaN): ended by the trial itself, not retried
            status, err = "ERROR", _error_line(metrics["error"])
        else:
            status, err = ("TERMINATED" if metrics.get("complete") else "STOPPED"), None
        vals = [metrics.get(m) for m in objectives]
        ok = status != "ERROR" and all(finite_scalar(v) for v in vals)
        val = float(vals[0]) if status != "ERROR" and finite_scalar(vals[0]) else None
        params = {k: (r.config or {}).get(k) for k in param_keys}
        recs.append(TrialRecord(idx, tid, status, params, val, metrics, err, [float(v) for v in vals] if ok else None))
    return sorted(recs, key=lambda x: (x.index, x.trial_id))


def _front(recs: list[TrialRecord], modes: list[str]) -> list[TrialRecord]:
    """Finished trials on the Pareto front of the objectives (by index order)."""
    from .tracking import pareto_front

    done = [r for r in recs if r.status == "TERMINATED" and r.values is not None]
    return [done[i] for i in pareto_front([r.values for r in done], modes)]


def _best(recs: list[TrialRecord], mode: str) -> TrialRecord | None:
    done = [r for r in recs if r.status == "TERMINATED" and r.value is not None]
    if not done:
        return None
    sign = 1 if mode == "max" else -1
    return max(done, key=lambda r: (sign * r.value, -r.index))  # ties: the earliest trial


def _parent_run(client, exp_id: str, plan: StudyPlan, space: SpaceConfig, space_path: Path,
                previous: str | None) -> str:
    """Reopen the study's parent run on resume, else create it with the space as params."""
    from mlflow.entities import Param

    if previous:
        try:
            client.update_run(previous, status="RUNNING")
            return previous
        except Exception as e:  # noqa: BLE001 - e.g. another tracking store: start a new parent
            log.warning("cannot reopen MLflow parent run %s (%s); starting a new one", previous, _error_line(e))
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


# ----------------------------------------------------------------------------- Optuna storage
def _sqlite_url(url: str, base: Path | None = None) -> str:
    """A relative ``sqlite:///file.db`` made absolute against ``base`` (default: the cwd); other URLs unchanged."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        rest = url[len("sqlite:///"):]
        if rest and rest != ":memory:":
            return "sqlite:///" + os.path.normpath(str((base or Path.cwd()) / Path(rest).expanduser()))
    return url


def default_optuna_storage(tracking_uri: str, storage_root: str) -> str | None:
    """``sqlite:///<dir>/optuna.db`` next to a sqlite MLflow db, else next to a local Tune storage folder; else None
    (an in-memory study)."""
    if tracking_uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(tracking_uri[len("sqlite:///"):]).parent / "optuna.db")
    if "://" not in storage_root:
        return "sqlite:///" + str(Path(storage_root) / "optuna.db")
    return None


def _rdb(url: str | None):
    if not url:
        return None
    import optuna

    kw = {"engine_kwargs": {"connect_args": {"timeout": 60}}} if url.startswith("sqlite:") else {}
    if url.startswith("sqlite:////"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(url, **kw)


def _optuna_study_name(url: str, name: str) -> str | None:
    """``name``, or ``name-2``, ``name-3``... when the storage already holds a study of that name (a fresh study never
    continues another's sampler history). None (with a warning) when the storage cannot be opened."""
    import optuna

    try:
        taken = set(optuna.study.get_all_study_names(_rdb(url)))
    except Exception as e:  # noqa: BLE001 - a bad URL or driver: the study runs with an in-memory sampler
        log.warning("cannot open Optuna storage %s (%s); the study's sampler stays in memory", url, _error_line(e))
        return None
    k, out = 1, name
    while out in taken:
        k += 1
        out = f"{name}-{k}"
    return out


# ----------------------------------------------------------------------------- live progress
_DISPLAY: list[Any] = []  # the live table of this driver process (set by run_tune); _Progress callbacks feed it


class _Progress(Callback):
    """Driver-side Tune callback that feeds pfnas's live table. It holds plain data only: Tune pickles it with the
    run config, and a restored study's copy finds the display of the process that resumes it."""

    def __init__(self, title: str, metric: str, ctx: TrialContext, total: int, mode: str = "max"):
        self.title, self.metric, self.ctx, self.total, self.mode = title, metric, ctx, int(total), mode

    def _display(self):
        return _DISPLAY[-1] if _DISPLAY else None

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        d = self._display()
        if d is not None:
            d.update(self, trials)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        d = self._display()
        if d is not None:
            d.update(self, trials, done=trial)

    on_trial_error = on_trial_complete

    def on_experiment_end(self, trials: list, **info) -> None:
        d = self._display()
        if d is not None:
            d.update(self, trials, end=True)


def _eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


class LiveTable:
    """One live rich table per Tune run: trial, state, key params, phase (epoch of planned), the latest value of the
    study metric and an ETA from epochs done vs planned (search.epochs + train.epochs). On a terminal it redraws in
    place (at most twice a second); elsewhere (a log file, a pipe) it prints one line per finished trial."""

    def __init__(self, console=None, refresh_s: float = 0.5):
        from rich.console import Console

        self.console = console or Console()
        self.refresh_s = refresh_s
        self.live = None
        self.t0 = None
        self._last = 0.0
        self._planned: dict[str, int] = {}
        self._said: set[str] = set()
        self._owner = None

    def _plan(self, cb: _Progress, trial) -> int:
        if trial.trial_id not in self._planned:
            try:
                cfg = cb.ctx.config(trial.config or {}, "x")
                n = (cfg.search.epochs if cfg.method.kind == "search" else 0) + cfg.train.epochs
            except Exception:  # noqa: BLE001
                n = 0
            self._planned[trial.trial_id] = n
        return self._planned[trial.trial_id]

    def _progress(self, cb: _Progress, trial) -> tuple[int, int, str]:
        """(epochs done, planned, phase text) of a trial from its last result."""
        r = trial.last_result or {}
        planned, phase, epoch = self._plan(cb, trial), str(r.get("phase", "")), int(r.get("epoch", 0) or 0)
        search_epochs = planned - self._train_epochs(cb, trial)
        if phase in ("done", "failed") or trial.status in ("TERMINATED", "ERROR"):
            return planned, planned, phase or trial.status.lower()
        if phase == "search":
            return epoch, planned, f"search {epoch}/{search_epochs}"
        if phase == "retrain":
            return search_epochs + epoch, planned, f"retrain {epoch}/{planned - search_epochs}"
        return 0, planned, "" if trial.status == "PENDING" else (phase or "starting")

    def _train_epochs(self, cb: _Progress, trial) -> int:
        try:
            return cb.ctx.config(trial.config or {}, "x").train.epochs
        except Exception:  # noqa: BLE001
            return 0

    def _table(self, cb: _Progress, trials: list, done=None):
        from rich import box
        from rich.table import Table

        now = time.monotonic()
        rows, done_all, planned_all, best = [], 0, 0, None
        finished = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}
        if done is not None:  # the trial being completed: Tune sets its status after the callbacks
            finished.add(done.trial_id)
        for t in sorted(trials, key=lambda t: (_trial_index(t), t.trial_id)):
            n, planned, phase = self._progress(cb, t)
            if t.trial_id in finished:
                n = planned
            done_all, planned_all = done_all + n, planned_all + planned
            r = t.last_result or {}
            v = r.get(cb.metric)
            if finite_scalar(v) and t.trial_id in finished and not r.get("error"):
                best = v if best is None else (max(best, v) if cb.mode == "max" else min(best, v))
            rows.append((t, phase, v, n, planned, r))
        missing = max(cb.total - len(trials), 0)  # trials not created yet: planned like the last one
        if missing and rows:
            planned_all += missing * rows[-1][4]
        elapsed = now - self.t0
        eta = elapsed * (planned_all - done_all) / done_all if done_all else None
        n_done = len(finished)
        self._counts, self._eta = (n_done, best), eta
        title = (f"{cb.title}: {n_done}/{cb.total} trials"
                 + (f", best {cb.metric} {best:.4f}" if best is not None else "") + f", elapsed {_eta(elapsed)}"
                 + (f", ETA {_eta(eta)}" if n_done < cb.total else ""))
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for col in ("#", "trial", "state"):
            table.add_column(col, no_wrap=True)
        keys = [k for k in cb.ctx.param_keys]
        for k in _short_names(keys):
            table.add_column(k, overflow="fold")
        table.add_column("phase", overflow="fold")
        table.add_column(cb.metric, no_wrap=True)
        table.add_column("ETA", no_wrap=True)
        for t, phase, v, done, planned, r in rows:
            t_eta = None
            if t.status == "RUNNING" and done and finite_scalar(r.get("time_total_s")):
                t_eta = float(r["time_total_s"]) * (planned - done) / done
            state = {"TERMINATED": "done", "ERROR": "error"}.get(t.status, t.status.lower())
            table.add_row(str(_trial_index(t)), t.trial_id, state,
                          *[format_value((t.config or {}).get(k, "")) for k in keys], phase,
                          f"{v:.4f}" if finite_scalar(v) else "-", _eta(t_eta) if t.status == "RUNNING" else "")
        return table, title

    def update(self, cb: _Progress, trials: list, done=None, end: bool = False) -> None:
        from rich.live import Live

        if self._owner is not cb:  # a new Tune run (the finals after the study): a fresh table
            self.close()
            self._owner, self.t0, self._said = cb, time.monotonic(), set()
        terminal = self.console.is_terminal and not self.console.is_dumb_terminal
        if not terminal:  # one line per finished trial
            if done is not None and done.trial_id not in self._said:
                self._said.add(done.trial_id)
                table, title = self._table(cb, trials, done)
                r = done.last_result or {}
                v = r.get(cb.metric)
                state = "error" if done.status == "ERROR" or r.get("error") else "done"
                n_done, best = self._counts
                label = (f"seed {(done.config or {}).get('seed')}" if cb.ctx.kind == "final"
                         else f"t{_trial_index(done):02d}")
                self.console.print(f"{cb.title}: {label} {state}"
                                   + (f" {cb.metric}={v:.4f}" if finite_scalar(v) else "")
                                   + f" | {n_done}/{cb.total} done" + (f", best {best:.4f}" if best is not None else "")
                                   + f", {_eta(time.monotonic() - self.t0)}"
                                   + (f", ETA {_eta(self._eta)}" if n_done < cb.total else ""), highlight=False)
            return
        now = time.monotonic()
        if not (end or done is not None) and now - self._last < self.refresh_s:
            return
        self._last = now
        from rich.console import Group
        from rich.text import Text

        table, title = self._table(cb, trials, done)
        table = Group(Text(title, style="bold"), table)
        if self.live is None:
            self.live = Live(table, console=self.console, auto_refresh=False, transient=True)
            self.live.start()
        self.live.update(table, refresh=True)
        if end:
            self.close()

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
        self._owner = None


def _n_trials(space: SpaceConfig, plan: StudyPlan, num_samples: int) -> int:
    """Trials a study will run: ``num_samples``, times the size of the grid for a grid study."""
    n = num_samples
    if space.algorithm == "grid":
        n *= max(len(plan.variants), 1)
        for p in plan.params.values():
            n *= len(p.values or [None])
    return n


def _fit(tuner):
    """``tuner.fit()``, closing the live table even when interrupted."""
    try:
        return tuner.fit()
    finally:
        if _DISPLAY:
            _DISPLAY[-1].close()


def _tuner(plan: StudyPlan, space: SpaceConfig, trainable, storage: str, num_samples: int, *, verbose: bool = True,
           optuna_storage: str | None = None, optuna_study: str | None = None, progress: Any = None):
    """The study's Tuner: Optuna TPE (its study in ``optuna_storage`` when given: sqlite/RDB URL) or a grid.

    ``verbose`` keeps Ray's own per-trial output; otherwise Tune is silent and ``progress`` (a :class:`_Progress`
    callback) feeds pfnas's live table."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    k = space.max_concurrent_trials
    sched = None
    if space.scheduler.type == "asha":
        s = space.scheduler
        sched = ASHAScheduler(time_attr="training_iteration", metric=s.metric, mode=s.mode, max_t=s.max_t,
                              grace_period=s.grace_period, reduction_factor=s.reduction_factor)
    run_config = tune.RunConfig(name=plan.name, storage_path=storage,
                                failure_config=tune.FailureConfig(max_failures=space.max_failures),
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=space.keep_checkpoints),
                                verbose=1 if verbose else 0,
                                callbacks=[progress] if progress is not None and not verbose else None)
    if space.algorithm == "grid":  # Tune's variant generator: the full cross product, num_samples repeats
        grid = {"variant": tune.grid_search(list(range(len(plan.variants))))} if plan.variants else {}
        grid.update({key: tune.grid_search(list(p.values)) for key, p in plan.params.items()})
        return tune.Tuner(trainable, param_space=grid, run_config=run_config,
                          tune_config=tune.TuneConfig(num_samples=num_samples, scheduler=sched,
                                                      max_concurrent_trials=k, reuse_actors=True,
                                                      trial_name_creator=trial_name,
                                                      trial_dirname_creator=trial_dirname))
    sampler = optuna.samplers.TPESampler(seed=space.seed, n_startup_trials=space.startup_trials)
    searcher = PfnasOptunaSearch(space={key: p.distribution() for key, p in plan.params.items()},
                                 metric=space.metric, mode=space.mode, sampler=sampler,  # str, or lists
                                 points_to_evaluate=plan.points or None, storage=_rdb(optuna_storage),
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


def _run_study(plan: StudyPlan, space: SpaceConfig, space_path: Path, *, storage: str, tracking_uri: str,
               mlflow_experiment: str, resume: bool, num_samples: int, verbose: bool = False,
               optuna_storage: str | None = None) -> StudySummary:
    from ray import tune

    exp_path = f"{storage.rstrip('/')}/{plan.name}"
    local = "://" not in storage
    state_path = Path(exp_path) / STATE_FILE if local else None
    digest = _space_digest(space, plan)
    previous: dict[str, Any] = {}
    if state_path is not None and state_path.is_file():
        previous = json.loads(state_path.read_text())
    restoring = resume and tune.Tuner.can_restore(exp_path)
    notes = []
    if restoring and previous.get("digest") not in (None, digest):
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
        parent = _parent_run(client, exp_id, plan, space, space_path, earlier)
        optuna_study = None
        if optuna_storage and space.algorithm == "optuna":  # the sampler's study in RDB storage (optuna-dashboard)
            optuna_study = previous.get("optuna_study") if restoring else _optuna_study_name(optuna_storage, plan.name)
            if optuna_study:
                client.set_tag(parent, "pfnas.optuna_storage", optuna_storage)
                client.set_tag(parent, "pfnas.optuna_study", optuna_study)
    except PfnasError:
        raise
    except Exception as e:  # noqa: BLE001
        raise PfnasError(f"cannot use MLflow at {tracking_uri}: {_error_line(e)}") from None
    ctx = TrialContext(study=plan.name, base=plan.base.model_dump(mode="json"), tracking_uri=tracking_uri,
                       experiment=mlflow_experiment, parent_run_id=parent, param_keys=plan.param_keys,
                       variants=plan.variants)
    resources = {"cpu": space.resources.cpu, **({"gpu": space.resources.gpu} if space.resources.gpu else {})}
    trainable = tune.with_resources(tune.with_parameters(pfnas_trial, ctx=ctx), resources)
    if state_path is not None:
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps({"study": plan.name, "parent_run_id": parent, "tracking_uri": tracking_uri,
                                          "mlflow_experiment": mlflow_experiment, "digest": digest,
                                          "space": str(space_path), "optuna_storage": optuna_storage if optuna_study
                                          else None, "optuna_study": optuna_study}, indent=1))
    if restoring:  # the search state (OptunaSearch with its RDB study) comes back from Tune's experiment folder
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True)
    else:
        tuner = _tuner(plan, space, trainable, storage, num_samples, verbose=verbose,
                       optuna_storage=optuna_storage if optuna_study else None, optuna_study=optuna_study,
                       progress=_Progress(f"study {plan.name}", space.metrics[0], ctx,
                                          _n_trials(space, plan, num_samples), space.modes[0]))
    results = _fit(tuner)

    recs = _records(results, space.metrics, plan.param_keys)
    primary, primary_mode = space.metrics[0], space.modes[0]
    best = _best(recs, primary_mode)
    front = _front(recs, space.modes) if len(space.metrics) > 1 else []
    best_path, best_cfg, finals = None, None, None
    if best is not None:
        final_cfg, fctx = _final_context(ctx, plan, best, primary)
        best_cfg = final_cfg.model_dump(mode="json")
        if space.final.seeds:
            finals = _run_finals(fctx, final_cfg, best, space, storage, trainable_resources=resources, verbose=verbose)
    group_finals: list[FinalsRecord] = []  # a grid's variants, or a Pareto study's front: each point finalised
    groups: list[tuple[str, str, TrialRecord]] = []
    if space.final.per_variant:
        for i, overrides in enumerate(plan.variants):
            vbest = _best([r for r in recs if r.params.get("variant") == i], primary_mode)
            if vbest is not None:
                groups.append((f"-v{i}", " ".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items()), vbest))
    for k, point in enumerate(front):
        groups.append((f"-p{k}", "front " + " ".join(f"{m}={format_value(v)}" for m, v in
                                                     zip(space.metrics, point.values)), point))
    for suffix, label, chosen in groups if best is not None and space.final.seeds else []:
        if chosen.trial_id == best.trial_id:
            rec = replace(finals, label=label)
        else:
            ccfg, cctx = _final_context(ctx, plan, chosen, primary)
            rec = _run_finals(cctx, ccfg, chosen, space, storage, trainable_resources=resources, suffix=suffix,
                              verbose=verbose)
            rec.label = label
        group_finals.append(rec)
    for r in recs:  # show a grid variant as its overrides, not its index
        if plan.variants and isinstance(r.params.get("variant"), int):
            r.params["variant"] = " ".join(f"{k.split('.')[-1]}={v}" for k, v in plan.variants[r.params["variant"]].items())
    if best_cfg is not None and local:
        best_path = Path(exp_path) / "best_config.yaml"
        head = f"# selected: trial {best.trial_id} of study {plan.name}, {primary}={best.value:.6g} (validation)\n"
        if finals is not None and finals.test_accs:
            head += f"# final: {finals.describe()}\n"
        best_path.write_text(head + "# rerun the final: pfnas run -c best_config.yaml --set seed=N\n"
                             + yaml.safe_dump(best_cfg, sort_keys=False))
    if any(r.status == "STOPPED" for r in recs) and space.scheduler.type == "none":
        notes.append("some trials did not finish; rerun with --resume to continue them")
    if not any(r.value is not None for r in recs) and any(r.status == "TERMINATED" for r in recs):
        keys = sorted({k for r in recs for k in r.metrics if "/" not in k})
        notes.append(f"warning: no trial reported metric {primary!r} (final keys: {', '.join(keys)})")
    try:
        from mlflow.entities import Metric

        table = [{"index": r.index, "trial_id": r.trial_id, "status": r.status, "params": r.params,
                  **dict(zip(space.metrics, r.values or [r.value])), "error": r.error,
                  "pareto": any(r is p for p in front)} for r in recs]
        client.log_dict(parent, {"trials": table}, "trials.json")
        if front:  # the front as a table and a plot (first objective against the second)
            from .tracking import pareto_figure

            pts = [r for r in recs if r.values is not None]
            client.log_dict(parent, {"objectives": space.metrics, "modes": space.modes,
                                     "front": [{"trial_id": r.trial_id, "params": r.params,
                                                **dict(zip(space.metrics, r.values))} for r in front]},
                            "pareto_front.json")
            fig = pareto_figure([(r.values[1], r.values[0]) for r in pts], [pts.index(r) for r in front],
                                [r.trial_id for r in pts], space.metrics[1], space.metrics[0],
                                f"study {plan.name}: Pareto front")
            client.log_figure(parent, fig, "pareto_front.png")
        metrics = [Metric("n_trials", len(recs), 0, 0),
                   Metric("n_errored", sum(r.status == "ERROR" for r in recs), 0, 0)]
        if best is not None:
            metrics.append(Metric(f"best_{primary}", best.value, 0, 0))
            client.set_tag(parent, "pfnas.best_trial", best.trial_id)
            client.log_dict(parent, best_cfg, "best_config.yaml")
        if finals is not None and finals.test_accs:
            mean, std = finals.mean_std()
            metrics += [Metric("final_test_acc_mean", mean, 0, 0), Metric("final_test_acc_std", std, 0, 0),
                        Metric("final_n", len(finals.test_accs), 0, 0)]
        client.log_batch(parent, metrics=metrics)
        unfinished = any(r.status == "STOPPED" for r in recs) and space.scheduler.type == "none"
        orphans = _close_orphans(client, exp_id, parent)
        if orphans:
            notes.append(f"closed {orphans} MLflow trial run(s) left RUNNING by an interrupted, unresumed trial")
        client.set_terminated(parent, "KILLED" if unfinished else "FINISHED")
    except Exception as e:  # noqa: BLE001 - the study itself is done; say so instead of failing
        notes.append(f"warning: could not finish the MLflow parent run: {_error_line(e)}")
    for rec in {f.trial_id: f for f in [finals, *group_finals] if f is not None}.values():
        notes += [f"final seed {seed} of trial {rec.trial_id} failed: {err}" for seed, err in rec.errors]
    return StudySummary(plan.name, primary, primary_mode, plan.param_keys, recs, best, best_path, exp_path,
                        tracking_uri, mlflow_experiment, parent, notes, finals, group_finals,
                        objectives=space.metrics, front=front, optuna_storage=optuna_storage if optuna_study else None,
                        optuna_study=optuna_study)


@dataclass
class FinalsRecord:
    """Test scores of a study's finals: the selected trial's config and policy, retrained on train+val."""

    trial_id: str
    seeds: list[int]
    test_accs: list[float]
    errors: list[tuple[int, str]] = field(default_factory=list)
    label: str = ""  # per-variant finals: the variant's overrides

    def mean_std(self) -> tuple[float, float]:
        from .tracking import _mean_std

        return _mean_std(self.test_accs)

    def describe(self) -> str:
        mean, std = self.mean_std()
        return (f"test_acc {mean:.4f} ± {std:.4f} (n={len(self.test_accs)}, trial {self.trial_id}'s config and "
                f"policy retrained on train+val, tested once per seed)")


def _final_context(ctx: TrialContext, plan: StudyPlan, best: TrialRecord,
                   metric: str) -> tuple[ExperimentConfig, TrialContext]:
    """The final config (selected trial's values, its policy as a fixed method, stage final) and its context."""
    from .tracking import config_hash

    trial_cfg = ctx.config(best.params, f"{plan.name}-{best.trial_id}")
    policy = [op for op in str(best.metrics.get("policy", "")).split(",") if op]
    final = merge_dotted(trial_cfg, {"name": f"{plan.name}-final", "train.stage": "final",
                                     **({"method.kind": "fixed", "method.policy": policy} if policy else {})})
    tags = {"pfnas.label": ctx.label(trial_cfg, best.params), "pfnas.selected": config_hash(trial_cfg),
            "pfnas.selected_trial": best.trial_id, f"pfnas.selected_{metric}": f"{best.value:.6g}"}
    fctx = TrialContext(study=ctx.study, base=final.model_dump(mode="json"), tracking_uri=ctx.tracking_uri,
                        experiment=ctx.experiment, parent_run_id=ctx.parent_run_id, param_keys=["seed"],
                        kind="final", tags=tags)
    return final, fctx


def _run_finals(fctx: TrialContext, final_cfg: ExperimentConfig, best: TrialRecord, space: SpaceConfig,
                storage: str, trainable_resources: dict[str, float], suffix: str = "",
                verbose: bool = False) -> FinalsRecord:
    """Retrain the selected config on train+val and test it once per seed, as a Tune grid over seeds.

    The finals live in ``<storage>/<study>-final``; a resumed study continues them when the selected trial
    is unchanged and starts them afresh otherwise.
    """
    from ray import tune

    name = f"{fctx.study}-final{suffix}"
    path = f"{storage.rstrip('/')}/{name}"
    seeds = [final_cfg.seed + i for i in range(space.final.seeds)]
    marker = Path(path) / "selected_trial.txt" if "://" not in storage else None
    trainable = tune.with_resources(tune.with_parameters(pfnas_trial, ctx=fctx), trainable_resources)
    same = marker is not None and marker.is_file() and marker.read_text().strip() == best.trial_id
    if same and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        if marker is not None:
            shutil.rmtree(path, ignore_errors=True)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(best.trial_id)
        tuner = tune.Tuner(
            trainable, param_space={"seed": tune.grid_search(seeds)},
            tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=space.max_concurrent_trials,
                                        reuse_actors=True, trial_name_creator=trial_name,
                                        trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1 if verbose else 0,
                                      callbacks=[] if verbose else [_Progress(
                                          f"finals of trial {best.trial_id}{suffix}", "test_acc", fctx, len(seeds))],
                                      failure_config=tune.FailureConfig(max_failures=space.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=space.keep_checkpoints)))
    rec = FinalsRecord(best.trial_id, [], [])
    for r in sorted(_fit(tuner), key=lambda r: (r.config or {}).get("seed", 0)):
        seed = int((r.config or {}).get("seed", -1))
        acc = (r.metrics or {}).get("test_acc")
        if r.error is None and finite_scalar(acc):
            rec.seeds.append(seed)
            rec.test_accs.append(float(acc))
        else:
            why = r.error if r.error is not None else (r.metrics or {}).get("error")
            rec.errors.append((seed, _error_line(why) if why else "no test_acc reported"))
    return rec


class _Quiet:
    """Quiet Ray/Tune/Optuna loggers for the run (``on``), restored afterwards; ``init_kwargs`` for ``ray.init``."""

    LOGGERS = ("ray", "ray.tune", "ray.train", "ray.air", "ray.data", "optuna")

    def __init__(self, on: bool):
        self.on = on
        self.levels = {n: logging.getLogger(n).level for n in self.LOGGERS}
        self.optuna = None
        self.new_output = os.environ.get("RAY_AIR_NEW_OUTPUT")
        if on:
            os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the new engine prints its header and paths even at verbose=0
            import optuna

            self.optuna = optuna.logging.get_verbosity()
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            for n in self.LOGGERS:
                logging.getLogger(n).setLevel(logging.WARNING)

    def init_kwargs(self) -> dict[str, Any]:
        # ERROR: no "Started a local Ray instance" / token-authentication notes on the quiet terminal; worker output
        # (actor shutdown noise included) stays in Ray's session logs, trial errors reach the summary anyway
        return {"logging_level": logging.ERROR, "log_to_driver": False} if self.on else {}

    def restore(self) -> None:
        if not self.on:
            return
        import optuna

        optuna.logging.set_verbosity(self.optuna)
        if self.new_output is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = self.new_output
        for n, level in self.levels.items():
            logging.getLogger(n).setLevel(level)


def _storage_root(storage: str | None) -> str:
    if storage and "://" in storage:
        return storage
    return str(Path(storage or "ray_results").expanduser().resolve())


def run_tune(space_path: str | Path, *, address: str | None = None, tracking_uri: str | None = None,
             experiment: str | None = None, storage: str | None = None, resume: bool = False,
             overrides: list[str] | None = None, num_samples: int | None = None, optuna_storage: str | None = None,
             verbose: bool = False, console=None) -> TuneSummary:
    """Run (or with ``resume`` continue) the studies of a space YAML; returns a printable summary.

    ``address``: Ray cluster (``auto``, ``ray://host:10001``); None starts a local Ray unless one is
    already initialised. ``tracking_uri``: explicit > env ``MLFLOW_TRACKING_URI`` > the space's
    ``mlflow.tracking_uri`` > ``sqlite:///mlflow.db``, made absolute and handed to every trial.
    ``experiment`` names both the study and the MLflow experiment. ``storage``: Tune storage path
    (default ``./ray_results``); ``<storage>/<study>/best_config.yaml`` receives the best config.
    ``optuna_storage``: the RDB URL of the Optuna study (explicit > the space's ``optuna_storage`` > ``optuna.db``
    next to a sqlite MLflow db, else in the Tune storage folder; ``none``: in memory). ``verbose`` keeps Ray Tune's
    own output (per-trial tables and results); otherwise Ray, Tune and Optuna stay quiet and a live pfnas table
    (:class:`LiveTable`) is drawn on ``console``.
    """
    space_path = Path(space_path)
    space, plans = load_space(space_path, overrides, experiment)
    if num_samples is not None and num_samples < 1:
        raise ConfigError("--num-samples must be >= 1")
    if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        uri = resolve_tracking_uri(tracking_uri)
    else:
        uri = resolve_tracking_uri(space.mlflow.tracking_uri, base_dir=space_path.resolve().parent
                                   if space.mlflow.tracking_uri else None)
    mlflow_experiment = experiment or space.mlflow.experiment or space.name
    root = _storage_root(storage)
    if optuna_storage:
        ostore = _sqlite_url(optuna_storage)
    elif space.optuna_storage:
        ostore = _sqlite_url(space.optuna_storage, space_path.resolve().parent)
    else:
        ostore = default_optuna_storage(uri, root)
    if ostore and ostore.strip().lower() in ("none", "memory"):
        ostore = None

    from ray import tune

    paths = {p.name: f"{root.rstrip('/')}/{p.name}" for p in plans}
    existing = [n for n, path in paths.items() if tune.Tuner.can_restore(path)]
    if resume and not existing:
        raise ConfigError(f"nothing to resume: no Tune study at {' or '.join(paths.values())}")
    if not resume and existing:
        raise ConfigError(f"study {paths[existing[0]]} already exists; pass --resume to continue it, or pick "
                          "another --experiment name or --storage")

    import ray

    quiet = _Quiet(not verbose)
    started = False
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, **quiet.init_kwargs())
        started = True
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    # a checkpoint per epoch with num_to_keep forces frequent state snapshots (wanted, for resume): no warning
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    strict = os.environ.get("TUNE_DISABLE_STRICT_METRIC_CHECKING")
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # the study metric only appears once it is real
    if not verbose:
        _DISPLAY.append(LiveTable(console))
    try:
        studies = [_run_study(p, space, space_path, storage=root, tracking_uri=uri,
                              mlflow_experiment=mlflow_experiment, resume=resume and p.name in existing,
                              num_samples=num_samples or space.num_samples
                              or (1 if space.algorithm == "grid" else 8), verbose=verbose,
                              optuna_storage=ostore) for p in plans]
    finally:
        if not verbose:
            _DISPLAY.pop().close()
        quiet.restore()
        if strict is None:
            os.environ.pop("TUNE_DISABLE_STRICT_METRIC_CHECKING", None)
        else:
            os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = strict
        if started:
            ray.shutdown()
    return TuneSummary(studies)


__all__ = [
    "ParamSpec",
    "SpaceConfig",
    "StudyPlan",
    "StudySummary",
    "TrialContext",
    "TuneSummary",
    "load_space",
    "pfnas_trial",
    "run_trial_method",
    "run_tune",
]
