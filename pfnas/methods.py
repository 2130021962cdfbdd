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

import hashlib
import json
import math
import random
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .config import ExperimentConfig, PfnasError, config_hash, merge_dotted, selection_hash
from .engine import (EpochCallback, Experiment, OneShotPhase, Phase, backbone_param_count, claim_run_dir, evaluate,
                     fit, inherited_score, inherited_state, lr_at, rng_state, run_experiment, run_retrain, run_search, set_rng_state,
                     waiting_lock)
from .export import model_files
from .model import PromptedViT
from .oneshot import (fold_task, halving_schedule, keep_top, kendall_tau, layer_preference, next_generation,
                      oneshot_plan, policy_key, tau_ceiling, val_rank_key)
from .runtime import write_atomic
from .timing import steps_per_epoch, time_steps

PATH_LOGIT = 1e4  # alpha value that pins a gumbel supernet to one path (softmax of the rest is exactly 0)


# ----------------------------------------------------------------------------- budget
def _images_per_step(n: int, batch_size: int) -> int:
    return batch_size if n >= batch_size else n


def budget_images(cfg: ExperimentConfig, data) -> int:
    """Training images a baseline may spend: ``method.budget_images``, else the search's total cost x
    ``method.budget_multiplier`` (a ``budget_seconds`` budget needs a measured step: :func:`resolve_budget`)."""
    if cfg.method.budget_images is not None:
        return cfg.method.budget_images
    return int(search_cost(cfg, data)["total"] * cfg.method.budget_multiplier)


def measure_step_seconds(exp: Experiment, steps: int = 3) -> float:
    """Seconds per training image of a candidate step: a policy cycling the candidate ops, median of ``steps``
    timed steps after one warm-up step. The global RNG is restored, so the run itself is unchanged."""
    state = rng_state()
    try:
        ops = list(exp.cfg.prompts.ops)
        model = exp.fixed({l: ops[l % len(ops)] for l in range(len(exp.backbone.blocks))})
        phase = BudgetPhase(exp.cfg, model, exp.data, exp.device, steps + 1, score_split=None)
        x, y = (t.to(exp.device) for t in next(iter(phase._train_batches())))
        ms = time_steps(lambda lap: phase._weight_step(x, y), exp.device, steps, warmup=1)["ms"]
        return ms / 1e3 / y.numel()
    finally:
        set_rng_state(state)


def resolve_budget(exp: Experiment, st: dict[str, Any]) -> int:
    """A baseline's budget in images; a ``budget_seconds`` budget is converted once and kept in ``st``."""
    seconds = exp.cfg.method.budget_seconds
    if seconds is None:
        return budget_images(exp.cfg, exp.data)
    if "budget_images" not in st:
        st["step_s_per_image"] = measure_step_seconds(exp)
        st["budget_images"] = int(seconds / st["step_s_per_image"])
    return int(st["budget_images"])


