"""Tests for pfnas.data: layout readers, decoding, batches, errors, check_dataset and the synthetic task."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import MEAN, STD, expect_data_error, image_folder, png

from pfnas import data as D
from pfnas.data import decode
from pfnas.config import DataConfig, DataError

SHARED = Path(__file__).resolve().parents[2] / "shared"
PROXY = SHARED / "data" / "vtab-proxy"


def _gradient_png(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A non-constant image so that resizes and crops are observable."""
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _pixel_id(images: torch.Tensor) -> list[int]:
    """Red value of the top-left pixel: the fixtures encode an image's identity there."""
    return images[:, 0, 0, 0].tolist()


@pytest.fixture
def vtab_root(tmp_path: Path) -> Path:
    """<root>/toy: train 6 (ids 0-5), val 3 (ids 6-8), trainval = both, test 4 (ids 9-12); label = id % 3."""
    task = tmp_path / "vtab" / "toy"
    lines = {}
    for i in range(13):
        png(task / "images" / f"{i:03d}.png", (i * 10, 0, 0))
        lines[i] = f"images/{i:03d}.png {i % 3}"
    (task / "train800.txt").write_text("\n".join(lines[i] for i in range(6)) + "\n")
    (task / "val200.txt").write_text("\n".join(lines[i] for i in range(6, 9)) + "\n")
    (task / "train800val200.txt").write_text("\n".join(lines[i] for i in range(9)) + "\n")
    (task / "test.txt").write_text("\n".join(lines[i] for i in range(9, 13)) + "\n\n")
    return tmp_path / "vtab"


def _vtab(root: Path, task: str = "toy", img_size: int = 8, **kw) -> D.TaskData:
    return D.load_task(DataConfig(kind="vtab", root=str(root), task=task, **kw), img_size=img_size, mean=MEAN, std=STD)


# ----------------------------------------------------------------------------- VTAB


