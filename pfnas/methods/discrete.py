"""The discrete baselines at the search's budget: random search (each sample trained alone, or all scored
through one weight-sharing supernet) and regularized (aging) evolution, each candidate trained alone."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import PfnasError
from ..engine import Experiment, evaluate, fit
from .budget import (SharedPhase, best_record, emit, images_per_step, load_state, loop_fingerprint, policy_int,
                     policy_json, resolve_budget, save_state, say, set_path, train_candidate)


# ----------------------------------------------------------------------------- policies and evolution
def random_policy(depth: int, ops: Sequence[str], rng: random.Random) -> dict[int, str]:
    return {l: rng.choice(list(ops)) for l in range(depth)}


def sample_policies(n: int, depth: int, ops: Sequence[str], rng: random.Random) -> list[dict[int, str]]:
    """``n`` random policies, all distinct while the space (``len(ops) ** depth``) allows it."""
    space = len(ops) ** depth
    out: list[dict[int, str]] = []
    seen: set[tuple[str, ...]] = set()
    while len(out) < n:
        p = random_policy(depth, ops, rng)
        key = tuple(p[l] for l in range(depth))
        if key in seen and len(seen) < space:
            continue
        seen.add(key)
        out.append(p)
    return out


def mutate(policy: dict[int, str], ops: Sequence[str], rng: random.Random) -> dict[int, str]:
    """Copy of ``policy`` with one uniformly chosen layer switched to a different op."""
    if len(ops) < 2:
        raise PfnasError("evolution needs at least two candidate ops (prompts.ops)")
    child = {int(k): v for k, v in policy.items()}
    layer = rng.choice(sorted(child))
    child[layer] = rng.choice([o for o in ops if o != child[layer]])
    return child


def evolution_step(population: Sequence[dict[str, Any]], sample_size: int, ops: Sequence[str],
                   rng: random.Random) -> tuple[int, dict[int, str]]:
    """Tournament of regularized evolution: sample ``sample_size`` members with replacement, take the
    best ``val_acc`` (ties: the first drawn) as parent; returns (parent index, mutated child policy)."""
    drawn = rng.choices(range(len(population)), k=sample_size)
    parent = max(drawn, key=lambda i: population[i]["val_acc"])  # max keeps the first of equal values
    return parent, mutate(population[parent]["policy"], ops, rng)


def age_out(population: Sequence[Any], child: Any) -> list[Any]:
    """Append ``child`` and drop the oldest member (index 0): the population size stays constant."""
    return list(population[1:]) + [child]


def regularized_evolution_step(population: Sequence[dict[str, Any]], fitness: Callable[[dict[int, str]], float],
                               sample_size: int, ops: Sequence[str], rng: random.Random
                               ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One full cycle on in-memory members ``{"policy", "val_acc"}``: select, mutate, score, age."""
    parent, policy = evolution_step(population, sample_size, ops, rng)
    child = {"policy": policy, "val_acc": float(fitness(policy)), "parent": parent}
    return age_out(population, child), child


# ----------------------------------------------------------------------------- selection loops
def select_random(exp: Experiment, out: Path, on_epoch, progress, cycles=None) -> dict[str, Any]:
    """``method.samples`` distinct random policies. Without weight sharing each trains on ``train`` for
    ``budget // (samples * batch)`` steps and is scored on ``val``; with it one uniform single-path
    supernet trains for ``budget // batch`` steps and every sample is scored through it on ``val``."""
    cfg, data = exp.cfg, exp.data
    mc, depth, ops = cfg.method, len(exp.backbone.blocks), list(cfg.prompts.ops)
    per_step = images_per_step(data.num_images("train"), cfg.data.batch_size)
    st = load_state(out, loop_fingerprint(cfg))
    budget = resolve_budget(exp, st)
    if "policies" not in st:
        pols = sample_policies(mc.samples, depth, ops, random.Random(f"pfnas-random-{cfg.seed}"))
        st["policies"] = [policy_json(p) for p in pols]
        save_state(out, st)
    policies = [policy_int(p) for p in st["policies"]]
    n_val = data.num_images("val")
    if mc.weight_sharing:
        steps = budget // per_step
        if steps < 1:
            raise PfnasError(f"budget of {budget} images is less than one batch; raise method.budget_multiplier")
        model = exp.supernet()
        model.mode = "gumbel"
        phase = SharedPhase(cfg, model, data, exp.device, steps, exp.pae(model))
        shared = out / "shared"
        shared.mkdir(parents=True, exist_ok=True)
        fit(phase, shared / "shared.pt",
            lambda m: emit(on_epoch, {**m, "cost_images": phase.images, "budget_images": budget}),
            shared / "log.jsonl", progress)
        spent = phase.images
        records = st.setdefault("ranking", [])
        index = {o: i for i, o in enumerate(model.candidates)}
        for i in range(len(records), len(policies)):
            set_path(model, [index[policies[i][l]] for l in range(depth)])
            ev = evaluate(model, data, "val", cfg.data.eval_batch_size, exp.device, cfg.precision)
            records.append({"id": i, "policy": policy_json(policies[i]), "val_acc": ev["acc"], "val_loss": ev["loss"]})
            save_state(out, st)
            emit(on_epoch, {"phase": "random", "candidate": i, "val_acc": ev["acc"],
                             "best_val_acc": best_record(records)["val_acc"], "cost_images": spent, "budget_images": budget})
        extra = {"shared_steps": phase.step, "shared_history": phase.history,
                 "cost_step_s": sum(h["epoch_time_s"] for h in phase.history)}
    else:
        steps = budget // (mc.samples * per_step)
        if steps < 1:
            raise PfnasError(f"budget of {budget} images cannot train {mc.samples} samples for one batch each; "
                             "lower method.samples or raise method.budget_multiplier")
        records = st.setdefault("done", [])
        for i in range(len(records), len(policies)):
            rec = {"id": i, **train_candidate(exp, policies[i], out / f"cand_{i:03d}", steps)}
            records.append(rec)
            save_state(out, st)
            spent = sum(r["images"] for r in records)
            say(progress, f"candidate {i}: val acc {rec['val_acc']:.4f}  {rec['policy']}")
            emit(on_epoch, {"phase": "random", "candidate": i, "val_acc": rec["val_acc"],
                             "train_loss": rec["train_loss"], "best_val_acc": best_record(records)["val_acc"],
                             "cost_images": spent, "budget_images": budget})
        spent = sum(r["images"] for r in records)
        extra = {"candidate_steps": steps, "cost_step_s": sum(r["time_s"] for r in records)}
    best = best_record(records)
    return {"policy": best["policy"], "weight_sharing": mc.weight_sharing, "samples": mc.samples,
            "select_val_acc": best["val_acc"], "selected": best["id"], "cost_images": spent,
            "eval_images": len(records) * n_val, "budget_images": budget, "history": records, **extra}


