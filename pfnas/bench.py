"""Step-throughput benchmark of the frozen backbone, VPT-deep, the search supernet and retrained policies.

Every row times the engine's own step code (:meth:`Phase._weight_step`, :meth:`SearchPhase._arch_step`)
on one synthetic batch that already sits on the device, so data loading is outside the timed region.
Each step is bracketed by device synchronisation, rows are timed round-robin (so load drift on a shared
machine hits all rows alike), warmup rounds are dropped and the median step time is reported. Throughput counts *training* images only: a search step consumes a train batch (weight step)
and a val batch (arch step) but is credited with ``batch_size`` images, so its img/s is directly
comparable with a VPT-deep step. The engine runs the arch step only every ``arch_every`` weight steps
(``|train| // |val|`` = 4 on VTAB-1k when unset), so search rows also report the amortised rate
``batch / (weight_ms + arch_ms / arch_every)``; the DESIGN target for search is checked on that rate.

:func:`bench_end_to_end` runs :func:`~pfnas.engine.run_experiment` on the configured task and compares
its wall time with the sum of its measured step times (DESIGN target: within 1.5x).
"""
from __future__ import annotations

import gc
import json
import math
import platform
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from .config import ConfigError, ExperimentConfig, TrainingError, merge_dotted
from .data import Split, TaskData
from .engine import (Experiment, RetrainPhase, SearchPhase, autocast, backbone_param_count, resolve_device,
                     run_experiment, seed_everything)
from .model import backbone_input, load_backbone, load_policy, normalize_policy

SEARCH_TARGET = 0.8  # DESIGN: search step >= 0.8x VPT-deep throughput
RETRAIN_TARGET = 1.0  # DESIGN: retrained policy >= 1.0x VPT-deep throughput
E2E_TARGET = 1.5  # DESIGN: one task end to end within 1.5x of its pure step time
DEFAULT_ARCH_EVERY = 4  # |train800| // |val200|: the engine's cadence on VTAB-1k when search.arch_every is unset
BENCH_LR = 1e-4  # step cost does not depend on the lr; a small one keeps random-label steps finite

Lap = Callable[[], None]


# ----------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[Lap], Any]], device: torch.device, steps: int,
                     warmup: int) -> dict[str, dict[str, Any]]:
    """Time several step functions round-robin: ``warmup + steps`` rounds, one step of each per round.

    Interleaving makes load drift on a shared machine hit every row alike. Each call is bracketed by
    device syncs; ``fn(lap)`` may call ``lap()`` to mark a boundary inside its step (e.g. arch | weight).
    Per function: median and mean ms over the timed rounds, the median of each lap-delimited part
    (``parts_ms``) and, on CUDA, the peak memory allocated during its steps (``peak_mib``).
    """
    if steps < 1 or warmup < 0:
        raise ConfigError(f"bench needs steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    totals: dict[str, list[float]] = {k: [] for k in fns}
    parts: dict[str, list[list[float]]] = {k: [] for k in fns}
    peak: dict[str, float | None] = {k: None for k in fns}
    marks: list[float] = []

    def lap() -> None:
        _sync(device)
        marks.append(time.perf_counter())

    for i in range(warmup + steps):
        for key, fn in fns.items():
            marks.clear()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            lap()
            fn(lap)
            lap()
            if device.type == "cuda":
                peak[key] = max(peak[key] or 0.0, torch.cuda.max_memory_allocated(device) / 2**20)
            if i >= warmup:
                totals[key].append(marks[-1] - marks[0])
                parts[key].append([b - a for a, b in zip(marks, marks[1:])])
    return {k: {"ms": 1e3 * statistics.median(totals[k]), "mean_ms": 1e3 * statistics.fmean(totals[k]),
                "parts_ms": [1e3 * statistics.median(p) for p in zip(*parts[k])], "peak_mib": peak[k]}
            for k in fns}


def time_steps(step: Callable[[Lap], Any], device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """:func:`time_interleaved` for a single step function."""
    return time_interleaved({"step": step}, device, steps, warmup)["step"]


@contextmanager
def _tf32(device: torch.device) -> Iterator[None]:
    """TF32 matmuls/convolutions on CUDA for the duration of the benchmark (restored afterwards)."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _free_memory(device: torch.device) -> None:
    """Return cached CUDA blocks of models that are gone (no-op on CPU)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} torch threads)"


