"""Prompt-Agnostic Evolution (PAE, arXiv 2601.20232) as a plug-in for any policy or the supernet.

Two parts, both independent of the fusion operator (a layer's prompts are shared by its ops):

* :func:`frequency_init` replaces the VPT uniform prompts with task-aware ones. A train batch is
  band-pass filtered in the centred 2-D Fourier domain with ``n_bands`` sliding radial masks; each
  filtered batch is scored by the cross-entropy of the model's frozen features through a linear head
  fitted on the unfiltered train split (the model's own head is random at init). The masks with the
  lowest loss are the "frequency shortcuts" the backbone relies on; the patch embeddings of the
  images filtered by them, weighted by each patch's energy, are clustered into ``M`` prompt rows.
* :class:`PAERegularizer` couples the layers: prompts are encoded ``z_l = W_in P_l``, one shared
  Koopman operator ``K`` should map layer ``l`` to ``l + 1`` and a learned Lyapunov function
  ``V(z) = z Q z^T`` should not grow along the layers.
"""
from __future__ import annotations

import math
import time
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import PAEConfig

__all__ = ["radial_grid", "band_masks", "band_filter", "vpt_init_bound", "energy_weighted_prompts",
           "pooled_features", "fit_score_head", "frequency_init", "PAERegularizer", "prompt_chain", "apply_pae"]


