"""What a config and its metrics become in MLflow and in tables: params, labels, formatting, and the
statistics the study summary and ``pfnas compare`` share (Pareto front, policy agreement, mean and std)."""
from __future__ import annotations

import json
import math
import re
from typing import Any

from pfnas.config import ExperimentConfig, finite_scalar  # noqa: F401 (re-exported)


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


# what the runs table shows as param columns besides a study's tuned keys (the full config is config.yaml)
CURATED_PARAMS = ("method.kind", "method.op", "method.policy", "method.weight_sharing", "method.supernet",
                  "search.mode", "prompts.length", "search.arch_lr", "search.optim.lr", "train.optim.lr", "train.stage",
                  "seed", "data.task")


def curated_params(cfg: ExperimentConfig, tuned: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """The few config values a run logs as MLflow params: ``tuned`` keys first (a study's searched values, its
    variants' overrides), then :data:`CURATED_PARAMS` that are set (what names the method, the prompt length, the
    lrs); the whole config is the run's ``config.yaml`` artifact."""
    flat = config_params(cfg)
    keys = [k for k in tuned if k in flat]
    keys += [k for k in CURATED_PARAMS if flat.get(k, "None") not in ("None", "null")]
    return {k: flat[k] for k in dict.fromkeys(keys)}


def method_label(cfg: ExperimentConfig) -> str:
    """Short name of what ``cfg`` runs: ``search``, ``fixed:prepend``, ``probe``, ``random+ws``..."""
    m = cfg.method
    if m.kind == "search":
        return "search" + {"gumbel": "-gdas", "sigmoid": "-sigmoid"}.get(cfg.search.mode, "")
    if m.kind == "fixed":
        return "fixed:policy" if m.policy else f"fixed:{m.op}"
    if m.kind == "random":
        return "random" + ("+ws" if m.weight_sharing else "")
    if m.kind == "oneshot":
        return "oneshot" + ("-uniform" if m.supernet == "uniform" else "")
    return m.kind


TEST_NAME = re.compile(r"(^|[/_.])test($|[/_.])")


def reads_test(metric: str) -> bool:
    """True for a metric computed on the test split (``test_acc``, ``retrain/test_loss``...)."""
    return bool(TEST_NAME.search(metric))


# what a finished trial reports (its last result; ``test_acc`` only in finals) and which way is better
RESULT_METRICS = {"test_acc": "max", "val_acc": "max", "val_loss": "min", "select_val_acc": "max",
                  "tuned_params": "min", "tuned_percent": "min", "cost_images": "min", "cost_step_s": "min",
                  "infer_images_per_s": "max", "infer_ms_per_image": "min", "search_time_s": "min",
                  "retrain_time_s": "min", "time_s": "min"}


def metric_mode(metric: str) -> str | None:
    """``max``/``min``: the direction in which ``metric`` improves, for a result metric or a phase's epoch metric
    (``retrain/val_loss``: by its last name part, ``*_acc`` up, ``*_loss`` down); None where it is not known."""
    leaf = metric.rsplit("/", 1)[-1]
    if leaf in RESULT_METRICS:
        return RESULT_METRICS[leaf]
    return "max" if leaf.endswith("_acc") else "min" if leaf.endswith("_loss") else None


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


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def human_count(n: float | None) -> str:
    """A count for a table cell: ``1.23M``, ``45.6k``, ``789``; ``-`` when unknown or not finite."""
    if n is None or not math.isfinite(n):
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"
