"""Timing of steps on a device: syncs, interleaved medians, an evaluation forward, steps per epoch.

Shared by the bench, the engine's measured inference throughput, the per-op latency table and the baselines'
time budgets, so every measured number in pfnas comes from one timer.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
import torch.nn as nn

from .errors import ConfigError
from .runtime import autocast

Lap = Callable[[], None]


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Weight steps of an engine epoch on ``n`` images (drop_last when ``n >= batch_size``)."""
    return max(n // batch_size, 1) if n >= batch_size else 1


def sync(device: torch.device) -> None:
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
        sync(device)
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


def forward_fn(model: nn.Module, x: torch.Tensor, device: torch.device, precision: str) -> Callable[[Lap], Any]:
    """Evaluation forward (eval mode, no grad, autocast) that leaves the model's train/eval mode as it was."""
    def step(lap: Lap) -> None:
        was = model.training
        model.eval()
        with torch.no_grad(), autocast(device, precision):
            model(x)
        model.train(was)

    return step
