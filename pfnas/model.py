"""Frozen timm ViT with per-layer learnable prompts fused by one of four operators.

Every operator splits into ``fuse`` (build the block input from tokens and prompts) and ``split``
(keep the image-token outputs of the block), so a layer's output always has the shape of its input:

* ``prepend``    [prefix; P; patches] -> block -> drop prompt outputs (VPT-deep)
* ``add``        block(X + mean(P))                         (VPT "add-1": one summary broadcast)
* ``affine``     block((1 + gamma(s)) * X + beta(s)), s = mean(P), gamma/beta zero at init
* ``cross_attn`` block(X + W_o attn(LN(X) W_q, P W_k, P W_v)), reduced dim, W_o zero at init

A :class:`PromptedViT` built with ``policy=None`` is the search supernet: every layer mixes all
candidate ops with weights ``softmax(alpha_l / tau)`` (DARTS), a hard Gumbel sample (GDAS, only
the sampled op runs), or independent gates ``sigmoid(alpha_lk / tau)`` on each op's change to the
prompt-free block (``sigmoid``, after Fair DARTS: ops do not compete for one unit of weight, and an op
that starts as the identity is neither rewarded nor punished until it changes something). Built with a
policy ``{layer: op}`` it is the fixed, retrainable model.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import OPS, BackboneConfig, ModelError, PfnasError, PromptConfig
from .runtime import write_atomic

FIXED_OPS = OPS + ("none",)  # "none": the plain frozen block, no prompts (linear probe)


# ----------------------------------------------------------------------------- backbone
def _checkpoint_head_classes(path: Path) -> int | None:
    """Number of classes of the head stored in a checkpoint file, if it has one."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return f.get_slice("head.weight").get_shape()[0] if "head.weight" in f.keys() else None
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd.get("model", sd)) if isinstance(sd, dict) else sd
        w = sd.get("head.weight") if isinstance(sd, dict) else None
        return int(w.shape[0]) if w is not None else None
    except Exception as e:  # unreadable file
        raise ModelError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


# names of the patch-embedding kernel and the position embedding in timm, DINOv2/OpenCLIP (prefixed), CLIP and
# big_vision (.npz) checkpoints
_PATCH_KEYS = ("patch_embed.proj.weight", "conv1.weight", "embedding/kernel")
_POS_KEYS = ("pos_embed", "positional_embedding", "posembed_input/pos_embedding")


def _named(keys: Iterable[str], names: tuple[str, ...]) -> str | None:
    """The first of ``keys`` that is one of ``names`` or ends in ``.name`` / ``/name``."""
    return next((k for k in keys if any(k == n or k.endswith(("." + n, "/" + n)) for n in names)), None)


def _geometry(model: nn.Module, kernel: tuple[int, ...], tokens: int | None) -> str:
    """``32 px, patch 4`` for a patch kernel and a count of position tokens, as ``model`` lays them out."""
    grid_tokens = (tokens or 0) - (0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens)
    side = math.isqrt(max(grid_tokens, 0))
    patch = "x".join(str(k) for k in kernel) if len(set(kernel)) > 1 else str(kernel[0])
    if tokens is None or side * side != grid_tokens or len(set(kernel)) > 1:
        return f"patch {patch}" + (f" with {tokens} position tokens" if tokens is not None else "")
    return f"{side * kernel[0]} px, patch {patch}"


def _refuse_other_geometry(model: nn.Module, path: Path, shapes: dict[str, tuple[int, ...]], npz: bool) -> None:
    """ModelError when the checkpoint's patch kernel or position embedding differs from ``model``'s: timm would
    resample them to fit, which changes what the backbone computes (``backbone.resample: true`` allows it)."""
    patch_key, pos_key = _named(shapes, _PATCH_KEYS), _named(shapes, _POS_KEYS)
    if patch_key is None or len(shapes[patch_key]) != 4:
        return  # not a ViT patch embedding: the strict key check reports it
    kernel = tuple(shapes[patch_key][:2] if npz else shapes[patch_key][-2:])
    tokens = shapes[pos_key][-2] if pos_key is not None and len(shapes[pos_key]) in (2, 3) else None
    own_kernel = tuple(model.patch_embed.proj.weight.shape[-2:])
    own_pos = getattr(model, "pos_embed", None)
    own_tokens = int(own_pos.shape[1]) if own_pos is not None else None
    if kernel != own_kernel or (tokens is not None and own_tokens is not None and tokens != own_tokens):
        raise ModelError(f"checkpoint {path} is {_geometry(model, kernel, tokens)} but the config builds "
                         f"{_geometry(model, own_kernel, own_tokens)}: match backbone.kwargs img_size/patch_size "
                         "to the checkpoint, or set backbone.resample true to resample its embeddings")


