"""The training loop: device/RNG/schedule helpers, evaluation, and the resumable phases (the bilevel
:class:`SearchPhase`, the :class:`RetrainPhase` of a fixed policy) that :func:`fit` runs epoch by epoch."""
from __future__ import annotations

import json
import logging
import math
import time
from itertools import cycle
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ExperimentConfig, OptimConfig, PfnasError, RunFileError, TemperatureConfig, TrainingError
from ..data import TaskData
from ..model import PromptedViT
from ..runtime import autocast, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..timing import steps_per_epoch
from .costs import op_latency_table

EpochCallback = Callable[[dict[str, Any]], None]
log = logging.getLogger("pfnas.engine")

# ----------------------------------------------------------------------------- helpers
def temperature(cfg: TemperatureConfig, progress: float) -> float:
    """Temperature at ``progress`` in [0, 1] of the search."""
    t = min(max(progress, 0.0), 1.0)
    a, b = cfg.start, cfg.end
    if cfg.schedule == "constant":
        return a
    if cfg.schedule == "linear":
        return a + (b - a) * t
    if cfg.schedule == "cosine":
        return b + (a - b) * 0.5 * (1 + math.cos(math.pi * t))
    return a * (b / a) ** t  # exponential


def lr_at(optim: OptimConfig, batch_size: int, step: int, steps_per_epoch: int, epochs: int) -> float:
    """VPT schedule: lr scaled by batch/256, linear warmup, then cosine decay to 0."""
    base = optim.lr * batch_size / 256.0
    warm = optim.warmup_epochs * steps_per_epoch
    total = max(epochs * steps_per_epoch, 1)
    if step < warm:
        return base * (step + 1) / warm
    return base * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))


_CLAMP_WARNED: set[int] = set()  # requested batch sizes already warned about in this process


def real_batch_size(requested: int, n_images: int, split: str) -> int:
    """The images a training step holds: ``requested``, or the whole split when it has fewer (warned once per
    process), so the lr scales by batch/256 with a batch that exists."""
    if requested <= n_images or n_images < 1:
        return requested
    if requested not in _CLAMP_WARNED:
        _CLAMP_WARNED.add(requested)
        log.warning("data.batch_size %d exceeds the %d images of split %r: each step uses all %d, and the lr "
                    "scales by %d/256", requested, n_images, split, n_images, n_images)
    return n_images