def search_cost(cfg: ExperimentConfig, data) -> dict[str, int]:
    """Images the differentiable search trains on, as :class:`~pfnas.engine.SearchPhase` draws them."""
    s, bs = cfg.search, cfg.data.batch_size
    n_train, n_val = data.num_images("train"), data.num_images("val")
    spe, per = steps_per_epoch(n_train, bs), _images_per_step(n_train, bs)
    vb = s.arch_batch_size or bs
    val_sizes = [min(vb, n_val - i) for i in range(0, n_val, vb)]  # the val list an epoch cycles through
    arch_every = s.arch_every or max(n_train // max(n_val, 1), 1)  # as SearchPhase: one alpha step per k
    arch_steps = math.ceil(spe / arch_every)  # alpha steps per epoch (weight steps 0, k, 2k, ...)
    arch_epochs = max(s.epochs - s.arch_warmup_epochs, 0)
    train = s.epochs * spe * per
    val = arch_epochs * sum(val_sizes[i % len(val_sizes)] for i in range(arch_steps))
    unrolled = 3 * arch_epochs * arch_steps * per if s.order == 2 else 0
    return {"train_images": train, "val_images": val, "unrolled_images": unrolled,
            "total": train + val + unrolled}


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


def _policy_json(policy: dict[int, str]) -> dict[str, str]:
    return {str(k): v for k, v in sorted(policy.items())}


def _policy_int(policy: dict) -> dict[int, str]:
    return {int(k): v for k, v in policy.items()}


# ----------------------------------------------------------------------------- budgeted training phases
class BudgetPhase(Phase):
    """Weight training on ``train`` for exactly ``max_steps`` steps (the last epoch is cut short) with
    the search's optimiser recipe; scores ``score_split`` after the last step. Counts its images."""

    name = "candidate"
    seed_offset = 3

    def __init__(self, cfg: ExperimentConfig, model: PromptedViT, data, device: torch.device, max_steps: int,
                 extra_loss: Any = None, score_split: str | None = "val"):
        super().__init__(cfg, model, data, device, 1, cfg.search.optim, "train", extra_loss)
        self.max_steps = max(int(max_steps), 1)
        self.epochs = math.ceil(self.max_steps / self.steps_per_epoch)
        self.score_split = score_split
        self.images = 0

    @property
    def lr(self) -> float:  # warmup + cosine over max_steps rather than whole epochs
        return lr_at(self.optim_cfg, self.batch_size, self.step, self.steps_per_epoch,
                     self.max_steps / self.steps_per_epoch)

    def _weight_step(self, x, y):
        out = super()._weight_step(x, y)
        self.images += int(y.numel())
        return out

    def state_dict(self):
        return {**super().state_dict(), "images": self.images}

    def load_state_dict(self, st):
        super().load_state_dict(st)
        self.images = int(st["images"])

    def run_epoch(self) -> dict[str, Any]:
        m = {**self._weight_epoch(self.max_steps), "images": self.images}
        if self.score_split and self.epoch == self.epochs:
            ev = evaluate(self.model, self.data, self.score_split, self.cfg.data.eval_batch_size, self.device,
                          self.cfg.precision)
            m[f"{self.score_split}_acc"], m[f"{self.score_split}_loss"] = ev["acc"], ev["loss"]
        self.history.append(m)
        return m


def set_path(model: PromptedViT, ops_idx: Sequence[int]) -> None:
    """Pin a gumbel-mode supernet to one op per layer (train and eval forward run only that path)."""
    with torch.no_grad():
        model.alpha.zero_()
        model.alpha[torch.arange(model.depth), torch.as_tensor(list(ops_idx))] = PATH_LOGIT


class SharedPhase(BudgetPhase):
    """Uniform single-path supernet training (Li & Talwalkar): a random op per layer at every step."""

    name = "shared"
    seed_offset = 4

    def __init__(self, cfg: ExperimentConfig, model: PromptedViT, data, device: torch.device, max_steps: int,
                 extra_loss: Any = None):
        model.mode, model.tau = "gumbel", 1.0
        model.alpha.requires_grad_(False)  # alpha only selects the path; it is never trained here
        super().__init__(cfg, model, data, device, max_steps, extra_loss, score_split=None)
        self.path_gen = torch.Generator().manual_seed(cfg.seed * 1000 + 5)

    def _weight_step(self, x, y):
        set_path(self.model, torch.randint(len(self.model.candidates), (self.model.depth,),
                                           generator=self.path_gen).tolist())
        return super()._weight_step(x, y)

    def state_dict(self):
        return {**super().state_dict(), "path_gen": self.path_gen.get_state()}

    def load_state_dict(self, st):
        super().load_state_dict(st)
        self.path_gen.set_state(st["path_gen"])


# ----------------------------------------------------------------------------- state and helpers
def _fingerprint(cfg: ExperimentConfig, **extra: Any) -> tuple[str, ...]:
    """Fingerprints a selection loop's ``state.json`` may carry, the one to write first: what the loop reads
    (:func:`pfnas.config.selection_hash`, no retrain fields, so a retrain-lr grid can share one loop) plus ``extra``.
    Folders of earlier versions carry the config's result identity with the retrain (``config_hash`` with the
    seed) or, older still, a hash of every field but name/output_dir/device: both still resume."""
    def h(x: Any) -> str:
        return hashlib.sha1(json.dumps([x, extra], sort_keys=True, default=str).encode()).hexdigest()[:16]

    raw = cfg.model_dump(mode="json")
    for k in ("name", "output_dir", "device"):
        raw.pop(k, None)
    return h(selection_hash(cfg)), h(config_hash(cfg, include_seed=True)), h(raw)


def _load_state(out: Path, fingerprint: tuple[str, ...]) -> dict[str, Any]:
    path = out / "state.json"
    if not path.is_file():
        return {"fingerprint": fingerprint[0]}
    st = json.loads(path.read_text())
    if st.get("fingerprint") not in fingerprint:
        raise PfnasError(f"{out} holds a run with a different configuration (or evolution cycles); rerun with the "
                         f"same ones to resume it, or start fresh with another --out (or delete {out})")
    st["fingerprint"] = fingerprint[0]
    return st


def _save_state(out: Path, st: dict[str, Any]) -> None:
    write_atomic(out / "state.json", json.dumps(st, indent=1))


def _train_candidate(exp: Experiment, policy: dict[int, str], folder: Path, steps: int,
                     init: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Train ``policy`` on ``train`` for ``steps`` steps (resumable), return its record with ``val_acc``;
    ``init``: the trainable state it starts from (else a fresh init)."""
    folder.mkdir(parents=True, exist_ok=True)
    model = exp.fixed(policy)
    if init is not None:
        model.load_trainable_state_dict(init)
    phase = BudgetPhase(exp.cfg, model, exp.data, exp.device, steps, exp.pae(model))
    fit(phase, folder / "candidate.pt", log_path=folder / "log.jsonl")
    last = phase.history[-1]
    return {"policy": _policy_json(policy), "val_acc": last["val_acc"], "val_loss": last["val_loss"],
            "train_loss": last["train_loss"], "images": phase.images, "steps": phase.step,
            "time_s": sum(h["epoch_time_s"] for h in phase.history)}


def _best(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Highest ``val_acc``; ties (val200 scores move in steps of half a point) go to the lower ``val_loss``,
    then to the earliest record."""
    return max(records, key=val_rank_key)


def _emit(on_epoch: EpochCallback | None, metrics: dict[str, Any]) -> None:
    if on_epoch is not None:
        on_epoch(metrics)


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
           "policy": _policy_json(policy), "select_val_acc": None, "cost_images": 0, "cost_step_s": 0.0,
           "budget_images": budget_images(exp.cfg, exp.data), "eval_images": 0, "history": [],
           **res, "val_acc": last.get("val_acc"), "val_loss": last.get("val_loss"), "test_acc": last.get("test_acc"),
           "tuned_params": tuned,
           "tuned_percent": 100.0 * tuned / backbone_param_count(exp.backbone),
           "retrain_history": phase.history, **(phase.inference or {}), "time_s": time.perf_counter() - t0,
           "model_dir": str((out / "retrain").resolve()),
           "model_files": model_files(out / "retrain")}
    (out / "result.json").write_text(json.dumps(res, indent=1, default=str))
    return res


def _say(progress: bool, msg: str) -> None:
    if progress:
        from rich.console import Console

        Console().print(msg)


# ----------------------------------------------------------------------------- methods
def _run_search(exp: Experiment, out: Path, on_epoch, progress, t0, search_cache=None) -> dict[str, Any]:
    r = run_experiment(exp.cfg, out, on_epoch, progress, exp=exp, search_cache=search_cache)
    cost = search_cost(exp.cfg, exp.data)
    res = {"method": "search", "seed": exp.cfg.seed, **r.to_json(), "select_val_acc": r.search_val_acc,
           "cost_images": cost["total"], "cost_step_s": sum(h["epoch_time_s"] for h in r.search_history), "cost_breakdown": cost, "budget_images": budget_images(exp.cfg, exp.data),
           "eval_images": exp.cfg.search.epochs * exp.data.num_images("val"), "history": r.search_history,
           "time_s": time.perf_counter() - t0, "model_dir": str(out.resolve()), "model_files": model_files(out)}
    (out / "result.json").write_text(json.dumps(res, indent=1, default=str))
    return res


def _select_random(exp: Experiment, out: Path, on_epoch, progress, cycles=None) -> dict[str, Any]:
    """``method.samples`` distinct random policies. Without weight sharing each trains on ``train`` for
    ``budget // (samples * batch)`` steps and is scored on ``val``; with it one uniform single-path
    supernet trains for ``budget // batch`` steps and every sample is scored through it on ``val``."""
    cfg, data = exp.cfg, exp.data
    mc, depth, ops = cfg.method, len(exp.backbone.blocks), list(cfg.prompts.ops)
    per_step = _images_per_step(data.num_images("train"), cfg.data.batch_size)
    st = _load_state(out, _fingerprint(cfg))
    budget = resolve_budget(exp, st)
    if "policies" not in st:
        pols = sample_policies(mc.samples, depth, ops, random.Random(f"pfnas-random-{cfg.seed}"))
        st["policies"] = [_policy_json(p) for p in pols]
        _save_state(out, st)
    policies = [_policy_int(p) for p in st["policies"]]
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
            lambda m: _emit(on_epoch, {**m, "cost_images": phase.images, "budget_images": budget}),
            shared / "log.jsonl", progress)
        spent = phase.images
        records = st.setdefault("ranking", [])
        index = {o: i for i, o in enumerate(model.candidates)}
        for i in range(len(records), len(policies)):
            set_path(model, [index[policies[i][l]] for l in range(depth)])
            ev = evaluate(model, data, "val", cfg.data.eval_batch_size, exp.device, cfg.precision)
            records.append({"id": i, "policy": _policy_json(policies[i]), "val_acc": ev["acc"], "val_loss": ev["loss"]})
            _save_state(out, st)
            _emit(on_epoch, {"phase": "random", "candidate": i, "val_acc": ev["acc"],
                             "best_val_acc": _best(records)["val_acc"], "cost_images": spent, "budget_images": budget})
        extra = {"shared_steps": phase.step, "shared_history": phase.history,
                 "cost_step_s": sum(h["epoch_time_s"] for h in phase.history)}
    else:
        steps = budget // (mc.samples * per_step)
        if steps < 1:
            raise PfnasError(f"budget of {budget} images cannot train {mc.samples} samples for one batch each; "
                             "lower method.samples or raise method.budget_multiplier")
        records = st.setdefault("done", [])
        for i in range(len(records), len(policies)):
            rec = {"id": i, **_train_candidate(exp, policies[i], out / f"cand_{i:03d}", steps)}
            records.append(rec)
            _save_state(out, st)
            spent = sum(r["images"] for r in records)
            _say(progress, f"candidate {i}: val acc {rec['val_acc']:.4f}  {rec['policy']}")
            _emit(on_epoch, {"phase": "random", "candidate": i, "val_acc": rec["val_acc"],
                             "train_loss": rec["train_loss"], "best_val_acc": _best(records)["val_acc"],
                             "cost_images": spent, "budget_images": budget})
        spent = sum(r["images"] for r in records)
        extra = {"candidate_steps": steps, "cost_step_s": sum(r["time_s"] for r in records)}
    best = _best(records)
    return {"policy": best["policy"], "weight_sharing": mc.weight_sharing, "samples": mc.samples,
            "select_val_acc": best["val_acc"], "selected": best["id"], "cost_images": spent,
            "eval_images": len(records) * n_val, "budget_images": budget, "history": records, **extra}