def _npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the patch kernel and position embedding of a big_vision ``.npz`` (only those arrays are read)."""
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        keys = [k for k in (_named(z.files, _PATCH_KEYS), _named(z.files, _POS_KEYS)) if k is not None]
        return {k: tuple(z[k].shape) for k in keys}


def _load_checkpoint_strict(model: nn.Module, path: Path, name: str, resample: bool = False) -> None:
    """Load every backbone weight of ``path`` into ``model``; keys and shapes must match, ``head.*`` is ignored.
    A checkpoint of another image or patch size is refused unless ``resample`` (timm then resamples it)."""
    import sys

    from timm.models import load_state_dict

    if path.suffix.lower() in (".npz", ".npy"):  # JAX/big_vision weights: timm's own ViT converter
        if not resample and path.suffix.lower() == ".npz":
            _refuse_other_geometry(model, path, _npz_shapes(path), npz=True)
        model.load_pretrained(str(path))
        return
    sd = {k: v for k, v in load_state_dict(str(path)).items() if not k.startswith("head.")}
    if not resample:
        _refuse_other_geometry(model, path, {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")},
                               npz=False)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:  # timm-format conversions (pos_embed resampling, old key names)
        try:
            sd = filter_fn(sd, model)
        except Exception:  # a foreign dict: report it by its keys below
            pass
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in sd and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or extra or shape:
        parts = [f"{len(v)} {what} (e.g. {', '.join(v[:2])})"
                 for what, v in (("missing keys", missing), ("unexpected keys", extra), ("shape mismatches", shape))
                 if v]
        raise ModelError(f"checkpoint {path} does not fit {name} with the configured kwargs: {'; '.join(parts)}")
    model.load_state_dict(sd, strict=True)


def load_backbone(cfg: BackboneConfig) -> nn.Module:
    """Create a frozen timm VisionTransformer from the hub or a local checkpoint (eval mode)."""
    import timm

    if not timm.is_model(cfg.name):
        raise ModelError(f"unknown timm model {cfg.name!r} (see timm.list_models('vit*'))")
    kwargs = dict(cfg.kwargs)
    pretrained = cfg.pretrained
    if cfg.checkpoint:
        path = Path(cfg.checkpoint).expanduser()
        if not path.is_file():
            raise ModelError(f"backbone checkpoint not found: {path}")
        overlay: dict = {"file": str(path)}
        n_head = cfg.checkpoint_num_classes or _checkpoint_head_classes(path)
        if n_head:
            overlay["num_classes"] = n_head
        if cfg.mean and cfg.std:
            overlay.update(mean=tuple(cfg.mean), std=tuple(cfg.std))
        if "img_size" in kwargs:
            s = kwargs["img_size"]
            overlay["input_size"] = (3, s, s) if isinstance(s, int) else (3, *s)
        kwargs["pretrained_cfg_overlay"] = overlay
        pretrained = False  # loaded below, strictly
    try:
        model = timm.create_model(cfg.name, pretrained=pretrained, num_classes=0, **kwargs)
        if cfg.checkpoint:
            _load_checkpoint_strict(model, path, cfg.name, cfg.resample)
    except PfnasError:
        raise
    except (RuntimeError, OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = f"checkpoint {cfg.checkpoint}" if cfg.checkpoint else ("hub weights" if pretrained else "config")
        raise ModelError(f"cannot build {cfg.name} from {where}: {first[:300]}") from None
    for attr in ("blocks", "patch_embed", "_pos_embed", "norm", "forward_head"):
        if not hasattr(model, attr):
            raise ModelError(f"{cfg.name} is not a timm VisionTransformer (no .{attr})")
    if cfg.mean and cfg.std:
        model.pretrained_cfg = {**model.pretrained_cfg, "mean": tuple(cfg.mean), "std": tuple(cfg.std)}
    model.requires_grad_(False)
    return model.eval()


def backbone_input(backbone: nn.Module) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(image size, mean, std) the backbone expects."""
    size = backbone.patch_embed.img_size
    size = int(size[0]) if isinstance(size, (tuple, list)) else int(size)
    pc = getattr(backbone, "pretrained_cfg", {}) or {}
    mean = tuple(pc.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(pc.get("std", (0.229, 0.224, 0.225)))
    return size, mean, std


# ----------------------------------------------------------------------------- operators
class FusionOp(nn.Module):
    """Base operator: ``fuse`` builds the block input, ``split`` keeps the image-token outputs.

    ``p`` is the layer's prompts, [M, D] (shared by the batch) or [B, M, D] (per-sample dropout).
    """

    changes_length = False

    def fuse(self, x: torch.Tensor, p: torch.Tensor, n_prefix: int) -> torch.Tensor:
        raise NotImplementedError

    def deployed_size(self, m: int, dim: int) -> int:
        """Numbers a deployed model stores for this op with ``m`` prompts of width ``dim``."""
        raise NotImplementedError

    def split(self, y: torch.Tensor, n_prefix: int, n_prompts: int) -> torch.Tensor:
        return y


class Prepend(FusionOp):
    changes_length = True

    def fuse(self, x, p, n_prefix):
        pe = p.to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :n_prefix], pe, x[:, n_prefix:]], dim=1)

    def deployed_size(self, m, dim):
        return m * dim  # the prompts themselves

    def split(self, y, n_prefix, n_prompts):
        return torch.cat([y[:, :n_prefix], y[:, n_prefix + n_prompts :]], dim=1)


