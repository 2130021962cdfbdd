"""Training engine: bilevel search, discretization, retraining, evaluation, checkpoint/resume.

No Ray or MLflow here: the orchestration layer drives :func:`run_experiment` (or the phases
directly) through the ``on_epoch`` callback and the checkpoint files the engine writes.
"""
from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import threading
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from itertools import cycle
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import (ExperimentConfig, OptimConfig, PfnasError, RunDirError, TemperatureConfig, TrainingError,
                     config_diff, config_hash, dump_config, search_hash)
from .data import TaskData, load_task
from .model import PromptedViT, backbone_input, load_backbone, load_policy, save_policy

EpochCallback = Callable[[dict[str, Any]], None]


# ----------------------------------------------------------------------------- helpers
def resolve_device(name: str = "auto") -> torch.device:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; anything unknown or unavailable is a PfnasError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise PfnasError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PfnasError(f"device {name!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise PfnasError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise PfnasError(f"device {name!r} requested but MPS is not available")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


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


def autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


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


def save_atomic(obj: Any, path: Path) -> None:
    """Write ``path`` whole or not at all: a temporary file, then ``os.replace``. A failed write (disk full,
    quota, I/O error) removes the temporary file, keeps the previous checkpoint and raises a one-line PfnasError."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as RuntimeError
        with suppress(OSError):
            tmp.unlink()
        why = (e.strerror or os.strerror(e.errno or errno.EIO)) if isinstance(e, OSError) else str(e).splitlines()[0]
        raise PfnasError(f"cannot write checkpoint {path}: {why}; the previous checkpoint is kept") from None


# ----------------------------------------------------------------------------- output folders
RUN_MARKERS = ("result.json", "state.json")  # besides *.pt checkpoints: files a resumed run reads or returns
_HELD: dict[str, list[Any]] = {}  # realpath -> [fd, depth, owner thread]: run folders this process holds
_HELD_GUARD = threading.Lock()


@dataclass
class RunDirClaim:
    """A held output folder. ``replaced``: it held another configuration's config.yaml but no training state."""

    path: Path
    replaced: bool = False


def _has_run_state(out: Path) -> bool:
    return any((out / f).is_file() for f in RUN_MARKERS) or next(out.rglob("*.pt"), None) is not None


def _check_run_config(cfg: ExperimentConfig, out: Path) -> bool:
    """Refuse a folder whose stored run has another configuration; True when a stale config.yaml without any
    training state is simply replaced. Fields that cannot change a result (name, output_dir, device, eval cadence,
    fields the method does not read) may differ: :func:`pfnas.config.config_hash` with the seed."""
    import yaml

    stored_path = out / "config.yaml"
    if not stored_path.is_file():
        return False
    fresh = f"rerun with the same configuration to resume it, or start fresh with another --out (or delete {out})"
    try:
        stored = ExperimentConfig.model_validate(yaml.safe_load(stored_path.read_text()) or {})
    except Exception:  # noqa: BLE001 - unreadable, edited or from an incompatible version
        if not _has_run_state(out):
            return True
        raise RunDirError(f"{out} holds a run whose config.yaml cannot be read; {fresh}") from None
    if config_hash(stored, include_seed=True) == config_hash(cfg, include_seed=True):
        return False
    if not _has_run_state(out):  # e.g. the last try stopped at a bad data path before training: nothing to lose
        return True
    raise RunDirError(f"{out} holds a run with a different configuration ({config_diff(stored, cfg)}); {fresh}")


def _lock_dir(out: Path) -> int:
    """``fcntl.flock`` on ``out/.lock`` (the kernel drops it when the process dies, so kill -9 leaves no stale lock)."""
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl
    except ImportError:  # no flock on this platform: no lock
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            os.close(fd)
            raise
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        os.close(fd)
        raise RunDirError(f"{out} is in use by another pfnas run{f' (pid {holder})' if holder.isdigit() else ''}; "
                          "wait for it to end or use another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


@contextmanager
def claim_run_dir(cfg: ExperimentConfig, out_dir: str | Path):
    """Hold ``out_dir`` for one run: an exclusive lock (a second process is refused), then the stored
    ``config.yaml`` must match ``cfg`` (resume) or the folder is refused; ``cfg`` is written as config.yaml.

    Re-entrant within a thread (``run_method`` -> ``run_experiment`` on one folder). Yields a :class:`RunDirClaim`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(out)
    me = threading.get_ident()
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None and held[2] != me:
            raise RunDirError(f"{out} is in use by another run in this process; use another --out")
        if held is not None:
            held[1] += 1
        else:
            _HELD[key] = [_lock_dir(out), 1, me]
    try:
        replaced = _check_run_config(cfg, out)
        dump_config(cfg, out / "config.yaml")
        yield RunDirClaim(out, replaced)
    finally:
        with _HELD_GUARD:
            held = _HELD[key]
            held[1] -= 1
            if held[1] == 0:
                del _HELD[key]
                os.close(held[0])  # releases the flock


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
        self.batch_size = cfg.data.batch_size
        n = data.num_images(train_split)
        self.steps_per_epoch = max(n // self.batch_size, 1) if n >= self.batch_size else 1
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
            from .bench import op_latency_table

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
        val_iter = cycle(list(self.data.batches("val", s.arch_batch_size or self.batch_size, shuffle=True,
                                                generator=self.gen)))
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
        phase.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False))
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
                save_atomic(phase.state_dict(), ckpt)
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


# ----------------------------------------------------------------------------- experiment
@dataclass
class Experiment:
    """Everything built from a config: frozen backbone, data on the device, device."""

    cfg: ExperimentConfig
    backbone: nn.Module
    data: TaskData
    device: torch.device

    @classmethod
    def build(cls, cfg: ExperimentConfig, data: TaskData | None = None, backbone: nn.Module | None = None):
        device = resolve_device(cfg.device)
        seed_everything(cfg.seed)
        backbone = backbone if backbone is not None else load_backbone(cfg.backbone)
        backbone = backbone.to(device)
        if data is None:
            size, mean, std = backbone_input(backbone)
            data = load_task(cfg.data, img_size=size, mean=mean, std=std,
                             device=device if cfg.data.resident else "cpu", seed=cfg.seed)
        return cls(cfg, backbone, data, device)

    def supernet(self) -> PromptedViT:
        seed_everything(self.cfg.seed)
        return PromptedViT(self.backbone, self.data.num_classes, self.cfg.prompts, None, self.cfg.search.mode,
                           self.cfg.search.per_op_prompts)

    def fixed(self, policy: dict | list) -> PromptedViT:
        seed_everything(self.cfg.seed + 1)
        return PromptedViT(self.backbone, self.data.num_classes, self.cfg.prompts, policy)

    def pae(self, model: PromptedViT):
        """PAE regulariser for ``model`` (frequency init applied now), or None when disabled."""
        if not self.cfg.pae.enabled:
            return None
        from .pae import apply_pae

        return apply_pae(self.cfg.pae, model, self.data, self.device, self.cfg.seed)


@dataclass
class ExperimentResult:
    """Outcome of search + retrain: ``val_acc`` (stage ``select``) or ``test_acc`` (stage ``final``) of the
    retrained policy; ``search_val_acc`` is the supernet's own val score after the search."""

    policy: dict[int, str]
    stage: str
    val_acc: float | None
    test_acc: float | None
    search_val_acc: float | None
    tuned_params: int
    tuned_percent: float
    search_history: list[dict[str, Any]] = field(default_factory=list)
    retrain_history: list[dict[str, Any]] = field(default_factory=list)
    search_time_s: float = 0.0
    retrain_time_s: float = 0.0
    inference: dict[str, Any] | None = None  # measured eval throughput of the retrained policy

    def to_json(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["policy"] = {str(k): v for k, v in self.policy.items()}
        d.update(d.pop("inference") or {})
        return d


def backbone_param_count(backbone: nn.Module) -> int:
    return sum(p.numel() for p in backbone.parameters())


def run_search(exp: Experiment, out_dir: str | Path, on_epoch: EpochCallback | None = None,
               progress: bool = False, stop_after: int | None = None) -> SearchPhase:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = exp.supernet()
    phase = SearchPhase(exp.cfg, model, exp.data, exp.device, exp.pae(model))
    fit(phase, out / "search.pt", on_epoch, out / "log.jsonl", progress, stop_after)
    phase.policy = None
    if phase.epoch >= phase.epochs:
        done = out / "policy.json"
        if done.is_file() and (out / "alpha.pt").is_file():  # selected before (a finished, resumed run)
            phase.policy = load_policy(done)
        else:
            phase.policy = select_policy(model, exp, out)
            save_policy(phase.policy, done)
            torch.save(model.alpha.detach().cpu(), out / "alpha.pt")
    return phase


SEARCH_FILES = ("policy.json", "alpha.pt", "selection.json", "log.jsonl", "search.pt")  # checkpoint last: it marks a copy done


@contextmanager
def _waiting_lock(path: Path) -> Iterator[None]:
    """Exclusive ``flock`` on ``path``, waiting for a holder to finish (the kernel drops it if the holder dies)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl
        except ImportError:  # no flock on this platform: runs may search twice, never wrongly
            fcntl = None
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def shared_search(exp: Experiment, out_dir: str | Path, cache: str | Path, on_epoch: EpochCallback | None = None,
                  progress: bool = False) -> SearchPhase:
    """:func:`run_search` shared by runs whose configs differ only after the search (retrain, method budget), as
    the retrain-lr grid of a study has them: one run searches in ``cache/<search_hash>`` while the others wait on
    its lock; a waiting run then loads the finished checkpoint (its RNG state too, so the retrain is bitwise the one
    an unshared run makes) and every run copies the search files into ``out_dir``. A run that did not
    watch the search gets its epochs replayed to ``on_epoch`` (curves and Tune iterations match the searching
    run's); ``out_dir/search_reported`` counts what was reported, across retries. A run whose own folder
    already holds a search checkpoint continues that one."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "search.pt").is_file():
        return run_search(exp, out, on_epoch, progress)
    mark = out / "search_reported"
    reported = int(mark.read_text()) if mark.is_file() else 0

    def report(m: dict[str, Any]) -> None:
        nonlocal reported
        reported = int(m["epoch"])
        mark.write_text(str(reported))
        if on_epoch is not None:
            on_epoch(m)

    slot = Path(cache) / search_hash(exp.cfg)
    slot.mkdir(parents=True, exist_ok=True)
    with _waiting_lock(slot / ".lock"):
        searched = run_search(exp, slot, report, progress)
        if searched.policy is None:  # never copy an unfinished search
            raise PfnasError(f"shared search in {slot} did not finish")
    for m in searched.history:
        if int(m["epoch"]) > reported:
            report(m)
    for name in SEARCH_FILES:
        if (slot / name).is_file():
            tmp = out / f".{name}.tmp"
            shutil.copyfile(slot / name, tmp)
            os.replace(tmp, out / name)
    return searched


PIN_LOGIT = 1e4  # an alpha row pinned to one op: its softmax is exactly one-hot


def select_policy(model: PromptedViT, exp: Experiment, out: Path | None = None) -> dict[int, str]:
    """The discrete policy of a searched supernet by ``search.select``; parsimony writes its per-layer evidence
    to ``out/selection.json``."""
    s = exp.cfg.search
    if s.select == "argmax":
        return model.discretize()
    args = (model, exp.data, exp.device, exp.cfg.precision, exp.cfg.data.eval_batch_size)
    if s.select == "perturb":
        return perturbation_policy(*args)
    policy, layers = parsimony_policy(*args, z=s.select_z, prefer=s.select_prefer)
    if out is not None:
        (out / "selection.json").write_text(json.dumps({"rule": "parsimony", "z": s.select_z,
                                                        "prefer": s.select_prefer, "layers": layers}, indent=1))
    return policy


@torch.no_grad()
def _pinned_scores(model: PromptedViT, data: TaskData, device: torch.device, precision: str, batch_size: int,
                   layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image val cross-entropy and correctness [n_ops, n_val] with ``layer`` pinned to each op in turn
    (the other layers keep their current alpha). Val is read in its fixed order, so columns pair up."""
    losses, correct = [], []
    for i in range(len(model.candidates)):
        model.alpha[layer].fill_(-PIN_LOGIT)
        model.alpha[layer, i] = PIN_LOGIT
        batches = list(eval_logits(model, data, "val", batch_size, device, precision))
        losses.append(torch.cat([F.cross_entropy(logits.float(), y, reduction="none") for logits, y in batches]))
        correct.append(torch.cat([logits.argmax(-1) == y for logits, y in batches]))
    return torch.stack(losses).cpu(), torch.stack(correct).cpu()


@torch.no_grad()
def _pin_layer_by_layer(model: PromptedViT, data: TaskData, device: torch.device, precision: str, batch_size: int,
                        choose: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], int]) -> dict[int, str]:
    """Measured selection: layer by layer, ``choose(layer, losses, correct, alpha_row)`` picks an op from its
    pinned val scores (:func:`_pinned_scores`; the layers not decided yet keep their search weights) and the
    layer stays pinned to it. Returns the pinned policy; alpha is restored afterwards. Reads val only."""
    alpha0 = model.alpha.detach().clone()
    try:
        for l in range(model.depth):
            losses, correct = _pinned_scores(model, data, device, precision, batch_size, l)
            pick = choose(l, losses, correct, alpha0[l].cpu())
            model.alpha[l].fill_(-PIN_LOGIT)
            model.alpha[l, pick] = PIN_LOGIT
        return model.discretize()
    finally:
        model.alpha.copy_(alpha0)


def perturbation_policy(model: PromptedViT, data: TaskData, device: torch.device, precision: str,
                        batch_size: int) -> dict[int, str]:
    """Selection by measured val accuracy instead of argmax(alpha) (after Wang et al., ICLR 2021).

    Layer by layer, each candidate op is pinned in turn (the layers not decided yet keep their search
    weights, the decided ones stay pinned) and the op with the best supernet val accuracy is kept; ties go
    to the larger alpha. Costs depth x ops val evaluations; reads val only, never test.
    """
    def best_accuracy(l, losses, correct, alpha):
        acc = correct.float().mean(-1)
        return max(range(len(acc)), key=lambda i: (float(acc[i]), float(alpha[i])))

    return _pin_layer_by_layer(model, data, device, precision, batch_size, best_accuracy)


def parsimonious_choice(losses: torch.Tensor, costs: torch.Tensor, alpha: torch.Tensor,
                        z: float, prefer: int | None = None) -> tuple[int, list[int]]:
    """One layer's pick from per-image val losses [n_ops, n]: the op with the lowest mean loss, unless other
    ops are not significantly worse -- paired difference to the best within ``z`` standard errors -- in
    which case, among those tied, op ``prefer`` if it is one, else the cheapest (then the larger alpha).
    Returns (pick, the tied ops)."""
    mean = losses.double().mean(-1)
    best = int(mean.argmin())
    diff = losses.double() - losses[best].double()
    n = losses.shape[-1]
    se = diff.std(-1) / n ** 0.5 if n > 1 else torch.zeros_like(mean)  # paired: per-image differences
    tied = [i for i in range(len(mean)) if i == best or float(diff[i].mean()) <= z * float(se[i])]
    pick = min(tied, key=lambda i: (i != prefer, float(costs[i]), -float(alpha[i]), i))
    return pick, tied


def parsimony_policy(model: PromptedViT, data: TaskData, device: torch.device, precision: str, batch_size: int,
                     z: float = 2.0, prefer: str | None = None) -> tuple[dict[int, str], list[dict[str, Any]]]:
    """Selection that leaves undetectable differences to the parameter count (``search.select: parsimony``).

    Layer by layer (as :func:`perturbation_policy`: decided layers stay pinned), each candidate op is pinned
    and scored by per-image val loss; the op kept is the cheapest (fewest deployed numbers) of those whose
    loss is within ``z`` paired standard errors of the best op's. Where val separates the ops this is the
    measured best; where it cannot, the cheap op instead of alpha's noise. Per-layer tests compound: each
    pinned layer may cost up to ``z`` SEs, and near-identical ops can differ "significantly" by a hair, so
    the rule leans to the cheapest op (on the proxy: more reproducible and 2.8x cheaper than argmax on
    digits at -0.5 val points, but -3.7 on dsprites_loc, where ``add`` is weak; README). ``prefer`` (an op
    name, e.g. the val-best single op) takes the ties instead of the cheapest op (proxy, 3 seeds: val +0.7 /
    +2.6 / +2.1 over argmax on three tasks, -0.7 on the fourth, at 30-59% of its deployed numbers; agreement
    still 0.53-0.61; README). Returns the policy and, per layer, each pinned op's mean val loss and accuracy
    and the tied set. Reads val only.
    """
    costs, ops, layers = model.param_costs(), model.candidates, []
    preferred = None if prefer is None else ops.index(prefer)

    def pick_among_tied(l, losses, correct, alpha):
        pick, tied = parsimonious_choice(losses, costs[l], alpha, z, preferred)
        layers.append({"layer": l, "pick": ops[pick], "tied": [ops[i] for i in tied],
                       "val_loss": dict(zip(ops, losses.double().mean(-1).tolist())),
                       "val_acc": dict(zip(ops, correct.float().mean(-1).tolist()))})
        return pick

    return _pin_layer_by_layer(model, data, device, precision, batch_size, pick_among_tied), layers


@torch.no_grad()
def inference_throughput(model: nn.Module, data: TaskData, device: torch.device, precision: str, batch_size: int,
                         steps: int = 5, warmup: int = 2) -> dict[str, Any]:
    """Measured eval-mode forward throughput of ``model``: median of ``steps`` batches of ``batch_size``
    images (from the first split, repeated to fill the batch), bracketed by device syncs."""
    from .bench import _forward_fn, time_steps  # the bench's own timer (device syncs, median)

    x = next(iter(data.batches(next(iter(data.splits)), batch_size)))[0]
    x = x.repeat(-(-batch_size // x.shape[0]), 1, 1, 1)[:batch_size].to(device)  # a full batch on small splits
    sec = time_steps(_forward_fn(model, x, device, precision), device, steps, warmup)["ms"] / 1e3
    return {"infer_images_per_s": batch_size / sec, "infer_ms_per_image": 1e3 * sec / batch_size,
            "infer_batch": batch_size, "infer_device": str(device)}


def run_retrain(exp: Experiment, policy: dict | list, out_dir: str | Path, on_epoch: EpochCallback | None = None,
                progress: bool = False, stop_after: int | None = None,
                eval_every: int | None = None) -> RetrainPhase:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = exp.fixed(policy)
    phase = RetrainPhase(exp.cfg, model, exp.data, exp.device, exp.pae(model), eval_every=eval_every)
    fit(phase, out / "retrain.pt", on_epoch, out / "log.jsonl", progress, stop_after)
    phase.inference = None
    if phase.epoch >= phase.epochs:  # finished: measured inference, and the self-contained model files
        phase.inference = inference_throughput(model, exp.data, exp.device, exp.cfg.precision,
                                               min(exp.cfg.data.eval_batch_size, 128))
        from .export import export_model

        last = phase.history[-1] if phase.history else {}
        score = {k: last[k] for k in (f"{phase.eval_split}_acc", f"{phase.eval_split}_loss") if k in last}
        export_model(out, model, exp.cfg, exp.data, score)
    return phase


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, on_epoch: EpochCallback | None = None,
                   progress: bool = False, exp: Experiment | None = None,
                   search_cache: str | Path | None = None) -> ExperimentResult:
    """Search, discretize, retrain (on the splits of ``train.stage``) and score; resumes from ``out_dir``. With
    ``search_cache`` the search is shared with other runs of the same search config (:func:`shared_search`)."""
    with claim_run_dir(cfg, out_dir) as claim:
        return _run_experiment(cfg, claim.path, on_epoch, progress, exp, search_cache)


def _run_experiment(cfg: ExperimentConfig, out: Path, on_epoch: EpochCallback | None, progress: bool,
                    exp: Experiment | None, search_cache: str | Path | None = None) -> ExperimentResult:
    exp = exp or Experiment.build(cfg)
    t0 = time.perf_counter()
    if search_cache is not None:
        search = shared_search(exp, out, search_cache, on_epoch, progress)
    else:
        search = run_search(exp, out, on_epoch, progress)
    t1 = time.perf_counter()
    policy = search.policy
    retrain = run_retrain(exp, policy, out, on_epoch, progress)
    t2 = time.perf_counter()
    final = retrain.history[-1]
    tuned = retrain.model.tuned_parameter_count()
    res = ExperimentResult(policy=policy, stage=cfg.train.stage, val_acc=final.get("val_acc"),
                           test_acc=final.get("test_acc"),
                           search_val_acc=search.history[-1]["val_acc"] if search.history else None,
                           tuned_params=tuned,
                           tuned_percent=100.0 * tuned / backbone_param_count(exp.backbone),
                           search_history=search.history, retrain_history=retrain.history,
                           search_time_s=t1 - t0, retrain_time_s=t2 - t1, inference=retrain.inference)
    (out / "result.json").write_text(json.dumps(res.to_json(), indent=1))
    return res
