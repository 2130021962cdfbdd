"""Data integrity: splits fixed by ``data.split_seed`` (not the run seed), 16-bit images scaled rather than
clipped, the lr scaled by a batch that exists, checkpoints of another geometry refused, finite bounded fields."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, TINY_BACKBONE, checkpoint_32px, tiny_config
from pfnas import data as D
from pfnas.config import BackboneConfig, ConfigError, DataConfig, ExperimentConfig, ModelError, merge_dotted
from pfnas.engine import Experiment, RetrainPhase, lr_at
from pfnas.model import load_backbone
from pfnas.provenance import dataset_info

MEAN = STD = (0.5, 0.5, 0.5)
GREY_16 = 30000  # of 65535
GREY_8 = round(GREY_16 / 65535 * 255)  # 117, where convert("RGB") saturates to 255


def _png(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def _classes(root: Path, classes: int = 3, per_class: int = 10) -> None:
    for c in range(classes):
        for i in range(per_class):
            _png(root / f"class_{c}" / f"{i}.png", (c * 50, i, 0))


# ----------------------------------------------------------------------------- item 6: the split seed
def _data_config(kind: str, tmp_path: Path) -> dict:
    if kind == "imagefolder":  # flat: pfnas draws 70/10/20
        _classes(tmp_path / "flat")
        return {"kind": "imagefolder", "root": str(tmp_path / "flat")}
    if kind == "hta":  # train/test folders: pfnas draws train/val
        _classes(tmp_path / "hta" / "set" / "train")
        _classes(tmp_path / "hta" / "set" / "test", per_class=2)
        return {"kind": "hta", "root": str(tmp_path / "hta"), "task": "set"}
    return {"kind": "synthetic", "synthetic_classes": 3, "synthetic_per_class": 8}


@pytest.mark.parametrize("kind", ["imagefolder", "hta", "synthetic"])
def test_finals_of_several_seeds_share_one_split(tmp_path, kind):
    """A study's finals differ in ``seed`` only (``final_cfg.seed + k``): same images, same dataset digest."""
    base = tiny_config(data=_data_config(kind, tmp_path), train={"stage": "final"})
    finals = [merge_dotted(base, {"seed": k}) for k in (0, 1, 2)]
    built = [Experiment.build(c).data for c in finals]
    for d in built[1:]:
        for s in D.SPLITS:
            assert torch.equal(d.splits[s].images, built[0].splits[s].images), (kind, s)
            assert torch.equal(d.splits[s].labels, built[0].splits[s].labels), (kind, s)
    digests = {dataset_info(c, d)["digest"] for c, d in zip(finals, built)}
    assert len(digests) == 1
    other_cfg = merge_dotted(base, {"data.split_seed": 1})  # the data seed itself still draws another split
    other = Experiment.build(other_cfg).data
    assert not torch.equal(other.splits["train"].images, built[0].splits["train"].images)
    assert dataset_info(other_cfg, other)["digest"] not in digests


