"""Export and predict: model.safetensors + pfnas_model.json from every retrain, pfnas.load_model, pfnas predict."""
from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import CRAFTED, TINY_BACKBONE, crafted_model, tiny_config
from pfnas import cli, load_model
from pfnas.methods import run_method
from pfnas.config import ModelError, PfnasError
from pfnas.engine import Experiment, evaluate
from pfnas.export import META_FILE, WEIGHTS_FILE, PfnasModel

KW4 = {**TINY_BACKBONE["kwargs"], "depth": 4}
POLICY = ["prepend", "add", "affine", "cross_attn"]


def _fixed_cfg(epochs: int = 2, **backbone):
    return tiny_config(backbone={"kwargs": KW4, **backbone}, method={"kind": "fixed", "policy": POLICY},
                       train={"epochs": epochs, "stage": "final"})


def _trained(exp: Experiment, folder: Path, policy) -> torch.nn.Module:
    """The run's own retrained model, rebuilt on the run's backbone from its last checkpoint."""
    model = exp.fixed(policy)
    model.load_trainable_state_dict(torch.load(folder / "retrain.pt", map_location="cpu", weights_only=True)["model"])
    return model.eval()


def _test_batch(exp: Experiment) -> torch.Tensor:
    return next(iter(exp.data.batches("test", 64)))[0]


def test_load_model_reproduces_the_run(tmp_path: Path) -> None:
    cfg = _fixed_cfg()
    exp = Experiment.build(cfg)
    res = run_method(cfg, tmp_path / "run", exp=exp)
    folder = tmp_path / "run" / "retrain"
    assert (folder / WEIGHTS_FILE).is_file() and (folder / META_FILE).is_file()
    assert res["model_dir"] == str(folder.resolve())
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["policy"] == {str(i): op for i, op in enumerate(POLICY)} and meta["stage"] == "final"
    assert meta["metrics"]["test_acc"] == res["test_acc"] and meta["num_classes"] == 3
    assert meta["classes"] == exp.data.classes and meta["backbone"]["init_seed"] == cfg.seed
    assert meta["backbone"]["checkpoint_sha256"] is None and len(meta["backbone"]["weights_sha256"]) == 64
    assert meta["preprocessing"]["resize"] == "square" and meta["preprocessing"]["image_size"] == 16
    assert meta["prompts"] == {"length": 4, "dropout": 0.0, "fusion_dim": 4, "ops": cfg.prompts.ops}
    from safetensors.torch import load_file

    assert not any(k.startswith("backbone.") for k in load_file(str(folder / WEIGHTS_FILE)))  # no frozen weights

    rng = torch.get_rng_state()
    loaded = load_model(tmp_path / "run")  # the run folder: found in retrain/
    assert torch.equal(torch.get_rng_state(), rng)  # rebuilding the model leaves the caller's RNG alone
    assert isinstance(loaded, PfnasModel) and not loaded.training
    assert loaded.policy == dict(enumerate(POLICY)) and loaded.classes == exp.data.classes
    ev = evaluate(loaded, exp.data, "test", cfg.data.eval_batch_size, exp.device, cfg.precision)
    assert ev["acc"] == res["test_acc"]  # exactly the run's test accuracy
    x = _test_batch(exp)
    with torch.no_grad():
        assert torch.equal(loaded(x), _trained(exp, folder, POLICY)(x))
    # preprocess: uint8 images through the same arithmetic as TaskData.batches
    u8 = exp.data.split("test").images[:4]
    assert torch.equal(loaded.preprocess(u8), x[:4])
    assert torch.equal(loaded.preprocess(Image.fromarray(u8[0].permute(1, 2, 0).numpy())), x[:1])