def _select_evolution(exp: Experiment, out: Path, on_epoch, progress, cycles: int | None) -> dict[str, Any]:
    """Aging evolution. Every candidate gets the same steps: the budget split over ``population + cycles``
    candidates (``max(method.samples, population + 1)`` when ``cycles`` is None), at least one batch;
    the loop ends when the next candidate would overrun the budget or the cycles run out."""
    cfg, data = exp.cfg, exp.data
    mc, depth, ops = cfg.method, len(exp.backbone.blocks), list(cfg.prompts.ops)
    st = _load_state(out, _fingerprint(cfg, cycles=cycles))
    budget = resolve_budget(exp, st)
    per_step = _images_per_step(data.num_images("train"), cfg.data.batch_size)
    planned = mc.population + cycles if cycles is not None else max(mc.samples, mc.population + 1)
    steps = max(budget // (planned * per_step), 1)  # the loop below stops when the budget is spent
    cand_images = steps * per_step
    if mc.population * cand_images > budget:
        raise PfnasError(f"budget of {budget} images cannot train the initial population of {mc.population} "
                         "for one batch each; lower method.population or raise method.budget_multiplier")
    if "initial" not in st:
        init = sample_policies(mc.population, depth, ops, random.Random(f"pfnas-evolution-init-{cfg.seed}"))
        st.update(initial=[_policy_json(p) for p in init], members=[], population=[])
        _save_state(out, st)
    members, pop = st["members"], st["population"]
    while True:
        i = len(members)
        parent, cycle = None, None
        if i < mc.population:
            policy = _policy_int(st["initial"][i])
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
               **_train_candidate(exp, policy, out / f"cand_{i:03d}", steps)}
        members.append(rec)
        st["population"] = pop = age_out(pop, i) if cycle is not None else pop + [i]
        _save_state(out, st)
        _say(progress, f"candidate {i}: val acc {rec['val_acc']:.4f}  {rec['policy']}")
        _emit(on_epoch, {"phase": "evolution", "candidate": i, "cycle": -1 if cycle is None else cycle,
                         "val_acc": rec["val_acc"], "train_loss": rec["train_loss"],
                         "best_val_acc": _best(members)["val_acc"], "cost_images": spent + rec["images"],
                         "budget_images": budget, "population_best_val_acc": max(members[j]["val_acc"] for j in pop)})
    best = _best(members)
    return {"policy": best["policy"], "population": mc.population, "sample_size": mc.sample_size, "cycles": cycles,
            "select_val_acc": best["val_acc"], "selected": best["id"], "cost_images": sum(r["images"] for r in members),
            "cost_step_s": sum(r["time_s"] for r in members), "budget_images": budget,
            "eval_images": len(members) * data.num_images("val"), "candidate_steps": steps,
            "final_population": list(pop), "history": members}


