"""The trial side: what runs inside a Ray worker. :func:`pfnas_trial` builds the trial's config from its
:class:`TrialContext`, runs the method (engine + baselines) in the trial folder, and reports every epoch to Tune
(with a checkpoint of that folder) and to a nested MLflow run."""
from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..methods import run_method
from ..config import ExperimentConfig, TrainingError, merge_dotted
from ..engine import Experiment
from ..provenance import dataset_info
from ..tracking import (
    RESULT_METRICS,
    RunLogger,
    finite_scalar,
    format_value,
    method_label,
)
from .space import trial_values



FINAL_KEYS = tuple(RESULT_METRICS)  # a finished trial's last report, in this order


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
    search_cache: str | None = None  # trials whose configs differ only after the search share it (local storage)
    # the finals of several selected trials as one Tune run: a trial's params are {"final": {"config": i, "seed": s}},
    # and ``finals[i]`` (a context of kind "final") builds it
    finals: list[TrialContext] = field(default_factory=list)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle a context saved by an older pfnas (a study resumed after an upgrade): new fields get defaults."""
        defaults = {f.name: f.default_factory() for f in fields(self) if f.default_factory is not MISSING}
        defaults.update({f.name: f.default for f in fields(self) if f.default is not MISSING})
        self.__dict__.update({**defaults, **state})

    def resolve(self, params: dict[str, Any]) -> tuple[TrialContext, dict[str, Any]]:
        """The context that builds a trial and that trial's own params (itself and ``params`` unless ``finals``)."""
        if not self.finals:
            return self, params
        pick = dict(params["final"])
        return self.finals[int(pick.pop("config"))], pick

    def _values(self, params: dict[str, Any]) -> dict[str, Any]:
        """Dotted config values of a trial: its variant's overrides, then its sampled params."""
        return trial_values(self.variants, self.param_keys, params)

    def config(self, params: dict[str, Any], name: str) -> ExperimentConfig:
        """The trial's config; ``params`` are its own (a several-config finals context: ``resolve`` them first)."""
        base = ExperimentConfig.model_validate(self.base)
        return merge_dotted(base, {**self._values(params), "name": name})

    def run_name(self, params: dict[str, Any], trial_id: str, index: int | None = None) -> str:
        """A trial's one name (MLflow run, live table, summary, compare): ``t03`` by its creation order; a final
        ``t03 final s1`` (the trial it finalises, its seed)."""
        if self.kind == "final":
            picked = self.tags.get("pfnas.selected_run")
            return f"{picked} final s{params['seed']}" if picked else f"final s{params['seed']}"
        return trial_run_name(index, trial_id)

    def tuned_keys(self, params: dict[str, Any]) -> list[str]:
        """The dotted config keys this trial's variant and sampled params set (its first MLflow param columns)."""
        return list(self._values(params))

    def label(self, cfg: ExperimentConfig, params: dict[str, Any]) -> str:
        """Method label plus the values that make this configuration (seeds and method fields left out)."""
        if "pfnas.label" in self.tags:
            return self.tags["pfnas.label"]
        tuned = ", ".join(f"{k}={format_value(v)}" for k, v in self._values(params).items()
                          if k != "seed" and not k.startswith("method."))
        return f"{method_label(cfg)} [{tuned}]" if tuned else method_label(cfg)


def trial_run_name(index: int | None, trial_id: str) -> str:
    """``t03``: the name of a study's trial number ``index`` (its creation order: from 0 in a grid study, from 1
    under a searcher, as Tune counts); the Tune id without one."""
    return f"t{index:02d}" if index is not None else trial_id


ABBREV = {"prompts.length": "len", "prompts.fusion_dim": "r", "prompts.dropout": "drop", "search.arch_lr": "alr",
           "search.optim.lr": "slr", "train.optim.lr": "lr", "search.epochs": "se", "train.epochs": "te",
           "search.tau.start": "tau", "search.tau.end": "tauend", "search.order": "ord", "search.cost_weight": "cw",
           "pae.enabled": "pae", "data.task": "", "seed": "s"}


def _short_method(cfg: ExperimentConfig) -> str:
    m = cfg.method
    if m.kind == "search":
        return cfg.search.mode  # softmax | gumbel
    if m.kind == "fixed":
        return "policy" if m.policy else m.op
    if m.kind == "random":
        return "random" + ("+ws" if m.weight_sharing else "")
    if m.kind == "oneshot":
        return "spos" if m.supernet == "uniform" else "fairnas"
    return {"evolution": "evo"}.get(m.kind, m.kind)


def _abbrev(key: str, value: Any) -> str:
    """``prompts.length=8`` -> ``len8``, ``search.arch_lr=0.00413`` -> ``alr0.0041``, a string value as itself."""
    if isinstance(value, str) or value is None:
        return str(value)
    leaf = key.split(".")[-1]
    short = ABBREV.get(key, "".join(w[0] for w in leaf.split("_")) if "_" in leaf else leaf[:4])
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