# ----------------------------------------------------------------------------- frequency masks
def radial_grid(size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[size, size] distance of each centred-FFT bin from the DC bin, divided by the largest distance."""
    c = torch.arange(size, dtype=torch.float32, device=device) - size // 2  # fftshift puts DC at size//2
    r = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    return r / r.max().clamp_min(1e-12)


def band_masks(size: int, n_bands: int, band_width: float, device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, list[float]]:
    """``n_bands`` binary ring masks [n, size, size] of width ``band_width`` (fraction of the max radius).

    Centres run evenly from ``band_width / 2`` (a low-pass disc that keeps DC) to ``1 - band_width / 2``
    (the highest frequencies); with ``n_bands = 1`` the single band is the low-pass one.
    """
    r = radial_grid(size, device)
    half = band_width / 2.0
    if n_bands == 1:
        centres = [half]
    else:
        centres = [half + k * (1.0 - band_width) / (n_bands - 1) for k in range(n_bands)]
    masks = torch.stack([((r - c).abs() <= half + 1e-6).float() for c in centres])
    return masks, centres


def band_filter(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Keep the frequencies of ``x`` [B, C, S, S] where the centred-spectrum ``mask`` [S, S] is 1."""
    spec = torch.fft.fftshift(torch.fft.fft2(x.float()), dim=(-2, -1))
    spec = spec * mask
    return torch.fft.ifft2(torch.fft.ifftshift(spec, dim=(-2, -1))).real


# ----------------------------------------------------------------------------- prompts from tokens
def vpt_init_bound(model: nn.Module) -> float:
    """VPT's uniform init bound ``sqrt(6 / (3 * patch_area + D))`` for ``model``'s backbone."""
    patch = model.backbone.patch_embed.patch_size
    area = patch[0] * patch[1] if isinstance(patch, (tuple, list)) else patch * patch
    return math.sqrt(6.0 / float(3 * area + model.dim))


def energy_weighted_prompts(tokens: torch.Tensor, energy: torch.Tensor, m: int, iters: int = 10) -> torch.Tensor:
    """``m`` prompt rows from ``tokens`` [T, D] with non-negative ``energy`` [T].

    Energy-weighted k-means: seeds are picked greedily (the most energetic token first, then the
    token maximising energy x squared distance to the chosen seeds, so seeds are strong and
    distinct), followed by ``iters`` Lloyd steps whose centres are energy-weighted means. Rows come
    back ordered by the total energy of their cluster. Fully deterministic.
    """
    tokens, w = tokens.float(), energy.float().clamp_min(0) + 1e-12
    t_count = tokens.shape[0]
    if t_count < m:  # fewer tokens than prompt rows: repeat them
        rep = math.ceil(m / t_count)
        tokens, w = tokens.repeat(rep, 1), w.repeat(rep)
    seeds = [int(w.argmax())]
    d2 = ((tokens - tokens[seeds[0]]) ** 2).sum(-1)
    for _ in range(1, m):
        score = w * d2
        score[seeds] = -1.0
        nxt = int(score.argmax())
        seeds.append(nxt)
        d2 = torch.minimum(d2, ((tokens - tokens[nxt]) ** 2).sum(-1))
    centres = tokens[seeds].clone()
    assign = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
    for _ in range(iters):
        assign = torch.cdist(tokens, centres).argmin(-1)
        mass = torch.zeros(m, device=tokens.device).index_add_(0, assign, w)
        sums = torch.zeros_like(centres).index_add_(0, assign, tokens * w[:, None])
        keep = mass > 1e-12
        centres[keep] = sums[keep] / mass[keep, None]
    mass = torch.zeros(m, device=tokens.device).index_add_(0, assign, w)
    return centres[mass.argsort(descending=True, stable=True)]


def _patch_energy(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, N] energy (sum of squares over channels and pixels) of each patch of ``x`` [B, C, S, S]."""
    e = (x.float() ** 2).sum(1, keepdim=True)
    return F.adaptive_avg_pool2d(e, grid).flatten(1)


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[B, D] pre-logit features of ``model`` (what its head sees)."""
    return model.backbone.forward_head(model.forward_features(x), pre_logits=True)


@torch.no_grad()
def fit_score_head(model: nn.Module, data: Any, device: torch.device | str, seed: int, max_images: int = 1024,
                   steps: int = 100, weight_decay: float = 1e-2) -> nn.Linear:
    """Linear head fitted on ``model``'s frozen features of up to ``max_images`` ``train`` images.

    Multinomial logistic regression on standardised features (L2 ``weight_decay``), zero init,
    full-batch L-BFGS for ``steps`` iterations: deterministic and independent of ``model.head``.
    Call with ``model`` in eval mode.
    """
    gen = torch.Generator().manual_seed(int(seed) + 1)
    feats, labels = [], []
    for x, y in data.batches("train", 256, shuffle=True, generator=gen, augment=False):
        feats.append(pooled_features(model, x.to(device)).float())
        labels.append(y.to(device))
        if sum(len(l) for l in labels) >= max_images:
            break
    f, y = torch.cat(feats)[:max_images], torch.cat(labels)[:max_images]
    mu, sd = f.mean(0), f.std(0, correction=0).clamp_min(1e-6)
    z = (f - mu) / sd
    n_cls = model.head.out_features
    w = torch.zeros(n_cls, z.shape[1], device=z.device, requires_grad=True)
    b = torch.zeros(n_cls, device=z.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.t() + b, y) + 0.5 * weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    head = nn.Linear(z.shape[1], n_cls).to(z.device)  # fold the standardisation into the weights
    head.weight.copy_(w / sd)
    head.bias.copy_(b - (mu / sd) @ w.t())
    return head


@torch.no_grad()
def frequency_init(model: nn.Module, data: Any, device: torch.device | str, cfg: PAEConfig, seed: int,
                   n_keep: int | None = None) -> dict[str, Any]:
    """Overwrite every prompted layer's prompts with frequency-shortcut tokens; returns a report.

    * batch: the first ``cfg.score_batch`` images of ``train`` in a ``seed``-shuffled order;
    * scoring: cross-entropy of ``model``'s features (eval mode, no grad) on each band-passed batch
      through :func:`fit_score_head` (fitted on the unfiltered train split), so the choice does not
      depend on the random init of ``model.head``; the ``n_keep`` (default ``ceil(n_bands / 2)``)
      lowest-loss masks are kept, best first;
    * layer ``l`` takes the ``(l mod n_keep)``-th kept mask, so layer 0 gets the best band and the
      layers cycle through the others;
    * prompts: ``backbone.patch_embed`` tokens of that filtered batch (no position embedding, like
      VPT's prompts), weighted by each patch's energy in the filtered image and clustered into ``M``
      rows (:func:`energy_weighted_prompts`); each row is rescaled to the expected norm of a VPT
      init row, ``bound * sqrt(D / 3)``, so the optimiser sees the usual scale.

    The global RNG is not touched (the batch order comes from a private generator).
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    prompted = [l for l, layer in enumerate(model.layers) if layer.prompts.numel() > 0]
    if not prompted:
        return {"skipped": "no prompted layers", "losses": [], "centres": [], "kept": [], "layer_mask": {}}
    gen = torch.Generator().manual_seed(int(seed))
    x, y = next(iter(data.batches("train", cfg.score_batch, shuffle=True, generator=gen, augment=False)))
    x, y = x.to(device).float(), y.to(device)
    masks, centres = band_masks(x.shape[-1], cfg.n_bands, cfg.band_width, device)
    was_training = model.training
    model.eval()
    head = fit_score_head(model, data, device, seed)
    filtered, losses = [], []
    for mask in masks:
        xf = band_filter(x, mask)
        filtered.append(xf)
        losses.append(float(F.cross_entropy(head(pooled_features(model, xf)).float(), y)))
    model.train(was_training)
    n_keep = max(1, min(n_keep or math.ceil(cfg.n_bands / 2), cfg.n_bands))
    ranking = sorted(range(cfg.n_bands), key=lambda k: (losses[k], k))
    kept = ranking[:n_keep]
    bb = model.backbone
    grid = tuple(int(g) for g in bb.patch_embed.grid_size)
    dim = model.dim
    row_norm = vpt_init_bound(model) * math.sqrt(dim / 3.0)
    cache: dict[tuple[int, int], torch.Tensor] = {}
    layer_mask: dict[int, int] = {}
    for i, l in enumerate(prompted):
        k = kept[i % n_keep]
        layer_mask[l] = k
        prompts = model.layers[l].prompts
        m = prompts.shape[0]
        key = (k, m)
        if key not in cache:
            tokens = bb.patch_embed(filtered[k]).reshape(x.shape[0], -1, dim)
            energy = _patch_energy(filtered[k], grid)
            rows = energy_weighted_prompts(tokens.reshape(-1, dim), energy.reshape(-1), m)
            cache[key] = rows * (row_norm / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        prompts.copy_(cache[key].to(prompts.device, prompts.dtype))
    return {"losses": losses, "centres": centres, "ranking": ranking, "kept": kept, "layer_mask": layer_mask,
            "time_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- regulariser
def prompt_chain(model: nn.Module) -> list[torch.Tensor]:
    """Prompts [M, D] of the layers that have them, in depth order (op "none" layers are skipped)."""
    return [layer.prompts for layer in model.layers if layer.prompts.numel() > 0]


class PAERegularizer(nn.Module):
    """Koopman + Lyapunov loss on the chain of per-layer prompts.

    ``z_l = P_l W^T`` with ``W`` the row-normalised weight of ``W_in`` (rows of unit norm, so the
    encoder cannot shrink to zero and satisfy both losses trivially); ``K`` is one latent operator
    shared by all layers (identity init); ``Q = d * L^T L / tr(L^T L)`` (trace ``d`` = latent dim, so
    ``L = I`` gives ``Q = I`` and ``Q`` cannot collapse). Consecutive *prompted* layers form the pairs.

    * Koopman: mean over pairs and prompt rows of ``||z_l K - z_{l+1}||^2``;
    * Lyapunov: mean over pairs and rows of ``max(0, V(z_{l+1}) - V(z_l))``, ``V(z) = z Q z^T``;
    * total: ``koopman_weight * koopman + lyapunov_weight * lyapunov``.
    """

    def __init__(self, dim: int, latent_dim: int = 32, koopman_weight: float = 0.1,
                 lyapunov_weight: float = 0.01, seed: int = 0):
        super().__init__()
        self.koopman_weight, self.lyapunov_weight = float(koopman_weight), float(lyapunov_weight)
        self.W_in = nn.Linear(dim, latent_dim, bias=False)
        gen = torch.Generator().manual_seed(int(seed) + 7919)  # own stream: the global RNG is untouched
        with torch.no_grad():
            self.W_in.weight.copy_(torch.randn(latent_dim, dim, generator=gen) / math.sqrt(dim))
        self.K = nn.Parameter(torch.eye(latent_dim))
        self.L = nn.Parameter(torch.eye(latent_dim))

    def encoder_weight(self) -> torch.Tensor:
        w = self.W_in.weight
        return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def encode(self, p: torch.Tensor) -> torch.Tensor:
        """Latent ``z`` [M, latent] of prompts ``p`` [M, D]."""
        return p.float() @ self.encoder_weight().t()

    def lyapunov_matrix(self) -> torch.Tensor:
        gram = self.L.t() @ self.L
        return gram * (gram.shape[0] / torch.diagonal(gram).sum().clamp_min(1e-12))

    def energy(self, z: torch.Tensor) -> torch.Tensor:
        """``V(z)`` per row of ``z`` [..., latent]."""
        return ((z @ self.lyapunov_matrix()) * z).sum(-1)

    def terms(self, prompts: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unweighted ``koopman`` and ``lyapunov`` losses and the weighted ``total`` for a prompt chain."""
        zero = self.K.sum() * 0.0
        if len(prompts) < 2:
            return {"koopman": zero, "lyapunov": zero, "total": zero}
        z = torch.stack([self.encode(p) for p in prompts])  # [n, M, d]
        koop = ((z[:-1] @ self.K - z[1:]) ** 2).sum(-1).mean()
        v = self.energy(z)  # [n, M]
        lyap = F.relu(v[1:] - v[:-1]).mean()
        return {"koopman": koop, "lyapunov": lyap,
                "total": self.koopman_weight * koop + self.lyapunov_weight * lyap}

    def loss(self, model: nn.Module) -> torch.Tensor:
        """Weighted PAE loss of ``model``'s prompts (added to the task loss by the engine)."""
        return self.terms(prompt_chain(model))["total"]


def apply_pae(cfg: PAEConfig, model: nn.Module, data: Any, device: torch.device | str, seed: int
              ) -> PAERegularizer | None:
    """Frequency-initialise ``model``'s prompts (if ``cfg.freq_init``) and build its regulariser.

    Returns None when both loss weights are 0 or fewer than two layers carry prompts (nothing to
    couple). The model is moved to ``device`` first; the report of the init is kept on the
    regulariser as ``init_report``.
    """
    model.to(device)
    report = frequency_init(model, data, device, cfg, seed) if cfg.freq_init else None
    if (cfg.koopman_weight <= 0 and cfg.lyapunov_weight <= 0) or len(prompt_chain(model)) < 2:
        return None
    reg = PAERegularizer(model.dim, cfg.latent_dim, cfg.koopman_weight, cfg.lyapunov_weight, seed).to(device)
    reg.init_report = report
    return reg