# ----------------------------------------------------------------------------- one-shot (FairNAS / SPOS / NOAH)
def _alone(exp: Experiment, out: Path, st: dict[str, Any], policy: dict[int, str], epochs: int,
           fold: tuple[int, Experiment] | None = None, supernet: PromptedViT | None = None) -> tuple[dict[str, Any], bool]:
    """``policy`` trained alone on ``train`` for ``epochs`` epochs and scored on ``val`` (``fold``: (index,
    experiment on that fold's task)), from scratch or, given a ``supernet``, from its inherited weights; kept in
    ``st["alone"]``, so a policy met again (a tau sample that is also a candidate, a resumed run) is trained once.
    Returns (record, trained now)."""
    folds = exp.cfg.method.select_folds
    if supernet is not None and fold is not None:
        raise PfnasError("a K-fold rung trains from scratch (the supernet has seen its held-out fold)")
    name = (hashlib.sha1(json.dumps(_policy_json(policy)).encode()).hexdigest()[:10] + f"-e{epochs}"
            + (f"-fold{fold[0]}of{folds}" if fold is not None else "") + ("-inh" if supernet is not None else ""))
    done = st.setdefault("alone", {})
    if name in done:
        return done[name], False
    e = fold[1] if fold is not None else exp
    steps = epochs * steps_per_epoch(e.data.num_images("train"), exp.cfg.data.batch_size)
    init = inherited_state(supernet, policy) if supernet is not None else None
    done[name] = {"name": name, "n_val": e.data.num_images("val"), "init": "scratch" if init is None else "inherited",
                  **_train_candidate(e, policy, out / "alone" / name, steps, init)}
    _save_state(out, st)
    return done[name], True