def _bf16(cfg: ExperimentConfig, device: torch.device) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


# ----------------------------------------------------------------------------- inputs
def _random_batch(n: int, size: int, num_classes: int, device: torch.device, gen: torch.Generator):
    x = torch.randn(n, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, num_classes, (n,), generator=gen).to(device)
    return x, y


def _bench_task(n: int, size: int, num_classes: int, mean, std, device: torch.device) -> TaskData:
    """Random uint8 task of ``n`` images per split: bookkeeping for the phases (and PAE init), not timed."""
    gen = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen).to(device),
                  (torch.arange(n) % num_classes).to(device))
    return TaskData("bench", num_classes, {s: split for s in ("train", "val", "trainval", "test")},
                    size, tuple(mean), tuple(std))


def mixed_policy(depth: int, ops: list[str]) -> list[str]:
    """Representative retrained policy: layers cycle through the search space's ops."""
    return [ops[l % len(ops)] for l in range(depth)]


# ----------------------------------------------------------------------------- step functions
def search_step(phase: SearchPhase, xt, yt, xv, yv, lap: Lap | None = None) -> None:
    """One arch step on the val batch, then one weight step with alpha frozen, as ``SearchPhase.run_epoch``."""
    phase._arch_step(xt, yt, xv, yv)
    if lap is not None:
        lap()
    alpha = phase.model.alpha
    alpha.requires_grad_(False)
    try:
        phase._weight_step(xt, yt)
    finally:
        alpha.requires_grad_(True)


def _forward_fn(model: nn.Module, x: torch.Tensor, device: torch.device, precision: str) -> Callable[[Lap], Any]:
    """Evaluation forward (eval mode, no grad, autocast) that leaves the model's train/eval mode as it was."""
    def step(lap: Lap) -> None:
        was = model.training
        model.eval()
        with torch.no_grad(), autocast(device, precision):
            model(x)
        model.train(was)

    return step


