"""Self-contained export of a retrained policy, and :func:`load_model` to use it again.

Every finished retrain writes two files next to its checkpoint:

* ``model.safetensors``  the trained weights only: prompts, operator weights and head (never the frozen backbone)
* ``pfnas_model.json``   everything needed to rebuild the model: policy, prompt config, the backbone reference
                         (timm name, kwargs, checkpoint path and its sha256, a sha256 of the backbone weights as
                         loaded), classes, preprocessing, the stage and the score the retrain reached

:func:`load_model` rebuilds the frozen backbone from the reference, refuses it when a digest differs, and
returns a :class:`PfnasModel` in eval mode. MLflow (``runs:/<id>/model``, ``models:/...``) is imported only
when such a URI is given; the engine side of this module never touches MLflow or Ray.
"""
from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from ._version import __version__
from .config import BackboneConfig, ExperimentConfig, ModelError, PfnasError, PromptConfig
from .data import IMAGE_EXTS, TaskData, View, decode_images, eval_view, render_image
from .model import PromptedViT, load_backbone
from .runtime import autocast, write_atomic
from .sysinfo import file_sha256

FORMAT = "pfnas-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "pfnas_model.json"
EXPORT_FILES = (WEIGHTS_FILE, META_FILE)
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")

_WEIGHT_DIGESTS: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------------------- digests
def model_files(folder: str | Path) -> list[str]:
    """Absolute paths of the export files a finished retrain writes into ``folder``."""
    return [str((Path(folder) / f).resolve()) for f in EXPORT_FILES]