class Add(FusionOp):
    def fuse(self, x, p, n_prefix):
        return x + p.mean(-2, keepdim=True).to(x.dtype)

    def deployed_size(self, m, dim):
        return dim  # only mean(P) is used


class Affine(FusionOp):
    """Scale and shift from the prompt summary through a rank-``r`` map; identity at init."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Parameter(torch.randn(dim, rank) / math.sqrt(dim))
        self.up = nn.Parameter(torch.zeros(rank, 2 * dim))

    def fuse(self, x, p, n_prefix):
        gamma, beta = ((p.mean(-2, keepdim=True) @ self.down) @ self.up).to(x.dtype).chunk(2, dim=-1)
        return x * (1 + gamma) + beta

    def deployed_size(self, m, dim):
        return 2 * dim  # gamma and beta are constants once trained


class CrossAttn(FusionOp):
    """Tokens attend to the prompts in a reduced dimension; the output projection starts at zero."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.q = nn.Linear(dim, rank, bias=False)
        self.k = nn.Linear(dim, rank, bias=False)
        self.v = nn.Linear(dim, rank, bias=False)
        self.o = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.o.weight)

    def fuse(self, x, p, n_prefix):
        q = self.q(F.layer_norm(x, x.shape[-1:])).unsqueeze(1)  # B,1,T,r
        k = self.k(p.to(x.dtype)).unsqueeze(-3).expand(x.shape[0], 1, -1, -1)  # B,1,M,r
        v = self.v(p.to(x.dtype)).unsqueeze(-3).expand(x.shape[0], 1, -1, -1)
        return x + self.o(F.scaled_dot_product_attention(q, k, v).squeeze(1))

    def deployed_size(self, m, dim):
        # K = P W_k and V = P W_v precomputed (M x r each) plus W_q (D x r) and W_o (r x D); or, when
        # smaller, W_q K^T (D x M) and V W_o (M x D) folded
        r = self.q.out_features
        return min(2 * r * (m + dim), 2 * m * dim)


class Identity(FusionOp):
    def fuse(self, x, p, n_prefix):
        return x

    def deployed_size(self, m, dim):
        return 0


def make_op(name: str, dim: int, rank: int) -> FusionOp:
    if name == "prepend":
        return Prepend()
    if name == "add":
        return Add()
    if name == "affine":
        return Affine(dim, rank)
    if name == "cross_attn":
        return CrossAttn(dim, rank)
    if name == "none":
        return Identity()
    raise PfnasError(f"unknown fusion op {name!r}; choose from {list(FIXED_OPS)}")


