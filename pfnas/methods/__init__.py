"""Every `method.kind` behind one entry, :func:`run_method`: the differentiable search, fixed single-op policies,
the linear probe, and the discrete baselines compared with the search at the same budget.

Budget and cost are counted in images processed by a training (forward + backward) pass:

* budget = the search's ``cost_images`` (below) x ``method.budget_multiplier``, so a baseline trains on
  as many images as the differentiable search it is compared with; or ``method.budget_images``; or
  ``method.budget_seconds`` of training steps, turned into images once with a measured candidate step
  (a soft DARTS step runs every op, so an image of search costs more than an image of a candidate:
  compare methods on both units);
* the search's ``cost_images`` = weight-step images on ``train`` + images of the ``val`` batches
  used by alpha steps (one every ``search.arch_every`` weight steps) + three extra ``train`` batches
  per alpha step when ``search.order == 2`` (unrolled gradient and the two finite-difference
  passes); see :func:`search_cost`;
* a discrete baseline's ``cost_images`` = the images its candidates (or its weight-sharing
  supernet) were trained on. Forward-only scoring passes on ``val`` are reported apart as
  ``eval_images`` (the search's per-epoch val evaluation is not counted either);
* ``cost_step_s`` = the measured wall time of those training steps (the search's weight + arch steps,
  the candidates' or the shared supernet's steps), the same cost in seconds;
* the final retrain of the selected policy is identical for every method and is not part of the cost.
  Fixed policies and the linear probe select nothing: cost 0.

Every method writes into ``out_dir``: ``state.json`` (the selection loop), one subfolder per
candidate (``cand_000/`` ... with the engine's checkpoint), ``shared/`` (weight-sharing supernet),
``retrain/`` (final policy) and ``result.json``. Rerunning the same call continues where it stopped. Runs that
differ only in the retrain (a study's lr grid) can share one selection loop through a cache folder
(``run_method(search_cache=...)``), which each then copies into its own ``out_dir``.
"""
from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from ..config import ExperimentConfig, PfnasError, merge_dotted, selection_hash
from ..engine import (EpochCallback, Experiment, backbone_param_count, claim_run_dir, run_experiment, run_retrain,
                      waiting_lock)
from ..export import model_files
from ..runtime import write_atomic
from .budget import (PATH_LOGIT, BudgetPhase, SharedPhase, budget_images, emit, epoch_images, measure_step_seconds,
                     policy_int, policy_json, resolve_budget, search_cost, set_path, with_selection_progress)
from .discrete import (age_out, evolution_step, mutate, random_policy, regularized_evolution_step, sample_policies,
                       select_evolution, select_random)
from .oneshot import select_oneshot

__all__ = ["run_method", "fixed_baseline", "random_search", "regularized_evolution", "budget_images", "search_cost",
           "resolve_budget", "measure_step_seconds", "BudgetPhase", "SharedPhase", "set_path", "PATH_LOGIT",
           "random_policy", "sample_policies", "mutate", "evolution_step", "age_out", "regularized_evolution_step"]


# ----------------------------------------------------------------------------- retrain and the search
def _finish(exp: Experiment, out: Path, policy: dict[int, str], on_epoch: EpochCallback | None, progress: bool,
            res: dict[str, Any], t0: float) -> dict[str, Any]:
    """Retrain ``policy`` on the splits of ``train.stage``, score it and write ``result.json``.

    ``res`` carries the method's own selection record (``select_val_acc``: the score that picked the policy);
    the retrained policy's score is ``val_acc`` (stage select) or ``test_acc`` (stage final).
    """
    phase = run_retrain(exp, policy, out / "retrain", on_epoch, progress)
    tuned = phase.model.tuned_parameter_count()
    last = phase.history[-1]
    res = {"method": exp.cfg.method.kind, "seed": exp.cfg.seed, "stage": exp.cfg.train.stage,
           "policy": policy_json(policy), "select_val_acc": None, "cost_images": 0, "cost_step_s": 0.0,
           "budget_images": budget_images(exp.cfg, exp.data), "eval_images": 0, "history": [],
           **res, "val_acc": last.get("val_acc"), "val_loss": last.get("val_loss"), "test_acc": last.get("test_acc"),
           "tuned_params": tuned,
           "tuned_percent": 100.0 * tuned / backbone_param_count(exp.backbone),
           "retrain_history": phase.history, **(phase.inference or {}), "time_s": time.perf_counter() - t0,
           "model_dir": str((out / "retrain").resolve()),
           "model_files": model_files(out / "retrain")}
    (out / "result.json").write_text(json.dumps(res, indent=1, default=str))
    return res


