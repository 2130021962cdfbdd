"""The space YAML grammar: :class:`SpaceConfig` (params, grid variants, objectives, scheduler, finals) and
:func:`load_space`, which validates a space and builds its :class:`StudyPlan` s (one per task)."""
from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    check_name,
    merge_dotted,
    read_yaml,
    selection_hash,
    validate,
)
from ..tracking import (
    RESULT_METRICS,
    flatten,
    format_value,
    metric_mode,
    reads_test,
)

log = logging.getLogger(__name__)

PATH_KEYS = ("backbone.checkpoint", "data.root")  # resolved against the file (or cwd) that names them


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

    name: str  # the study's folder (and ``<name>-<task>`` per task): a plain folder name (config.check_name)
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
    # studies of a ``tasks`` space run side by side, at most this many at once (each with its own
    # max_concurrent_trials); None: as many as the Ray cluster's CPUs and GPUs hold, at least 1
    max_concurrent_studies: int | None = Field(None, ge=1)
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

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        return check_name("", v)

    @field_validator("tasks")
    @classmethod
    def _tasks_are_folder_names(cls, v: list[str] | None) -> list[str] | None:
        for task in v or []:  # each names a study folder, <name>-<task>
            check_name("", task)
        return v

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
        for where, m, mode in [*(("metric", m, d) for m, d in zip(self.metrics, self.modes)),
                               ("scheduler.metric", self.scheduler.metric, self.scheduler.mode)]:
            if reads_test(m):
                raise ValueError(f"{where} {m!r} reads the test split; a study selects on validation "
                                 "(val_acc) and tests only its finals")
            if "/" not in m and m not in RESULT_METRICS:
                raise ValueError(f"{where} {m!r} is not reported by a trial; choose from "
                                 f"{', '.join(k for k in RESULT_METRICS if not reads_test(k))}, or a phase's "
                                 "epoch metric such as retrain/val_acc")
            better = metric_mode(m)
            if better not in (None, mode):
                raise ValueError(f"{where} {m!r} with mode {mode!r} selects the worst trial; {m} is better "
                                 f"{'higher' if better == 'max' else 'lower'}: set mode {better!r}")
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


def trial_values(variants: list[dict[str, Any]], keys: list[str], params: dict[str, Any]) -> dict[str, Any]:
    """Dotted config values of a trial's ``params`` (its ``keys``): its variant's overrides, then the rest."""
    out = dict(variants[int(params["variant"])]) if variants and "variant" in params else {}
    out.update({k: params[k] for k in keys if k in params and k != "variant"})
    return out


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

    def grid_points(self, num_samples: int = 1) -> list[dict[str, Any]]:
        """A grid study's trials in launch order: every variant x choice combination, ``num_samples`` times.

        Trials that would run one selection (a search, random search or evolution with equal
        :func:`~pfnas.config.selection_hash`: e.g. a retrain-lr grid) are spread out, round robin over the groups,
        so that concurrent slots do not sit waiting on a selection another slot is running: the first of each group
        starts early, the others once it is done."""
        axes = ([("variant", list(range(len(self.variants))))] if self.variants else []) + \
            [(k, list(p.values)) for k, p in self.params.items()]  # a grid takes choice params only
        points = [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]
        groups: dict[Any, list[dict[str, Any]]] = {}
        for i, point in enumerate(points * num_samples):
            cfg = merge_dotted(self.base, trial_values(self.variants, self.param_keys, point))
            groups.setdefault(selection_hash(cfg) or i, []).append(dict(point))
        return [g[r] for r in range(max(map(len, groups.values()), default=0)) for g in groups.values() if r < len(g)]


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
    name = space.name if study_name is None else check_name("--experiment", study_name)  # a folder of the storage
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