def select_evolution(exp: Experiment, out: Path, on_epoch, progress, cycles: int | None) -> dict[str, Any]:
    """Aging evolution. Every candidate gets the same steps: the budget split over ``population + cycles``
    candidates (``max(method.samples, population + 1)`` when ``cycles`` is None), at least one batch;
    the loop ends when the next candidate would overrun the budget or the cycles run out."""
    cfg, data = exp.cfg, exp.data
    mc, depth, ops = cfg.method, len(exp.backbone.blocks), list(cfg.prompts.ops)
    st = load_state(out, loop_fingerprint(cfg, cycles=cycles))
    budget = resolve_budget(exp, st)
    per_step = images_per_step(data.num_images("train"), cfg.data.batch_size)
    planned = mc.population + cycles if cycles is not None else max(mc.samples, mc.population + 1)
    steps = max(budget // (planned * per_step), 1)  # the loop below stops when the budget is spent
    cand_images = steps * per_step
    if mc.population * cand_images > budget:
        raise PfnasError(f"budget of {budget} images cannot train the initial population of {mc.population} "
                         "for one batch each; lower method.population or raise method.budget_multiplier")
    if "initial" not in st:
        init = sample_policies(mc.population, depth, ops, random.Random(f"pfnas-evolution-init-{cfg.seed}"))
        st.update(initial=[policy_json(p) for p in init], members=[], population=[])
        save_state(out, st)
    members, pop = st["members"], st["population"]
    while True:
        i = len(members)
        parent, cycle = None, None
        if i < mc.population:
            policy = policy_int(st["initial"][i])
        else:
            cycle = i - mc.population
            if cycles is not None and cycle >= cycles:
                break
            p_idx, policy = evolution_step([members[j] for j in pop], mc.sample_size, ops,
                                           random.Random(f"pfnas-evolution-{cfg.seed}-{cycle}"))
            parent = pop[p_idx]
        spent = sum(r["images"] for r in members)
        if spent + cand_images > budget:
            break
        rec = {"id": i, "cycle": cycle, "parent": parent,
               **train_candidate(exp, policy, out / f"cand_{i:03d}", steps)}
        members.append(rec)
        st["population"] = pop = age_out(pop, i) if cycle is not None else pop + [i]
        save_state(out, st)
        say(progress, f"candidate {i}: val acc {rec['val_acc']:.4f}  {rec['policy']}")
        emit(on_epoch, {"phase": "evolution", "candidate": i, "cycle": -1 if cycle is None else cycle,
                         "val_acc": rec["val_acc"], "train_loss": rec["train_loss"],
                         "best_val_acc": best_record(members)["val_acc"], "cost_images": spent + rec["images"],
                         "budget_images": budget, "population_best_val_acc": max(members[j]["val_acc"] for j in pop)})
    best = best_record(members)
    return {"policy": best["policy"], "population": mc.population, "sample_size": mc.sample_size, "cycles": cycles,
            "select_val_acc": best["val_acc"], "selected": best["id"], "cost_images": sum(r["images"] for r in members),
            "cost_step_s": sum(r["time_s"] for r in members), "budget_images": budget,
            "eval_images": len(members) * data.num_images("val"), "candidate_steps": steps,
            "final_population": list(pop), "history": members}