# ----------------------------------------------------------------------------- benchmark
def _bench_rows(cfg: ExperimentConfig, device: torch.device, batch_size: int, steps: int, warmup: int,
                policy, num_classes: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Build every row's model and phase, time their steps interleaved; returns the rows and backbone facts."""
    seed_everything(cfg.seed)
    backbone = load_backbone(cfg.backbone).to(device)
    size, mean, std = backbone_input(backbone)
    depth = len(backbone.blocks)
    bb_params = backbone_param_count(backbone)
    data = _bench_task(max(batch_size, cfg.pae.score_batch if cfg.pae.enabled else 1), size, num_classes,
                       mean, std, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    xt, yt = _random_batch(batch_size, size, num_classes, device, gen)
    xv, yv = _random_batch(batch_size, size, num_classes, device, gen)
    arch_every = cfg.search.arch_every or DEFAULT_ARCH_EVERY
    if policy is None:
        mixed = mixed_policy(depth, list(cfg.prompts.ops))
    else:
        mixed = load_policy(policy) if isinstance(policy, (str, Path)) else policy
    mixed = [v for _, v in sorted(normalize_policy(mixed, depth).items())]

    specs: list[dict[str, Any]] = [{"key": "frozen_forward", "label": "frozen forward", "tuned_params": 0,
                                    "fn": _forward_fn(backbone, xt, device, cfg.precision)}]

    def fixed(key: str, label: str, pol: list[str]) -> None:
        exp = Experiment(cfg, backbone, data, device)
        model = exp.fixed(pol)
        phase = RetrainPhase(cfg, model, data, device, exp.pae(model))
        model.train()
        specs.append({"key": key, "label": label, "tuned_params": model.tuned_parameter_count(), "policy": pol,
                      "fn": lambda lap: phase._weight_step(xt, yt)})

    def search(key: str, label: str, mode: str) -> None:
        scfg = merge_dotted(cfg, {"search.mode": mode})
        exp = Experiment(scfg, backbone, data, device)
        model = exp.supernet()
        phase = SearchPhase(scfg, model, data, device, exp.pae(model))
        model.train()
        specs.append({"key": key, "label": label, "tuned_params": model.tuned_parameter_count(),
                      "fn": lambda lap: search_step(phase, xt, yt, xv, yv, lap)})

    fixed("vpt_deep", "VPT-deep", ["prepend"] * depth)
    search("search_softmax", "search soft", "softmax")
    search("search_gumbel", "search 1-path", "gumbel")
    fixed("retrain_mixed", "retrain mixed", mixed)
    for op in ("add", "affine", "cross_attn"):
        fixed(f"retrain_{op}", f"retrain {op}", [op] * depth)
    fixed("linear_probe", "linear probe", ["none"] * depth)

    _free_memory(device)
    timings = time_interleaved({s["key"]: s.pop("fn") for s in specs}, device, steps, warmup)
    rows = []
    for s in specs:
        t = timings[s["key"]]
        row = {**s, "images_per_s": batch_size / (t["ms"] / 1e3), "ms": t["ms"], "mean_ms": t["mean_ms"],
               "tuned_percent": 100.0 * s["tuned_params"] / bb_params, "peak_mem_mib": t["peak_mib"]}
        if s["key"].startswith("search_"):
            arch_ms, weight_ms = t["parts_ms"]
            row.update(arch_ms=arch_ms, weight_ms=weight_ms, arch_every=arch_every,
                       amortised_images_per_s=batch_size / ((weight_ms + arch_ms / arch_every) / 1e3))
        rows.append(row)
    info = {"img_size": size, "depth": depth, "embed_dim": backbone.embed_dim, "backbone_params": bb_params,
            "arch_every": arch_every, "mixed_policy": mixed}
    return rows, info


def run_bench(cfg: ExperimentConfig, *, batch_size: int = 32, steps: int = 10, warmup: int = 3,
              out: str | Path | None = None, console=None, policy: list | dict | str | Path | None = None,
              num_classes: int = 10, e2e: bool = False, e2e_dir: str | Path | None = None) -> dict[str, Any]:
    """Benchmark the step throughput of every model kind for ``cfg``'s backbone; prints and returns the table.

    Rows: frozen forward, VPT-deep, soft and single-path search steps, the mixed retrained policy
    (``policy``: list, ``{layer: op}`` or policy file; default: layers cycle through ``prompts.ops``),
    all-add / all-affine / all-cross_attn and the linear probe, each with img/s and its ratio to
    VPT-deep. ``e2e`` also runs :func:`bench_end_to_end` in ``e2e_dir`` (default: a temporary folder,
    removed afterwards) and adds its result under ``"e2e"``.
    """
    import timm
    from rich.console import Console

    console = console or Console()
    if batch_size < 1:
        raise ConfigError(f"bench needs batch_size >= 1, got {batch_size}")
    if steps < 1 or warmup < 0:
        raise ConfigError(f"bench needs steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    device = resolve_device(cfg.device)
    # the lr does not change the cost of a step; a small one keeps many steps on random labels finite
    bench_cfg = merge_dotted(cfg, {"search.optim.lr": BENCH_LR, "train.optim.lr": BENCH_LR})
    try:
        with _tf32(device):
            rows, info = _bench_rows(bench_cfg, device, batch_size, steps, warmup, policy, num_classes)
    except torch.cuda.OutOfMemoryError:
        raise TrainingError(f"out of GPU memory at batch {batch_size}; lower --batch-size") from None

    vpt = next(r for r in rows if r["key"] == "vpt_deep")["images_per_s"]
    for r in rows:
        r["ratio_vpt"] = r["images_per_s"] / vpt
        if "amortised_images_per_s" in r:
            r["amortised_ratio_vpt"] = r["amortised_images_per_s"] / vpt
        target = {"search_gumbel": SEARCH_TARGET, "retrain_mixed": RETRAIN_TARGET}.get(r["key"])
        if target is not None:
            r["target"] = target
            r["check"] = "pass" if r.get("amortised_ratio_vpt", r["ratio_vpt"]) >= target else "below"
    by_key = {r["key"]: r for r in rows}
    k = info["arch_every"]
    targets = [
        {"what": f"search 1-path, arch step every {k} weight steps",
         "ratio_vpt": by_key["search_gumbel"]["amortised_ratio_vpt"], "target": SEARCH_TARGET},
        {"what": "search 1-path, arch step every weight step",
         "ratio_vpt": by_key["search_gumbel"]["ratio_vpt"], "target": SEARCH_TARGET},
        {"what": "retrained mixed policy", "ratio_vpt": by_key["retrain_mixed"]["ratio_vpt"],
         "target": RETRAIN_TARGET},
    ]
    for t in targets:
        t["check"] = "pass" if t["ratio_vpt"] >= t["target"] else "below"
    result: dict[str, Any] = {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "timm": timm.__version__, "cuda": torch.version.cuda if device.type == "cuda" else None,
        "precision": "bf16" if _bf16(cfg, device) else "fp32", "tf32": device.type == "cuda",
        "backbone": cfg.backbone.name, "backbone_kwargs": dict(cfg.backbone.kwargs),
        "checkpoint": cfg.backbone.checkpoint, **info, "prompt_length": cfg.prompts.length,
        "ops": list(cfg.prompts.ops), "search_order": cfg.search.order, "pae": cfg.pae.enabled,
        "batch_size": batch_size, "steps": steps, "warmup": warmup, "num_classes": num_classes,
        "images_counted": "train images only (a search step also processes a val batch of the same size)",
        "rows": rows, "targets": targets,
    }
    if e2e:
        tmp = e2e_dir is None
        run_dir = Path(tempfile.mkdtemp(prefix="pfnas-e2e-")) if tmp else Path(e2e_dir)
        try:
            result["e2e"] = bench_end_to_end(cfg, run_dir, steps=steps, warmup=warmup)
        finally:
            if tmp:
                shutil.rmtree(run_dir, ignore_errors=True)
    print_bench(result, console)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))
        console.print(f"wrote {out}")
    return result


def print_bench(result: dict[str, Any], console) -> None:
    """Rich table of the rows, then the DESIGN target checks (and the end-to-end check if present)."""
    from rich import box
    from rich.table import Table

    cuda = result["device_type"] == "cuda"
    k = result["arch_every"]
    title = (f"{result['backbone']} {result['img_size']}px depth {result['depth']}, P={result['prompt_length']}, "
             f"batch {result['batch_size']}, {result['precision']}, median of {result['steps']} steps")
    caption = (f"{result['device']} | torch {result['torch']} | timm {result['timm']}\n"
               f"img/s: train images per step (a search step also runs a val batch)\n"
               f"@1/{k}: xVPT of search with an arch step every {k} weight steps (engine cadence); "
               f"%bb: tuned params as % of the backbone; check: search 1-path @1/{k} >= {SEARCH_TARGET}x, "
               f"retrain mixed >= {RETRAIN_TARGET}x VPT-deep")
    tab = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, show_edge=False)
    cols = ["step", "img/s", "xVPT", "ms", f"@1/{k}", "params", "%bb", *(["MiB"] if cuda else []), "check"]
    for col in cols:
        tab.add_column(col, justify="left" if col == "step" else "right", no_wrap=True)
    for r in result["rows"]:
        check = r.get("check")
        target = f"[{'green' if check == 'pass' else 'red'}]{check}[/]" if check else ""
        ips = r["images_per_s"]
        tab.add_row(r["label"], f"{ips:,.1f}" if ips < 100 else f"{ips:,.0f}", f"{r['ratio_vpt']:.2f}",
                    f"{r['ms']:.1f}" if r["ms"] < 1000 else f"{r['ms']:,.0f}",
                    f"{r['amortised_ratio_vpt']:.2f}" if "amortised_ratio_vpt" in r else "",
                    f"{r['tuned_params']:,}", f"{r['tuned_percent']:.2f}",
                    *([f"{r['peak_mem_mib']:,.0f}"] if cuda else []), target)
    console.print(tab)
    for t in result["targets"]:
        mark = "[green]pass[/]" if t["check"] == "pass" else "[red]below[/]"
        console.print(f"target: {t['what']}: {t['ratio_vpt']:.2f}x VPT-deep (>= {t['target']:.1f}x) {mark}")
    e = result.get("e2e")
    if e:
        mark = "[green]pass[/]" if e["check"] == "pass" else "[red]below[/]"
        console.print(f"target: end to end {e['wall_s']:.1f}s vs {e['predicted_s']:.1f}s pure step time = "
                      f"{e['ratio']:.2f}x (<= {E2E_TARGET}x) {mark}")