def _train_supernet(exp: Experiment, folder: Path, paths: str, epochs: int, on_epoch, progress) -> OneShotPhase:
    """A one-shot supernet (each op its own prompts) trained on ``train`` in ``folder`` (checkpointed, resumable)."""
    model = exp.supernet(per_op_prompts=True)
    phase = OneShotPhase(exp.cfg, model, exp.data, exp.device, epochs, paths)
    folder.mkdir(parents=True, exist_ok=True)
    fit(phase, folder / "supernet.pt", on_epoch, folder / "log.jsonl", progress)
    return phase


def _inherited(exp: Experiment, model: PromptedViT, policy: dict, rec_id: int) -> dict[str, Any]:
    idx = [model.candidates.index(policy[l]) for l in range(model.depth)]
    ev = inherited_score(model, idx, exp.data, "val", exp.cfg.data.eval_batch_size, exp.device, exp.cfg.precision)
    return {"id": rec_id, "policy": _policy_json(policy), "val_acc": ev["acc"], "val_loss": ev["loss"]}


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
            st["pending"] = {"generation": g, "policies": [_policy_json(p) for p in pols]}
            _save_state(out, st)
        g, pols = st["pending"]["generation"], st["pending"]["policies"]
        scored = [r for r in recs if r["generation"] == g]
        for p in pols[len(scored):]:
            if (len(recs) + 1) * n_val > eval_budget:
                st["evolution_done"] = True
                break
            recs.append({**_inherited(exp, model, _policy_int(p), len(recs)), "generation": g})
            _save_state(out, st)
        gen = [r for r in recs if r["generation"] == g]
        if gen:
            _emit(on_epoch, {"phase": "oneshot_evolution", "epoch": g, "generation": g, "policies": len(gen),
                             "mean_val_acc": statistics.fmean(r["val_acc"] for r in gen),
                             "best_val_acc": _best(recs)["val_acc"], "eval_images": len(recs) * n_val,
                             "eval_budget_images": eval_budget})
        st.pop("pending")
        st["generation"] = g
        _save_state(out, st)
    return recs