EXPERIMENT_CACHE: dict[str, tuple[str, Any]] = {}


def _cached_experiment(cfg: ExperimentConfig):
    """Experiment for ``cfg``, reusing the backbone and decoded data of the previous trial in this process.

    Reused actors run many trials; rebuilding a hub ViT and re-decoding a data set for each is waste.
    Random-init backbones depend on the seed, so the seed is part of their key; the data depends on its own
    ``data.split_seed`` only, so a study's finals (seeds) share one decoded task.
    """
    bb = cfg.backbone
    random_init = not (bb.pretrained or bb.checkpoint)
    bkey = json.dumps([bb.model_dump(mode="json"), cfg.seed if random_init else None, cfg.device], sort_keys=True)
    dkey = json.dumps([bkey, cfg.data.model_dump(mode="json")], sort_keys=True)
    backbone = EXPERIMENT_CACHE["backbone"][1] if EXPERIMENT_CACHE.get("backbone", ("",))[0] == bkey else None
    data = EXPERIMENT_CACHE["data"][1] if backbone is not None and EXPERIMENT_CACHE.get("data", ("",))[0] == dkey else None
    if backbone is None:
        EXPERIMENT_CACHE.clear()  # free the old backbone/data before building the new ones
    exp = Experiment.build(cfg, data=data, backbone=backbone)
    EXPERIMENT_CACHE["backbone"], EXPERIMENT_CACHE["data"] = (bkey, exp.backbone), (dkey, exp.data)
    return exp


def run_trial_method(cfg: ExperimentConfig, out_dir: str | Path, on_epoch=None, on_data=None,
                     search_cache: str | None = None) -> dict[str, Any]:
    """``methods.run_method`` (every ``method.kind``) on the experiment cached in this worker; ``on_data`` gets the
    decoded task (``TaskData``) first; ``search_cache``: the study's shared searches (``engine.shared_search``)."""
    exp = _cached_experiment(cfg)
    if on_data is not None:
        on_data(exp.data)
    return run_method(cfg, out_dir, on_epoch=on_epoch, exp=exp, search_cache=search_cache)


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
                     "diverged": int(isinstance(err, TrainingError)), "restored": self.restored})


def error_line(err: BaseException | str | None) -> str:
    text = str(err or "").strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    hits = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", ln)]
    line = hits[-1] if hits else (lines[-1] if lines else type(err).__name__)
    return re.sub(r"^(\w+\.)+(?=\w+(Error|Exception))", "", line)[:200]  # pfnas.config.TrainingError -> TrainingError


def pfnas_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """Tune function trainable: one experiment in the trial's own dir, resumable from Tune checkpoints."""
    from ray import tune

    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # one INFO line per checkpoint
    ctx, config = ctx.resolve(config)  # one of several selected configs' finals: its own context
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
                       tuned=ctx.tuned_keys(config),
                       tags={**ctx.tags, "pfnas.kind": ctx.kind, "pfnas.study": ctx.study, "pfnas.trial_id": trial_id,
                             "pfnas.label": ctx.label(cfg, config)})
    reporter = _TrialReporter(work, logger, restored=ckpt is not None)
    try:
        with logger.recording():  # a scheduler's stop (SystemExit) closes the run as KILLED, an error as FAILED
            res = run_trial_method(cfg, work, reporter.on_epoch,
                                   on_data=lambda data: logger.log_dataset(dataset_info(cfg, data)),
                                   search_cache=ctx.search_cache)
    except TrainingError as e:
        if not e.deterministic:  # e.g. out of memory: another try (FailureConfig) may fit
            raise
        # a non-finite loss comes back on every retry of this config: end the trial here (its MLflow run is FAILED)
        # instead of raising, which Ray would retry; the study sees it as an errored trial (``error``)
        reporter.failed(e)
        return
    logger.finish(res)  # before the final report, so MLflow is complete when Tune marks the trial done
    reporter.final(res)


def trial_index(trial) -> int | None:
    """Tune's creation number of ``trial`` (the leading digits of its experiment tag; None without any)."""
    m = re.match(r"(\d+)", getattr(trial, "experiment_tag", "") or "")
    return int(m.group(1)) if m else None


def trial_dirname(trial) -> str:
    """``0003_<trial id>``: creation order first, so listings sort like the study ran."""
    return f"{trial_index(trial) or 0:04d}_{trial.trial_id}"


def trial_name(trial) -> str:
    """Tune's display name of a trial: ``t03`` as its MLflow run (``f03`` for the finals' Tune run)."""
    index = trial_index(trial)
    if index is None:
        return trial.trial_id
    return f"{'f' if 'final' in (trial.config or {}) else 't'}{index:02d}"
