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

The ``plain_vpt_deep`` row is a reference: a minimal VPT-deep training step written directly on timm's
blocks (:class:`PlainVPTDeep`, no pfnas model code), timed in the same rounds, so pfnas's own VPT-deep
overhead (``ratio_plain``, DESIGN target >= 0.95x) is measured side by side on any device. Every row's FLOPs
per step are counted once with :class:`torch.utils.flop_counter.FlopCounterMode` (an extra step outside
the timed region) and reported as achieved TFLOP/s at the median step time. ``torch_compile`` wraps each
row's model with :func:`torch.compile`; a row whose compilation fails reports ``error``.
"""
from __future__ import annotations

import gc
import json
import math
import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError, ExperimentConfig, TrainingError, merge_dotted
from .data import Split, TaskData
from .engine import Experiment, OneShotPhase, RetrainPhase, SearchPhase, backbone_param_count, run_experiment
from .engine.costs import device_name
from .runtime import autocast, resolve_device, seed_everything, uses_bf16
from .model import backbone_input, load_backbone, load_policy, normalize_policy
from .timing import Lap, forward_fn, steps_per_epoch, sync, time_interleaved

SEARCH_TARGET = 1.0  # DESIGN: single-path search at the VTAB-1k cadence >= 1.0x VPT-deep throughput
RETRAIN_TARGET = 1.0  # DESIGN: retrained policy >= 1.0x VPT-deep throughput
PLAIN_TARGET = 0.95  # DESIGN: pfnas VPT-deep >= 0.95x a plain timm VPT-deep loop
COMPILE_RECOMPILE_LIMIT = 64  # every row's model shares nn.Module's call code: one cache entry per model kind
E2E_TARGET = 1.5  # DESIGN: one task end to end within 1.5x of its pure step time
DEFAULT_ARCH_EVERY = 4  # |train800| // |val200|: the engine's cadence on VTAB-1k when search.arch_every is unset
BENCH_LR = 1e-4  # step cost does not depend on the lr; a small one keeps random-label steps finite

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


# ----------------------------------------------------------------------------- plain VPT-deep reference
class PlainVPTDeep(nn.Module):
    """VPT-deep written directly on a timm ViT's blocks, with no pfnas model code: the bench's reference.

    Prompts ``[depth, M, D]`` with VPT's uniform init bound sqrt(6 / (3 * patch_area + D)); prompt dropout
    draws a mask per sample. Block 0 gets ``[prefix; P_0; patches]``, and before every later block the
    prompt slot is overwritten with that layer's prompts. The prompt outputs are dropped once after the
    last block, then ``backbone.norm``, timm's ``forward_head(pre_logits=True)`` pooling and a linear head.
    The backbone stays frozen and in eval mode.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, length: int, dropout: float):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        depth, dim = len(backbone.blocks), backbone.embed_dim
        self.n_prefix = int(getattr(backbone, "num_prefix_tokens", 1))
        patch = backbone.patch_embed.patch_size
        area = patch[0] * patch[1] if isinstance(patch, (tuple, list)) else patch * patch
        bound = math.sqrt(6.0 / float(3 * area + dim))
        self.prompts = nn.Parameter(torch.empty(depth, length, dim).uniform_(-bound, bound))
        self.dropout = float(dropout)
        self.head = nn.Linear(dim, num_classes)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bb, n, m = self.backbone, self.n_prefix, self.prompts.shape[1]
        x = bb._pos_embed(bb.patch_embed(x))
        x = bb.patch_drop(x) if hasattr(bb, "patch_drop") else x
        x = bb.norm_pre(x) if hasattr(bb, "norm_pre") else x
        for i, block in enumerate(bb.blocks):
            p = self.prompts[i].expand(x.shape[0], -1, -1)
            if self.training and self.dropout > 0:
                p = F.dropout(p, self.dropout, training=True)
            x = block(torch.cat([x[:, :n], p.to(x.dtype), x[:, n if i == 0 else n + m:]], dim=1))
        x = bb.norm(torch.cat([x[:, :n], x[:, n + m:]], dim=1))
        return self.head(bb.forward_head(x, pre_logits=True))