# ----------------------------------------------------------------------------- end to end
def _steps_per_epoch(n: int, batch_size: int) -> int:
    """Weight steps per epoch, as :class:`~pfnas.engine.Phase` counts them (drop_last when n >= batch)."""
    return max(n // batch_size, 1) if n >= batch_size else 1


def bench_end_to_end(cfg: ExperimentConfig, out_dir: str | Path, *, steps: int = 5,
                     warmup: int = 2) -> dict[str, Any]:
    """Run :func:`run_experiment` on ``cfg``'s task and compare its wall time with its pure step time.

    The run goes to a fresh folder under ``out_dir`` (run_experiment resumes from checkpoints it finds).
    Predicted time = search weight steps x weight-step time + arch steps x arch-step time + retrain steps
    x retrain-step time + eval batches x eval-forward time, each step timed afterwards on the task's own
    first batch (median of ``steps``, interleaved) for the supernet and for the discovered policy. Data decoding
    (``Experiment.build``) is reported as ``setup_s`` and not counted in the wall time.
    """
    device = resolve_device(cfg.device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=out))
    with _tf32(device):
        t0 = time.perf_counter()
        exp = Experiment.build(cfg)
        _sync(device)
        setup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = run_experiment(cfg, run_dir, exp=exp)
        _sync(device)
        wall_s = time.perf_counter() - t0

        data, bs, ebs = exp.data, cfg.data.batch_size, cfg.data.eval_batch_size
        xt, yt = next(data.batches("train", bs))
        xv, yv = next(data.batches("val", bs))
        xtv, ytv = next(data.batches("trainval", bs))

        supernet = exp.supernet()
        search = SearchPhase(cfg, supernet, data, device, exp.pae(supernet))
        fixed = exp.fixed(res.policy)
        retrain = RetrainPhase(cfg, fixed, data, device, exp.pae(fixed))
        supernet.train()
        fixed.train()
        t = time_interleaved({
            "search": lambda lap: search_step(search, xt, yt, xv, yv, lap),
            "retrain": lambda lap: retrain._weight_step(xtv, ytv),
            "val": _forward_fn(supernet, next(data.batches("val", ebs))[0], device, cfg.precision),
            "test": _forward_fn(fixed, next(data.batches("test", ebs))[0], device, cfg.precision),
        }, device, steps, warmup)
        arch_ms, weight_ms = t["search"]["parts_ms"]
        retrain_ms, val_ms, test_ms = t["retrain"]["ms"], t["val"]["ms"], t["test"]["ms"]

    counts = {
        "search_weight_steps": cfg.search.epochs * _steps_per_epoch(data.num_images("train"), bs),
        "arch_steps": sum(int(h.get("arch_steps", 0)) for h in res.search_history),
        "retrain_steps": cfg.train.epochs * _steps_per_epoch(data.num_images("trainval"), bs),
        "val_eval_batches": cfg.search.epochs * math.ceil(data.num_images("val") / ebs),
        "test_eval_batches": sum(1 for h in res.retrain_history if "test_acc" in h)
                             * math.ceil(data.num_images("test") / ebs),
    }
    parts_s = {
        "search_weight": counts["search_weight_steps"] * weight_ms / 1e3,
        "search_arch": counts["arch_steps"] * arch_ms / 1e3,
        "retrain": counts["retrain_steps"] * retrain_ms / 1e3,
        "eval": (counts["val_eval_batches"] * val_ms + counts["test_eval_batches"] * test_ms) / 1e3,
    }
    predicted = sum(parts_s.values())
    ratio = wall_s / max(predicted, 1e-9)
    return {"task": cfg.data.task or cfg.data.kind, "policy": {str(k): v for k, v in res.policy.items()},
            "test_acc": res.test_acc, "setup_s": setup_s, "wall_s": wall_s,
            "search_s": res.search_time_s, "retrain_s": res.retrain_time_s,
            "search_loop_s": sum(h.get("epoch_time_s", 0.0) for h in res.search_history),
            "retrain_loop_s": sum(h.get("epoch_time_s", 0.0) for h in res.retrain_history),
            "step_ms": {"search_arch": arch_ms, "search_weight": weight_ms, "retrain": retrain_ms,
                        "eval_val_batch": val_ms, "eval_test_batch": test_ms},
            "counts": counts, "predicted_parts_s": parts_s, "predicted_s": predicted, "ratio": ratio,
            "target": E2E_TARGET, "check": "pass" if ratio <= E2E_TARGET else "below", "run_dir": str(run_dir)}
