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

import errno
import hashlib
import json
import os
import weakref
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence

import torch
import torch.nn as nn
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError,
                      field_validator, model_validator)

from ._version import __version__
from .config import (OPS, BackboneConfig, DataError, ExperimentConfig, ModelError, PfnasError, PromptConfig,
                     format_validation_error)
from .data import IMAGE_EXTS, TaskData, View, decode_images, eval_view, render_image
from .model import FIXED_OPS, PromptedViT, load_backbone
from .runtime import autocast, write_atomic
from .sysinfo import file_sha256

FORMAT = "pfnas-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "pfnas_model.json"
EXPORT_FILES = (WEIGHTS_FILE, META_FILE)
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")

# bounds on what a pfnas_model.json may ask for (a crafted file must not allocate gigabytes)
MAX_CLASSES = 100_000
MAX_IMAGE_SIZE = 4096
MAX_PROMPT_LENGTH = 1024
MAX_FUSION_DIM = 4096
MAX_LAYERS = 1024
MAX_BACKBONE_PARAMS = 2_000_000_000
MAX_PATCHES = 16_384
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


# ----------------------------------------------------------------------------- the model file
_Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
_Positive = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0)]
_Sha256 = Annotated[str, Field(strict=True, pattern=r"^[0-9a-f]{64}$")]
_Triple = Annotated[list[_Finite], Field(min_length=3, max_length=3)]
_PositiveTriple = Annotated[list[_Positive], Field(min_length=3, max_length=3)]


def _layer_key(key: str) -> str:
    if not (key.isascii() and key.isdigit() and str(int(key)) == key and int(key) < MAX_LAYERS):
        raise ValueError(f"a policy key is a layer number 0..{MAX_LAYERS - 1}")
    return key


_Layer = Annotated[StrictStr, AfterValidator(_layer_key)]
_Size = Annotated[int, Field(strict=True, ge=1, le=MAX_IMAGE_SIZE)]
_Name = Annotated[str, Field(strict=True, max_length=1000)]


class _MetaSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExportPrompts(_MetaSection):
    length: StrictInt = Field(ge=1, le=MAX_PROMPT_LENGTH)
    dropout: float = Field(strict=True, ge=0.0, lt=1.0)
    fusion_dim: StrictInt = Field(ge=1, le=MAX_FUSION_DIM)
    ops: list[Literal[OPS]] = Field(min_length=1, max_length=len(OPS))

    @field_validator("ops")
    @classmethod
    def _distinct_ops(cls, v: list[str]) -> list[str]:  # PromptConfig's rule, refused here in one line
        if len(set(v)) != len(v):
            raise ValueError("has duplicates")
        return v


class ExportBackbone(_MetaSection):
    name: _Name
    pretrained: StrictBool = False
    checkpoint: Optional[Annotated[str, Field(strict=True, max_length=4096)]] = None
    kwargs: dict[StrictStr, Any] = Field(default_factory=dict)  # checked by a dry build on the meta device
    mean: Optional[_Triple] = None
    std: Optional[_PositiveTriple] = None
    checkpoint_num_classes: Optional[StrictInt] = Field(None, ge=1, le=MAX_CLASSES)
    resample: StrictBool = False  # the checkpoint's embeddings were resampled to this geometry when trained
    checkpoint_sha256: Optional[_Sha256] = None
    init_seed: Optional[StrictInt] = Field(None, ge=0, lt=2**63)
    weights_sha256: Optional[_Sha256] = None

    def config(self) -> BackboneConfig:
        fields = {k: getattr(self, k) for k in BackboneConfig.model_fields}
        return BackboneConfig.model_validate({**fields, "mean": self.mean and tuple(self.mean),
                                              "std": self.std and tuple(self.std)})


class ExportPreprocessing(_MetaSection):
    image_size: _Size
    mean: _Triple
    std: _PositiveTriple
    resize: Literal["square", "shorter_side"]
    resize_size: _Size
    crop_size: _Size
    interpolation: Literal["bicubic"] = "bicubic"
    data_kind: Optional[_Name] = None

    @model_validator(mode="after")
    def _crop_inside(self) -> "ExportPreprocessing":
        if self.crop_size > self.resize_size or self.crop_size != self.image_size:
            raise ValueError(f"crop_size {self.crop_size} must equal image_size ({self.image_size}) and be at most "
                             f"resize_size ({self.resize_size})")
        return self


class ExportWeights(_MetaSection):
    file: Literal[WEIGHTS_FILE]
    sha256: _Sha256
    tensors: Optional[StrictInt] = Field(None, ge=0)


