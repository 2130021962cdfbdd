"""The parts of ``method.kind: oneshot`` that are not training: the evolution of policies on inherited weights,
successive halving, the K-fold splits of train+val, the budget plan, Kendall's tau and the per-layer op
preference. The loop that trains and scores is :func:`pfnas.methods.run_method` (``_select_oneshot``).

The method (FairNAS / SPOS / NOAH lineage), all on ``train`` and ``val``, never ``test``:

1. a supernet (each op of each layer with its own prompts and weights) trained on ``train`` through single
   paths: ``fair`` (every op of every layer once per step, gradients of the K passes summed) or ``uniform``;
2. an evolution of policies (population, crossover, mutation, generations) scored on ``val`` forward only with
   the supernet's inherited weights, under a budget of val forward images;
3. the ``top_k`` policies of 2 plus the single-op policies, each trained alone on ``train`` under successive
   halving (rungs in epochs, ``ceil(n / eta)`` kept per rung) and scored on ``val`` (or the last rung by K-fold
   cross-validation over train+val, from scratch); ``verify_init: inherited`` (the default) starts each from the
   supernet's weights of its path, so a short rung ranks ops by what they become, not by how fast they leave
   their initialisation (affine and cross_attn start as the identity); the winner by val accuracy, ties by the
   lower val loss.
"""
from __future__ import annotations

import math
import random
import statistics
from dataclasses import replace
from typing import Any, Sequence

import torch

from .config import ExperimentConfig, PfnasError, finite_scalar
from .data import Split, TaskData
from .timing import steps_per_epoch


# ----------------------------------------------------------------------------- ranking
def val_rank_key(record: dict[str, Any]) -> tuple[float, float]:
    """Sort key of a scored record, larger is better: ``val_acc``, then the lower ``val_loss`` (a missing or
    non-finite loss ranks last among equal accuracies)."""
    loss = record.get("val_loss")
    return float(record["val_acc"]), -(float(loss) if finite_scalar(loss) else math.inf)


