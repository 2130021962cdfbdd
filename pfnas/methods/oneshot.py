"""``method.kind: oneshot``: the supernet, the evolution of policies on inherited weights, successive halving,
the K-fold splits of train+val, the budget plan, Kendall's tau and the per-layer op preference. Its loop is
:func:`select_oneshot`, run by :func:`pfnas.methods.run_method`.

The method (FairNAS / SPOS / NOAH lineage), all on ``train`` and ``val``, never ``test``:

1. a supernet (each op of each layer with its own prompts and weights) trained on ``train`` through single
   paths: ``fair`` (every op of every layer once per step; each op's gradient from its pass, the shared head's the
   mean of the K passes') or ``uniform``;
2. an evolution of policies (population, crossover, mutation, generations) scored on ``val`` forward only with
   the supernet's inherited weights, under a budget of val forward images;
3. the ``top_k`` policies of 2 plus the single-op policies, each trained alone on ``train`` under successive
   halving (rungs in epochs, ``ceil(n / eta)`` kept per rung) and scored on ``val`` (or the last rung by K-fold
   cross-validation over train+val, from scratch); ``verify_init: inherited`` (the default) starts each from the
   supernet's weights of its path, so a short rung does not rank ops by how fast they leave their initialisation
   (affine and cross_attn start as the identity); it still favours the op that learns fastest (prepend), whose
   lead after 2-8 epochs is not the order after 30 (docs/results/equal-effort.md); the winner by val accuracy,
   ties by the lower val loss.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import ExperimentConfig, PfnasError
from ..data import Split, TaskData
from ..engine import Experiment, OneShotPhase, fit, inherited_score, inherited_state, run_search
from ..model import PromptedViT
from ..timing import steps_per_epoch
from .budget import (best_record, emit, epoch_images, keep_top, load_state, loop_fingerprint, policy_int, policy_json,
                     resolve_budget, save_state, say, search_cost, train_candidate, val_rank_key)
from .discrete import sample_policies


# ----------------------------------------------------------------------------- diagnostics
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
def mixed_policies(n: int, depth: int, ops: Sequence[str], rng: random.Random,
                   concentration: float = 0.5) -> list[dict[int, str]]:
    """``n`` distinct policies (while the space allows), each with its own op shares drawn from a symmetric
    Dirichlet(``concentration``) and each layer's op drawn from those shares: near-single-op policies, pairs and
    blends, where uniform sampling gives policies of about ``depth / len(ops)`` layers of every op."""
    out, seen = [], set()
    space = len(ops) ** depth
    while len(out) < n:
        g = [rng.gammavariate(concentration, 1.0) for _ in ops]
        total = sum(g) or 1.0
        p = {l: rng.choices(list(ops), weights=[x / total for x in g])[0] for l in range(depth)}
        key = policy_key(p)
        if key in seen and len(seen) < space:
            continue
        seen.add(key)
        out.append(p)
    return out


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


def extrapolated_loss(prev: tuple[int, float], cur: tuple[int, float], target: int) -> float:
    """The val loss after ``target`` epochs predicted from two separate runs, each annealed over its own length:
    ``(epochs, final val loss)`` of the shorter and the longer; a line in log-epochs through both, read at
    ``target`` (the longer run's loss when it already trained ``target`` epochs). Non-finite losses give inf."""
    (e0, l0), (e1, l1) = prev, cur
    if not (math.isfinite(l0) and math.isfinite(l1)) or e1 <= e0:
        return math.inf
    return l1 + (l1 - l0) * math.log(max(target, e1) / e1) / math.log(e1 / e0)


def rung_rank_key(record: dict[str, Any]) -> tuple[float, float, float]:
    """Sort key of a verification record, larger is better: the lower ``score`` (a predicted val loss) when the
    record has one, then :func:`val_rank_key`."""
    score = record.get("score")
    return (-score if score is not None else 0.0, *val_rank_key(record))


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


def verification_images(cfg: ExperimentConfig, data: TaskData, candidates: int) -> int:
    """Training images of the verification of ``candidates`` policies (K-fold at the last trained rung)."""
    mc, bs = cfg.method, cfg.data.batch_size
    rungs = capped_rungs(mc.rungs, cfg.train.epochs)
    sched = halving_schedule(candidates, rungs, mc.eta)
    per_epoch = epoch_images(data.num_images("train"), bs)
    total = sum(n * e * per_epoch for n, e in zip(sched[:-1], rungs))
    last_n, last_e = sched[-1], rungs[len(sched) - 1]
    if mc.select_folds:
        n_all = data.num_images("train") + data.num_images("val")
        held = [len(range(k, n_all, mc.select_folds)) for k in range(mc.select_folds)]  # stratified sizes differ <= 1
        fold = sum(epoch_images(n_all - h, bs) for h in held)
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
    epoch = passes * epoch_images(data.num_images("train"), cfg.data.batch_size)
    rungs = capped_rungs(mc.rungs, cfg.train.epochs)
    if mc.rung_score == "extrapolated_loss" and len(rungs) < 2:
        raise PfnasError(f"method.rung_score extrapolated_loss needs two rungs, and train.epochs {cfg.train.epochs} "
                         f"caps method.rungs {mc.rungs} to {rungs}; lower the rungs below train.epochs")
    verify = max(verification_images(cfg, data, n) for n in range(1, mc.top_k + n_ops + 1))
    epochs = mc.supernet_epochs if mc.supernet_epochs is not None else (budget - verify) // epoch
    if epochs < 1 or verify + epochs * epoch > budget:
        raise PfnasError(f"budget of {budget} images cannot train the one-shot plan: verification up to {verify} "
                         f"images + supernet {max(epochs, 1)} epoch(s) x {epoch}; raise method.budget_multiplier or "
                         "lower method.supernet_epochs / top_k / rungs / select_folds")
    return {"supernet_epochs": int(epochs), "supernet_epoch_images": epoch, "supernet_passes": passes,
            "verification_images_max": verify, "rungs": rungs}


# ----------------------------------------------------------------------------- the loop (FairNAS / SPOS / NOAH)
def _alone(exp: Experiment, out: Path, st: dict[str, Any], policy: dict[int, str], epochs: int,
           fold: tuple[int, Experiment] | None = None, supernet: PromptedViT | None = None) -> tuple[dict[str, Any], bool]:
    """``policy`` trained alone on ``train`` for ``epochs`` epochs and scored on ``val`` (``fold``: (index,
    experiment on that fold's task)), from scratch or, given a ``supernet``, from its inherited weights; kept in
    ``st["alone"]``, so a policy met again (a tau sample that is also a candidate, a resumed run) is trained once.
    Returns (record, trained now)."""
    folds = exp.cfg.method.select_folds
    if supernet is not None and fold is not None:
        raise PfnasError("a K-fold rung trains from scratch (the supernet has seen its held-out fold)")
    name = (hashlib.sha1(json.dumps(policy_json(policy)).encode()).hexdigest()[:10] + f"-e{epochs}"
            + (f"-fold{fold[0]}of{folds}" if fold is not None else "") + ("-inh" if supernet is not None else ""))
    done = st.setdefault("alone", {})
    if name in done:
        return done[name], False
    e = fold[1] if fold is not None else exp
    steps = epochs * steps_per_epoch(e.data.num_images("train"), exp.cfg.data.batch_size)
    init = inherited_state(supernet, policy) if supernet is not None else None
    done[name] = {"name": name, "n_val": e.data.num_images("val"), "init": "scratch" if init is None else "inherited",
                  **train_candidate(e, policy, out / "alone" / name, steps, init)}
    save_state(out, st)
    return done[name], True


def train_supernet(exp: Experiment, folder: Path, paths: str, epochs: int, on_epoch, progress) -> OneShotPhase:
    """A one-shot supernet (each op its own prompts) trained on ``train`` in ``folder`` (checkpointed, resumable)."""
    model = exp.supernet(per_op_prompts=True)
    phase = OneShotPhase(exp.cfg, model, exp.data, exp.device, epochs, paths)
    folder.mkdir(parents=True, exist_ok=True)
    fit(phase, folder / "supernet.pt", on_epoch, folder / "log.jsonl", progress)
    return phase


def _inherited(exp: Experiment, model: PromptedViT, policy: dict, rec_id: int) -> dict[str, Any]:
    idx = [model.candidates.index(policy[l]) for l in range(model.depth)]
    ev = inherited_score(model, idx, exp.data, "val", exp.cfg.data.eval_batch_size, exp.device, exp.cfg.precision)
    return {"id": rec_id, "policy": policy_json(policy), "val_acc": ev["acc"], "val_loss": ev["loss"]}


def _inherited_evolution(exp: Experiment, model: PromptedViT, out: Path, st: dict[str, Any], eval_budget: int,
                         on_epoch) -> list[dict[str, Any]]:
    """Evolution of policies scored on ``val`` with the supernet's inherited weights (forward only): a random
    population, then ``method.generations`` generations of crossover and mutation children of the best half of
    everything scored; a policy is scored once; stops before ``eval_budget`` val images would be exceeded.
    The generation being scored is kept in ``st["pending"]``, so a resumed run continues it."""
    cfg, mc = exp.cfg, exp.cfg.method
    ops, depth, n_val = list(cfg.prompts.ops), model.depth, exp.data.num_images("val")
    recs = st.setdefault("inherited", [])
    while not st.get("evolution_done"):
        if "pending" not in st:
            g = st.get("generation", -1) + 1
            if g == 0:
                pols = sample_policies(min(mc.population, len(ops) ** depth), depth, ops,
                                       random.Random(f"pfnas-oneshot-init-{cfg.seed}"))
            elif g <= mc.generations:
                seen = {policy_key(r["policy"]) for r in recs}
                crossovers = mc.population // 2 if mc.crossover is None else mc.crossover
                pols = next_generation([r["policy"] for r in keep_top(recs, max(2, mc.population // 2))],
                                       mc.population, crossovers, mc.mutation_prob, ops,
                                       random.Random(f"pfnas-oneshot-gen-{cfg.seed}-{g}"), seen)
            else:
                pols = []
            if not pols:
                st["evolution_done"] = True
                break
            st["pending"] = {"generation": g, "policies": [policy_json(p) for p in pols]}
            save_state(out, st)
        g, pols = st["pending"]["generation"], st["pending"]["policies"]
        scored = [r for r in recs if r["generation"] == g]
        for p in pols[len(scored):]:
            if (len(recs) + 1) * n_val > eval_budget:
                st["evolution_done"] = True
                break
            recs.append({**_inherited(exp, model, policy_int(p), len(recs)), "generation": g})
            save_state(out, st)
        gen = [r for r in recs if r["generation"] == g]
        if gen:
            emit(on_epoch, {"phase": "oneshot_evolution", "epoch": g, "generation": g, "policies": len(gen),
                             "mean_val_acc": statistics.fmean(r["val_acc"] for r in gen),
                             "best_val_acc": best_record(recs)["val_acc"], "eval_images": len(recs) * n_val,
                             "eval_budget_images": eval_budget})
        st.pop("pending")
        st["generation"] = g
        save_state(out, st)
    return recs


def _verify(exp: Experiment, out: Path, st: dict[str, Any], candidates: list[dict[int, str]], rungs: list[int],
            on_epoch, spent: int, budget: int, supernet: PromptedViT | None = None) -> list[dict[str, Any]]:
    """Successive halving over ``candidates``, each trained alone at each rung (from ``supernet``'s inherited
    weights when given, else from scratch); the last trained rung is scored by K-fold cross-validation over
    train+val, from scratch, when ``method.select_folds`` is set. A rung keeps its best by :func:`rung_rank_key`:
    val acc, or with ``method.rung_score: extrapolated_loss`` the ``score`` of each record (its val loss at the
    first rung, then the val loss at ``train.epochs`` extrapolated from this rung's run and the previous rung's
    run of the same candidate; no extra training). Returns every rung's records."""
    cfg, mc = exp.cfg, exp.cfg.method
    sched = halving_schedule(len(candidates), rungs, mc.eta)
    folds = {}
    if mc.select_folds:
        folds = {k: Experiment(cfg, exp.backbone, fold_task(exp.data, k, mc.select_folds, cfg.seed), exp.device)
                 for k in range(mc.select_folds)}
    alive, history, counted = list(range(len(candidates))), [], {}  # run name -> its training images
    for r, n in enumerate(sched):
        last, epochs, rung = r == len(sched) - 1, rungs[r], []
        for i in alive[:n]:
            policy = candidates[i]
            parts = ([_alone(exp, out, st, policy, epochs, (k, folds[k])) for k in sorted(folds)] if last and folds
                     else [_alone(exp, out, st, policy, epochs, supernet=supernet)])
            recs = [p[0] for p in parts]
            rec = {"candidate": i, "rung": r, "epochs": epochs, "policy": policy_json(policy),
                   "val_acc": statistics.fmean(x["val_acc"] for x in recs),
                   "val_loss": statistics.fmean(x["val_loss"] for x in recs),
                   "images": sum(x["images"] for x in recs), "time_s": sum(x["time_s"] for x in recs),
                   "eval_images": sum(x["n_val"] for x in recs), "runs": [x["name"] for x in recs],
                   **({"folds": len(recs), "fold_val_acc": [x["val_acc"] for x in recs]} if last and folds else {})}
            if mc.rung_score == "extrapolated_loss":
                prev = [h for h in history if h["candidate"] == i and h["rung"] == r - 1]
                rec["score"] = (extrapolated_loss((prev[0]["epochs"], prev[0]["val_loss"]), (epochs, rec["val_loss"]),
                                                  cfg.train.epochs) if prev else
                                rec["val_loss"] if math.isfinite(rec["val_loss"]) else math.inf)
            rung.append(rec)
            counted.update((x["name"], x["images"]) for x in recs)
            if any(p[1] for p in parts):
                emit(on_epoch, {"phase": "oneshot_verify", "candidate": len(history) + len(rung) - 1, "rung": r,
                                 "epochs": epochs, "val_acc": rec["val_acc"], "val_loss": rec["val_loss"],
                                 **({"score": rec["score"]} if "score" in rec else {}),
                                 "cost_images": spent + sum(counted.values()),
                                 "budget_images": budget})
        history += rung
        alive = [rec["candidate"] for rec in sorted(rung, key=rung_rank_key, reverse=True)[:math.ceil(n / mc.eta)]]
    return history


def _tau_diagnostic(exp: Experiment, out: Path, st: dict[str, Any], own: PromptedViT, epochs: int, rung_epochs: int,
                    on_epoch, progress) -> dict[str, Any]:
    """Kendall tau between inherited-weight and standalone val accuracy of ``method.tau_policies`` random policies
    (``method.tau_sample``: uniform or :func:`mixed_policies`; each trained alone from scratch for ``rung_epochs``:
    ``method.tau_epochs``, else the last rung's) for every supernet of ``method.tau_supernets`` (the method's
    own is reused; the others are trained here for the same epochs; ``darts`` is the differentiable search's
    supernet of ``search.*``). A diagnostic: it never feeds the choice."""
    cfg, mc = exp.cfg, exp.cfg.method
    ops, depth = list(cfg.prompts.ops), own.depth
    tau_st = st.setdefault("tau", {"inherited": {}})
    if "policies" not in tau_st:
        draw = mixed_policies if mc.tau_sample == "mixed" else sample_policies
        pols = draw(min(mc.tau_policies, len(ops) ** depth), depth, ops, random.Random(f"pfnas-oneshot-tau-{cfg.seed}"))
        tau_st["policies"] = [policy_json(p) for p in pols]
        save_state(out, st)
    policies = [policy_int(p) for p in tau_st["policies"]]
    alone = [_alone(exp, out, st, p, rung_epochs)[0] for p in policies]
    taus, extra_images, extra_s = {}, 0, 0.0
    for kind in mc.tau_supernets:
        if kind not in tau_st["inherited"]:
            def relay(m, kind=kind):
                emit(on_epoch, {k: v for k, v in {**m, "phase": f"tau_{kind}"}.items() if k not in ("alpha", "policy")})

            if kind == mc.supernet:
                model = own
            elif kind == "darts":
                model = run_search(exp, out / "tau_darts", relay, progress).model
            else:
                model = train_supernet(exp, out / f"tau_{kind}", kind, epochs, relay, progress).model
            tau_st["inherited"][kind] = [_inherited(exp, model, p, i) for i, p in enumerate(policies)]
            save_state(out, st)
        if kind != mc.supernet:  # a diagnostic's own training, reported apart from the method's cost
            log = out / f"tau_{kind}" / "log.jsonl"
            hist = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
            extra_s += sum(h.get("epoch_time_s", 0.0) for h in hist)
            extra_images += (search_cost(cfg, exp.data)["total"] if kind == "darts"
                             else sum(h.get("images", 0) for h in hist[-1:]))
        taus[kind] = kendall_tau([r["val_acc"] for r in tau_st["inherited"][kind]], [r["val_acc"] for r in alone])
    return {"kendall_tau_by_supernet": taus, "tau_policies": len(policies), "tau_rung_epochs": rung_epochs,
            "tau_ceiling": tau_ceiling([r["val_acc"] for r in alone], exp.data.num_images("val")),
            "tau_standalone": [{"policy": r["policy"], "val_acc": r["val_acc"], "val_loss": r["val_loss"]}
                               for r in alone],
            "tau_inherited": tau_st["inherited"], "tau_runs": [r["name"] for r in alone],
            "tau_supernet_images": extra_images, "tau_supernet_step_s": extra_s}


def select_oneshot(exp: Experiment, out: Path, on_epoch, progress, cycles=None) -> dict[str, Any]:
    """``method.kind: oneshot`` (the module docstring): supernet, evolution on inherited weights, verification
    by successive halving, diagnostics. Cost: the supernet's training images (a fair step on B images counts K * B)
    + the verification's; ``eval_images``: val forward images (inherited scores and the verification's scores)."""
    cfg, data, mc = exp.cfg, exp.data, exp.cfg.method
    ops, depth, n_val = list(cfg.prompts.ops), len(exp.backbone.blocks), data.num_images("val")
    st = load_state(out, loop_fingerprint(cfg))
    budget = resolve_budget(exp, st)
    plan = oneshot_plan(cfg, data, budget)
    eval_budget = mc.eval_images or min(mc.population, len(ops) ** depth) * (mc.generations + 1) * n_val
    if eval_budget < n_val:
        raise PfnasError(f"method.eval_images {eval_budget} is less than one pass over val ({n_val} images)")
    sup = train_supernet(exp, out / "supernet", mc.supernet, plan["supernet_epochs"],
                          lambda m: emit(on_epoch, {**m, "budget_images": budget}), progress)
    model = sup.model
    inherited = _inherited_evolution(exp, model, out, st, eval_budget, on_epoch)
    candidates, seen = [], set()
    for p in [r["policy"] for r in keep_top(inherited, mc.top_k)] + [{l: op for l in range(depth)} for op in ops]:
        if policy_key(p) not in seen:
            seen.add(policy_key(p))
            candidates.append(policy_int(p))
    history = _verify(exp, out, st, candidates, plan["rungs"], on_epoch, sup.images, budget,
                      model if mc.verify_init == "inherited" else None)
    last_rung = max(h["rung"] for h in history)
    winner = max([h for h in history if h["rung"] == last_rung], key=rung_rank_key)
    runs = {name for h in history for name in h["runs"]}
    verify_images = sum(st["alone"][n]["images"] for n in runs)
    res = {"policy": winner["policy"], "supernet": mc.supernet, "verify_init": mc.verify_init, "select_val_acc": winner["val_acc"],
           "select_val_loss": winner["val_loss"], "select_score": winner.get("score"), "selected": winner["candidate"],
           "rung_score": mc.rung_score,
           "cost_images": sup.images + verify_images,
           "cost_step_s": sum(h["epoch_time_s"] for h in sup.history) + sum(st["alone"][n]["time_s"] for n in runs),
           "cost_breakdown": {"supernet_images": sup.images, "verification_images": verify_images,
                              "supernet_epochs": plan["supernet_epochs"], "supernet_passes": plan["supernet_passes"]},
           "budget_images": budget, "eval_budget_images": eval_budget, "inherited_eval_images": len(inherited) * n_val,
           "eval_images": len(inherited) * n_val + sum(h["eval_images"] for h in history),
           "rungs": plan["rungs"], "candidates": [policy_json(c) for c in candidates], "history": history,
           "inherited": inherited, "supernet_history": sup.history, "kendall_tau": None, "kendall_tau_by_supernet": {}}
    pref_records = list(inherited)
    if mc.tau_policies:
        diag = _tau_diagnostic(exp, out, st, model, plan["supernet_epochs"], mc.tau_epochs or plan["rungs"][-1],
                               on_epoch, progress)
        res.update(diag, kendall_tau=diag["kendall_tau_by_supernet"].get(mc.supernet))
        tau_only = set(diag["tau_runs"]) - runs
        res["diagnostic_images"] = sum(st["alone"][n]["images"] for n in tau_only) + diag["tau_supernet_images"]
        known = {policy_key(r["policy"]) for r in pref_records}
        pref_records += [r for r in diag["tau_inherited"].get(mc.supernet, []) if policy_key(r["policy"]) not in known]
    res["layer_preference"] = layer_preference(pref_records, depth, ops)
    diag_metrics = {f"kendall_tau_{k}": v for k, v in res["kendall_tau_by_supernet"].items() if v is not None}
    if res.get("tau_ceiling") is not None:
        diag_metrics["tau_ceiling"] = res["tau_ceiling"]
    for l, row in res["layer_preference"].items():
        for op, v in row.items():
            diag_metrics.update({f"pref_l{l}_{op}": v["mean"], f"pref_l{l}_{op}_se": v["se"]})
    emit(on_epoch, {"phase": "oneshot", "epoch": 0, "select_val_acc": winner["val_acc"],
                     "cost_images": res["cost_images"], "eval_images": res["eval_images"], **diag_metrics})
    say(progress, f"one-shot: {winner['policy']} val acc {winner['val_acc']:.4f}; kendall tau {res['kendall_tau']}")
    return res
