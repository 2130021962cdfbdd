"""Selection rules of a study: trial records read from Tune's results, the finished trials, the selected one
(best metric on validation; ties to the lower val loss, then the earliest trial) and the Pareto front."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..tracking import finite_scalar, mean_std, pareto_front
from .trial import error_line, trial_run_name


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
    retries: int = 0  # times Tune retried it after a failure (a killed worker), from its last checkpoint
    retry_error: str | None = None  # the failure it was last retried after

    @property
    def name(self) -> str:
        """``t03``: its MLflow run name, and its name in every table."""
        return trial_run_name(self.index, self.trial_id)


@dataclass
class FinalsRecord:
    """Test scores of a study's finals: the selected trial's config and policy, retrained on train+val."""

    trial_id: str
    seeds: list[int]
    test_accs: list[float]
    errors: list[tuple[int, str]] = field(default_factory=list)
    label: str = ""  # per-variant finals: the variant's overrides
    name: str = ""  # the finalised trial's name (``t03``)
    diverged: list[int] = field(default_factory=list)  # seeds whose training diverged on train+val (NaN, collapse)
    replaced: list[str] = field(default_factory=list)  # names of the better-by-val trials whose finals diverged

    def mean_std(self) -> tuple[float, float]:
        return mean_std(self.test_accs)

    def describe(self) -> str:
        mean, std = self.mean_std()
        return (f"test_acc {mean:.4f} ± {std:.4f} (n={len(self.test_accs)}, trial {self.name or self.trial_id}'s "
                "config and policy retrained on train+val, tested once per seed)")


def records(results, objectives: list[str], param_keys: list[str],
             retries: dict[str, tuple[int, str | None]] | None = None) -> list[TrialRecord]:
    """One record per Tune result; ``retries``: trial id -> (times retried after a failure, that failure's line)."""
    recs = []
    for r in results:
        name = Path(str(r.path)).name
        m = re.match(r"(\d+)_(\w+)$", name)
        idx, tid = (int(m.group(1)), m.group(2)) if m else (0, r.metrics.get("trial_id", name))
        metrics = dict(r.metrics or {})
        if r.error is not None:
            status, err = "ERROR", error_line(r.error)
        elif metrics.get("error"):  # failed deterministically (NaN): ended by the trial itself, not retried
            status, err = "ERROR", error_line(metrics["error"])
        else:
            status, err = ("TERMINATED" if metrics.get("complete") else "STOPPED"), None
        vals = [metrics.get(m) for m in objectives]
        ok = status != "ERROR" and all(finite_scalar(v) for v in vals)
        val = float(vals[0]) if status != "ERROR" and finite_scalar(vals[0]) else None
        params = {k: (r.config or {}).get(k) for k in param_keys}
        n, why = (retries or {}).get(tid, (0, None))
        recs.append(TrialRecord(idx, tid, status, params, val, metrics, err, [float(v) for v in vals] if ok else None,
                                n, why))
    return sorted(recs, key=lambda x: (x.index, x.trial_id))


def pareto_trials(recs: list[TrialRecord], modes: list[str]) -> list[TrialRecord]:
    """Finished trials on the Pareto front of the objectives (by index order)."""
    done = [r for r in recs if r.status == "TERMINATED" and r.values is not None]
    return [done[i] for i in pareto_front([r.values for r in done], modes)]


def finished(recs: list[TrialRecord]) -> list[TrialRecord]:
    """Trials that ran to the end and reported the study metric (the candidates for selection)."""
    return [r for r in recs if r.status == "TERMINATED" and r.value is not None]


def ranked(recs: list[TrialRecord], mode: str, metric: str = "val_acc") -> list[TrialRecord]:
    """Finished trials, best ``metric`` first. An accuracy on a small val split ties often (val200 moves in steps
    of half a point); ties on ``val_acc`` go to the lower val loss of the same split, then to the earliest trial."""
    sign = 1 if mode == "max" else -1
    return sorted(finished(recs), key=lambda r: (-sign * r.value, tie_loss(r, metric), r.index))


def best_trial(recs: list[TrialRecord], mode: str, metric: str = "val_acc") -> TrialRecord | None:
    """The selected trial: the first of :func:`ranked`."""
    order = ranked(recs, mode, metric)
    return order[0] if order else None


def tie_loss(r: TrialRecord, metric: str) -> float:
    """A trial's val loss when ``metric`` is val_acc (inf where none is known): what breaks its ties. Studies
    started before trials reported ``val_loss`` have the last retrain epoch's."""
    loss = r.metrics.get("val_loss", r.metrics.get("retrain/val_loss"))
    return float(loss) if metric == "val_acc" and finite_scalar(loss) else math.inf