def _run_search(exp: Experiment, out: Path, on_epoch, progress, t0, search_cache=None) -> dict[str, Any]:
    r = run_experiment(exp.cfg, out, on_epoch, progress, exp=exp, search_cache=search_cache)
    cost = search_cost(exp.cfg, exp.data)
    res = {"method": "search", "seed": exp.cfg.seed, **r.to_json(), "select_val_acc": r.search_val_acc,
           "cost_images": cost["total"], "cost_step_s": sum(h["epoch_time_s"] for h in r.search_history), "cost_breakdown": cost, "budget_images": budget_images(exp.cfg, exp.data),
           "eval_images": exp.cfg.search.epochs * exp.data.num_images("val"), "history": r.search_history,
           "time_s": time.perf_counter() - t0, "model_dir": str(out.resolve()), "model_files": model_files(out)}
    (out / "result.json").write_text(json.dumps(res, indent=1, default=str))
    return res


# ----------------------------------------------------------------------------- a selection shared by a retrain grid
Selector = Callable[..., dict[str, Any]]  # (exp, out, on_epoch, progress, cycles) -> the loop's record


def _shared_selection(exp: Experiment, out: Path, cache: Path, select: Selector, on_epoch: EpochCallback | None,
                      progress: bool, cycles: int | None) -> dict[str, Any]:
    """``select`` (random search or evolution) shared by runs whose configs differ only in the retrain, as a
    study's retrain-lr grid has them: one run selects in ``cache/<selection_hash>`` while the others wait on its
    lock, then each copies the loop's files into ``out`` (``state.json`` last: it marks the copy done) and
    retrains on its own. The loop's reports are kept in the slot (``events.jsonl``) and every run reports each
    once (``out/selection_reported`` counts them across retries). A run whose ``out`` already holds a loop
    continues that one. The retrain seeds itself, so the result is the one an unshared run gets."""
    if (out / "state.json").is_file():
        return select(exp, out, on_epoch, progress, cycles)
    mark = out / "selection_reported"
    reported = int(mark.read_text()) if mark.is_file() else 0
    slot = cache / (str(selection_hash(exp.cfg)) + (f"-cycles{cycles}" if cycles is not None else ""))
    slot.mkdir(parents=True, exist_ok=True)
    events = slot / "events.jsonl"

    def catch_up() -> None:
        nonlocal reported
        lines = events.read_text().splitlines() if events.is_file() else []
        for line in lines[reported:]:
            reported += 1
            mark.write_text(str(reported))
            emit(on_epoch, json.loads(line))

    def record(m: dict[str, Any]) -> None:
        with events.open("a") as f:
            f.write(json.dumps(m, default=float) + "\n")
        catch_up()

    with waiting_lock(slot / ".lock"):
        res = select(exp, slot, record, progress, cycles)
    catch_up()
    for item in sorted(slot.iterdir()):  # the candidates' (or the supernet's) folders, then the loop's state
        if item.is_dir():
            shutil.copytree(item, out / item.name, dirs_exist_ok=True)
    write_atomic(out / "state.json", (slot / "state.json").read_bytes())
    return res


# ----------------------------------------------------------------------------- the entry point
def run_method(cfg: ExperimentConfig, out_dir: str | Path, on_epoch: EpochCallback | None = None,
               progress: bool = False, *, exp: Experiment | None = None, cycles: int | None = None,
               search_cache: str | Path | None = None) -> dict[str, Any]:
    """Run ``cfg.method.kind`` (search, fixed, probe, random, evolution, oneshot) into ``out_dir``; resumable.

    Returns the dict also written to ``out_dir/result.json``: method, seed, policy, val_acc,
    test_acc, tuned_params, tuned_percent, cost_images, budget_images, eval_images, history, ...
    ``cycles`` caps the evolution cycles on top of the budget (None: budget only). ``search_cache``: a folder where
    runs that differ only in the retrain share their selection (a search: ``engine.shared_search``; random search,
    evolution and one-shot: :func:`_shared_selection`).

    ``out_dir`` is locked for the call (a second process is refused with :class:`~pfnas.config.RunDirError`), and a
    folder holding a run of another configuration is refused rather than resumed (see ``engine.claim_run_dir``).
    """
    with claim_run_dir(cfg, out_dir) as claim:  # one process per folder; resume only the same configuration
        return _run_method(cfg, claim.path, on_epoch, progress, exp, cycles, search_cache)


