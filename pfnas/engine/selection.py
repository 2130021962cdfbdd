"""Reading a discrete policy out of a searched supernet (``search.select``): argmax of alpha, perturbation
(layer by layer, pin each op and keep the one with the best supernet val accuracy), or parsimony (among ops
statistically tied on val loss, the preferred or the cheapest one)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..config import ExperimentConfig
from ..data import TaskData
from ..model import PromptedViT
from .phases import eval_logits


PIN_LOGIT = 1e4  # an alpha row pinned to one op: its softmax is exactly one-hot


def select_policy(model: PromptedViT, cfg: ExperimentConfig, data: TaskData, device: torch.device,
                  out: Path | None = None) -> dict[int, str]:
    """The discrete policy of a searched supernet by ``search.select``; parsimony writes its per-layer evidence
    to ``out/selection.json``."""
    s = cfg.search
    if s.select == "argmax":
        return model.discretize()
    args = (model, data, device, cfg.precision, cfg.data.eval_batch_size)
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