def eval_logits(model: nn.Module, data: TaskData, split: str, batch_size: int, device: torch.device,
                precision: str = "auto") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(logits, labels)`` per batch of ``split`` in its fixed order, ``model`` in eval mode meanwhile (call
    under ``torch.no_grad``)."""
    was_training = model.training
    model.eval()
    try:
        for x, y in data.batches(split, batch_size):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(x)
            yield logits, y
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(model: nn.Module, data: TaskData, split: str, batch_size: int, device: torch.device,
             precision: str = "auto") -> dict[str, float]:
    """Top-1 accuracy and mean loss of ``model`` on ``split``."""
    n, correct, loss_sum = 0, torch.zeros((), device=device), torch.zeros((), device=device)
    for logits, y in eval_logits(model, data, split, batch_size, device, precision):
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")  # summed on the device: one sync below
        correct += (logits.argmax(-1) == y).sum()
        n += y.numel()
    return {"acc": correct.item() / max(n, 1), "loss": loss_sum.item() / max(n, 1)}


# ----------------------------------------------------------------------------- phases
class Phase:
    """One resumable training phase (search or retrain); ``run_epoch`` returns that epoch's metrics.

    Steps do not wait for the device: losses and accuracies accumulate as device tensors, and the
    finiteness of every loss is folded into a device flag that the host reads every ``finite_every``
    steps and at the end of each epoch (before its checkpoint), so a NaN still fails the run with the
    last good checkpoint kept.
    """

    name = "phase"
    seed_offset = 0  # distinct data-order streams for search and retrain
    finite_every = 50  # steps between host reads of the finiteness flag (and at every epoch end)

    def __init__(self, cfg: ExperimentConfig, model: PromptedViT, data: TaskData, device: torch.device,
                 epochs: int, optim: OptimConfig, train_split: str, extra_loss: Any = None):
        self.cfg, self.model, self.data, self.device = cfg, model.to(device), data, device
        self.epochs, self.optim_cfg, self.train_split = epochs, optim, train_split
        self.extra_loss = extra_loss  # PAE regulariser: module with .loss(model) and parameters
        self.epoch = 0
        self.step = 0
        n = data.num_images(train_split)
        self.batch_size = real_batch_size(cfg.data.batch_size, n, train_split)
        self.steps_per_epoch = steps_per_epoch(n, self.batch_size)
        params = model.weight_parameters() + (list(extra_loss.parameters()) if extra_loss is not None else [])
        self.weights = params
        self.opt = torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + self.seed_offset)
        self.history: list[dict[str, Any]] = []
        self._finite: torch.Tensor | None = None  # AND of isfinite(loss) since the last host check
        self._checked_at = 0

    @property
    def lr(self) -> float:
        return lr_at(self.optim_cfg, self.batch_size, self.step, self.steps_per_epoch, self.epochs)

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.device, self.cfg.precision):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y)
        return loss, logits

    def _track_finite(self, loss: torch.Tensor) -> None:
        """Fold ``isfinite(loss)`` into the device flag (no host sync); read it every ``finite_every`` steps."""
        ok = torch.isfinite(loss.detach())
        self._finite = ok if self._finite is None else self._finite & ok
        if self.finite_every and self.step - self._checked_at >= self.finite_every:
            self.check_finite()

    def check_finite(self) -> None:
        """One host sync: a TrainingError if any loss since the last check was NaN or inf."""
        ok, self._finite = self._finite, None
        first, self._checked_at = self._checked_at, self.step
        if ok is not None and not bool(ok):
            raise TrainingError(f"non-finite loss in {self.name} epoch {self.epoch + 1} (steps {first}-{self.step}); "
                                "lower the learning rate", deterministic=True)

    def _weight_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step; returns the batch's summed loss and correct count as device tensors (no sync)."""
        for g in self.opt.param_groups:
            g["lr"] = self.lr
        loss, logits = self._loss(x, y)
        total = loss
        if self.extra_loss is not None:
            total = total + self.extra_loss.loss(self.model)
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        if self.optim_cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.weights, self.optim_cfg.grad_clip)
        self.opt.step()
        self.step += 1
        self._track_finite(total)
        return loss.detach() * y.numel(), (logits.detach().argmax(-1) == y).sum()

    def _train_batches(self):
        return self.data.batches(self.train_split, self.batch_size, shuffle=True, generator=self.gen,
                                 drop_last=self.data.num_images(self.train_split) >= self.batch_size)

    # --- checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.name, "epoch": self.epoch, "step": self.step,
                "model": self.model.trainable_state_dict(), "opt": self.opt.state_dict(),
                "extra": self.extra_loss.state_dict() if self.extra_loss is not None else None,
                "gen": self.gen.get_state(), "rng": rng_state(), "history": self.history}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        if st.get("phase") != self.name:
            raise PfnasError(f"checkpoint is for phase {st.get('phase')!r}, not {self.name!r}")
        self.model.load_trainable_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        if self.extra_loss is not None and st.get("extra") is not None:
            self.extra_loss.load_state_dict(st["extra"])
        self.epoch, self.step, self.history = st["epoch"], st["step"], list(st["history"])
        self.gen.set_state(st["gen"])
        set_rng_state(st["rng"])

    def run_epoch(self) -> dict[str, Any]:
        raise NotImplementedError

    def _weight_epoch(self, max_steps: int | None = None) -> dict[str, Any]:
        """One pass of weight steps over the train split (stopping at global step ``max_steps``); advances
        ``epoch`` and returns the epoch's train metrics, read from the device once, at the end."""
        self.model.train()
        t0 = time.perf_counter()
        n = correct = 0
        loss_sum = 0.0
        for x, y in self._train_batches():
            if max_steps is not None and self.step >= max_steps:
                break
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            l, c = self._weight_step(x, y)
            loss_sum, correct, n = loss_sum + l, correct + c, n + y.numel()
        self.check_finite()  # syncs the device, so the epoch time below is real
        dt = time.perf_counter() - t0
        loss_sum, correct = float(loss_sum), int(correct)
        self.epoch += 1
        return {"phase": self.name, "epoch": self.epoch, "train_loss": loss_sum / max(n, 1),
                "train_acc": correct / max(n, 1), "lr": self.lr, "epoch_time_s": dt,
                "images_per_s": n / max(dt, 1e-9)}