def _run_method(cfg: ExperimentConfig, out: Path, on_epoch: EpochCallback | None, progress: bool,
                exp: Experiment | None, cycles: int | None, search_cache: str | Path | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    exp = exp or Experiment.build(cfg)
    kind = cfg.method.kind
    if kind == "search":
        return _run_search(exp, out, on_epoch, progress, t0, search_cache)
    if kind in ("fixed", "probe"):
        depth = len(exp.backbone.blocks)
        if kind == "fixed" and cfg.method.policy is not None:
            if len(cfg.method.policy) != depth:
                raise PfnasError(f"method.policy names {len(cfg.method.policy)} ops; the backbone has {depth} blocks")
            return _finish(exp, out, dict(enumerate(cfg.method.policy)), on_epoch, progress, {"op": "policy"}, t0)
        op = "none" if kind == "probe" else cfg.method.op
        return _finish(exp, out, {l: op for l in range(depth)}, on_epoch, progress, {"op": op}, t0)
    if kind in ("random", "evolution", "oneshot"):
        select = {"random": select_random, "evolution": select_evolution, "oneshot": select_oneshot}[kind]
        on_epoch = with_selection_progress(on_epoch, epoch_images(exp.data.num_images("train"), cfg.data.batch_size))
        if search_cache is not None:
            res = _shared_selection(exp, out, Path(search_cache), select, on_epoch, progress, cycles)
        else:
            res = select(exp, out, on_epoch, progress, cycles)
        return _finish(exp, out, policy_int(res["policy"]), on_epoch, progress, res, t0)
    raise PfnasError(f"unknown method.kind {kind!r}")


# ----------------------------------------------------------------------------- CLI entry points
_SUMMARY_KEYS = ("method", "op", "seed", "stage", "weight_sharing", "samples", "population", "sample_size", "cycles",
                 "supernet", "kendall_tau",
                 "policy", "select_val_acc", "val_acc", "test_acc", "tuned_params", "tuned_percent", "cost_images", "budget_images",
                 "time_s")


def _summary(res: dict[str, Any], out: Path) -> dict[str, Any]:
    s = {k: res[k] for k in _SUMMARY_KEYS if k in res}
    s["out_dir"] = str(out)
    return s


def _default_out(cfg: ExperimentConfig, suffix: str) -> Path:
    return Path(cfg.output_dir) / f"{cfg.name}-{suffix}"


Runner = Callable[..., dict[str, Any]]  # run_method's signature; the CLI passes an MLflow-logged one


def fixed_baseline(cfg: ExperimentConfig, op: str, seeds: int = 1, out_dir: str | Path | None = None,
                   runner: Runner = run_method) -> dict[str, Any]:
    """``op`` on every layer (``none`` = linear probe), retrained and tested for seeds ``cfg.seed + i``.

    Each seed runs in ``out_dir/seed<k>``; the summary has the mean and sample std (0 for one seed).
    """
    out = Path(out_dir) if out_dir else _default_out(cfg, "probe" if op == "none" else f"fixed-{op}")
    kind = "probe" if op == "none" else "fixed"
    runs = []
    for i in range(max(int(seeds), 1)):
        c = merge_dotted(cfg, {"seed": cfg.seed + i, "method.kind": kind, "method.op": op})
        runs.append(runner(c, out / f"seed{c.seed}", progress=True))
    key = "test_acc" if cfg.train.stage == "final" else "val_acc"  # the stage's one score
    accs = [r[key] for r in runs]
    summary = {"method": kind, "op": op, "stage": cfg.train.stage, "seeds": [r["seed"] for r in runs], f"{key}s": accs,
               f"{key}_mean": statistics.fmean(accs), f"{key}_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
               "tuned_params": runs[0]["tuned_params"], "tuned_percent": runs[0]["tuned_percent"],
               "out_dir": str(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def random_search(cfg: ExperimentConfig, samples: int = 8, weight_sharing: bool = False,
                  out_dir: str | Path | None = None, runner: Runner = run_method) -> dict[str, Any]:
    """Random search over layer policies under the search's budget (optionally with weight sharing)."""
    out = Path(out_dir) if out_dir else _default_out(cfg, "random")
    c = merge_dotted(cfg, {"method.kind": "random", "method.samples": samples, "method.weight_sharing": weight_sharing})
    return _summary(runner(c, out, progress=True), out)


def regularized_evolution(cfg: ExperimentConfig, population: int = 6, sample: int = 3, cycles: int | None = None,
                          out_dir: str | Path | None = None, runner: Runner = run_method) -> dict[str, Any]:
    """Regularized (aging) evolution under the search's budget; ``cycles`` caps the cycles as well."""
    out = Path(out_dir) if out_dir else _default_out(cfg, "evolution")
    c = merge_dotted(cfg, {"method.kind": "evolution", "method.population": population, "method.sample_size": sample})
    return _summary(runner(c, out, progress=True, cycles=cycles), out)
