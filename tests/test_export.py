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

from conftest import TINY_BACKBONE, one_error_line, tiny_config
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
    capsys.readouterr()
    rc = cli.main(["predict", "-m", str(tmp_path / "run"), str(tmp_path / "missing.png")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("pfnas: error: ") and "missing.png" in err[0]
    rc = cli.main(["predict", "-m", str(tmp_path / "nomodel"), str(imgs)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "nomodel" in err[0]


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    """One exported 2-layer model (policy add, affine) and one 16 px image, shared by the crafted-file tests."""
    root = tmp_path_factory.mktemp("export")
    cfg = tiny_config(method={"kind": "fixed", "policy": ["add", "affine"]}, train={"epochs": 1})
    run_method(cfg, root / "run")
    Image.new("RGB", (40, 40), (200, 10, 10)).save(root / "img.png")
    return root


def _crafted(root: Path, tmp_path: Path, edit) -> Path:
    """A copy of the export whose pfnas_model.json ``edit`` changed in place."""
    folder = tmp_path / "model"
    shutil.copytree(root / "run" / "retrain", folder)
    meta = json.loads((folder / META_FILE).read_text())
    edit(meta)
    (folder / META_FILE).write_text(json.dumps(meta))
    return folder


def _set(section: str | None, key: str, value):
    def edit(meta):
        (meta[section] if section else meta)[key] = value
    return edit


CRAFTED = {  # the reviewer's files: tracebacks, or gigabytes allocated, before validation
    "policy key x": (lambda m: m["policy"].update({"x": m["policy"].pop("1")}), "layer number"),
    "policy op unknown": (lambda m: m["policy"].update({"0": "conv"}), "policy.0"),
    "policy one layer short": (lambda m: m["policy"].pop("1"), "2 blocks"),
    "prompt length -1": (_set("prompts", "length", -1), "prompts.length"),
    "prompt length huge": (_set("prompts", "length", 10**9), "prompts.length"),
    "num_classes four": (_set(None, "num_classes", "four"), "num_classes"),
    "num_classes 1e9": (_set(None, "num_classes", 10**9), "num_classes"),
    "num_classes float": (_set(None, "num_classes", 3.0), "num_classes"),
    "mean one value": (_set("preprocessing", "mean", [0.5]), "preprocessing.mean: List should have at least 3"),
    "std zero": (_set("preprocessing", "std", [0.5, 0.0, 0.5]), "preprocessing.std"),
    "mean NaN": (_set("preprocessing", "mean", [0.5, float("nan"), 0.5]), "preprocessing.mean"),
    "crop_size 100000": (_set("preprocessing", "crop_size", 100000), "preprocessing.crop_size"),
    "resize_size 30000": (_set("preprocessing", "resize_size", 30000), "preprocessing.resize_size"),
    "crop above resize": (_set("preprocessing", "crop_size", 20), "crop_size"),
    "crop not the backbone's": (lambda m: m["preprocessing"].update(crop_size=12, image_size=12), "16"),
    "backbone img_size 100000": (lambda m: m["backbone"]["kwargs"].update(img_size=100000), "patches"),
    "backbone depth x": (lambda m: m["backbone"]["kwargs"].update(depth="x"), "cannot build"),
    "weights other file": (_set("weights", "file", "../../etc/passwd"), "weights.file"),
    "extra field": (_set(None, "surprise", 1), "surprise"),
    "classes too few": (_set(None, "classes", ["a"]), "classes: 1 class names"),
    "head size differs": (lambda m: m.update(num_classes=5, classes=None), "does not fit"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_model_file_is_one_error(tiny_export: Path, tmp_path: Path, case: str, capsys) -> None:
    edit, fragment = CRAFTED[case]
    folder = _crafted(tiny_export, tmp_path, edit)
    with pytest.raises(ModelError, match=None) as err:
        load_model(folder)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    rc = cli.main(["predict", "-m", str(folder), str(tiny_export / "img.png")])
    one_error_line(capsys.readouterr().err, fragment)
    assert rc == 2


def test_untouched_export_still_predicts(tiny_export: Path, tmp_path: Path, capsys) -> None:
    folder = _crafted(tiny_export, tmp_path, lambda m: None)
    assert cli.main(["predict", "-m", str(folder), str(tiny_export / "img.png")]) == 0, capsys.readouterr().err


def _images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img{i}.png" for i in range(n)]
    for i, p in enumerate(paths):
        Image.new("RGB", (20 + i, 16), (40 * i, 0, 0)).save(p)
    return paths


def test_predict_skip_bad_writes_the_good_ones(tiny_export: Path, tmp_path: Path, capsys) -> None:
    good = _images(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "broken.png").write_text("not a png")
    (tmp_path / "imgs" / "loop.jpg").symlink_to("loop.jpg")  # a symlink loop inside the folder
    model = str(tiny_export / "run")
    rc = cli.main(["predict", "-m", model, str(tmp_path / "imgs")])  # default: any bad file stops it
    one_error_line(capsys.readouterr().err, "broken.png", "--skip-bad")
    assert rc == 2
    out = tmp_path / "pred.csv"
    rc = cli.main(["predict", "-m", model, str(tmp_path / "imgs"), "--skip-bad", "--csv", str(out),
                   "--batch-size", "2"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 3, err
    assert sorted({r["path"] for r in csv.DictReader(out.open())}) == [str(p) for p in good]
    assert len(err) == 2 and all(ln.startswith("pfnas: skipped: ") for ln in err), err
    assert "broken.png" in err[0] and "loop.jpg" in err[1] and "symlink loop" in err[1]
    (tmp_path / "imgs" / "broken.png").unlink()
    rc = cli.main(["predict", "-m", model, str(tmp_path / "imgs")])  # a loop inside a folder is named as such
    one_error_line(capsys.readouterr().err, "loop.jpg", "symlink loop", "--skip-bad")
    assert rc == 2
    rc = cli.main(["predict", "-m", model, *map(str, good), "--skip-bad"])  # all good: 0
    assert rc == 0 and capsys.readouterr().err == ""
    (tmp_path / "broken.png").write_text("not a png")
    rc = cli.main(["predict", "-m", model, str(tmp_path / "broken.png"), "--skip-bad"])  # none good: 2
    assert rc == 2 and capsys.readouterr().err.splitlines()[-1].startswith("pfnas: error: no readable image")


def test_predict_names_a_symlink_loop(tiny_export: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    rc = cli.main(["predict", "-m", str(tiny_export / "run"), str(tmp_path / "a.png")])
    one_error_line(capsys.readouterr().err, "a.png", "symlink loop")
    assert rc == 2
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    rc = cli.main(["predict", "-m", str(tiny_export / "run"), str(tmp_path / "gone.png")])
    one_error_line(capsys.readouterr().err, "gone.png", "dangling symlink")
    assert rc == 2