# ----------------------------------------------------------------------------- policies
def normalize_policy(policy: dict | list, depth: int) -> dict[int, str]:
    """Accept ``{layer: op}`` (str or int keys) or a list of ops; check length and op names."""
    if isinstance(policy, (list, tuple)):
        policy = dict(enumerate(policy))
    out = {int(k): str(v) for k, v in policy.items()}
    if sorted(out) != list(range(depth)):
        raise PfnasError(f"policy must name an op for each of the {depth} layers, got layers {sorted(out)}")
    bad = {k: v for k, v in out.items() if v not in FIXED_OPS}
    if bad:
        raise PfnasError(f"policy has unknown op(s) {bad}; choose from {list(FIXED_OPS)}")
    return out


def save_policy(policy: dict[int, str], path: str | Path) -> None:
    """Write ``policy`` as JSON, whole or not at all."""
    write_atomic(path, json.dumps({str(k): v for k, v in sorted(policy.items())}, indent=1), "policy")


def load_policy(path: str | Path) -> dict[int, str]:
    """``{layer: op}`` from a JSON or YAML file (a mapping, ``{"policy": ...}`` or a list of ops); an unreadable,
    cut or malformed file is a one-line PfnasError naming it."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise PfnasError(f"policy file not found: {p}")
    try:
        text = p.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        why = e.strerror if isinstance(e, OSError) else "truncated, or not JSON/YAML"
        raise PfnasError(f"cannot read policy file {p}: {why}") from None
    if isinstance(data, dict) and "policy" in data:
        data = data["policy"]
    if not isinstance(data, (dict, list)):
        raise PfnasError(f"{p}: a policy is a {{layer: op}} mapping or a list of ops")
    try:
        return {int(k): v for k, v in (data.items() if isinstance(data, dict) else enumerate(data))}
    except (TypeError, ValueError):
        raise PfnasError(f"{p}: a policy's layers are integers, e.g. {{\"0\": \"prepend\"}}") from None


# ----------------------------------------------------------------------------- layers and model
class PromptLayer(nn.Module):
    """Prompts of one block plus its candidate operators (one for a fixed policy, several for search)."""

    def __init__(self, ops: Iterable[str], length: int, dim: int, rank: int, init_bound: float,
                 per_op_prompts: bool = False):
        super().__init__()
        self.op_names = list(ops)
        self.ops = nn.ModuleList(make_op(o, dim, rank) for o in self.op_names)
        self.uses_prompts = any(o != "none" for o in self.op_names)
        self.per_op = per_op_prompts and len(self.op_names) > 1  # supernet: each op its own prompts [n_ops, M, D]
        shape = (len(self.op_names),) if self.per_op else ()
        self.prompts = nn.Parameter(torch.empty(*shape, length if self.uses_prompts else 0, dim))
        nn.init.uniform_(self.prompts, -init_bound, init_bound)

    @property
    def length(self) -> int:
        return self.prompts.shape[-2]

    def op_prompts(self, i: int) -> torch.Tensor:
        """[M, D] prompts op ``i`` reads (the layer's shared prompts unless the supernet keeps them per op)."""
        return self.prompts[i] if self.per_op else self.prompts

    def run_op(self, i: int, block: nn.Module, x: torch.Tensor, p: torch.Tensor, n_prefix: int) -> torch.Tensor:
        op = self.ops[i]
        return op.split(block(op.fuse(x, p, n_prefix)), n_prefix, p.shape[-2])

    def op_outputs(self, block, x, ps: list[torch.Tensor], n_prefix, with_ref: bool = False):
        """Every op's block output ``[(i, y_i)]`` (op ``i`` reads prompts ``ps[i]``; length-changing ops first),
        and ``block(x)`` without prompts when ``with_ref`` (else None). Same-length inputs, ``x`` included,
        share one batched block call."""
        outs = [(i, self.run_op(i, block, x, ps[i], n_prefix)) for i, op in enumerate(self.ops) if op.changes_length]
        same = [i for i, op in enumerate(self.ops) if not op.changes_length]
        if not same and not with_ref:
            return None, outs
        B = x.shape[0]
        ys = block(torch.cat([x] * with_ref + [self.ops[i].fuse(x, ps[i], n_prefix) for i in same], dim=0)).split(B)
        outs += list(zip(same, ys[int(with_ref):]))
        return (ys[0] if with_ref else None), outs

    def run_mixed(self, block, x, ps: list[torch.Tensor], n_prefix, weights: torch.Tensor) -> torch.Tensor:
        """Weighted sum of every op's block output."""
        out = 0.0
        for i, y in self.op_outputs(block, x, ps, n_prefix)[1]:
            out = out + weights[i] * y
        return out

    def run_gated(self, block, x, ps: list[torch.Tensor], n_prefix, gates: torch.Tensor) -> torch.Tensor:
        """``ref + sum_k g_k (y_k - ref)`` with ``ref = block(x)`` (no prompts): op k is weighed, and its gate
        gets a gradient, only by what it changes."""
        ref, outs = self.op_outputs(block, x, ps, n_prefix, with_ref=True)
        out = ref
        for i, y in outs:
            out = out + gates[i] * (y - ref)
        return out


class PromptedViT(nn.Module):
    """Frozen ViT + per-layer prompts/operators + a linear head on the pooled feature.

    ``policy=None`` builds the search supernet over ``prompt_cfg.ops`` with architecture
    weights ``alpha`` [depth, n_ops]; a policy builds the fixed model with one op per layer.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, prompt_cfg: PromptConfig,
                 policy: dict | list | None = None, mode: str = "softmax", per_op_prompts: bool = False):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.depth = len(backbone.blocks)
        self.dim = backbone.embed_dim
        self.n_prefix = int(getattr(backbone, "num_prefix_tokens", 1))
        self.mode = mode
        self.tau = 1.0
        self.centered = False  # gumbel: straight-through gradient of the op's change to the block (see forward)
        patch = backbone.patch_embed.patch_size
        patch_area = patch[0] * patch[1] if isinstance(patch, (tuple, list)) else patch * patch
        bound = math.sqrt(6.0 / float(3 * patch_area + self.dim))  # VPT's uniform init
        self.candidates = list(prompt_cfg.ops)
        self.policy = normalize_policy(policy, self.depth) if policy is not None else None
        layer_ops = ([[self.policy[l]] for l in range(self.depth)] if self.policy is not None
                     else [self.candidates] * self.depth)
        self.layers = nn.ModuleList(
            PromptLayer(ops, prompt_cfg.length, self.dim, prompt_cfg.fusion_dim, bound,
                        per_op_prompts and self.policy is None) for ops in layer_ops)
        self.prompt_dropout = nn.Dropout(prompt_cfg.dropout)
        self.alpha = (nn.Parameter(1e-3 * torch.randn(self.depth, len(self.candidates)))
                      if self.policy is None else None)
        self.head = nn.Linear(self.dim, num_classes)
        self._sampled: torch.Tensor | None = None
        self.path: list[int] | None = None  # set: every layer runs only op path[l], unweighted (fair warm-up)

    # --- parameter groups
    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alpha] if self.alpha is not None else []

    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if p.requires_grad and n != "alpha"
                and not n.startswith("backbone.")]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.named_parameters() if not n.startswith("backbone.")}

    def load_trainable_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        missing = self.load_state_dict(sd, strict=False)
        bad = [k for k in missing.missing_keys if not k.startswith("backbone.")]
        if bad or missing.unexpected_keys:
            raise PfnasError(f"checkpoint does not match the model (missing {bad[:3]}, "
                             f"unexpected {missing.unexpected_keys[:3]})")

    def trained_parameter_count(self) -> int:
        """Parameters the optimiser trains (prompts, op weights, head; no alpha)."""
        return sum(p.numel() for p in self.weight_parameters())

    def tuned_parameter_count(self) -> int:
        """Numbers a deployed fixed-policy model adds to the backbone: per layer, what its op needs
        after folding (``prepend`` M*D prompts, ``add`` mean(P): D, ``affine`` gamma and beta: 2*D,
        ``cross_attn`` min(2*r*(M+D), 2*M*D), ``none`` 0), plus the head. The supernet
        (``policy=None``) reports :meth:`trained_parameter_count`.
        """
        if self.policy is None:
            return self.trained_parameter_count()
        head = sum(p.numel() for p in self.head.parameters())
        return head + sum(layer.ops[0].deployed_size(layer.length, self.dim) for layer in self.layers)

    def param_costs(self) -> torch.Tensor:
        """[depth, n_ops] deployed numbers of each candidate op in each layer (the supernet's cost table)."""
        return torch.tensor([[float(op.deployed_size(layer.length, self.dim)) for op in layer.ops]
                             for layer in self.layers])

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen backbone: dropout/droppath stay off, as in VPT
        return self

    # --- architecture
    def op_weights(self) -> torch.Tensor:
        """[depth, n_ops] mixing weights for the current forward (soft, or hard one-hot straight-through)."""
        if self.mode == "gumbel" and self.training:
            return F.gumbel_softmax(self.alpha, tau=self.tau, hard=True, dim=-1)
        if self.mode == "gumbel":  # evaluate the supernet at its current argmax
            return F.one_hot(self.alpha.argmax(-1), self.alpha.shape[-1]).to(self.alpha.dtype)
        if self.mode == "sigmoid":
            return torch.sigmoid(self.alpha / self.tau)
        return F.softmax(self.alpha / self.tau, dim=-1)

    def alpha_probs(self) -> torch.Tensor:
        return F.softmax(self.alpha.detach().float(), dim=-1)

    def alpha_entropy(self) -> list[float]:
        """Per-layer entropy of softmax(alpha), normalised to [0, 1] by log(n_ops)."""
        p = self.alpha_probs()
        h = -(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(max(p.shape[-1], 2))
        return h.tolist()

    def discretize(self) -> dict[int, str]:
        """Argmax policy ``{layer: op}`` of the supernet."""
        return {l: self.candidates[i] for l, i in enumerate(self.alpha.detach().argmax(-1).tolist())}

    # --- forward
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        x = bb.patch_embed(x)
        x = bb._pos_embed(x)
        x = bb.patch_drop(x) if hasattr(bb, "patch_drop") else x
        return bb.norm_pre(x) if hasattr(bb, "norm_pre") else x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        # a set path (fair warm-up) runs its ops unweighted: no op weights, no Gumbel sample, no host sync
        weights = self.op_weights() if self.alpha is not None and self.path is None else None
        # single path: the host must know which op each layer runs; one sync for the whole net per step
        path = weights.detach().argmax(-1).tolist() if weights is not None and self.mode == "gumbel" else None
        per_sample = self.training and self.prompt_dropout.p > 0
        B = x.shape[0]
        # no-grad soft forward with rows pinned one-hot (perturbation / parsimony selection): only the pinned
        # op runs there (-1: a mixed row), the others would add 0 * y. One host sync, never in a training step.
        pinned = None
        if weights is not None and self.mode == "softmax" and not torch.is_grad_enabled():
            hot = weights == 1
            pinned = torch.where(hot.any(-1), hot.int().argmax(-1), -1).tolist()

        def prompts(layer: PromptLayer, i: int) -> torch.Tensor:
            p = layer.op_prompts(i)  # eval: [M, D] shared by the batch; train: a dropout mask per sample
            return self.prompt_dropout(p.expand(B, -1, -1)) if per_sample and p.numel() else p

        for l, (block, layer) in enumerate(zip(self.backbone.blocks, self.layers)):
            if self.path is not None:
                x = layer.run_op(self.path[l], block, x, prompts(layer, self.path[l]), self.n_prefix)
            elif weights is None:
                x = layer.run_op(0, block, x, prompts(layer, 0), self.n_prefix)
            elif pinned is not None and pinned[l] >= 0:
                i = pinned[l]
                x = layer.run_op(i, block, x, prompts(layer, i), self.n_prefix)
            elif self.mode == "gumbel":
                i, w = path[l], weights[l, path[l]]  # only the sampled op runs; w is 1 with a gradient
                y = layer.run_op(i, block, x, prompts(layer, i), self.n_prefix)
                if self.centered and w.requires_grad:
                    # w * y hands alpha <dL/dy, y>: the value of scaling the whole residual stream, which every
                    # op carries. Centered, alpha gets <dL/dy, y - block(x)>: what this op changes vs the
                    # prompt-free block (the soft mixture cancels the stream the same way, against its mean)
                    with torch.no_grad():
                        ref = block(x)
                    x = y + (w - w.detach()) * (y - ref)
                else:
                    x = w * y
            else:
                ps = ([prompts(layer, i) for i in range(len(layer.ops))] if layer.per_op
                      else [prompts(layer, 0)] * len(layer.ops))
                run = layer.run_gated if self.mode == "sigmoid" else layer.run_mixed
                x = run(block, x, ps, self.n_prefix, weights[l])
        return self.backbone.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone.forward_head(self.forward_features(x), pre_logits=True)
        return self.head(feats)