class ExportMeta(_MetaSection):
    """``pfnas_model.json``, validated: strict types, known ops, bounded sizes (see the ``MAX_*`` constants)."""

    format: Literal[FORMAT]
    format_version: StrictInt = Field(ge=1, le=FORMAT_VERSION)
    versions: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    task: Optional[_Name] = None
    seed: Optional[StrictInt] = None
    stage: Optional[Literal["select", "final"]] = None
    epochs: Optional[StrictInt] = Field(None, ge=0)
    metrics: dict[StrictStr, Annotated[float, Field(strict=True)]] = Field(default_factory=dict)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    policy: dict[_Layer, Literal[FIXED_OPS]] = Field(min_length=1, max_length=MAX_LAYERS)
    prompts: ExportPrompts
    backbone: ExportBackbone
    num_classes: StrictInt = Field(ge=1, le=MAX_CLASSES)
    classes: Optional[list[_Name]] = None
    preprocessing: ExportPreprocessing
    weights: ExportWeights

    @field_validator("policy")
    @classmethod
    def _every_layer(cls, policy: dict[str, str]) -> dict[str, str]:
        layers = sorted(int(k) for k in policy)
        if layers != list(range(len(layers))):
            raise ValueError(f"policy must name layers 0..{len(layers) - 1} once each, got {layers[:8]}")
        return policy

    @field_validator("classes")
    @classmethod
    def _one_name_per_class(cls, classes: list[str] | None, info) -> list[str] | None:
        n = info.data.get("num_classes")
        if classes is not None and n is not None and len(classes) != n:
            raise ValueError(f"{len(classes)} class names for num_classes {n}")
        return classes


def validate_meta(raw: Any, source: str | Path = META_FILE) -> ExportMeta:
    """``raw`` (the parsed json) as an :class:`ExportMeta`, or a one-line :class:`ModelError` naming the field."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ModelError(f"{source} is not a pfnas model file (no \"format\": \"{FORMAT}\")")
    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise ModelError(f"{source} has format_version {version!r}; this pfnas reads 1 to {FORMAT_VERSION}")
    try:
        return ExportMeta.model_validate(raw)
    except ValidationError as e:
        raise ModelError(f"{source}: {format_validation_error(e)}") from None


def _dry_build(spec: ExportMeta, source: Path) -> None:
    """Build the backbone on the meta device (no memory, no download) and refuse it before the real build when it
    is too big or does not fit the policy and preprocessing of ``spec``."""
    import timm

    bb = spec.backbone
    if not timm.is_model(bb.name):
        raise ModelError(f"{source}: unknown timm model {bb.name!r} in backbone.name")
    try:
        with torch.device("meta"):
            net = timm.create_model(bb.name, pretrained=False, num_classes=0, **bb.kwargs)
        params = sum(p.numel() for p in net.parameters())
        patches = int(net.patch_embed.num_patches)
        depth = len(net.blocks)
        size = net.patch_embed.img_size
    except Exception as e:  # noqa: BLE001 - untrusted kwargs: whatever timm raises is a refusal
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelError(f"{source}: cannot build {bb.name} with backbone.kwargs: {first}") from None
    if params > MAX_BACKBONE_PARAMS or patches > MAX_PATCHES:
        raise ModelError(f"{source}: backbone {bb.name} with these kwargs has {params:,} parameters and {patches:,} "
                         f"patches (at most {MAX_BACKBONE_PARAMS:,} and {MAX_PATCHES:,})")
    if len(spec.policy) != depth:
        raise ModelError(f"{source}: policy names {len(spec.policy)} layers, backbone {bb.name} has {depth} blocks")
    crop = spec.preprocessing.crop_size
    if not getattr(net, "dynamic_img_size", False) and tuple(size) != (crop, crop):
        raise ModelError(f"{source}: preprocessing.crop_size {crop} does not fit backbone input {tuple(size)}")


# ----------------------------------------------------------------------------- the loaded model
class PfnasModel(PromptedViT):
    """A :class:`PromptedViT` rebuilt from an export: ``policy``, ``classes`` (names, or class indices as
    strings), ``preprocessing`` (the json's dict), ``meta`` (the whole json) and :meth:`preprocess`."""

    def __init__(self, backbone: nn.Module, meta: dict[str, Any] | ExportMeta):
        spec = meta if isinstance(meta, ExportMeta) else validate_meta(meta)
        super().__init__(backbone, spec.num_classes, PromptConfig.model_validate(spec.prompts.model_dump()),
                         {int(k): v for k, v in spec.policy.items()})
        self.meta = spec.model_dump(mode="json")
        n = spec.num_classes
        self.classes = list(spec.classes) if spec.classes else [str(i) for i in range(n)]
        pre = spec.preprocessing
        self.preprocessing = pre.model_dump(mode="json")
        self.view = View(pre.resize_size, pre.crop_size, pre.resize == "square")

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


def _read_meta(path: Path) -> ExportMeta:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ModelError(f"cannot read {path}: {' '.join(str(e).split())[:300]}") from None
    return validate_meta(raw, path)


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

    spec = _read_meta(folder / META_FILE)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise PfnasError(f"{folder}: {WEIGHTS_FILE} is missing next to {META_FILE}")
    if file_sha256(weights) != spec.weights.sha256:
        raise ModelError(f"{weights} does not match the sha256 in {META_FILE} (files from two different exports?)")
    _dry_build(spec, folder / META_FILE)
    ref = spec.backbone
    try:
        bcfg = ref.config()
    except ValidationError as e:
        raise ModelError(f"{folder / META_FILE}: {format_validation_error(e, 'backbone.')}") from None
    if backbone_checkpoint is not None:
        bcfg = bcfg.model_copy(update={"checkpoint": str(Path(backbone_checkpoint).expanduser())})
    if bcfg.checkpoint:
        ck = Path(bcfg.checkpoint).expanduser()
        if not ck.is_file():
            raise ModelError(f"backbone checkpoint not found: {ck} (pass backbone_checkpoint= / --backbone-checkpoint "
                             "with the file the model was trained on)")
        want = ref.checkpoint_sha256
        got = file_sha256(ck)
        if want and got != want:
            raise ModelError(f"backbone checkpoint {ck} has sha256 {got[:16]}..., the model was trained on "
                             f"{want[:16]}...; refusing to load it on other weights")
    try:
        sd = load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - truncated or foreign file
        raise PfnasError(f"cannot read {weights}: {e}") from None
    with torch.random.fork_rng(devices=[]):  # rebuilding must not move the caller's RNG
        if ref.init_seed is not None:
            torch.manual_seed(ref.init_seed)
        backbone = load_backbone(bcfg)
        want = ref.weights_sha256
        if want and weights_sha256(backbone) != want:
            source = (f"checkpoint {bcfg.checkpoint}" if bcfg.checkpoint else
                      "hub weights" if bcfg.pretrained else f"init seed {ref.init_seed}")
            raise ModelError(f"backbone {bcfg.name} from {source} has other weights than the model was trained on "
                             f"(trained with timm {spec.versions.get('timm', '?')}, this is timm {_timm_version()}); "
                             "refusing to load")
        model = PfnasModel(backbone, spec)
    try:
        model.load_trainable_state_dict(sd)
    except RuntimeError as e:  # shapes: a json whose prompts / classes were changed after the export
        first = (str(e).strip().splitlines() or [""])[-1].strip()[:200]
        raise ModelError(f"{weights} does not fit the model {META_FILE} describes: {first}") from None
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
def _unreachable(p: Path) -> str | None:
    """Why ``p`` cannot be opened (symlink loop, dangling symlink, not found, permission), or None."""
    try:
        p.stat()
    except FileNotFoundError:
        return f"dangling symlink to {os.readlink(p)}" if p.is_symlink() else "not found"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop (too many levels of symbolic links)"
        return e.strerror or type(e).__name__
    return None


def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named by ``inputs``: files as given, folders searched recursively (sorted). Inside folders,
    broken symlinks with an image name are listed too, so that predicting them reports them."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        problem = _unreachable(p)
        if problem == "not found":
            raise DataError(f"image path not found: {p}")
        if problem:
            raise DataError(f"image path {p}: {problem}")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if (f.is_file() or f.is_symlink() and not f.is_dir())
                           and f.suffix.lower() in IMAGE_EXTS
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) in {p}")
            out.extend(found)
        else:
            out.append(p)
    if not out:
        raise DataError("no images given")
    return out


