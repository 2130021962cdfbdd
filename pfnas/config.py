"""Experiment configuration: pydantic v2 models, YAML loading and ``--set a.b=c`` overrides.

Every model forbids unknown fields, so a typo in a YAML file or an override fails with a
:class:`ConfigError` that names the field instead of being silently ignored.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import (BadNameError, ConfigError, DataError, ModelError, PfnasError, RunDirError,  # noqa: F401
                     RunFileError, StudyError, TrainingError)  # re-exported: pfnas.config has always exported them

OPS: tuple[str, ...] = ("prepend", "add", "affine", "cross_attn")


NAME_CHARS = "letters, digits and . _ -"
NAME_MAX = 200  # a folder name holds 255 bytes; room for the suffixes pfnas adds (-final, -retrain, -<task>)


def check_name(kind: str, value: str) -> str:
    """``value`` when it is safe as one folder name: letters, digits and ``._-``, not starting with ``.`` or ``-``
    (so no ``..``, path separator, absolute path, empty or NUL). Else :class:`BadNameError` (a :class:`ConfigError`):
    ``<kind> '<value>' is not a plain folder name (<why>); ...``. ``kind`` names where it came from (``--experiment``,
    ``tasks[0]``); empty inside a pydantic field (its location is shown already)."""
    if not isinstance(value, str):
        raise BadNameError(f"{kind + ' ' if kind else ''}{value!r} is not a name (a string)")
    bad = next((c for c in value if not (c.isascii() and (c.isalnum() or c in "._-"))), None)
    why = ("it is empty" if not value else
           "it holds a NUL byte" if "\0" in value else
           f"it holds the path separator {bad!r}" if bad in ("/", "\\") else
           f"it holds {bad!r}" if bad is not None else
           f"it starts with {value[0]!r}" if value[0] in ".-" else
           f"longer than {NAME_MAX} characters" if len(value) > NAME_MAX else None)
    if why is not None:
        raise BadNameError(f"{kind + ' ' if kind else ''}{value!r} is not a plain folder name ({why}); "
                           f"use {NAME_CHARS}, not starting with . or -")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # every float finite


# Upper bounds of the numeric fields: far above any recipe (VPT's lr grid tops out at 50, batch 128, 100 epochs),
# low enough that a typo (``lr=1e30``, ``batch_size=1e9``) fails validation instead of training to NaN or OOM.
MAX_LR = 1e3  # SGD base lr (x batch/256) and the unrolled step
MAX_ARCH_LR = 10.0  # Adam on alpha moves each logit by about lr per step; beyond ~10 softmax is one-hot at once
MAX_WEIGHT_DECAY = 1.0
MAX_EPOCHS = 100_000
MAX_BATCH = 1_048_576
MAX_TAU = 1e3
MIN_TAU = 1e-3  # far below GDAS's 0.1; smaller only makes softmax(alpha / tau) one-hot, without a gradient
MAX_PROMPT_LENGTH = 1024
MAX_LOSS_WEIGHT = 1e3  # entropy, cost, Koopman and Lyapunov weights


class BackboneConfig(_Strict):
    """Frozen timm VisionTransformer. ``checkpoint`` loads a local file instead of hub weights."""

    name: str = "vit_tiny_patch16_224"
    pretrained: bool = False
    checkpoint: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)  # timm.create_model keyword arguments
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    checkpoint_num_classes: int | None = None  # classes of the head stored in ``checkpoint`` (dropped)
    resample: bool = False  # let a checkpoint of another image or patch size be resampled to the config's;
    # False: such a checkpoint is refused (timm would interpolate its position/patch embeddings silently)


# The embedded offline default (used only when a config has no ``backbone`` section): a 4-block random-init
# ViT on 32 px. ``weight_init=jax`` (xavier) gives random features a linear head can use; timm's default
# init (std 0.02) leaves the CLS output nearly constant, and every method sits at chance.
DEMO_BACKBONE: dict[str, Any] = {"name": "vit_tiny_patch16_224", "kwargs": {
    "img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 96, "num_heads": 3, "weight_init": "jax"}}


class DataConfig(_Strict):
    """Where the images come from. ``kind=synthetic`` is the embedded offline default."""

    kind: Literal["vtab", "fgvc", "hta", "imagefolder", "synthetic"] = "synthetic"
    root: str | None = None
    task: str | None = None
    batch_size: int = Field(64, ge=1, le=MAX_BATCH)
    eval_batch_size: int = Field(256, ge=1, le=MAX_BATCH)
    augment: bool | None = None  # None: FGVC-style crop+flip for fgvc/hta, none for vtab (VPT recipe)
    resident: bool = True  # decode once and keep uint8 tensors on the training device
    synthetic_classes: int = Field(4, ge=2, le=10_000)
    synthetic_per_class: int = Field(64, ge=4, le=1_000_000)
    split_seed: int = Field(0, ge=0)  # draws the splits pfnas makes (flat ImageFolder 70/10/20, HTA/ImageFolder
    # train/val) and the synthetic images: fixed for a whole study, never the training seed, so finals of
    # several seeds train and test on the same images

    @model_validator(mode="after")
    def _root_needed(self) -> "DataConfig":
        if self.kind != "synthetic" and not self.root:
            raise ValueError(f"data.root is required for data.kind={self.kind!r}")
        if self.kind == "synthetic":  # the in-memory default reads no files: a root or task here would be ignored
            set_ = [f"data.{f}={getattr(self, f)!r}" for f in ("root", "task") if getattr(self, f) is not None]
            if set_:
                raise ValueError(f"{', '.join(set_)} is ignored by data.kind='synthetic' (generated in memory); "
                                 "set data.kind to vtab, fgvc, hta or imagefolder")
        return self


class PromptConfig(_Strict):
    """Per-layer prompts and the candidate fusion operators."""

    length: int = Field(10, ge=1, le=MAX_PROMPT_LENGTH)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    fusion_dim: int = Field(8, ge=1, le=65_536)  # reduced dim of the affine / cross_attn projections
    ops: list[str] = Field(default_factory=lambda: list(OPS))

    @field_validator("ops")
    @classmethod
    def _known_ops(cls, v: list[str]) -> list[str]:
        bad = [o for o in v if o not in OPS]
        if bad or not v:
            raise ValueError(f"unknown fusion op(s) {bad}; choose from {list(OPS)}")
        if len(set(v)) != len(v):
            raise ValueError("prompts.ops has duplicates")
        return v


class OptimConfig(_Strict):
    """SGD recipe for prompts + head (VPT: momentum 0.9, cosine decay, linear warmup)."""

    lr: float = Field(0.5, gt=0, le=MAX_LR)  # base lr for batch 256, scaled by batch_size/256
    weight_decay: float = Field(1e-4, ge=0, le=MAX_WEIGHT_DECAY)
    momentum: float = Field(0.9, ge=0, lt=1)
    warmup_epochs: int = Field(1, ge=0, le=MAX_EPOCHS)
    grad_clip: float | None = Field(5.0, ge=0)  # max gradient norm; 0 or None: no clipping


class TemperatureConfig(_Strict):
    start: float = Field(1.0, ge=MIN_TAU, le=MAX_TAU)
    end: float = Field(1.0, ge=MIN_TAU, le=MAX_TAU)
    schedule: Literal["constant", "linear", "cosine", "exponential"] = "constant"


class SearchConfig(_Strict):
    """Bilevel DARTS/GDAS search over the per-layer fusion operators."""

    epochs: int = Field(10, ge=1, le=MAX_EPOCHS)
    mode: Literal["softmax", "gumbel", "sigmoid"] = "softmax"  # sigmoid: independent gates on each op's change
    order: Literal[1, 2] = 1
    arch_lr: float = Field(3e-4, gt=0, le=MAX_ARCH_LR)
    arch_betas: tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = Field(1e-3, ge=0, le=MAX_WEIGHT_DECAY)
    arch_warmup_epochs: int = Field(0, ge=0)  # epochs of weight-only training before alpha moves
    warmup_paths: Literal["mixture", "fair"] = "mixture"  # warm-up trains the uniform mixture, or one op per layer
    # per step, each op once in every n_ops steps (strict fairness, as FairNAS), as a standalone path
    arch_every: int | None = Field(None, ge=1)  # weight steps per arch step; None: |train| // |val|,
    # so one epoch uses the val split once (VTAB-1k: every 4th step, search cost ~1.25x VPT-deep)
    arch_batch_size: int | None = Field(None, ge=1, le=MAX_BATCH)  # val images per alpha step; None: batch_size.
    # (larger: less batch noise; on the proxy 200 = all of val200 did not make alpha decisive, README)
    unrolled_lr: float | None = Field(None, gt=0, le=MAX_LR)  # xi of the second-order step; None: current prompt lr
    entropy_weight: float = Field(0.0, ge=-MAX_LOSS_WEIGHT, le=MAX_LOSS_WEIGHT)  # >0: alpha decisive, <0: spread
    centered: bool = False  # gumbel: alpha's gradient from the op's change to the block, not the whole stream
    per_op_prompts: bool = False  # supernet: each candidate op trains its own prompts (False: one set shared)
    select: Literal["argmax", "perturb", "parsimony"] = "argmax"  # perturb: per-layer val accuracy of each pinned
    # op; parsimony: per-layer val loss of each pinned op, the cheapest op within select_z paired SEs of the best
    select_z: float = Field(2.0, ge=0, le=100)
    select_prefer: str | None = None  # parsimony: the op kept where it ties (e.g. the val-best single op), then
    # the cheapest; None: the cheapest
    cost_weight: float = Field(0.0, ge=0, le=MAX_LOSS_WEIGHT)  # lambda of the resource-aware arch loss:
    # + lambda * E_alpha[cost]
    cost: Literal["params", "latency"] = "params"  # per-op cost: deployed numbers, or measured step latency
    tau: TemperatureConfig = Field(default_factory=TemperatureConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)

    @field_validator("arch_betas")
    @classmethod
    def _adam_betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"Adam betas must lie in [0, 1), got {list(v)}")
        return v

    @model_validator(mode="after")
    def _fair_needs_warmup(self) -> "SearchConfig":
        if self.warmup_paths == "fair" and self.arch_warmup_epochs == 0:
            raise ValueError("warmup_paths fair acts only in the warm-up: set search.arch_warmup_epochs > 0")
        if self.arch_warmup_epochs >= self.epochs:  # alpha would stay uniform and argmax pick op 0 on every layer
            raise ValueError(f"arch_warmup_epochs ({self.arch_warmup_epochs}) must be below search.epochs "
                             f"({self.epochs}): the architecture weights would never be trained")
        if self.select_prefer is not None and self.select != "parsimony":
            raise ValueError("select_prefer is the tie-break of search.select parsimony: set search.select parsimony")
        return self


class TrainConfig(_Strict):
    """Retraining of a fixed (discretized) policy.

    ``stage`` picks the splits (the VTAB-1k protocol): ``select`` retrains on ``train`` and scores ``val``
    (what a study trial does: its score is the objective); ``final`` retrains on ``trainval`` and scores
    ``test`` once, after the last epoch. A per-epoch test curve is opt-in (``test_every``), for plots only.
    """

    epochs: int = Field(10, ge=1, le=MAX_EPOCHS)
    stage: Literal["final", "select"] = "final"
    eval_every: int = Field(1, ge=1)  # select stage: val evaluation every N epochs (and after the last)
    test_every: int | None = Field(None, ge=1)  # final stage: opt-in test curve every N epochs (never selects)
    # final stage: fail the run (before test is scored) when its last epoch predicts one minority class for 95% of
    # its training images: a diverged model that grad clipping kept finite
    collapse_check: bool = True
    optim: OptimConfig = Field(default_factory=OptimConfig)


class PAEConfig(_Strict):
    """Prompt-Agnostic Evolution plug-in (frequency init, Koopman and Lyapunov losses)."""

    enabled: bool = False
    freq_init: bool = True
    n_bands: int = Field(8, ge=1, le=1024)  # sliding radial band masks scored on the centred FFT
    band_width: float = Field(0.25, gt=0, le=1)  # as a fraction of the max radius
    score_batch: int = Field(64, ge=1, le=MAX_BATCH)
    koopman_weight: float = Field(0.1, ge=0, le=MAX_LOSS_WEIGHT)
    lyapunov_weight: float = Field(0.01, ge=0, le=MAX_LOSS_WEIGHT)
    latent_dim: int = Field(32, ge=1, le=65_536)


class MethodConfig(_Strict):
    """What an experiment runs: the differentiable search or a discrete baseline under its budget."""

    kind: Literal["search", "fixed", "probe", "random", "evolution", "oneshot"] = "search"
    op: str = "prepend"  # kind=fixed: the op used on every layer (prepend = VPT-deep)
    samples: int = Field(8, ge=1)  # kind=random: policies sampled
    weight_sharing: bool = False  # kind=random: rank samples inside one trained supernet
    population: int = Field(6, ge=2, le=10_000)  # kind=evolution; kind=oneshot: policies per generation
    sample_size: int = Field(3, ge=1)  # kind=evolution: tournament size S
    budget_multiplier: float = Field(1.0, gt=0)  # x the search's own cost in training images (methods.search_cost)
    budget_images: int | None = Field(None, ge=1)  # explicit budget in training images (replaces the search's cost)
    budget_seconds: float | None = Field(None, gt=0)  # or in training-step seconds, converted with a measured step
    policy: list[str] | None = None  # kind=fixed: one op per layer (overrides ``op``); a study's finals use it
    # kind=oneshot (FairNAS / SPOS / NOAH): a supernet trained on train through single paths, an evolution of
    # policies scored on val with its inherited weights, the top-k and the single-op policies retrained alone
    # under successive halving and picked on val
    supernet: Literal["fair", "uniform"] = "fair"  # fair: every op of every layer once per step; uniform: one path
    supernet_epochs: int | None = Field(None, ge=1, le=10_000)  # None: what the budget leaves after verification
    generations: int = Field(4, ge=0, le=1000)  # evolution generations after the initial population
    mutation_prob: float = Field(0.1, gt=0, le=1)  # per layer, of a mutated child
    crossover: int | None = Field(None, ge=0, le=10_000)  # children by crossover per generation; None: population//2
    eval_images: int | None = Field(None, ge=1)  # val forward images of the evolution; None: every planned policy
    top_k: int = Field(3, ge=1, le=64)  # inherited-weight winners that go to verification (plus the single ops)
    rungs: list[int] = Field(default_factory=lambda: [5, 15, 30])  # epochs per successive-halving rung (capped
    # by train.epochs)
    eta: int = Field(2, ge=1, le=4)  # each rung keeps ceil(n / eta) candidates (1: all; with rung_score
    # extrapolated_loss every candidate then gets the two runs its score needs)
    verify_init: Literal["inherited", "scratch"] = "inherited"  # verification candidates start from the supernet's
    # weights of their path (prompts, op weights, head) or from a fresh init; the K-fold rung always from scratch
    select_folds: int | None = Field(None, ge=2, le=20)  # the last rung scored by K-fold CV over train+val
    rung_score: Literal["acc", "extrapolated_loss"] = "acc"  # how a rung ranks: val acc (ties: lower val loss), or
    # the val loss at train.epochs predicted from this rung's run and the previous rung's (a line in log-epochs
    # through the two runs' final val losses; the first rung ranks by its val loss)
    tau_policies: int = Field(16, ge=0, le=512)  # random policies trained alone for the Kendall tau (0: off)
    tau_epochs: int | None = Field(None, ge=1, le=10_000)  # their training from scratch; None: the last rung's epochs
    tau_sample: Literal["uniform", "mixed"] = "uniform"  # uniform: each layer's op at random (FairNAS); mixed: per
    # policy, op shares drawn from a Dirichlet(0.5), each layer's op from them (near-single-op policies and blends,
    # so the standalone scores spread beyond val noise)
    tau_supernets: list[Literal["fair", "uniform", "darts"]] = Field(
        default_factory=lambda: ["fair", "uniform", "darts"])  # supernets whose inherited ranking tau measures

    @field_validator("op")
    @classmethod
    def _known_op(cls, v: str) -> str:
        if v not in OPS + ("none",):
            raise ValueError(f"unknown fusion op {v!r}; choose from {list(OPS)}")
        return v

    @model_validator(mode="after")
    def _one_budget(self) -> "MethodConfig":
        if self.budget_images is not None and self.budget_seconds is not None:
            raise ValueError("give method.budget_images or method.budget_seconds, not both")
        if self.rung_score == "extrapolated_loss":
            if len(self.rungs) < 2:
                raise ValueError("rung_score extrapolated_loss needs at least two rungs (it extends a line through "
                                 "two runs' val losses)")
            if self.select_folds:
                raise ValueError("rung_score extrapolated_loss with select_folds: the K-fold rung trains from scratch, "
                                 "the rungs before it from inherited weights, so no line goes through both")
        return self

    @field_validator("rungs")
    @classmethod
    def _increasing_rungs(cls, v: list[int]) -> list[int]:
        if not v or len(v) > 8 or any(r < 1 or r > 10_000 for r in v) or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("1 to 8 strictly increasing epoch counts (1 to 10000)")
        return v

    @field_validator("tau_supernets")
    @classmethod
    def _distinct_supernets(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("tau_supernets has duplicates")
        return v

    @field_validator("policy")
    @classmethod
    def _known_policy_ops(cls, v: list[str] | None) -> list[str] | None:
        bad = [o for o in v or [] if o not in OPS + ("none",)]
        if bad or v == []:
            raise ValueError(f"policy: unknown op(s) {bad}; one of {list(OPS) + ['none']} per layer")
        return v


class ExperimentConfig(_Strict):
    """One search + retrain experiment."""

    name: str = "pfnas"
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    output_dir: str = "runs"
    backbone: BackboneConfig = Field(default_factory=lambda: BackboneConfig(**DEMO_BACKBONE))
    data: DataConfig = Field(default_factory=DataConfig)
    prompts: PromptConfig = Field(default_factory=PromptConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    pae: PAEConfig = Field(default_factory=PAEConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:  # it names the run's folder under output_dir
        return check_name("", v)

    @model_validator(mode="after")
    def _pae_needs_shared_prompts(self) -> "ExperimentConfig":
        if self.pae.enabled and self.search.per_op_prompts:
            raise ValueError("pae.enabled needs one prompt set per layer: set search.per_op_prompts false")
        prefer = self.search.select_prefer
        if prefer is not None and prefer not in self.prompts.ops:
            raise ValueError(f"search.select_prefer {prefer!r} is not a candidate op; choose from {self.prompts.ops}")
        return self


def finite_scalar(v: Any) -> bool:
    """True for a real, finite number (not a bool, None, NaN or inf): what may be logged, ranked or averaged."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line naming the first offending field, e.g. ``search.arch_lr: Input should be greater than 0``."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "__root__")
    loc = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "config"
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    elif first.get("type") == "value_error":  # our validators' own sentence, without pydantic's prefix
        msg = msg.removeprefix("Value error, ")
    more = len(err.errors()) - 1
    return f"{loc}: {msg}" + (f" (+{more} more)" if more > 0 else "")


