"""Measured costs the search can weigh: the per-op step latency table of a backbone, cached on disk."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..config import ExperimentConfig
from ..runtime import autocast, uses_bf16, write_atomic
from ..sysinfo import cpu_model
from ..timing import Lap, time_interleaved


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} torch threads)"


def _latency_cache_path(cfg: ExperimentConfig, device: torch.device, batch_size: int) -> Path:
    key = json.dumps([cfg.backbone.name, cfg.backbone.kwargs, device_name(device), batch_size, cfg.prompts.length,
                      cfg.prompts.fusion_dim, list(cfg.prompts.ops), uses_bf16(cfg.precision, device), torch.__version__],
                     sort_keys=True, default=str)
    root = Path(os.environ.get("PFNAS_CACHE", Path.home() / ".cache" / "pfnas")) / "latency"
    return root / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"


def op_latency_table(cfg: ExperimentConfig, model: nn.Module, device: torch.device, batch_size: int,
                     steps: int = 5, warmup: int = 2) -> torch.Tensor:
    """[depth, n_ops] milliseconds of one training step (forward + backward) of each candidate op in a block.

    Measured on the supernet's first layer (the blocks of a ViT are alike, so the row is shared by every
    layer), timed interleaved, and cached per backbone / device / batch / prompt length / precision under
    ``$PFNAS_CACHE`` (default ``~/.cache/pfnas``), so a study measures it once.
    """
    path = _latency_cache_path(cfg, device, batch_size)
    if path.is_file():
        row = json.loads(path.read_text())["ms"]
    else:
        layer, block = model.layers[0], model.backbone.blocks[0]
        bb = model.backbone
        tokens = bb.patch_embed.num_patches + int(getattr(bb, "num_prefix_tokens", 1))
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(batch_size, tokens, model.dim, generator=gen).to(device)

        def step_fn(i: int) -> Callable[[Lap], Any]:
            def step(lap: Lap) -> None:
                with autocast(device, cfg.precision):
                    out = layer.run_op(i, block, x, layer.op_prompts(i), model.n_prefix)
                out.float().sum().backward()
                layer.zero_grad(set_to_none=True)
            return step

        timings = time_interleaved({op: step_fn(i) for i, op in enumerate(layer.op_names)}, device, steps, warmup)
        row = [timings[op]["ms"] for op in layer.op_names]
        write_atomic(path, json.dumps({"ops": layer.op_names, "ms": row, "device": device_name(device),
                                       "batch_size": batch_size, "backbone": cfg.backbone.name}), "latency table")
    return torch.tensor([row] * len(model.layers))
