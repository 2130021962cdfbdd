"""What every selection loop spends its budget through: the budget in training images (or seconds) and the
search's cost it is measured against, the budgeted candidate phase (and the weight-sharing one), a candidate
trained alone, the rule that ranks scored candidates, and the loop's resumable ``state.json``."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import ExperimentConfig, PfnasError, config_hash, finite_scalar, selection_hash
from ..engine import EpochCallback, Experiment, Phase, evaluate, fit, lr_at, rng_state, set_rng_state
from ..model import PromptedViT
from ..runtime import write_atomic
from ..timing import steps_per_epoch, time_steps

PATH_LOGIT = 1e4  # alpha value that pins a gumbel supernet to one path (softmax of the rest is exactly 0)


# ----------------------------------------------------------------------------- budget
def images_per_step(n: int, batch_size: int) -> int:
    return batch_size if n >= batch_size else n


def epoch_images(n: int, batch_size: int) -> int:
    """Images one training epoch over ``n`` images draws (whole batches)."""
    return steps_per_epoch(n, batch_size) * images_per_step(n, batch_size)


def with_selection_progress(on_epoch: EpochCallback | None, images_per_epoch: int) -> EpochCallback | None:
    """``on_epoch`` with the selection's progress added to every report that carries its budget: images spent and
    the budget as epochs of ``train`` (``select_epochs_done`` / ``select_epochs_planned``), so a study's live view
    can give a selection loop an ETA like a search's."""
    if on_epoch is None or images_per_epoch < 1:
        return on_epoch

    def relay(m: dict[str, Any]) -> None:
        budget, spent = m.get("budget_images"), m.get("cost_images", m.get("images"))
        if finite_scalar(budget) and finite_scalar(spent) and budget > 0:
            m = {**m, "select_epochs_done": float(spent) / images_per_epoch,
                 "select_epochs_planned": float(budget) / images_per_epoch}
        on_epoch(m)

    return relay


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
    spe, per = steps_per_epoch(n_train, bs), images_per_step(n_train, bs)
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


# ----------------------------------------------------------------------------- ranking
def val_rank_key(record: dict[str, Any]) -> tuple[float, float]:
    """Sort key of a scored record, larger is better: ``val_acc``, then the lower ``val_loss`` (a missing or
    non-finite loss ranks last among equal accuracies)."""
    loss = record.get("val_loss")
    return float(record["val_acc"]), -(float(loss) if finite_scalar(loss) else math.inf)


def keep_top(records: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The ``n`` best records by :func:`val_rank_key`; equal keys keep their order."""
    return sorted(records, key=val_rank_key, reverse=True)[:max(int(n), 0)]


# ----------------------------------------------------------------------------- a loop's state and records
def policy_json(policy: dict[int, str]) -> dict[str, str]:
    return {str(k): v for k, v in sorted(policy.items())}


def policy_int(policy: dict) -> dict[int, str]:
    return {int(k): v for k, v in policy.items()}


def loop_fingerprint(cfg: ExperimentConfig, **extra: Any) -> tuple[str, ...]:
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


def load_state(out: Path, fingerprint: tuple[str, ...]) -> dict[str, Any]:
    path = out / "state.json"
    if not path.is_file():
        return {"fingerprint": fingerprint[0]}
    st = json.loads(path.read_text())
    if st.get("fingerprint") not in fingerprint:
        raise PfnasError(f"{out} holds a run with a different configuration (or evolution cycles); rerun with the "
                         f"same ones to resume it, or start fresh with another --out (or delete {out})")
    st["fingerprint"] = fingerprint[0]
    return st


def save_state(out: Path, st: dict[str, Any]) -> None:
    write_atomic(out / "state.json", json.dumps(st, indent=1))


def train_candidate(exp: Experiment, policy: dict[int, str], folder: Path, steps: int,
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
    return {"policy": policy_json(policy), "val_acc": last["val_acc"], "val_loss": last["val_loss"],
            "train_loss": last["train_loss"], "images": phase.images, "steps": phase.step,
            "time_s": sum(h["epoch_time_s"] for h in phase.history)}


def best_record(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Highest ``val_acc``; ties (val200 scores move in steps of half a point) go to the lower ``val_loss``,
    then to the earliest record."""
    return max(records, key=val_rank_key)


def emit(on_epoch: EpochCallback | None, metrics: dict[str, Any]) -> None:
    if on_epoch is not None:
        on_epoch(metrics)


def say(progress: bool, msg: str) -> None:
    if progress:
        from rich.console import Console

        Console().print(msg)