def test_vtab_loader_shapes_labels_and_splits(vtab_root: Path) -> None:
    d = _vtab(vtab_root)
    assert d.name == "toy" and d.num_classes == 3 and d.augment is False
    assert {s: d.num_images(s) for s in D.SPLITS} == {"train": 6, "val": 3, "trainval": 9, "test": 4}
    for s in D.SPLITS:
        sp = d.splits[s]
        assert sp.images.dtype == torch.uint8 and sp.labels.dtype == torch.int64
        assert sp.images.shape[1:] == (3, 8, 8)
        ids = _pixel_id(sp.images)
        assert sp.labels.tolist() == [(i // 10) % 3 for i in ids]  # labels follow their own image
    assert _pixel_id(d.splits["train"].images) == [0, 10, 20, 30, 40, 50]
    assert _pixel_id(d.splits["test"].images) == [90, 100, 110, 120]
    tv = sorted(_pixel_id(d.splits["trainval"].images))
    assert tv == sorted(_pixel_id(d.splits["train"].images) + _pixel_id(d.splits["val"].images))


def test_vtab_resize_matches_torchvision_bicubic(tmp_path: Path) -> None:
    import numpy as np
    from torchvision.transforms import InterpolationMode, Resize

    task = tmp_path / "r" / "t"
    for split in ("train", "val", "test"):  # splits name distinct files
        img = _gradient_png(task / "images" / f"{split}_a.png", (20, 12), 0)
        png(task / "images" / f"{split}_b.png", (0, 0, 0))  # a second class: one-class tasks are refused
    lines = {s: f"images/{s}_a.png 1\nimages/{s}_b.png 0\n" for s in ("train", "val", "test")}
    lines["trainval"] = lines["train"] + lines["val"]
    for split, f in D.VTAB_SPLIT_FILES.items():
        (task / f).write_text(lines[split])
    d = _vtab(tmp_path / "r", "t", img_size=16)
    ref = Resize((16, 16), interpolation=InterpolationMode.BICUBIC)(Image.open(img).convert("RGB"))
    expect = torch.from_numpy(np.array(ref)).permute(2, 0, 1)
    assert d.splits["test"].images.shape == (2, 3, 16, 16)
    assert torch.equal(d.splits["test"].images[0], expect)
    assert d.num_classes == 2


def test_each_file_is_decoded_once(vtab_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    real = decode._decode_one

    def counting(path, targets):
        calls.append(path)
        return real(path, targets)

    monkeypatch.setattr(decode, "_decode_one", counting)
    _vtab(vtab_root)
    assert len(calls) == len(set(calls)) == 13  # trainval reuses the train and val decodes


def test_vtab_proxy_digits() -> None:
    if not (PROXY / "digits").is_dir():
        pytest.skip("shared vtab-proxy data not present")
    d = _vtab(PROXY, "digits", img_size=32)
    assert {s: d.num_images(s) for s in D.SPLITS} == {"train": 800, "val": 200, "trainval": 1000, "test": 797}
    assert d.num_classes == 10
    assert d.splits["test"].images.shape == (797, 3, 32, 32)
    assert set(d.splits["trainval"].labels.tolist()) == set(range(10))
    x, y = next(d.batches("train", 64))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (64,)


# ----------------------------------------------------------------------------- FGVC


def _fgvc_task(tmp_path: Path, name: str = "CUB_200_2011", image_dir: str = "images") -> Path:
    task = tmp_path / "fgvc" / name
    labels = [5, 17, 42]  # non-contiguous label values
    sets = {"train": 6, "val": 3, "test": 3}
    k = 0
    for split, n in sets.items():
        entries = {}
        for i in range(n):
            rel = f"{labels[i % 3]:03d}.cls/{split}_{i}.png"
            _gradient_png(task / image_dir / rel if image_dir else task / rel, (24, 14), k)
            entries[rel] = labels[i % 3]
            k += 1
        (task / f"{split}.json").write_text(json.dumps(entries))
    return task


@pytest.mark.parametrize("image_dir", ["images", "Images", ""])
def test_fgvc_loader_maps_labels_and_finds_image_root(tmp_path: Path, image_dir: str) -> None:
    task = _fgvc_task(tmp_path, image_dir=image_dir)
    d = D.load_task(DataConfig(kind="fgvc", root=str(task.parent), task=task.name), img_size=16, mean=MEAN, std=STD)
    assert d.num_classes == 3 and d.augment is True
    assert d.splits["train"].labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert {s: d.num_images(s) for s in D.SPLITS} == {"train": 6, "val": 3, "trainval": 9, "test": 3}
    big = round(16 * 256 / 224)
    assert d.splits["train"].images.shape == (6, 3, big, big)
    assert d.splits["trainval"].images.shape == (9, 3, big, big)
    assert d.splits["test"].images.shape == (3, 3, 16, 16)
    assert torch.equal(d.splits["trainval"].images[:6], d.splits["train"].images)


def test_fgvc_eval_preprocessing_matches_torchvision(tmp_path: Path) -> None:
    import numpy as np
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Resize

    task = _fgvc_task(tmp_path)
    d = D.load_task(DataConfig(kind="fgvc", root=str(task.parent), task=task.name), img_size=16, mean=MEAN, std=STD)
    first = next(iter(json.loads((task / "test.json").read_text())))
    tf = Compose([Resize(18, interpolation=InterpolationMode.BICUBIC), CenterCrop(16)])
    ref = np.array(tf(Image.open(task / "images" / first).convert("RGB")))
    assert torch.equal(d.splits["test"].images[0], torch.from_numpy(ref).permute(2, 0, 1))
    # batches() without augmentation centre-crops the stored 18x18 train image like CenterCrop(16).
    x, _ = next(d.batches("train", 1, augment=False))
    assert x.shape == (1, 3, 16, 16)
    stored = d.splits["train"].images[0, :, 1:17, 1:17].float() / 255
    assert torch.allclose(x[0], (stored - 0.5) / 0.25, atol=1e-6)


# ----------------------------------------------------------------------------- ImageFolder / HTA


def test_imagefolder_flat_split_70_10_20_deterministic(tmp_path: Path) -> None:
    image_folder(tmp_path / "flat")
    cfg = DataConfig(kind="imagefolder", root=str(tmp_path / "flat"), split_seed=3)
    d = D.load_task(cfg, img_size=8, mean=MEAN, std=STD)
    assert d.classes == ["class_0", "class_1", "class_2"] and d.num_classes == 3
    assert {s: d.num_images(s) for s in D.SPLITS} == {"train": 21, "val": 3, "trainval": 24, "test": 6}
    for s in D.SPLITS:  # class c has red value 50*c
        assert torch.equal(d.splits[s].images[:, 0, 0, 0].long() // 50, d.splits[s].labels)

    def keys(t: D.TaskData, split: str) -> list[tuple[int, int]]:  # (class colour, image index) per image
        im = t.splits[split].images
        return sorted(zip(im[:, 0, 0, 0].tolist(), im[:, 1, 0, 0].tolist()))

    again = D.load_task(cfg, img_size=8, mean=MEAN, std=STD)
    other = D.load_task(cfg.model_copy(update={"split_seed": 4}), img_size=8, mean=MEAN, std=STD)
    assert keys(d, "test") == keys(again, "test")
    assert keys(d, "test") != keys(other, "test")
    assert len(set(keys(d, "test") + keys(d, "trainval"))) == 30  # disjoint parts that cover every file


def test_hta_without_val_splits_train(tmp_path: Path) -> None:
    task = tmp_path / "hta" / "cifar10"
    image_folder(task / "train", 2, 10)
    image_folder(task / "test", 2, 3)
    d = D.load_task(DataConfig(kind="hta", root=str(tmp_path / "hta"), task="cifar10"), img_size=8, mean=MEAN, std=STD)
    assert d.augment is True and d.num_classes == 2
    assert {s: d.num_images(s) for s in D.SPLITS} == {"train": 18, "val": 2, "trainval": 20, "test": 6}
    assert sorted(d.splits["val"].labels.tolist()) == [0, 1]  # stratified


def test_imagefolder_with_val_dir(tmp_path: Path) -> None:
    image_folder(tmp_path / "set" / "train", 2, 4)
    image_folder(tmp_path / "set" / "val", 2, 2)
    image_folder(tmp_path / "set" / "test", 2, 1)
    d = D.load_task(DataConfig(kind="imagefolder", root=str(tmp_path / "set")), img_size=8, mean=MEAN, std=STD)
    assert {s: d.num_images(s) for s in D.SPLITS} == {"train": 8, "val": 4, "trainval": 12, "test": 2}
    (tmp_path / "set" / "val").rename(tmp_path / "old_val")
    (tmp_path / "set" / "val").symlink_to(tmp_path / "set" / "test")  # "no val split: use test" is selecting on test
    expect_data_error(DataConfig(kind="imagefolder", root=str(tmp_path / "set")), "share 2 images", "val", "test")


# ----------------------------------------------------------------------------- batches


def test_batches_normalisation_of_known_pixel(vtab_root: Path) -> None:
    d = _vtab(vtab_root)
    x, y = next(d.batches("test", 2))
    assert x.dtype == torch.float32 and x.shape == (2, 3, 8, 8) and y.tolist() == [0, 1]
    assert x[0, 0, 3, 3].item() == pytest.approx((90 / 255 - 0.5) / 0.25, abs=1e-6)
    assert x[1, 0, 0, 0].item() == pytest.approx((100 / 255 - 0.5) / 0.25, abs=1e-6)
    assert x[0, 1, 0, 0].item() == pytest.approx(-2.0, abs=1e-6)


def _ids(x: torch.Tensor) -> list[int]:
    """Undo the normalisation of the identity-encoding red pixel."""
    return ((x[:, 0, 0, 0] * 0.25 + 0.5) * 255).round().long().tolist()


def test_batches_shuffle_reproducible_from_generator_state(vtab_root: Path) -> None:
    d = _vtab(vtab_root)
    g = torch.Generator().manual_seed(123)
    state = g.get_state()
    first = [(_ids(x), y.tolist()) for x, y in d.batches("trainval", 4, shuffle=True, generator=g)]
    g.set_state(state)
    second = [(_ids(x), y.tolist()) for x, y in d.batches("trainval", 4, shuffle=True, generator=g)]
    assert first == second
    order = [i for ids, _ in first for i in ids]
    assert order == [10 * i for i in torch.randperm(9, generator=torch.Generator().manual_seed(123)).tolist()]
    assert order != sorted(order)
    assert [len(y) for _, y in d.batches("trainval", 4, drop_last=True)] == [4, 4]
    assert [len(y) for _, y in d.batches("trainval", 4)] == [4, 4, 1]


def test_batches_augment_crops_and_flips(tmp_path: Path) -> None:
    task = _fgvc_task(tmp_path)
    d = D.load_task(DataConfig(kind="fgvc", root=str(task.parent), task=task.name), img_size=16, mean=MEAN, std=STD)
    g = torch.Generator().manual_seed(0)
    stored = d.splits["train"].images
    plain = torch.cat([x for x, _ in d.batches("train", 6, augment=False)])
    flips = 0
    for _ in range(4):
        x, _ = next(d.batches("train", 6, generator=g))  # augment=None -> self.augment (True) on train
        assert x.shape == (6, 3, 16, 16)
        assert not torch.allclose(x, plain)
        raw = ((x * 0.25 + 0.5) * 255).round().to(torch.uint8)
        for i in range(6):  # every output is some 16x16 window of the stored image, possibly mirrored
            windows = stored[i].unfold(1, 16, 1).unfold(2, 16, 1).permute(1, 2, 0, 3, 4).reshape(-1, 3, 16, 16)
            direct = (windows == raw[i]).flatten(1).all(1).any().item()
            mirrored = (windows == raw[i].flip(-1)).flatten(1).all(1).any().item()
            assert direct or mirrored
            flips += int(mirrored and not direct)
    assert flips > 0
    v1 = torch.cat([x for x, _ in d.batches("val", 3, generator=g)])
    v2 = torch.cat([x for x, _ in d.batches("val", 3, generator=g)])
    assert torch.equal(v1, v2)  # eval splits are never augmented by default


def test_to_keeps_uint8_and_resident_false_stays_on_cpu(vtab_root: Path) -> None:
    d = _vtab(vtab_root, resident=False).to("cpu")
    assert d.splits["train"].images.dtype == torch.uint8 and d.device.type == "cpu"
    with pytest.raises(DataError, match="unknown split"):
        d.num_images("bogus")


# ----------------------------------------------------------------------------- errors


def test_error_missing_root_and_task(tmp_path: Path, vtab_root: Path) -> None:
    expect_data_error(DataConfig(kind="vtab", root=str(tmp_path / "nope"), task="toy"), "data root not found", "nope")
    cfg = DataConfig(kind="vtab", root=str(vtab_root), task="other")
    expect_data_error(cfg, "task directory not found", "other", "toy")
    expect_data_error(DataConfig(kind="vtab", root=str(vtab_root)), "data.task is required")


def test_error_missing_split_file(vtab_root: Path) -> None:
    (vtab_root / "toy" / "val200.txt").unlink()
    expect_data_error(DataConfig(kind="vtab", root=str(vtab_root), task="toy"), "missing split file", "val200.txt")


def test_error_unparsable_line(vtab_root: Path) -> None:
    with open(vtab_root / "toy" / "test.txt", "a") as f:
        f.write("images/000.png seven\n")
    expect_data_error(DataConfig(kind="vtab", root=str(vtab_root), task="toy"), "test.txt:6", "seven")


def test_error_listed_image_missing(vtab_root: Path) -> None:
    (vtab_root / "toy" / "images" / "010.png").unlink()
    expect_data_error(DataConfig(kind="vtab", root=str(vtab_root), task="toy"), "missing", "010.png", "test.txt")


def test_error_unreadable_image(vtab_root: Path) -> None:
    (vtab_root / "toy" / "images" / "004.png").write_bytes(b"not a png at all")
    expect_data_error(DataConfig(kind="vtab", root=str(vtab_root), task="toy"), "unreadable image", "004.png")


def test_error_label_out_of_range(vtab_root: Path) -> None:
    txt = vtab_root / "toy" / "val200.txt"
    txt.write_text(txt.read_text().replace(" 0\n", " -1\n"))
    expect_data_error(DataConfig(kind="vtab", root=str(vtab_root), task="toy"), "val200.txt", "out of range")
    known = vtab_root / "svhn"  # a known VTAB task has 10 classes
    (vtab_root / "toy").rename(known)
    txt = known / "test.txt"
    txt.write_text(txt.read_text().replace(" 1\n", " 12\n"))
    (known / "val200.txt").write_text((known / "val200.txt").read_text().replace(" -1\n", " 0\n"))
    expect_data_error(DataConfig(kind="vtab", root=str(vtab_root), task="svhn"), "out of range", "svhn")


def test_error_empty_split(vtab_root: Path) -> None:
    (vtab_root / "toy" / "val200.txt").write_text("\n")
    expect_data_error(DataConfig(kind="vtab", root=str(vtab_root), task="toy"), "empty", "val200.txt")


@pytest.mark.parametrize("split_file,line,fragments", [
    ("val200.txt", "images/002.png 2", ("val200.txt", "train800.txt", "002.png", "1 image")),  # val reads a train image
    ("test.txt", "images/007.png 1", ("test.txt", "val200.txt", "007.png")),  # test reads a val image
    ("test.txt", "./images/000.png 0", ("test.txt", "train800.txt", "000.png")),  # the same file, spelt another way
])
def test_error_splits_share_images(vtab_root: Path, split_file: str, line: str, fragments: tuple[str, ...]) -> None:
    """A val image the model trains on biases every choice made on val; a test image it trains on or selects with
    inflates the test score. Either makes a wrong result, so the loader refuses it and the check reports it."""
    with open(vtab_root / "toy" / split_file, "a") as f:
        f.write(line + "\n")
    expect_data_error(DataConfig(kind="vtab", root=str(vtab_root), task="toy"), "share", *fragments)
    rep = D.check_dataset(vtab_root / "toy")
    assert not rep.ok and any("share" in m and fragments[-1] in m for m in rep.problems), rep.problems


def test_fgvc_val_inside_train_is_refused(tmp_path: Path) -> None:
    task = _fgvc_task(tmp_path)
    train = json.loads((task / "train.json").read_text())
    first = next(iter(train))
    val = json.loads((task / "val.json").read_text())
    (task / "val.json").write_text(json.dumps({**val, first: train[first]}))
    expect_data_error(DataConfig(kind="fgvc", root=str(task.parent), task=task.name), "share", "val.json", "train.json",
                  Path(first).name)


def test_fgvc_errors(tmp_path: Path) -> None:
    task = _fgvc_task(tmp_path)
    cfg = DataConfig(kind="fgvc", root=str(task.parent), task=task.name)
    (task / "val.json").write_text("{not json")
    expect_data_error(cfg, "val.json", "invalid JSON")
    (task / "val.json").write_text(json.dumps({"a.png": "bird"}))
    expect_data_error(cfg, "val.json", "a.png", "not an integer")
    (task / "val.json").write_text(json.dumps(["a.png"]))
    expect_data_error(cfg, "val.json", "JSON object")
    (task / "val.json").write_text(json.dumps({"005.cls/nowhere.png": 5}))
    expect_data_error(cfg, "nowhere.png", "val.json")


def test_hta_errors(tmp_path: Path) -> None:
    task = tmp_path / "hta" / "dtd"
    image_folder(task / "train", 2, 3)
    cfg = DataConfig(kind="hta", root=str(tmp_path / "hta"), task="dtd")
    expect_data_error(cfg, "missing split folder", "test")
    image_folder(task / "test", 2, 1)
    png(task / "test" / "stranger" / "0.png", (0, 0, 0))
    expect_data_error(cfg, "stranger", "no folder")


# ----------------------------------------------------------------------------- check_dataset


def test_check_dataset_reports_without_raising(vtab_root: Path) -> None:
    rep = D.check_dataset(vtab_root / "toy")
    assert rep.ok and rep.kind == "vtab" and rep.classes == 3
    assert rep.counts == {"train": 6, "val": 3, "trainval": 9, "test": 4}
    (vtab_root / "toy" / "images" / "002.png").write_bytes(b"\x89PNG garbage bytes")
    (vtab_root / "toy" / "test.txt").unlink()
    rep = D.check_dataset(vtab_root / "toy")
    assert not rep.ok
    assert len(rep.broken) == 1 and "002.png" in rep.broken[0]
    assert any("test.txt" in p for p in rep.problems)
    root_rep = D.check_dataset(vtab_root)  # a root of tasks is detected too
    assert root_rep.tasks == {"toy": 3} and root_rep.counts["toy/train"] == 6
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(rep.render())
    text = console.export_text()
    assert "002.png" in text and "test.txt" in text and "FAILED" in text
    with pytest.raises(DataError, match="not found"):
        D.check_dataset(vtab_root / "missing")


def test_check_dataset_detects_fgvc_imagefolder_hta(tmp_path: Path) -> None:
    task = _fgvc_task(tmp_path, name="Stanford-dogs", image_dir="Images")
    rep = D.check_dataset(task)
    assert rep.kind == "fgvc" and rep.ok and rep.classes == 3
    assert any("120" in w for w in rep.warnings)  # Stanford Dogs has 120 classes
    image_folder(tmp_path / "flat", 2, 5)
    rep = D.check_dataset(tmp_path / "flat")
    assert rep.kind == "imagefolder" and rep.ok and sum(rep.counts[s] for s in ("train", "val", "test")) == 10
    image_folder(tmp_path / "hta" / "svhn" / "train", 2, 5)
    rep = D.check_dataset(tmp_path / "hta")
    assert rep.kind == "hta" and "svhn" in rep.tasks
    assert any("test" in p for p in rep.problems)  # test/ folder missing
    rep = D.check_dataset(tmp_path / "hta", kind="hta", task="svhn")
    assert rep.kind == "hta" and not rep.ok


def test_check_dataset_vtab_proxy() -> None:
    if not (PROXY / "digits").is_dir():
        pytest.skip("shared vtab-proxy data not present")
    rep = D.check_dataset(PROXY, task="digits")
    assert rep.ok and rep.kind == "vtab" and rep.classes == 10 and rep.counts["test"] == 797


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_split_sizes() -> None:
    a, b, c = D.synthetic_task(seed=1), D.synthetic_task(seed=1), D.synthetic_task(seed=2)
    assert {s: a.num_images(s) for s in D.SPLITS} == {"train": 204, "val": 52, "trainval": 256, "test": 256}
    for s in D.SPLITS:
        assert torch.equal(a.splits[s].images, b.splits[s].images)
        assert torch.equal(a.splits[s].labels, b.splits[s].labels)
    assert not torch.equal(a.splits["train"].images, c.splits["train"].images)
    assert a.splits["train"].images.shape == (204, 3, 32, 32) and a.splits["train"].images.dtype == torch.uint8
    assert torch.bincount(a.splits["val"].labels).tolist() == [13] * 4
    tv = a.splits["trainval"]
    assert torch.equal(tv.images, torch.cat([a.splits["train"].images, a.splits["val"].images]))


def test_synthetic_is_learnable_by_nearest_class_mean() -> None:
    d = D.synthetic_task(num_classes=4, per_class=64, img_size=32, seed=0)
    tr, te = d.splits["trainval"], d.splits["test"]
    feats = tr.images.float().flatten(1)
    means = torch.stack([feats[tr.labels == k].mean(0) for k in range(4)])
    pred = torch.cdist(te.images.float().flatten(1), means).argmin(1)
    acc = (pred == te.labels).float().mean().item()
    assert acc > 0.7, acc  # chance is 0.25


def test_load_task_synthetic_defaults() -> None:
    cfg = DataConfig(synthetic_classes=3, synthetic_per_class=10, split_seed=5)
    d = D.load_task(cfg, img_size=16, mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0))
    assert d.num_classes == 3 and d.augment is False and d.img_size == 16 and d.mean == (0.1, 0.2, 0.3)
    assert d.num_images("trainval") == 30 and d.num_images("test") == 30
    d2 = D.load_task(cfg.model_copy(update={"augment": True}), img_size=16, mean=MEAN, std=STD)
    assert d2.augment is True and torch.equal(d2.splits["test"].images, d.splits["test"].images)