def _verify(exp: Experiment, out: Path, st: dict[str, Any], candidates: list[dict[int, str]], rungs: list[int],
            on_epoch, spent: int, budget: int, supernet: PromptedViT | None = None) -> list[dict[str, Any]]:
    """Successive halving over ``candidates``, each trained alone at each rung (from ``supernet``'s inherited
    weights when given, else from scratch); the last trained rung is scored by K-fold cross-validation over
    train+val, from scratch, when ``method.select_folds`` is set. Returns every rung's records."""
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
            rec = {"candidate": i, "rung": r, "epochs": epochs, "policy": _policy_json(policy),
                   "val_acc": statistics.fmean(x["val_acc"] for x in recs),
                   "val_loss": statistics.fmean(x["val_loss"] for x in recs),
                   "images": sum(x["images"] for x in recs), "time_s": sum(x["time_s"] for x in recs),
                   "eval_images": sum(x["n_val"] for x in recs), "runs": [x["name"] for x in recs],
                   **({"folds": len(recs), "fold_val_acc": [x["val_acc"] for x in recs]} if last and folds else {})}
            rung.append(rec)
            counted.update((x["name"], x["images"]) for x in recs)
            if any(p[1] for p in parts):
                _emit(on_epoch, {"phase": "oneshot_verify", "candidate": len(history) + len(rung) - 1, "rung": r,
                                 "epochs": epochs, "val_acc": rec["val_acc"], "val_loss": rec["val_loss"],
                                 "cost_images": spent + sum(counted.values()),
                                 "budget_images": budget})
        history += rung
        alive = [rec["candidate"] for rec in keep_top(rung, math.ceil(n / mc.eta))]
    return history


def _tau_diagnostic(exp: Experiment, out: Path, st: dict[str, Any], own: PromptedViT, epochs: int, rung_epochs: int,
                    on_epoch, progress) -> dict[str, Any]:
    """Kendall tau between inherited-weight and standalone val accuracy of ``method.tau_policies`` random policies
    (each trained alone from scratch for ``rung_epochs``: ``method.tau_epochs``, else the last rung's) for every supernet of ``method.tau_supernets`` (the method's
    own is reused; the others are trained here for the same epochs; ``darts`` is the differentiable search's
    supernet of ``search.*``). A diagnostic: it never feeds the choice."""
    cfg, mc = exp.cfg, exp.cfg.method
    ops, depth = list(cfg.prompts.ops), own.depth
    tau_st = st.setdefault("tau", {"inherited": {}})
    if "policies" not in tau_st:
        pols = sample_policies(min(mc.tau_policies, len(ops) ** depth), depth, ops,
                               random.Random(f"pfnas-oneshot-tau-{cfg.seed}"))
        tau_st["policies"] = [_policy_json(p) for p in pols]
        _save_state(out, st)
    policies = [_policy_int(p) for p in tau_st["policies"]]
    alone = [_alone(exp, out, st, p, rung_epochs)[0] for p in policies]
    taus, extra_images, extra_s = {}, 0, 0.0
    for kind in mc.tau_supernets:
        if kind not in tau_st["inherited"]:
            def relay(m, kind=kind):
                _emit(on_epoch, {k: v for k, v in {**m, "phase": f"tau_{kind}"}.items() if k not in ("alpha", "policy")})

            if kind == mc.supernet:
                model = own
            elif kind == "darts":
                model = run_search(exp, out / "tau_darts", relay, progress).model
            else:
                model = _train_supernet(exp, out / f"tau_{kind}", kind, epochs, relay, progress).model
            tau_st["inherited"][kind] = [_inherited(exp, model, p, i) for i, p in enumerate(policies)]
            _save_state(out, st)
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