# ----------------------------------------------------------------------------- item 7: 16-bit images
def _grey16(path: Path, mode: str = "I;16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), GREY_16, dtype=np.uint16)).save(path)
    assert Image.open(path).mode in ("I;16", "I")  # a 16-bit grey PNG, as Pillow decodes it
    return path


def test_16_bit_png_is_scaled_in_training_decode(tmp_path):
    for c in range(2):
        for i in range(5):
            _grey16(tmp_path / "set" / f"class_{c}" / f"{i}.png")
    d = D.load_task(DataConfig(kind="imagefolder", root=str(tmp_path / "set")), img_size=8, mean=MEAN, std=STD)
    for s in ("train", "test"):
        assert (d.splits[s].images.int() - GREY_8).abs().max() <= 1, d.splits[s].images.unique()


def test_16_bit_and_float_images_are_scaled_in_predict_decode(tmp_path):
    view = D.eval_view("imagefolder", 8)
    files = D.decode_images([_grey16(tmp_path / "g.png")], view, workers=1)  # pfnas predict FILES
    assert (files.int() - GREY_8).abs().max() <= 1, files.unique()
    grey = np.full((8, 8), GREY_16, dtype=np.uint16)
    images = {"I;16": Image.fromarray(grey), "I": Image.fromarray(grey.astype(np.int32)),
              "I;16B": Image.frombytes("I;16B", (8, 8), grey.astype(">u2").tobytes()),
              "F": Image.fromarray(np.full((8, 8), GREY_16 / 65535, dtype=np.float32))}  # float grey in [0, 1]
    for mode, img in images.items():  # LoadedModel.preprocess(PIL image)
        assert img.mode == mode
        out = D.render_image(img, view)
        assert out.shape == (3, view.crop, view.crop) and (out.int() - GREY_8).abs().max() <= 1, (mode, out.unique())


# ----------------------------------------------------------------------------- item 8: the real batch
def test_batch_larger_than_the_split_scales_the_lr_by_the_real_batch(caplog):
    requested = 99_991  # a size no other test asks for: the warning is once per process and size
    cfg = tiny_config(data={"batch_size": requested},
                      train={"stage": "final", "optim": {"lr": 0.5, "warmup_epochs": 0}})
    exp = Experiment.build(cfg)
    n = exp.data.num_images("trainval")
    with caplog.at_level(logging.WARNING, logger="pfnas.engine"):
        phases = [RetrainPhase(cfg, exp.fixed(["add", "add"]), exp.data, exp.device) for _ in range(2)]
    assert all(p.batch_size == n for p in phases)
    assert phases[0].lr == pytest.approx(0.5 * n / 256) == lr_at(cfg.train.optim, n, 0, 1, cfg.train.epochs)
    warned = [r.getMessage() for r in caplog.records if "data.batch_size" in r.getMessage()]
    assert len(warned) == 1 and f"data.batch_size {requested} exceeds the {n} images" in warned[0], warned


# ----------------------------------------------------------------------------- item 9: checkpoint geometry
def test_checkpoint_of_another_size_is_refused_unless_resample(tmp_path):
    ckpt = checkpoint_32px(tmp_path / "vit32.safetensors")
    kwargs = {**TINY_BACKBONE["kwargs"], "img_size": 32}
    assert load_backbone(BackboneConfig(name=TINY_BACKBONE["name"], checkpoint=str(ckpt), kwargs=kwargs))
    for change, builds in (({"img_size": 64}, "64 px, patch 4"), ({"patch_size": 8}, "32 px, patch 8")):
        cfg = BackboneConfig(name=TINY_BACKBONE["name"], checkpoint=str(ckpt), kwargs={**kwargs, **change})
        with pytest.raises(ModelError, match=f"is 32 px, patch 4 but the config builds {builds}") as ei:
            load_backbone(cfg)
        assert "\n" not in str(ei.value) and "backbone.resample" in str(ei.value)
    resampled = load_backbone(BackboneConfig(name=TINY_BACKBONE["name"], checkpoint=str(ckpt),
                                             kwargs={**kwargs, "img_size": 64}, resample=True))
    assert resampled.pos_embed.shape[1] == 1 + (64 // 4) ** 2


def test_backbone_checkpoint_of_another_architecture_refused(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import load_file, save_file

    kw = TINY_BACKBONE["kwargs"]

    def save(path: Path, sd: dict) -> str:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        return str(path)

    torch.manual_seed(0)
    same = timm.create_model(TINY_BACKBONE["name"], num_classes=7, **kw)
    ok = save(tmp_path / "ok.safetensors", same.state_dict())
    bb = load_backbone(BackboneConfig(**{**TINY_BACKBONE, "checkpoint": ok}))
    file_sd, own = load_file(ok), bb.state_dict()
    assert own and all(torch.equal(v, file_sd[k]) for k, v in own.items())

    wide = timm.create_model(TINY_BACKBONE["name"], num_classes=7, **{**kw, "embed_dim": 48})
    resnet_like = {"conv1.weight": torch.zeros(8, 3, 7, 7), "bn1.weight": torch.ones(8), "fc.weight": torch.zeros(7, 8)}
    for path in (save(tmp_path / "wide.safetensors", wide.state_dict()),
                 save(tmp_path / "resnet.safetensors", resnet_like)):
        with pytest.raises(ModelError) as ei:
            load_backbone(BackboneConfig(**{**TINY_BACKBONE, "checkpoint": path}))
        assert "\n" not in str(ei.value) and path in str(ei.value)


def test_shared_proxy_backbone_still_loads_at_its_own_size():
    from conftest import PROXY_BACKBONE

    if not PROXY_BACKBONE.is_file():
        pytest.skip("../shared proxy backbone not present")
    kw = {"img_size": 32, "patch_size": 4}
    assert load_backbone(BackboneConfig(checkpoint=str(PROXY_BACKBONE), kwargs=kw)).pos_embed.shape[1] == 65
    with pytest.raises(ModelError, match="is 32 px, patch 4 but the config builds 64 px, patch 4"):
        load_backbone(BackboneConfig(checkpoint=str(PROXY_BACKBONE), kwargs={**kw, "img_size": 64}))


# ----------------------------------------------------------------------------- item 14: bounds
@pytest.mark.parametrize("override", [
    "train.optim.lr=.inf", "search.optim.lr=.nan", "search.optim.lr=1001", "search.arch_lr=11",
    "search.tau.start=1.0e-9", "search.tau.end=.inf", "train.optim.weight_decay=2", "search.arch_betas=[0.5, 1.5]",
    "prompts.length=100000", "train.epochs=1000000000", "data.batch_size=1000000000", "pae.koopman_weight=1.0e+9",
    "search.entropy_weight=-.inf", "backbone.mean=[.nan, 0.5, 0.5]", "method.budget_seconds=.inf",
])
def test_every_float_is_finite_and_every_size_bounded(override):
    from pfnas.config import load_config

    with pytest.raises(ConfigError) as ei:
        load_config(None, [override])
    assert override.split("=")[0] in str(ei.value) and "\n" not in str(ei.value)


def test_shipped_configs_and_spaces_validate_within_the_bounds():
    from pfnas.config import EMBEDDED_CONFIGS, load_config
    from pfnas.tune import load_space

    for cfg in sorted(EMBEDDED_CONFIGS.glob("*.yaml")):
        assert isinstance(load_config(cfg), ExperimentConfig)
    for space in sorted((REPO / "search_spaces").glob("*.yaml")):
        assert load_space(space), space