def weights_sha256(module: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``module``'s state dict (cached per frozen module)."""
    if module in _WEIGHT_DIGESTS:
        return _WEIGHT_DIGESTS[module]
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    _WEIGHT_DIGESTS[module] = h.hexdigest()
    return _WEIGHT_DIGESTS[module]


# ----------------------------------------------------------------------------- export
def _backbone_reference(cfg: ExperimentConfig, backbone: nn.Module) -> dict[str, Any]:
    ref = cfg.backbone.model_dump(mode="json")
    ref["checkpoint_sha256"] = None
    if ref.get("checkpoint"):
        path = Path(ref["checkpoint"]).expanduser().resolve()
        ref["checkpoint"] = str(path)
        ref["checkpoint_sha256"] = file_sha256(path)
    # a random-init backbone is rebuilt from the seed Experiment.build drew it with; weights_sha256 checks that
    ref["init_seed"] = None if (ref.get("pretrained") or ref.get("checkpoint")) else int(cfg.seed)
    ref["weights_sha256"] = weights_sha256(backbone)
    return ref


def export_model(out_dir: str | Path, model: PromptedViT, cfg: ExperimentConfig, data: TaskData,
                 metrics: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` + ``pfnas_model.json`` for a fixed-policy ``model`` into ``out_dir``.

    Each file is written to a temporary name and renamed; the json (written last) names the sha256 of the
    weights file, so a half-replaced pair is detected by :func:`load_model`. Returns ``out_dir``.
    """
    import timm
    from safetensors.torch import save

    if model.policy is None:
        raise PfnasError("only a fixed-policy model can be exported (the supernet has no policy)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.trainable_state_dict().items()}
    write_atomic(out / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}), "model weights")
    n = int(model.head.out_features)
    view = eval_view(cfg.data.kind, data.img_size)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "versions": {"pfnas": __version__, "torch": torch.__version__, "timm": timm.__version__},
        "task": data.name, "seed": int(cfg.seed), "stage": cfg.train.stage, "epochs": int(cfg.train.epochs),
        "metrics": {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))},
        "precision": cfg.precision,
        "policy": {str(l): op for l, op in sorted(model.policy.items())},
        "prompts": cfg.prompts.model_dump(mode="json"),
        "backbone": _backbone_reference(cfg, model.backbone),
        "num_classes": n,
        "classes": list(data.classes) if data.classes and len(data.classes) == n else None,
        "preprocessing": {"image_size": int(data.img_size), "mean": list(data.mean), "std": list(data.std),
                          "resize": "square" if view.square else "shorter_side", "resize_size": view.resize,
                          "crop_size": view.crop, "interpolation": "bicubic", "data_kind": cfg.data.kind},
        "weights": {"file": WEIGHTS_FILE, "sha256": file_sha256(out / WEIGHTS_FILE), "tensors": len(tensors)},
    }
    write_atomic(out / META_FILE, json.dumps(meta, indent=1), "model file")
    return out


# ----------------------------------------------------------------------------- the loaded model
class PfnasModel(PromptedViT):
    """A :class:`PromptedViT` rebuilt from an export: ``policy``, ``classes`` (names, or class indices as
    strings), ``preprocessing`` (the json's dict), ``meta`` (the whole json) and :meth:`preprocess`."""

    def __init__(self, backbone: nn.Module, meta: dict[str, Any]):
        super().__init__(backbone, int(meta["num_classes"]), PromptConfig.model_validate(meta["prompts"]),
                         {int(k): v for k, v in meta["policy"].items()})
        self.meta = meta
        n = int(meta["num_classes"])
        self.classes = list(meta["classes"]) if meta.get("classes") else [str(i) for i in range(n)]
        pre = meta["preprocessing"]
        self.preprocessing = dict(pre)
        self.view = View(int(pre["resize_size"]), int(pre["crop_size"]), pre["resize"] == "square")

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, S, S]`` -> float32 normalised, the arithmetic of ``TaskData.batches``."""
        dev = images.device
        mean = torch.tensor(self.preprocessing["mean"], dtype=torch.float32, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocessing["std"], dtype=torch.float32, device=dev).view(1, 3, 1, 1)
        return (images.float() / 255.0 - mean) / std

    def _as_uint8(self, img: Any) -> torch.Tensor:
        from PIL import Image

        if isinstance(img, (str, Path)):
            return decode_images([img], self.view, workers=1)[0]
        if isinstance(img, Image.Image):
            return render_image(img, self.view)
        if isinstance(img, torch.Tensor) and img.dim() == 3 and img.shape[0] == 3:
            t = img.detach().to("cpu")
            if t.is_floating_point():  # RGB in [0, 1]
                t = (t.clamp(0, 1) * 255).round()
            t = t.to(torch.uint8)
            if tuple(t.shape[-2:]) == (self.view.crop, self.view.crop):
                return t.contiguous()
            return render_image(Image.fromarray(t.permute(1, 2, 0).numpy()), self.view)
        raise PfnasError(f"cannot preprocess {type(img).__name__}: pass a path, a PIL image or an RGB tensor [3, H, W]")

    def preprocess(self, images: Any) -> torch.Tensor:
        """A path, PIL image or RGB tensor (uint8, or float in [0, 1]; ``[3, H, W]`` or ``[B, 3, H, W]``), or a
        list of them -> normalised float32 ``[N, 3, S, S]`` on the model's device, decoded, resized and cropped as
        the evaluation split of the training data was."""
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        u8 = torch.stack([self._as_uint8(im) for im in images])
        return self.normalize(u8.to(self.head.weight.device))


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PfnasError(f"cannot read {path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PfnasError(f"{path} is not a pfnas model file (no \"format\": \"{FORMAT}\")")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise PfnasError(f"{path} has format_version {version!r}; this pfnas reads up to {FORMAT_VERSION}")
    missing = [k for k in ("policy", "prompts", "backbone", "num_classes", "preprocessing", "weights") if k not in meta]
    if missing:
        raise PfnasError(f"{path} lacks field(s) {', '.join(missing)}")
    return meta


def find_export(path: str | Path) -> Path:
    """The folder holding ``pfnas_model.json``: ``path`` itself, ``path/retrain`` (baselines), or the parent of
    a given export file."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.name not in EXPORT_FILES:
            raise PfnasError(f"{p} is not a pfnas export; pass the folder with {META_FILE} and {WEIGHTS_FILE}")
        p = p.parent
    if not p.exists():
        raise PfnasError(f"model path not found: {p}")
    for d in (p, p / "retrain"):
        if (d / META_FILE).is_file():
            return d
    below = sorted({f.parent for pat in (f"*/{META_FILE}", f"*/retrain/{META_FILE}") for f in p.glob(pat)})
    hint = f"; exports below it: {', '.join(str(b) for b in below[:3])}" + (" ..." if len(below) > 3 else "") if below else ""
    raise PfnasError(f"no {META_FILE} in {p} or {p / 'retrain'} (a finished retrain writes it){hint}")


def _timm_version() -> str:
    import timm

    return timm.__version__


def _load_folder(folder: Path, device: str | torch.device, backbone_checkpoint: str | Path | None) -> PfnasModel:
    from safetensors.torch import load_file

    meta = _read_meta(folder / META_FILE)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise PfnasError(f"{folder}: {WEIGHTS_FILE} is missing next to {META_FILE}")
    if file_sha256(weights) != meta["weights"].get("sha256"):
        raise ModelError(f"{weights} does not match the sha256 in {META_FILE} (files from two different exports?)")
    ref = dict(meta["backbone"])
    bcfg = BackboneConfig.model_validate({k: ref[k] for k in BackboneConfig.model_fields if k in ref})
    if backbone_checkpoint is not None:
        bcfg = bcfg.model_copy(update={"checkpoint": str(Path(backbone_checkpoint).expanduser())})
    if bcfg.checkpoint:
        ck = Path(bcfg.checkpoint).expanduser()
        if not ck.is_file():
            raise ModelError(f"backbone checkpoint not found: {ck} (pass backbone_checkpoint= / --backbone-checkpoint "
                             "with the file the model was trained on)")
        want = ref.get("checkpoint_sha256")
        got = file_sha256(ck)
        if want and got != want:
            raise ModelError(f"backbone checkpoint {ck} has sha256 {got[:16]}..., the model was trained on "
                             f"{want[:16]}...; refusing to load it on other weights")
    try:
        sd = load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - truncated or foreign file
        raise PfnasError(f"cannot read {weights}: {e}") from None
    with torch.random.fork_rng(devices=[]):  # rebuilding must not move the caller's RNG
        if ref.get("init_seed") is not None:
            torch.manual_seed(int(ref["init_seed"]))
        backbone = load_backbone(bcfg)
        want = ref.get("weights_sha256")
        if want and weights_sha256(backbone) != want:
            source = (f"checkpoint {bcfg.checkpoint}" if bcfg.checkpoint else
                      "hub weights" if bcfg.pretrained else f"init seed {ref.get('init_seed')}")
            raise ModelError(f"backbone {bcfg.name} from {source} has other weights than the model was trained on "
                             f"(trained with timm {meta.get('versions', {}).get('timm', '?')}, this is timm {_timm_version()}); "
                             "refusing to load")
        model = PfnasModel(backbone, meta)
    model.load_trainable_state_dict(sd)
    return model.to(device).eval()


def load_model(path: str | Path, *, device: str | torch.device = "cpu",
               backbone_checkpoint: str | Path | None = None) -> PfnasModel:
    """Load an exported model from a local export folder or a run folder (its ``retrain/`` is searched too).

    The frozen backbone is rebuilt from the export's reference and refused (:class:`ModelError`) when the
    checkpoint file or the loaded weights differ from the ones the model was trained on. ``backbone_checkpoint``
    points at the checkpoint when it moved. Returns a :class:`PfnasModel` in eval mode on ``device``. MLflow URIs
    are loaded by :func:`pfnas.load_model` (:mod:`pfnas.tracking.artifacts`), which downloads, then calls this.
    """
    return _load_folder(find_export(path), device, backbone_checkpoint)


# ----------------------------------------------------------------------------- prediction
def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named by ``inputs``: files as given, folders searched recursively (sorted)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise PfnasError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) in {p}")
            out.extend(found)
        else:
            raise PfnasError(f"image path not found: {p}")
    if not out:
        raise PfnasError("no images given")
    return out


@torch.no_grad()
def predict_files(model: PfnasModel, paths: Sequence[Path], top_k: int = 5, batch_size: int = 64
                  ) -> list[tuple[Path, list[tuple[str, float]]]]:
    """Top-``k`` (class, probability) per image file, decoded in chunks of ``batch_size``."""

    k = max(1, min(int(top_k), len(model.classes)))
    dev = model.head.weight.device
    results = []
    for i in range(0, len(paths), batch_size):
        chunk = list(paths[i:i + batch_size])
        x = model.normalize(decode_images(chunk, model.view).to(dev))
        with autocast(dev, model.meta.get("precision", "auto")):
            logits = model(x)
        prob, idx = logits.float().softmax(-1).topk(k, dim=-1)
        for p, ps, ids in zip(chunk, prob.tolist(), idx.tolist()):
            results.append((p, [(model.classes[j], q) for j, q in zip(ids, ps)]))
    return results