def _decode_readable(paths: list[Path], view: View, skipped: list[tuple[Path, str]] | None
                     ) -> tuple[list[Path], torch.Tensor | None]:
    """Decode ``paths``. When one fails, each is retried alone: an unreadable file (a symlink loop named as such)
    raises :class:`DataError`, or with ``skipped`` given goes there as (path, reason) while the rest is kept."""
    try:
        return paths, decode_images(paths, view)
    except DataError:
        pass
    good, images = [], []
    for p in paths:
        problem = _unreachable(p)
        try:
            if problem:
                raise DataError(f"unreadable image {p}: {problem}")
            images.append(decode_images([p], view, workers=1))
            good.append(p)
        except DataError as e:
            if skipped is None:
                raise
            skipped.append((p, str(e)))
    return good, (torch.cat(images) if images else None)


@torch.no_grad()
def predict_files(model: PfnasModel, paths: Sequence[Path], top_k: int = 5, batch_size: int = 64,
                  skipped: list[tuple[Path, str]] | None = None) -> list[tuple[Path, list[tuple[str, float]]]]:
    """Top-``k`` (class, probability) per image file, decoded in chunks of ``batch_size``.

    An unreadable file raises :class:`DataError`; with a ``skipped`` list given, it is appended there as
    ``(path, reason)`` and left out of the results instead.
    """

    k = max(1, min(int(top_k), len(model.classes)))
    dev = model.head.weight.device
    results = []
    for i in range(0, len(paths), batch_size):
        chunk, images = _decode_readable(list(paths[i:i + batch_size]), model.view, skipped)
        if images is None:
            continue
        x = model.normalize(images.to(dev))
        with autocast(dev, model.meta.get("precision", "auto")):
            logits = model(x)
        prob, idx = logits.float().softmax(-1).topk(k, dim=-1)
        for p, ps, ids in zip(chunk, prob.tolist(), idx.tolist()):
            results.append((p, [(model.classes[j], q) for j, q in zip(ids, ps)]))
    return results
