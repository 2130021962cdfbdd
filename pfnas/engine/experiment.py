"""An experiment in an output folder: :class:`Experiment` (backbone, data, device built from a config), the folder
claim that makes a rerun resume, and the runs: :func:`run_search` (optionally shared by a study's trials),
:func:`run_retrain`, :func:`run_experiment` (search, discretize, retrain, score)."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from ..config import (ExperimentConfig, PfnasError, RunDirError, config_diff, config_hash, dump_config,
                      search_hash)
from ..data import TaskData, load_task
from ..export import export_model
from ..model import PromptedViT, backbone_input, load_backbone, load_policy, save_policy
from ..pae import apply_pae
from ..runtime import load_checkpoint, resolve_device, save_checkpoint, seed_everything, try_lock, write_atomic
from ..timing import forward_fn, time_steps
from .phases import EpochCallback, RetrainPhase, SearchPhase, fit
from .selection import select_policy

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
    """The run folder's lock (:func:`~pfnas.runtime.try_lock` on ``out/.lock``); held elsewhere: RunDirError."""
    fd, holder = try_lock(out / ".lock")
    if fd < 0:
        raise RunDirError(f"{out} is in use by another pfnas run{f' (pid {holder})' if holder else ''}; "
                          "wait for it to end or use another --out")
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
                             device=device if cfg.data.resident else "cpu")
        return cls(cfg, backbone, data, device)

    def supernet(self, per_op_prompts: bool | None = None) -> PromptedViT:
        """The search supernet; ``per_op_prompts`` None: ``search.per_op_prompts``."""
        seed_everything(self.cfg.seed)
        per_op = self.cfg.search.per_op_prompts if per_op_prompts is None else per_op_prompts
        return PromptedViT(self.backbone, self.data.num_classes, self.cfg.prompts, None, self.cfg.search.mode, per_op)

    def fixed(self, policy: dict | list) -> PromptedViT:
        seed_everything(self.cfg.seed + 1)
        return PromptedViT(self.backbone, self.data.num_classes, self.cfg.prompts, policy)

    def pae(self, model: PromptedViT):
        """PAE regulariser for ``model`` (frequency init applied now), or None when disabled."""
        if not self.cfg.pae.enabled:
            return None
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
    val_loss: float | None = None  # the retrained policy's val loss (stage select): breaks val_acc ties
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
            phase.policy = select_policy(model, exp.cfg, exp.data, exp.device, out)
            save_policy(phase.policy, done)
            save_checkpoint(model.alpha.detach().cpu(), out / "alpha.pt")
    return phase


# the checkpoint last: it marks a copy done (its sha256 sidecar before it)
SEARCH_FILES = ("policy.json", "alpha.pt", "alpha.pt.sha256", "selection.json", "log.jsonl", "search.pt.sha256",
                "search.pt")


@contextmanager
def waiting_lock(path: Path) -> Iterator[None]:
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
        if int(m["epoch"]) > reported + 1:  # the slot ran on while this run was down: its checkpoint has those epochs
            for old in load_checkpoint(slot / "search.pt")["history"]:
                if reported < int(old["epoch"]) < int(m["epoch"]):
                    report(old)
        reported = int(m["epoch"])
        mark.write_text(str(reported))
        if on_epoch is not None:
            on_epoch(m)

    slot = Path(cache) / search_hash(exp.cfg)
    slot.mkdir(parents=True, exist_ok=True)
    with waiting_lock(slot / ".lock"):
        searched = run_search(exp, slot, report, progress)
        if searched.policy is None:  # never copy an unfinished search
            raise PfnasError(f"shared search in {slot} did not finish")
    for m in searched.history:
        if int(m["epoch"]) > reported:  # history keeps no alpha: the last epoch gets the searched one (heatmap)
            last = int(m["epoch"]) == searched.epochs
            report({**m, "alpha": searched.model.alpha_probs().tolist()} if last else m)
    for name in SEARCH_FILES:  # no temporary names: a folder syncer (Ray Tune's) could list one and then miss it
        if (slot / name).is_file() and name != "search.pt":
            shutil.copyfile(slot / name, out / name)  # rewritten whole by a retry: the checkpoint comes last
    try:  # the checkpoint marks the copy done, so it appears whole at once: a hard link (never written again)
        os.link(slot / "search.pt", out / "search.pt")
    except OSError:  # another filesystem, or no links
        write_atomic(out / "search.pt", (slot / "search.pt").read_bytes(), "checkpoint")
    return searched


@torch.no_grad()
def inference_throughput(model: nn.Module, data: TaskData, device: torch.device, precision: str, batch_size: int,
                         steps: int = 5, warmup: int = 2) -> dict[str, Any]:
    """Measured eval-mode forward throughput of ``model``: median of ``steps`` batches of ``batch_size``
    images (from the first split, repeated to fill the batch), bracketed by device syncs."""
    x = next(iter(data.batches(next(iter(data.splits)), batch_size)))[0]
    x = x.repeat(-(-batch_size // x.shape[0]), 1, 1, 1)[:batch_size].to(device)  # a full batch on small splits
    sec = time_steps(forward_fn(model, x, device, precision), device, steps, warmup)["ms"] / 1e3
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
                           val_loss=final.get("val_loss"), test_acc=final.get("test_acc"),
                           search_val_acc=search.history[-1]["val_acc"] if search.history else None,
                           tuned_params=tuned,
                           tuned_percent=100.0 * tuned / backbone_param_count(exp.backbone),
                           search_history=search.history, retrain_history=retrain.history,
                           search_time_s=t1 - t0, retrain_time_s=t2 - t1, inference=retrain.inference)
    write_atomic(out / "result.json", json.dumps(res.to_json(), indent=1))
    return res
