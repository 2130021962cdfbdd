"""One-shot supernet training (FairNAS, SPOS): prompts + head on ``train`` through single paths, no alpha step,
and the forward-only score of a policy with the supernet's inherited weights."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..config import ExperimentConfig, PfnasError
from ..data import TaskData
from ..model import PromptedViT
from .phases import Phase, evaluate

SUPERNET_PATHS = ("fair", "uniform")


class OneShotPhase(Phase):
    """Supernet weights trained on ``train`` for ``epochs`` with the search's optimiser recipe.

    ``fair`` (FairNAS strict fairness): every step draws, for each layer, a permutation of its candidate ops;
    pass k runs op ``perm[k]`` in every layer, alone and unweighted, as it will be deployed; the K passes on the
    same batch sum their gradients and one optimizer step follows, so each op of each layer is trained exactly
    once per step. What every pass shares (the head, and prompts a layer does not keep per op) gets the mean of
    the K gradients rather than their sum: each parameter then moves as far as one standalone step would move it,
    with the search's lr and grad_clip meaning what they mean there (the sum gave the head K times the step and
    let it fill the clipped norm; dsprites_ori's supernet loss rose from 2.35 to 3.02 in its second epoch).
    ``uniform`` (SPOS): one random path per step. ``images`` counts training images: a fair step on B images
    counts K * B. Alpha, if the model has one, only stays out of the way.
    """

    name = "supernet"
    seed_offset = 6

    def __init__(self, cfg: ExperimentConfig, model: PromptedViT, data: TaskData, device: torch.device, epochs: int,
                 paths: str = "fair", extra_loss: Any = None):
        if paths not in SUPERNET_PATHS:
            raise PfnasError(f"supernet paths must be one of {list(SUPERNET_PATHS)}, got {paths!r}")
        if model.policy is not None:
            raise PfnasError("a one-shot supernet needs a PromptedViT built with policy=None")
        if model.alpha is not None:
            model.alpha.requires_grad_(False)
        super().__init__(cfg, model, data, device, epochs, cfg.search.optim, "train", extra_loss)
        self.paths = paths
        self.path_gen = torch.Generator().manual_seed(cfg.seed * 1000 + 7)
        self.images = 0
        self.shared = list(model.head.parameters()) + [layer.prompts for layer in model.layers if not layer.per_op]

    @property
    def passes(self) -> int:
        """Forward/backward passes per step: the number of candidate ops (fair) or 1 (uniform)."""
        return len(self.model.candidates) if self.paths == "fair" else 1

    def step_paths(self) -> list[list[int]]:
        """The op index per layer of each pass of the next step (drawn from the phase's own generator)."""
        depth, n_ops = self.model.depth, len(self.model.candidates)
        if self.paths == "uniform":
            return [torch.randint(n_ops, (depth,), generator=self.path_gen).tolist()]
        perms = [torch.randperm(n_ops, generator=self.path_gen).tolist() for _ in range(depth)]
        return [[perms[l][k] for l in range(depth)] for k in range(n_ops)]

    def accumulate(self, x: torch.Tensor, y: torch.Tensor, paths: Sequence[Sequence[int]]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of each path on ``(x, y)``; gradients add up in ``.grad`` (no optimizer step), and
        the parameters every pass shares (:attr:`shared`) keep the mean. Returns the batch's summed loss and
        correct count, averaged over the passes (device tensors)."""
        loss_sum = correct = 0
        try:
            for path in paths:
                self.model.path = list(path)
                loss, logits = self._loss(x, y)
                total = loss + self.extra_loss.loss(self.model) if self.extra_loss is not None else loss
                total.backward()
                self._track_finite(total)
                loss_sum = loss_sum + loss.detach() * y.numel()
                correct = correct + (logits.detach().argmax(-1) == y).sum()
        finally:
            self.model.path = None
        if len(paths) > 1:
            for p in self.shared:
                if p.grad is not None:
                    p.grad.div_(len(paths))
        return loss_sum / len(paths), correct / len(paths)

    def _weight_step(self, x, y):
        for g in self.opt.param_groups:
            g["lr"] = self.lr
        self.opt.zero_grad(set_to_none=True)
        paths = self.step_paths()
        out = self.accumulate(x, y, paths)
        if self.optim_cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.weights, self.optim_cfg.grad_clip)
        self.opt.step()
        self.step += 1
        self.images += len(paths) * int(y.numel())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "path_gen": self.path_gen.get_state(), "images": self.images}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        super().load_state_dict(st)
        self.path_gen.set_state(st["path_gen"])
        self.images = int(st["images"])

    def run_epoch(self) -> dict[str, Any]:
        before = self.images
        m = self._weight_epoch()
        # training images per second: a fair step's K passes are K images each
        m.update(paths=self.paths, images=self.images,
                 images_per_s=(self.images - before) / max(m["epoch_time_s"], 1e-9))
        self.history.append(m)
        return m


@torch.no_grad()
def inherited_score(model: PromptedViT, path: Sequence[int], data: TaskData, split: str, batch_size: int,
                    device: torch.device, precision: str = "auto") -> dict[str, float]:
    """Accuracy and mean loss on ``split`` of the supernet pinned to ``path`` (op index per layer), forward
    only with its inherited weights; the supernet's own path setting is restored afterwards."""
    before = model.path
    model.path = list(path)
    try:
        return evaluate(model, data, split, batch_size, device, precision)
    finally:
        model.path = before


def inherited_state(supernet: PromptedViT, policy: dict[int, str]) -> dict[str, torch.Tensor]:
    """The trainable state of the fixed model of ``policy`` taken from a per-op supernet: each layer's prompts and
    op weights of the op ``policy`` names there, and the shared head (copies; load with
    :meth:`PromptedViT.load_trainable_state_dict`)."""
    if supernet.policy is not None:
        raise PfnasError("inherited weights come from a supernet (a PromptedViT built with policy=None)")
    out: dict[str, torch.Tensor] = {}
    for l, layer in enumerate(supernet.layers):
        op = policy[l]
        if op not in supernet.candidates:
            raise PfnasError(f"policy layer {l}: op {op!r} is not a candidate of this supernet {supernet.candidates}")
        i = supernet.candidates.index(op)
        out[f"layers.{l}.prompts"] = layer.op_prompts(i).detach().clone()
        out.update({f"layers.{l}.ops.0.{k}": v.detach().clone() for k, v in layer.ops[i].state_dict().items()})
    out.update({f"head.{k}": v.detach().clone() for k, v in supernet.head.state_dict().items()})
    return out