def _select_oneshot(exp: Experiment, out: Path, on_epoch, progress, cycles=None) -> dict[str, Any]:
    """``method.kind: oneshot`` (see :mod:`pfnas.oneshot`): supernet, evolution on inherited weights, verification
    by successive halving, diagnostics. Cost: the supernet's training images (a fair step on B images counts K * B)
    + the verification's; ``eval_images``: val forward images (inherited scores and the verification's scores)."""
    cfg, data, mc = exp.cfg, exp.data, exp.cfg.method
    ops, depth, n_val = list(cfg.prompts.ops), len(exp.backbone.blocks), data.num_images("val")
    st = _load_state(out, _fingerprint(cfg))
    budget = resolve_budget(exp, st)
    plan = oneshot_plan(cfg, data, budget)
    eval_budget = mc.eval_images or min(mc.population, len(ops) ** depth) * (mc.generations + 1) * n_val
    if eval_budget < n_val:
        raise PfnasError(f"method.eval_images {eval_budget} is less than one pass over val ({n_val} images)")
    sup = _train_supernet(exp, out / "supernet", mc.supernet, plan["supernet_epochs"],
                          lambda m: _emit(on_epoch, {**m, "budget_images": budget}), progress)
    model = sup.model
    inherited = _inherited_evolution(exp, model, out, st, eval_budget, on_epoch)
    candidates, seen = [], set()
    for p in [r["policy"] for r in keep_top(inherited, mc.top_k)] + [{l: op for l in range(depth)} for op in ops]:
        if policy_key(p) not in seen:
            seen.add(policy_key(p))
            candidates.append(_policy_int(p))
    history = _verify(exp, out, st, candidates, plan["rungs"], on_epoch, sup.images, budget,
                      model if mc.verify_init == "inherited" else None)
    last_rung = max(h["rung"] for h in history)
    winner = _best([h for h in history if h["rung"] == last_rung])
    runs = {name for h in history for name in h["runs"]}
    verify_images = sum(st["alone"][n]["images"] for n in runs)
    res = {"policy": winner["policy"], "supernet": mc.supernet, "verify_init": mc.verify_init, "select_val_acc": winner["val_acc"],
           "select_val_loss": winner["val_loss"], "selected": winner["candidate"],
           "cost_images": sup.images + verify_images,
           "cost_step_s": sum(h["epoch_time_s"] for h in sup.history) + sum(st["alone"][n]["time_s"] for n in runs),
           "cost_breakdown": {"supernet_images": sup.images, "verification_images": verify_images,
                              "supernet_epochs": plan["supernet_epochs"], "supernet_passes": plan["supernet_passes"]},
           "budget_images": budget, "eval_budget_images": eval_budget, "inherited_eval_images": len(inherited) * n_val,
           "eval_images": len(inherited) * n_val + sum(h["eval_images"] for h in history),
           "rungs": plan["rungs"], "candidates": [_policy_json(c) for c in candidates], "history": history,
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
    _emit(on_epoch, {"phase": "oneshot", "epoch": 0, "select_val_acc": winner["val_acc"],
                     "cost_images": res["cost_images"], "eval_images": res["eval_images"], **diag_metrics})
    _say(progress, f"one-shot: {winner['policy']} val acc {winner['val_acc']:.4f}; kendall tau {res['kendall_tau']}")
    return res


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
            _emit(on_epoch, json.loads(line))

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
        select = {"random": _select_random, "evolution": _select_evolution, "oneshot": _select_oneshot}[kind]
        if search_cache is not None:
            res = _shared_selection(exp, out, Path(search_cache), select, on_epoch, progress, cycles)
        else:
            res = select(exp, out, on_epoch, progress, cycles)
        return _finish(exp, out, _policy_int(res["policy"]), on_epoch, progress, res, t0)
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