def plain_vpt_step(model: PlainVPTDeep, opt: torch.optim.Optimizer, grad_clip: float | None, x: torch.Tensor,
                   y: torch.Tensor, device: torch.device, precision: str) -> None:
    """One plain training step: autocast forward, fp32 cross-entropy, backward, optional clip, SGD step."""
    with autocast(device, precision):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], grad_clip)
    opt.step()


# ----------------------------------------------------------------------------- FLOPs and torch.compile
def _cpu_attention_flops() -> dict[Any, Any]:
    """FLOP formulas for CPU fused attention, which FlopCounterMode does not register (it does for CUDA)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten, mapping = torch.ops.aten, {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = (
            lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v))
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            lambda g, q, k, v, *args, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v))
    return mapping


def count_flops(fn: Callable[[Lap], Any]) -> int | None:
    """FLOPs of one call of a step function (forward, backward and arch step alike); None if counting fails."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops()) as counter:
            fn(lambda: None)
    except Exception:  # counting is a report, never a reason to lose the bench
        return None
    return int(counter.get_total_flops())


@contextmanager
def _recompile_limit(n: int) -> Iterator[None]:
    """Raise dynamo's per-code recompile limit: every row's model is a distinct graph of the same call code."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    old = getattr(cfg, name)
    setattr(cfg, name, max(old, n))
    try:
        yield
    finally:
        setattr(cfg, name, old)


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _compile_row(spec: dict[str, Any], device: torch.device, warmup: int) -> None:
    """``torch.compile`` the row's modules and run two steps to compile them now, outside the timed region.

    On failure the row gets ``error``; otherwise its step function is wrapped to count the graphs compiled
    during the timed rounds (``recompiles``; e.g. single-path search specialises on each sampled path).
    """
    try:
        for module in spec["compile"]:
            module.compile()
        for _ in range(2):  # the second step compiles what the first one's state changes (e.g. alpha's grad flag)
            spec["fn"](lambda: None)
        sync(device)
    except Exception as e:  # inductor/dynamo failures of any kind: report, keep benchmarking the other rows
        msg = str(e).strip().splitlines()
        spec["error"] = f"torch.compile: {type(e).__name__}: {msg[0][:200] if msg else ''}".rstrip(": ")
        return
    fn, calls, spec["recompiles"] = spec["fn"], [0], 0

    def counted(lap: Lap) -> None:
        before = _graphs_compiled()
        fn(lap)
        calls[0] += 1
        if calls[0] > warmup:
            spec["recompiles"] += _graphs_compiled() - before

    spec["fn"] = counted


# ----------------------------------------------------------------------------- benchmark
def _bench_rows(cfg: ExperimentConfig, device: torch.device, batch_size: int, steps: int, warmup: int,
                policy, num_classes: int, torch_compile: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Build every row's model and phase, count FLOPs, time their steps interleaved; returns rows and backbone facts."""
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
                                    "fn": forward_fn(backbone, xt, device, cfg.precision), "compile": [backbone]}]

    def plain() -> None:
        optim = cfg.train.optim
        model = PlainVPTDeep(backbone, num_classes, cfg.prompts.length, cfg.prompts.dropout).to(device).train()
        params = [model.prompts, *model.head.parameters()]
        opt = torch.optim.SGD(params, lr=optim.lr * batch_size / 256.0, momentum=optim.momentum,
                              weight_decay=optim.weight_decay)
        specs.append({"key": "plain_vpt_deep", "label": "plain VPT-deep (timm)", "compile": [model],
                      "tuned_params": sum(p.numel() for p in params),
                      "fn": lambda lap: plain_vpt_step(model, opt, optim.grad_clip, xt, yt, device, cfg.precision)})

    def fixed(key: str, label: str, pol: list[str]) -> None:
        exp = Experiment(cfg, backbone, data, device)
        model = exp.fixed(pol)
        phase = RetrainPhase(cfg, model, data, device, exp.pae(model))
        model.train()
        specs.append({"key": key, "label": label, "tuned_params": model.tuned_parameter_count(), "policy": pol,
                      "fn": lambda lap: phase._weight_step(xt, yt), "compile": [model]})

    def search(key: str, label: str, mode: str) -> None:
        scfg = merge_dotted(cfg, {"search.mode": mode})
        exp = Experiment(scfg, backbone, data, device)
        model = exp.supernet()
        phase = SearchPhase(scfg, model, data, device, exp.pae(model))
        model.train()
        specs.append({"key": key, "label": label, "tuned_params": model.tuned_parameter_count(),
                      "fn": lambda lap: search_step(phase, xt, yt, xv, yv, lap), "compile": [model]})

    def oneshot(key: str, label: str, paths: str) -> None:
        exp = Experiment(cfg, backbone, data, device)
        model = exp.supernet(per_op_prompts=True)
        phase = OneShotPhase(cfg, model, data, device, 1, paths)
        model.train()
        specs.append({"key": key, "label": label, "tuned_params": model.tuned_parameter_count(),
                      "images_per_step": phase.passes * batch_size,  # K passes on the batch: K training images each
                      "fn": lambda lap: phase._weight_step(xt, yt), "compile": [model]})

    plain()
    fixed("vpt_deep", "VPT-deep", ["prepend"] * depth)
    search("search_softmax", "search soft", "softmax")
    search("search_gumbel", "search 1-path", "gumbel")
    oneshot("oneshot_fair", "one-shot fair", "fair")
    fixed("retrain_mixed", "retrain mixed", mixed)
    for op in ("add", "affine", "cross_attn"):
        fixed(f"retrain_{op}", f"retrain {op}", [op] * depth)
    fixed("linear_probe", "linear probe", ["none"] * depth)

    for s in specs:  # one extra step per row, eager and outside the timed region
        flops = count_flops(s["fn"])
        s["gflop_per_step"] = flops / 1e9 if flops is not None else None
    if torch_compile:
        torch._dynamo.reset()  # a clean cache: earlier compiled models must not use up the recompile limit
        for s in specs:
            _compile_row(s, device, warmup)
    _free_memory(device)
    timings = time_interleaved({s["key"]: s["fn"] for s in specs if "error" not in s}, device, steps, warmup)
    rows = []
    for s in specs:
        s = {k: v for k, v in s.items() if k not in ("fn", "compile")}
        t = timings.get(s["key"])
        if t is None:  # compilation failed: the row reports its error and no timing
            rows.append({**s, "images_per_s": None, "ms": None, "tflops": None,
                         "tuned_percent": 100.0 * s["tuned_params"] / bb_params})
            continue
        gflop = s["gflop_per_step"]
        row = {**s, "images_per_s": s.get("images_per_step", batch_size) / (t["ms"] / 1e3), "ms": t["ms"],
               "mean_ms": t["mean_ms"],
               "tflops": gflop / t["ms"] if gflop is not None else None,  # 1e9 flop / (1e-3 s) / 1e12
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
              num_classes: int = 10, e2e: bool = False, e2e_dir: str | Path | None = None,
              torch_compile: bool = False) -> dict[str, Any]:
    """Benchmark the step throughput of every model kind for ``cfg``'s backbone; prints and returns the table.

    Rows: frozen forward, VPT-deep, soft and single-path search steps, the mixed retrained policy
    (``policy``: list, ``{layer: op}`` or policy file; default: layers cycle through ``prompts.ops``),
    all-add / all-affine / all-cross_attn, the linear probe and the plain timm VPT-deep reference, each
    with img/s, its ratio to VPT-deep (``ratio_vpt``) and to plain VPT-deep (``ratio_plain``), FLOPs per
    step and achieved TFLOP/s. ``torch_compile`` compiles every row's model first (a failure becomes that
    row's ``error``). ``e2e`` also runs :func:`bench_end_to_end` in ``e2e_dir`` (default: a temporary folder,
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
        with _tf32(device), _recompile_limit(COMPILE_RECOMPILE_LIMIT) if torch_compile else nullcontext():
            rows, info = _bench_rows(bench_cfg, device, batch_size, steps, warmup, policy, num_classes,
                                     torch_compile)
    except torch.cuda.OutOfMemoryError:
        raise TrainingError(f"out of GPU memory at batch {batch_size}; lower --batch-size") from None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    by_key = {r["key"]: r for r in rows}
    vpt, plain = by_key["vpt_deep"]["images_per_s"], by_key["plain_vpt_deep"]["images_per_s"]
    for r in rows:
        r["ratio_vpt"], r["ratio_plain"] = ratio(r["images_per_s"], vpt), ratio(r["images_per_s"], plain)
        if "amortised_images_per_s" in r:
            r["amortised_ratio_vpt"] = ratio(r["amortised_images_per_s"], vpt)
        target = {"search_gumbel": SEARCH_TARGET, "retrain_mixed": RETRAIN_TARGET, "vpt_deep": PLAIN_TARGET}.get(r["key"])
        if target is not None:
            got = r["ratio_plain"] if r["key"] == "vpt_deep" else r.get("amortised_ratio_vpt", r["ratio_vpt"])
            r["target"] = target
            r["check"] = "n/a" if got is None else "pass" if got >= target else "below"
    k = info["arch_every"]
    gumbel, mixed = by_key["search_gumbel"], by_key["retrain_mixed"]
    targets = [
        {"what": f"search 1-path, arch step every {k} weight steps", "vs": "VPT-deep",
         "ratio": gumbel.get("amortised_ratio_vpt"), "target": SEARCH_TARGET},
        {"what": "search 1-path, arch step every weight step", "vs": "VPT-deep",
         "ratio": gumbel["ratio_vpt"], "target": SEARCH_TARGET},
        {"what": "retrained mixed policy", "vs": "VPT-deep", "ratio": mixed["ratio_vpt"], "target": RETRAIN_TARGET},
        {"what": "pfnas VPT-deep", "vs": "plain VPT-deep", "ratio": by_key["vpt_deep"]["ratio_plain"],
         "target": PLAIN_TARGET},
    ]
    for t in targets:
        if t["vs"] == "VPT-deep":
            t["ratio_vpt"] = t["ratio"]
        t["check"] = "n/a" if t["ratio"] is None else "pass" if t["ratio"] >= t["target"] else "below"
    result: dict[str, Any] = {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "timm": timm.__version__, "cuda": torch.version.cuda if device.type == "cuda" else None,
        "precision": "bf16" if uses_bf16(cfg.precision, device) else "fp32", "tf32": device.type == "cuda",
        "backbone": cfg.backbone.name, "backbone_kwargs": dict(cfg.backbone.kwargs),
        "checkpoint": cfg.backbone.checkpoint, **info, "prompt_length": cfg.prompts.length,
        "ops": list(cfg.prompts.ops), "search_order": cfg.search.order, "pae": cfg.pae.enabled,
        "batch_size": batch_size, "steps": steps, "warmup": warmup, "num_classes": num_classes,
        "torch_compile": torch_compile,
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
    width = console.width
    if not console.is_terminal:  # a log or a pipe: print whole lines instead of cutting them at 80 columns
        console.width = max(width, 160)
    try:
        _print_bench(result, console)
    finally:
        console.width = width


def _print_bench(result: dict[str, Any], console) -> None:
    from rich import box
    from rich.table import Table

    cuda = result["device_type"] == "cuda"
    k = result["arch_every"]
    title = (f"{result['backbone']} {result['img_size']}px depth {result['depth']}, P={result['prompt_length']}, "
             f"batch {result['batch_size']}, {result['precision']}, median of {result['steps']} steps"
             + (", torch.compile" if result.get("torch_compile") else ""))
    caption = (f"{result['device']} | torch {result['torch']} | timm {result['timm']}\n"
               f"img/s: train images per step (a search step also runs a val batch; a one-shot fair step "
               f"counts each of its K passes)\n"
               f"xVPT / xplain: img/s over pfnas VPT-deep / over plain timm VPT-deep; GF/img: counted FLOPs per step "
               f"/ batch; TFLOP/s: FLOPs per step / median step time\n"
               f"@1/{k}: xVPT of search with an arch step every {k} weight steps (engine cadence); "
               f"%bb: tuned params as % of the backbone; check: search 1-path @1/{k} >= {SEARCH_TARGET}x, "
               f"retrain mixed >= {RETRAIN_TARGET}x VPT-deep, VPT-deep >= {PLAIN_TARGET}x plain")
    tab = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, show_edge=False)
    cols = ["step", "img/s", "xVPT", "xplain", "ms", f"@1/{k}", "GF/img", "TFLOP/s", "params", "%bb",
            *(["MiB"] if cuda else []), "check"]
    for col in cols:
        tab.add_column(col, justify="left" if col == "step" else "right", no_wrap=True)

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in result["rows"]:
        check = r.get("check")
        target = f"[{'green' if check == 'pass' else 'red'}]{check}[/]" if check else ""
        if r.get("error"):
            target = f"[red]error[/] {r['error'][:60]}"
        ips, ms, gflop = r["images_per_s"], r["ms"], r.get("gflop_per_step")
        tab.add_row(r["label"], num(ips, ",.1f" if ips is not None and ips < 100 else ",.0f"),
                    num(r["ratio_vpt"], ".2f"), num(r["ratio_plain"], ".2f"),
                    num(ms, ".1f" if ms is not None and ms < 1000 else ",.0f"),
                    num(r["amortised_ratio_vpt"], ".2f") if "amortised_ratio_vpt" in r else "",
                    num(gflop / r.get("images_per_step", result["batch_size"]) if gflop is not None else None, ".3g"),
                    num(r.get("tflops"), ".3g"), f"{r['tuned_params']:,}", f"{r['tuned_percent']:.2f}",
                    *([num(r.get("peak_mem_mib"), ",.0f")] if cuda else []), target)
    console.print(tab)
    for t in result["targets"]:
        mark = {"pass": "[green]pass[/]", "below": "[red]below[/]"}.get(t["check"], "[red]n/a[/]")
        console.print(f"target: {t['what']}: {num(t['ratio'], '.2f')}x {t['vs']} (>= {t['target']:.2f}x) {mark}")
    recompiled = [f"{r['label']} ({r['recompiles']})" for r in result["rows"] if r.get("recompiles")]
    if recompiled:
        console.print(f"[yellow]torch.compile recompiled during the timed rounds[/] (their times include "
                      f"compilation): {', '.join(recompiled)}")
    e = result.get("e2e")
    if e:
        mark = "[green]pass[/]" if e["check"] == "pass" else "[red]below[/]"
        console.print(f"target: end to end {e['wall_s']:.1f}s vs {e['predicted_s']:.1f}s pure step time = "
                      f"{e['ratio']:.2f}x (<= {E2E_TARGET}x) {mark}")


# ----------------------------------------------------------------------------- end to end
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
        sync(device)
        setup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = run_experiment(cfg, run_dir, exp=exp)
        sync(device)
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
            "val": forward_fn(supernet, next(data.batches("val", ebs))[0], device, cfg.precision),
            "test": forward_fn(fixed, next(data.batches("test", ebs))[0], device, cfg.precision),
        }, device, steps, warmup)
        arch_ms, weight_ms = t["search"]["parts_ms"]
        retrain_ms, val_ms, test_ms = t["retrain"]["ms"], t["val"]["ms"], t["test"]["ms"]

    counts = {
        "search_weight_steps": cfg.search.epochs * steps_per_epoch(data.num_images("train"), bs),
        "arch_steps": sum(int(h.get("arch_steps", 0)) for h in res.search_history),
        "retrain_steps": cfg.train.epochs * steps_per_epoch(data.num_images("trainval"), bs),
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