def keep_top(records: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The ``n`` best records by :func:`val_rank_key`; equal keys keep their order."""
    return sorted(records, key=val_rank_key, reverse=True)[:max(int(n), 0)]


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b of two paired samples (ties in either corrected for); None when undefined (fewer than two
    pairs, or one sample constant)."""
    if len(x) != len(y):
        raise PfnasError(f"kendall_tau needs paired samples, got {len(x)} and {len(y)} values")
    n = len(x)
    concordant = discordant = tied_x = tied_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0:
                tied_x += 1
            if dy == 0:
                tied_y += 1
            if dx and dy:
                if (dx > 0) == (dy > 0):
                    concordant += 1
                else:
                    discordant += 1
    pairs = n * (n - 1) // 2
    denom = math.sqrt((pairs - tied_x) * (pairs - tied_y))
    return (concordant - discordant) / denom if denom > 0 else None


def tau_ceiling(accs: Sequence[float], n_val: int) -> float | None:
    """The highest Kendall tau a ranking can reach against these standalone accuracies, given that each is a score
    on ``n_val`` images: their variance less the mean binomial variance ``a(1 - a) / n`` is the part a ranking can
    follow (reliability ``r``), and a correlation of sqrt(r) between two normal variables has tau
    ``2 / pi * asin(sqrt(r))``. Seed noise is not counted, so the true ceiling is lower still. None below three
    scores or when they are all equal."""
    if len(accs) < 3 or n_val < 1:
        return None
    var = statistics.variance(accs)
    if var <= 0:
        return None
    noise = statistics.fmean(a * (1 - a) for a in accs) / n_val
    r = min(max(1.0 - noise / var, 0.0), 1.0)
    return 2.0 / math.pi * math.asin(math.sqrt(r))


def layer_preference(records: Sequence[dict[str, Any]], depth: int, ops: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per layer and op: mean ``val_acc`` of the records whose policy has that op at that layer, its standard error
    over those records (None below two) and their number."""
    out: dict[str, dict[str, Any]] = {}
    for l in range(depth):
        row = {}
        for op in ops:
            vals = [float(r["val_acc"]) for r in records if r["policy"][str(l)] == op]
            row[op] = {"mean": statistics.fmean(vals) if vals else None, "n": len(vals),
                       "se": statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else None}
        out[str(l)] = row
    return out


# ----------------------------------------------------------------------------- evolution on inherited weights
def policy_key(policy: dict[Any, str]) -> tuple[str, ...]:
    return tuple(v for _, v in sorted(((int(k), v) for k, v in policy.items())))


def next_generation(parents: Sequence[dict[Any, str]], population: int, crossovers: int, mutation_prob: float,
                    ops: Sequence[str], rng: random.Random, seen: set[tuple[str, ...]]) -> list[dict[int, str]]:
    """Up to ``population`` new policies (none in ``seen``, which they join): up to ``crossovers`` by uniform
    crossover of two distinct parents, the rest by mutating one parent (each layer, with ``mutation_prob``, to
    another op); 50 draws per wanted child, so fewer when the space around the parents runs out."""
    parents = [{int(k): v for k, v in p.items()} for p in parents]
    layers = sorted(parents[0]) if parents else []

    def cross() -> dict[int, str]:
        a, b = rng.sample(parents, 2)
        return {l: rng.choice((a[l], b[l])) for l in layers}

    def mutant() -> dict[int, str]:
        p = rng.choice(parents)
        return {l: rng.choice([o for o in ops if o != p[l]]) if len(ops) > 1 and rng.random() < mutation_prob
                else p[l] for l in layers}

    def draw(make, want: int) -> list[dict[int, str]]:
        got: list[dict[int, str]] = []
        for _ in range(50 * want):
            if len(got) >= want:
                break
            child = make()
            if policy_key(child) not in seen:
                seen.add(policy_key(child))
                got.append(child)
        return got

    if not parents:
        return []
    children = draw(cross, min(crossovers, population)) if len(parents) >= 2 else []
    return children + draw(mutant, population - len(children))


# ----------------------------------------------------------------------------- successive halving and its plan
def capped_rungs(rungs: Sequence[int], max_epochs: int) -> list[int]:
    """The rungs' epochs capped by ``max_epochs`` (train.epochs), duplicates dropped."""
    return sorted({min(int(r), int(max_epochs)) for r in rungs})


def halving_schedule(n: int, rungs: Sequence[int], eta: int) -> list[int]:
    """Candidates trained at each rung: ``n``, then ``ceil(n / eta)`` of them ... ; it ends early once one is
    left (more training cannot change the choice)."""
    out: list[int] = []
    for _ in rungs:
        out.append(n)
        if n <= 1:
            break
        n = math.ceil(n / eta)
    return out


def fold_assignment(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """Fold index of each image: stratified (each class spread round-robin over the folds) in a seeded order."""
    n = int(labels.numel())
    if folds > n:
        raise PfnasError(f"method.select_folds {folds} exceeds the {n} images of train+val")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + 11))
    order = perm[torch.sort(labels.cpu()[perm], stable=True).indices]
    assign = torch.empty(n, dtype=torch.long)
    assign[order] = torch.arange(n) % folds
    return assign


def fold_task(data: TaskData, fold: int, folds: int, seed: int) -> TaskData:
    """A task whose ``train`` is train+val without fold ``fold`` and whose ``val`` is that fold; it has no other
    split (test is not in it)."""
    tr, va = data.split("train"), data.split("val")
    if tr.images.shape[1:] != va.images.shape[1:]:
        raise PfnasError("method.select_folds needs train and val images of one size (train is stored larger for "
                         "cropping here); set method.select_folds null")
    images, labels = torch.cat([tr.images, va.images]), torch.cat([tr.labels, va.labels])
    held = (fold_assignment(labels, folds, seed) == fold).to(labels.device)
    return replace(data, splits={"train": Split(images[~held], labels[~held]), "val": Split(images[held], labels[held])})


def _epoch_images(n: int, batch_size: int) -> int:
    return steps_per_epoch(n, batch_size) * (batch_size if n >= batch_size else n)


def verification_images(cfg: ExperimentConfig, data: TaskData, candidates: int) -> int:
    """Training images of the verification of ``candidates`` policies (K-fold at the last trained rung)."""
    mc, bs = cfg.method, cfg.data.batch_size
    rungs = capped_rungs(mc.rungs, cfg.train.epochs)
    sched = halving_schedule(candidates, rungs, mc.eta)
    per_epoch = _epoch_images(data.num_images("train"), bs)
    total = sum(n * e * per_epoch for n, e in zip(sched[:-1], rungs))
    last_n, last_e = sched[-1], rungs[len(sched) - 1]
    if mc.select_folds:
        n_all = data.num_images("train") + data.num_images("val")
        held = [len(range(k, n_all, mc.select_folds)) for k in range(mc.select_folds)]  # stratified sizes differ <= 1
        fold = sum(_epoch_images(n_all - h, bs) for h in held)
        total += last_n * last_e * fold
    else:
        total += last_n * last_e * per_epoch
    return total


def oneshot_plan(cfg: ExperimentConfig, data: TaskData, budget: int) -> dict[str, Any]:
    """How a one-shot run spends ``budget`` training images: the verification of at most ``top_k + len(ops)``
    candidates first (its worst case), the supernet the rest (``method.supernet_epochs``, or as many epochs as
    fit). Raises a PfnasError when the plan does not fit."""
    mc = cfg.method
    n_ops = len(cfg.prompts.ops)
    passes = n_ops if mc.supernet == "fair" else 1
    epoch = passes * _epoch_images(data.num_images("train"), cfg.data.batch_size)
    verify = max(verification_images(cfg, data, n) for n in range(1, mc.top_k + n_ops + 1))
    epochs = mc.supernet_epochs if mc.supernet_epochs is not None else (budget - verify) // epoch
    if epochs < 1 or verify + epochs * epoch > budget:
        raise PfnasError(f"budget of {budget} images cannot train the one-shot plan: verification up to {verify} "
                         f"images + supernet {max(epochs, 1)} epoch(s) x {epoch}; raise method.budget_multiplier or "
                         "lower method.supernet_epochs / top_k / rungs / select_folds")
    return {"supernet_epochs": int(epochs), "supernet_epoch_images": epoch, "supernet_passes": passes,
            "verification_images_max": verify, "rungs": capped_rungs(mc.rungs, cfg.train.epochs)}