class SearchPhase(Phase):
    """Bilevel search: prompts + head on ``train``, alpha on ``val`` (first or second order)."""

    name = "search"
    seed_offset = 1

    def __init__(self, cfg: ExperimentConfig, model: PromptedViT, data: TaskData, device: torch.device,
                 extra_loss: Any = None):
        if model.alpha is None:
            raise PfnasError("search needs a supernet (PromptedViT with policy=None)")
        model.mode, model.centered = cfg.search.mode, cfg.search.centered
        super().__init__(cfg, model, data, device, cfg.search.epochs, cfg.search.optim, "train", extra_loss)
        s = cfg.search
        self.arch_opt = torch.optim.Adam(model.arch_parameters(), lr=s.arch_lr, betas=tuple(s.arch_betas),
                                         weight_decay=s.arch_weight_decay)
        model.tau = temperature(s.tau, 0.0)
        n_val = max(data.num_images("val"), 1)
        self.arch_every = s.arch_every or max(data.num_images("train") // n_val, 1)
        self.costs = self._cost_table() if s.cost_weight > 0 else None

    def fair_path(self, step: int) -> list[int]:
        """Op per layer for weight step ``step`` of a fair warm-up: in every block of n_ops steps each layer
        runs each op once, in an order drawn from (seed, block), so a resumed run draws the same paths."""
        depth, n_ops = self.model.alpha.shape
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step // n_ops)
        return [int(torch.randperm(n_ops, generator=g)[step % n_ops]) for _ in range(depth)]

    def _cost_table(self) -> torch.Tensor:
        """[depth, n_ops] cost of each candidate, scaled so the costliest policy costs 1 (lambda is unitless)."""
        s = self.cfg.search
        if s.cost == "params":
            table = self.model.param_costs()
        else:  # measured once per backbone / device / batch and cached (pfnas bench --op-latency)

            table = op_latency_table(self.cfg, self.model, self.device, self.batch_size)
        return (table / table.max(-1).values.sum().clamp_min(1e-12)).to(self.device)

    def expected_cost(self) -> torch.Tensor:
        """E_alpha[cost] under softmax(alpha), in [0, 1] of the costliest policy (differentiable in alpha)."""
        return (F.softmax(self.model.alpha, -1) * self.costs).sum()

    def state_dict(self):
        return {**super().state_dict(), "arch_opt": self.arch_opt.state_dict()}

    def load_state_dict(self, st):
        super().load_state_dict(st)
        self.arch_opt.load_state_dict(st["arch_opt"])

    def _arch_loss(self, x, y) -> torch.Tensor:
        loss, _ = self._loss(x, y)
        if self.cfg.search.entropy_weight:
            p = F.softmax(self.model.alpha, -1)
            loss = loss + self.cfg.search.entropy_weight * -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
        if self.costs is not None:
            loss = loss + self.cfg.search.cost_weight * self.expected_cost()
        return loss

    def _arch_step(self, xt, yt, xv, yv) -> torch.Tensor:
        """One alpha step on a val batch; returns its loss as a device tensor (no sync)."""
        alpha = self.model.alpha
        if self.cfg.search.order == 1:
            loss = self._arch_loss(xv, yv)
            self.arch_opt.zero_grad(set_to_none=True)
            alpha.grad = torch.autograd.grad(loss, alpha)[0]
        else:
            loss = self._second_order_grad(xt, yt, xv, yv)
        self.arch_opt.step()
        self._track_finite(loss)
        return loss.detach()

    def _rng_get(self) -> tuple:
        """Torch CPU (and the model's CUDA device) RNG state: dropout masks and Gumbel noise."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _rng_set(self, st: tuple) -> None:
        torch.set_rng_state(st[0])
        if st[1] is not None:
            torch.cuda.set_rng_state(st[1], self.device)

    def _second_order_grad(self, xt, yt, xv, yv) -> torch.Tensor:
        """DARTS unrolled gradient: dL_val(w', a)/da - xi * Hessian-vector product by finite differences.

        All four passes (virtual step, val, w + eps dw, w - eps dw) start from one RNG state, so they
        share prompt-dropout masks and the Gumbel path; afterwards the RNG continues from the state
        one forward pass leaves, so the training stream stays deterministic.
        """
        alpha, ws = self.model.alpha, self.model.weight_parameters()
        xi = self.cfg.search.unrolled_lr or self.lr
        wd = self.optim_cfg.weight_decay
        backup = [w.detach().clone() for w in ws]
        rng = self._rng_get()
        gw = torch.autograd.grad(self._loss(xt, yt)[0], ws, allow_unused=True)
        rng_after = self._rng_get()
        with torch.no_grad():  # one virtual SGD step: w' = w - xi (g + wd w)
            for w, g in zip(ws, gw):
                w.sub_(xi * ((g if g is not None else 0) + wd * w))
        self._rng_set(rng)
        loss_v = self._arch_loss(xv, yv)
        grads = torch.autograd.grad(loss_v, [alpha] + ws, allow_unused=True)
        d_alpha, dw = grads[0], [g if g is not None else torch.zeros_like(w) for g, w in zip(grads[1:], ws)]
        eps = 0.01 / (torch.sqrt(sum((g.float() ** 2).sum() for g in dw)) + 1e-12)
        hvp = []
        for sign in (1.0, -1.0):  # w + eps dw, then w - eps dw
            with torch.no_grad():
                for w, b, g in zip(ws, backup, dw):
                    w.copy_(b + sign * eps * g)
            self._rng_set(rng)
            hvp.append(torch.autograd.grad(self._loss(xt, yt)[0], alpha)[0])
        with torch.no_grad():
            for w, b in zip(ws, backup):
                w.copy_(b)
        self._rng_set(rng_after)
        self.arch_opt.zero_grad(set_to_none=True)
        alpha.grad = d_alpha - xi * (hvp[0] - hvp[1]) / (2 * eps)
        return loss_v

    def run_epoch(self) -> dict[str, Any]:
        s = self.cfg.search
        self.model.train()
        self.model.tau = temperature(s.tau, self.epoch / max(self.epochs - 1, 1))
        t0 = time.perf_counter()
        n = correct = 0
        loss_sum = arch_loss_sum = 0.0
        arch_steps = 0
        val_batch = s.arch_batch_size or self.cfg.data.batch_size  # as baselines.search_cost counts it
        val_iter = cycle(list(self.data.batches("val", val_batch, shuffle=True, generator=self.gen)))
        update_arch = self.epoch >= s.arch_warmup_epochs
        for i, (x, y) in enumerate(self._train_batches()):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if update_arch and i % self.arch_every == 0:
                xv, yv = (t.to(self.device, non_blocking=True) for t in next(val_iter))
                arch_loss_sum += self._arch_step(x, y, xv, yv)
                arch_steps += 1
            self.model.alpha.requires_grad_(False)  # the weight step needs no alpha gradient
            if not update_arch and s.warmup_paths == "fair":
                self.model.path = self.fair_path(self.step)
            try:
                l, c = self._weight_step(x, y)
            finally:
                self.model.alpha.requires_grad_(True)
                self.model.path = None
            loss_sum, correct, n = loss_sum + l, correct + c, n + y.numel()
        self.check_finite()  # syncs the device, so the epoch time below is real
        dt = time.perf_counter() - t0
        loss_sum, correct, arch_loss_sum = float(loss_sum), int(correct), float(arch_loss_sum)
        self.epoch += 1
        val = evaluate(self.model, self.data, "val", self.cfg.data.eval_batch_size, self.device, self.cfg.precision)
        ent = self.model.alpha_entropy()
        m = {"phase": self.name, "epoch": self.epoch, "train_loss": loss_sum / max(n, 1),
             "train_acc": correct / max(n, 1), "val_acc": val["acc"], "val_loss": val["loss"],
             "arch_loss": arch_loss_sum / max(arch_steps, 1), "arch_steps": arch_steps, "tau": self.model.tau, "lr": self.lr,
             "alpha_entropy": sum(ent) / len(ent), "alpha_entropy_per_layer": ent,
             **({"expected_cost": float(self.expected_cost().detach())} if self.costs is not None else {}),
             "alpha": self.model.alpha_probs().tolist(), "policy": self.model.discretize(),
             "epoch_time_s": dt, "images_per_s": n / max(dt, 1e-9)}
        self.history.append({k: v for k, v in m.items() if k != "alpha"})
        return m


RETRAIN_SPLITS = {"select": ("train", "val"), "final": ("trainval", "test")}  # stage -> (train, score)
COLLAPSE_SHARE = 0.95  # a trained model that predicts one (minority) class this often has collapsed


@torch.no_grad()
def class_counts(model: nn.Module, data: TaskData, split: str, batch_size: int, device: torch.device,
                 precision: str = "auto") -> torch.Tensor:
    """``(2, classes)``: how often ``model`` (eval mode) predicts each class on ``split``, and the labels' counts."""
    c = data.num_classes
    counts = torch.zeros(2, c, dtype=torch.long, device=device)
    for logits, y in eval_logits(model, data, split, batch_size, device, precision):
        counts += torch.stack([torch.bincount(logits.argmax(-1), minlength=c)[:c], torch.bincount(y, minlength=c)[:c]])
    return counts.cpu()


def collapse_error(counts: torch.Tensor, epoch: int) -> TrainingError | None:
    """A :class:`TrainingError` when ``counts`` (:func:`class_counts` on the training images) show a collapsed
    model: one class predicted for at least :data:`COLLAPSE_SHARE` of the images while under half of them carry
    it. Grad clipping can keep a diverged run's loss finite; this is what is left of it."""
    pred, true = counts[0].double(), counts[1].double()
    n = float(pred.sum())
    if n <= 0:
        return None
    k = int(pred.argmax())
    share, label_share = float(pred[k]) / n, float(true[k]) / n
    if share < COLLAPSE_SHARE or label_share >= 0.5:
        return None
    return TrainingError(f"training collapsed: after epoch {epoch} the model predicts class {k} for {share:.0%} of "
                         f"its training images ({label_share:.0%} of their labels); lower train.optim.lr",
                         deterministic=True)


class RetrainPhase(Phase):
    """Train a fixed policy for ``train.epochs`` on the splits of ``train.stage``.

    ``select``: train on ``train``, score ``val`` every ``eval_every`` epochs and after the last (a study
    trial's objective). ``final``: train on ``trainval``, score ``test`` once after the last epoch, or
    every ``test_every`` epochs when that curve is asked for (plots only).
    """

    name = "retrain"
    seed_offset = 2

    def __init__(self, cfg: ExperimentConfig, model: PromptedViT, data: TaskData, device: torch.device,
                 extra_loss: Any = None, epochs: int | None = None, eval_every: int | None = None):
        train_split, eval_split = RETRAIN_SPLITS[cfg.train.stage]
        super().__init__(cfg, model, data, device, epochs or cfg.train.epochs, cfg.train.optim, train_split,
                         extra_loss)
        default_every = cfg.train.eval_every if cfg.train.stage == "select" else cfg.train.test_every
        self.eval_split, self.eval_every = eval_split, eval_every or default_every

    def run_epoch(self) -> dict[str, Any]:
        m = self._weight_epoch()
        if self.epoch == self.epochs and self.cfg.train.stage == "final" and self.cfg.train.collapse_check:
            counts = class_counts(self.model, self.data, self.train_split, self.cfg.data.eval_batch_size, self.device,
                                  self.cfg.precision)  # the model to be tested, on its own training images
            if (err := collapse_error(counts, self.epoch)) is not None:
                raise err  # before test is scored: a collapsed final has no test number
        if self.epoch == self.epochs or (self.eval_every and self.epoch % self.eval_every == 0):
            ev = evaluate(self.model, self.data, self.eval_split, self.cfg.data.eval_batch_size, self.device,
                          self.cfg.precision)
            m[f"{self.eval_split}_acc"], m[f"{self.eval_split}_loss"] = ev["acc"], ev["loss"]
        self.history.append(m)
        return m


def fit(phase: Phase, ckpt_path: str | Path | None = None, on_epoch: EpochCallback | None = None,
        log_path: str | Path | None = None, progress: bool = False, stop_after: int | None = None) -> Phase:
    """Run ``phase`` to its last epoch, resuming from and saving to ``ckpt_path`` after every epoch.

    ``stop_after`` ends early after that many epochs in this call (used to simulate interruption).
    """
    ckpt = Path(ckpt_path) if ckpt_path else None
    if ckpt is not None and ckpt.is_file():
        state = load_checkpoint(ckpt)
        try:
            phase.load_state_dict(state)
        except PfnasError:
            raise
        except (AttributeError, IndexError, KeyError, RuntimeError, TypeError, ValueError) as e:
            raise RunFileError(f"checkpoint {ckpt} does not fit this run's {phase.name} phase "
                               f"({type(e).__name__}: {str(e).strip()[:160]}); start fresh with another --out") from None
    bar = None
    if progress and phase.epoch < phase.epochs:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                       TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
        bar.start()
        task = bar.add_task(phase.name, total=phase.epochs, completed=phase.epoch, info="")
    done = 0
    try:
        while phase.epoch < phase.epochs and (stop_after is None or done < stop_after):
            try:
                m = phase.run_epoch()
            except torch.cuda.OutOfMemoryError:
                raise TrainingError(f"out of GPU memory in {phase.name}; lower data.batch_size "
                                    f"(now {phase.batch_size}) or prompts.length") from None
            done += 1
            if ckpt is not None:
                save_checkpoint(phase.state_dict(), ckpt)
            if log_path:
                with open(log_path, "a") as f:
                    f.write(json.dumps({k: v for k, v in m.items() if k != "alpha"}) + "\n")
            if bar is not None:
                acc = m.get("val_acc", m.get("test_acc"))
                bar.update(task, completed=phase.epoch,
                           info=f"loss {m['train_loss']:.3f}" + (f" acc {acc:.3f}" if acc is not None else ""))
            if on_epoch is not None:
                on_epoch(m)
    finally:
        if bar is not None:
            bar.stop()
    return phase