def _set_path(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.get(k)
        if nxt is None:
            nxt = cur[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {k!r} is not a section")
        cur = nxt
    cur[keys[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings; values are parsed as YAML scalars/lists."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, val = item.split("=", 1)
        try:
            parsed = yaml.safe_load(val) if val != "" else ""
        except yaml.YAMLError:
            parsed = val
        _set_path(raw, key.strip(), parsed)
    return raw


EMBEDDED_CONFIGS = Path(__file__).with_name("configs")


def resolve_config_path(path: str | Path) -> Path:
    """A file path, or the name of an embedded config (``demo``, ``proxy``) in ``pfnas/configs``."""
    p = Path(path)
    if not p.is_file() and p.suffix == "" and (EMBEDDED_CONFIGS / f"{p.name}.yaml").is_file():
        return EMBEDDED_CONFIGS / f"{p.name}.yaml"
    return p


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = resolve_config_path(path)
    if not p.is_file():
        embedded = ", ".join(sorted(f.stem for f in EMBEDDED_CONFIGS.glob("*.yaml")))
        raise ConfigError(f"config file not found: {p} (a YAML file, or an embedded config: {embedded})")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return data


def validate(model: type[BaseModel], raw: dict[str, Any], prefix: str = ""):
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, prefix)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Build an :class:`ExperimentConfig` from an optional YAML file plus ``--set`` overrides."""
    raw = read_yaml(path) if path else {}
    return validate(ExperimentConfig, apply_overrides(raw, overrides))


def merge_dotted(cfg: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """Return a copy of ``cfg`` with dotted keys (``search.arch_lr``) replaced, validated again."""
    raw = cfg.model_dump(mode="json")
    for k, v in params.items():
        _set_path(raw, k, v)
    return validate(ExperimentConfig, raw)


# ----------------------------------------------------------------------------- result identity
# fields that cannot change a result: bookkeeping, and (below) eval cadence and fields a method does not read
_HASH_EXCLUDE = ("name", "output_dir", "device")
_BUDGET = ("budget_multiplier", "budget_images", "budget_seconds")
_METHOD_FIELDS = {"search": (), "fixed": ("op", "policy"), "probe": (), "random": ("samples", "weight_sharing", *_BUDGET),
                  "evolution": ("samples", "population", "sample_size", *_BUDGET),
                  "oneshot": ("supernet", "supernet_epochs", "population", "generations", "mutation_prob", "crossover",
                              "eval_images", "top_k", "rungs", "eta", "verify_init", "select_folds", "rung_score",
                              "tau_policies", "tau_epochs", "tau_sample", "tau_supernets", *_BUDGET)}


def result_fields(cfg: ExperimentConfig, include_seed: bool = True) -> dict[str, Any]:
    """The config as a dict of only what defines its result (no name/output_dir/device, eval cadence or fields
    its method does not read); ``include_seed=False`` also drops the seed (seeds of one configuration)."""
    d = cfg.model_dump(mode="json")
    for k in _HASH_EXCLUDE + (() if include_seed else ("seed",)):
        d.pop(k, None)
    kind = cfg.method.kind
    d["method"] = {"kind": kind, **{f: d["method"][f] for f in _METHOD_FIELDS[kind]}}
    for k in ("eval_every", "test_every", "collapse_check"):  # how a run is watched, not what it computes
        d["train"].pop(k, None)
    if kind in ("fixed", "probe"):
        d.pop("search", None)
    return d


def config_hash(cfg: ExperimentConfig, include_seed: bool = False) -> str:
    """Hash of :func:`result_fields`. Without the seed (default) runs that share it are seeds of one
    configuration (MLflow tag ``pfnas.config_hash``); with it, an output folder resumes only a run it matches."""
    import hashlib
    import json

    return hashlib.sha1(json.dumps(result_fields(cfg, include_seed), sort_keys=True).encode()).hexdigest()[:12]


def search_hash(cfg: ExperimentConfig) -> str:
    """Hash of what a search reads (:func:`result_fields` with the seed, without the retrain and the method): runs
    that share it would run the same search (``pfnas.engine.shared_search`` runs it once)."""
    import hashlib
    import json

    d = result_fields(cfg.model_copy(update={"method": MethodConfig()}), include_seed=True)
    d.pop("train", None)
    d.pop("method", None)
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def selection_hash(cfg: ExperimentConfig) -> str | None:
    """Hash of what a method's selection reads: :func:`search_hash` for a search; for random search, evolution and
    one-shot the search recipe (their budget) and the method's own fields, without the retrain (one-shot keeps
    train.epochs, which caps its rungs). Runs that share it (a
    retrain-lr grid) select the same policy and run the selection once. None for fixed policies and the probe."""
    import hashlib
    import json

    kind = cfg.method.kind
    if kind == "search":
        return search_hash(cfg)
    if kind in ("fixed", "probe"):
        return None
    d = result_fields(cfg, include_seed=True)
    train = d.pop("train", None)
    if kind == "oneshot":  # its rungs are capped by the retrain's epochs
        d["train_epochs"] = train["epochs"]
    return f"{kind}-" + hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def config_diff(a: ExperimentConfig, b: ExperimentConfig, limit: int = 3) -> str:
    """``key: a -> b`` for the first ``limit`` result fields that differ (for one-line errors)."""
    def flat(d: dict[str, Any], pre: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) and v else {f"{pre}{k}": v})
        return out

    fa, fb = flat(result_fields(a)), flat(result_fields(b))
    keys = sorted(k for k in set(fa) | set(fb) if fa.get(k, "<unset>") != fb.get(k, "<unset>"))
    parts = [f"{k}: {fa.get(k, '<unset>')} -> {fb.get(k, '<unset>')}" for k in keys[:limit]]
    return ", ".join(parts) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