def test_changed_backbone_checkpoint_is_refused(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    ckpt = tmp_path / "backbone.safetensors"
    bb = timm.create_model(TINY_BACKBONE["name"], pretrained=False, num_classes=0, **KW4)
    save_file({k: v.contiguous() for k, v in bb.state_dict().items()}, str(ckpt))
    cfg = _fixed_cfg(epochs=1, checkpoint=str(ckpt))
    exp = Experiment.build(cfg)
    run_method(cfg, tmp_path / "run", exp=exp)
    meta = json.loads((tmp_path / "run" / "retrain" / META_FILE).read_text())
    assert meta["backbone"]["checkpoint"] == str(ckpt.resolve()) and meta["backbone"]["init_seed"] is None
    x = _test_batch(exp)
    with torch.no_grad():
        ref = load_model(tmp_path / "run" / "retrain" / META_FILE)(x)  # a file of the export names its folder
    moved = tmp_path / "moved.safetensors"
    shutil.copy(ckpt, moved)
    changed = {k: v + 0.01 if k == "cls_token" else v for k, v in bb.state_dict().items()}
    save_file({k: v.contiguous() for k, v in changed.items()}, str(ckpt))
    with pytest.raises(ModelError, match="sha256"):
        load_model(tmp_path / "run")
    with torch.no_grad():  # the original weights elsewhere: accepted
        assert torch.equal(load_model(tmp_path / "run", backbone_checkpoint=moved)(x), ref)
    ckpt.unlink()
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "run")
    # missing or foreign files: one-line PfnasError
    with pytest.raises(PfnasError, match="not found"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(PfnasError, match=META_FILE):
        load_model(tmp_path)
    (tmp_path / "run" / "retrain" / WEIGHTS_FILE).unlink()
    with pytest.raises(PfnasError, match="missing"):
        load_model(tmp_path / "run", backbone_checkpoint=moved)


@pytest.mark.slow
def test_load_model_from_mlflow_run(tmp_path: Path) -> None:
    from pfnas.runs import run_logged
    from pfnas.tracking import make_client

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = _fixed_cfg(epochs=1)
    run_logged(cfg, tmp_path / "run", tracking_uri=uri, progress=False)
    rid = (tmp_path / "run" / "mlflow_run_id").read_text().strip()
    names = sorted(a.path for a in make_client(uri).list_artifacts(rid, "model"))
    assert names == sorted([f"model/{META_FILE}", f"model/{WEIGHTS_FILE}"])
    exp = Experiment.build(cfg)
    x = _test_batch(exp)
    with torch.no_grad():
        from_run = load_model(f"runs:/{rid}/model", tracking_uri=uri)(x)
        assert torch.equal(from_run, load_model(tmp_path / "run")(x))
        client = make_client(uri)  # a registry version whose source is the run's model/ folder: models:/ works too
        client.create_registered_model("pf")
        mv = client.create_model_version("pf", source=client.get_run(rid).info.artifact_uri + "/model", run_id=rid)
        assert torch.equal(load_model(f"models:/pf/{mv.version}", tracking_uri=uri)(x), from_run)
    with pytest.raises(PfnasError, match="cannot download"):
        load_model("runs:/0123456789abcdef/model", tracking_uri=uri)


def test_predict_cli_writes_top_k_csv(tmp_path: Path, capsys) -> None:
    cfg = tiny_config(method={"kind": "probe"}, train={"epochs": 1})  # probe: "none" layers, empty prompts
    exp = Experiment.build(cfg)
    exp = replace(exp, data=replace(exp.data, classes=None))  # a data set without class names
    run_method(cfg, tmp_path / "run", exp=exp)
    model = load_model(tmp_path / "run")
    assert model.classes == ["0", "1", "2"] and json.loads((tmp_path / "run/retrain" / META_FILE).read_text())["classes"] is None
    imgs = tmp_path / "imgs"
    g = torch.Generator().manual_seed(0)
    for i, size in enumerate([(16, 16), (24, 20), (10, 30)]):
        (imgs / ("sub" if i == 2 else "")).mkdir(parents=True, exist_ok=True)
        arr = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(arr).save(imgs / ("sub" if i == 2 else "") / f"img{i}.png")
    (imgs / "notes.txt").write_text("not an image")
    out = tmp_path / "pred.csv"
    rc = cli.main(["predict", "-m", str(tmp_path / "run"), str(imgs), "--top-k", "2", "--csv", str(out),
                   "--batch-size", "2"])
    assert rc == 0, capsys.readouterr().err
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3 * 2 and list(rows[0]) == ["path", "rank", "class", "prob"]
    files = sorted({r["path"] for r in rows})
    assert [Path(f).name for f in files] == ["img0.png", "img1.png", "img2.png"]
    with torch.no_grad():  # the CLI's numbers are the model's own on its preprocess
        probs = model(model.preprocess(files)).softmax(-1)
    for r in rows:
        p = probs[files.index(r["path"])]
        assert r["class"] in model.classes
        assert float(r["prob"]) == pytest.approx(float(p[int(r["class"])]), rel=1e-5)
        if r["rank"] == "1":
            assert int(r["class"]) == int(p.argmax())


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_model_file_is_one_error(tiny_export: Path, tmp_path: Path, case: str) -> None:
    """``pfnas predict`` on these files: tests/test_cli_exit_codes.py."""
    edit, fragment = CRAFTED[case]
    folder = crafted_model(tiny_export, tmp_path, edit)
    with pytest.raises(ModelError, match=None) as err:
        load_model(folder)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_untouched_export_still_predicts(tiny_export: Path, tmp_path: Path, capsys) -> None:
    folder = crafted_model(tiny_export, tmp_path, lambda m: None)
    assert cli.main(["predict", "-m", str(folder), str(tiny_export / "img.png")]) == 0, capsys.readouterr().err
