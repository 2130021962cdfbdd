"""Wrong input is loud: one ``pfnas: error:`` line on stderr and exit code 2, never a wrong result with exit 0."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_BACKBONE, one_error_line
from pfnas import cli
from pfnas import data as D
from pfnas.config import BackboneConfig, DataConfig, ModelError, PfnasError
from conftest import expect_data_error, image_folder, png

MEAN = STD = (0.5, 0.5, 0.5)


def _pfnas(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m pfnas ARGS`` as a user runs it: the real exit code and stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "pfnas", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _main(capsys, *args: str) -> tuple[int, str]:
    rc = cli.main(list(args))
    return rc, capsys.readouterr().err


# ----------------------------------------------------------------------------- A: exit codes


def test_usage_errors_exit_2_with_one_line() -> None:
    for args, fragment in ((["--bogus"], "--bogus"), (["tune"], "--space"),
                           (["baseline", "fixed", "--op", "prepend", "--seeds", "abc"], "--seeds")):
        r = _pfnas(*args)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        one_error_line(r.stderr, fragment)
    r = _pfnas("--help")
    assert r.returncode == 0 and "Usage" in r.stdout and not r.stderr.strip()


def _vtab_task(root: Path, train: list[int], test: list[int], name: str = "toy") -> Path:
    """A VTAB-1k task folder: one 8x8 PNG per listed label; val200 has train800's labels in files of its own."""
    task = root / name
    lines = {}
    for split, labels in (("train", train), ("val", train), ("test", test)):
        lines[split] = []
        for i, lab in enumerate(labels):
            png(task / "images" / f"{split}_{i}.png", (i * 10, lab * 20, 0))
            lines[split].append(f"images/{split}_{i}.png {lab}")
    lines["trainval"] = lines["train"] + lines["val"]
    for split, f in (("train", "train800.txt"), ("val", "val200.txt"), ("trainval", "train800val200.txt"),
                     ("test", "test.txt")):
        (task / f).write_text("\n".join(lines[split]) + "\n")
    return task


@pytest.mark.slow
def test_an_unreachable_ray_address_is_one_line_exit_2(tmp_path: Path) -> None:
    """Ray's own client retries a dead GCS address for minutes, printing a warning every few seconds; pfnas tries
    the port once first."""
    from conftest import free_port

    port = free_port()  # nothing listens there
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        r = _pfnas("tune", "--space", str(REPO / "search_spaces" / "demo.yaml"), "--address", address,
                   "--storage", str(tmp_path / "ray"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", timeout=60)
        assert r.returncode == 2, r.stderr[-2000:]
        one_error_line(r.stderr, "cannot reach the Ray cluster at", address, "--address")


@pytest.mark.slow
def test_data_check_on_broken_data_exits_2(tmp_path: Path) -> None:
    ok = _vtab_task(tmp_path / "ok", [0, 1, 2, 0], [2, 1])
    assert _pfnas("data", "check", str(ok)).returncode == 0
    bad = _vtab_task(tmp_path / "bad", [0, 1, 2, 0], [2, 1])
    (bad / "images" / "train_1.png").write_bytes(b"not a png")
    r = _pfnas("data", "check", str(bad))
    assert r.returncode == 2 and "FAILED" in r.stdout
    one_error_line(r.stderr, str(bad))


# ----------------------------------------------------------------------------- B: SIGTERM


@pytest.mark.slow
def test_sigterm_keeps_checkpoint_and_exits_143(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pfnas", "run", "--set", "train.epochs=50", "-o", str(out)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "search.pt").is_file():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err[-2000:]
    assert "terminated" in err and "Traceback" not in err
    state = torch.load(out / "search.pt", map_location="cpu", weights_only=True)
    assert state  # the last checkpoint is whole and loads


# ----------------------------------------------------------------------------- C: device and output folder


def test_unknown_device_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    from pfnas.engine import resolve_device

    for name in ("tpu", "xla", "meta", "cpu:x"):
        with pytest.raises(PfnasError, match="device"):
            resolve_device(name)
    assert resolve_device("cpu") == torch.device("cpu")
    rc, err = _main(capsys, "run", "--set", "device=tpu", "-o", str(tmp_path / "out"))
    assert rc == 2
    one_error_line(err, "tpu")


def test_data_root_or_task_on_the_synthetic_default_is_refused(tmp_path: Path, capsys) -> None:
    """``--set data.root=...`` without ``data.kind`` used to train on the in-memory task and exit 0."""
    for setting, fragment in (("data.root=/some/vtab", "data.root='/some/vtab' is ignored"),
                              ("data.task=digits", "data.task='digits' is ignored")):
        rc, err = _main(capsys, "run", "--set", setting, "-o", str(tmp_path / "out"))
        assert rc == 2 and not (tmp_path / "out").exists()
        line = one_error_line(err, fragment)
        assert "Value error" not in line and "data.kind" in line


@pytest.mark.slow
def test_output_folder_under_a_file_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    target = blocker / "sub"
    rc, err = _main(capsys, "run", "-o", str(target))
    assert rc == 2
    one_error_line(err, str(target))
    r = _pfnas("baseline", "fixed", "--op", "add", "-o", str(target))
    assert r.returncode == 2
    one_error_line(r.stderr, str(target))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes through chmod")
def test_read_only_output_folder_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for target in (ro, ro / "sub"):
            rc, err = _main(capsys, "run", "-o", str(target))
            assert rc == 2
            one_error_line(err, str(target))
    finally:
        ro.chmod(0o755)


# ----------------------------------------------------------------------------- D: labels


def _refused(cfg: DataConfig, *fragments: str) -> None:
    expect_data_error(cfg, *fragments)


def _check_fails(path: Path, fragment: str) -> None:
    rep = D.check_dataset(path)
    assert not rep.ok and any(fragment in p for p in rep.problems), rep.problems
    r = _pfnas("data", "check", str(path))
    assert r.returncode == 2, r.stderr
    one_error_line(r.stderr)


@pytest.mark.slow
def test_vtab_label_gap_refused_for_any_task(tmp_path: Path) -> None:
    for name in ("toy", "svhn"):  # an unknown task and a known VTAB one
        _vtab_task(tmp_path / "v", [0, 2, 0, 2], [0, 2], name=name)  # label 1 never occurs
        _refused(DataConfig(kind="vtab", root=str(tmp_path / "v"), task=name), "1", "gaps")
    _check_fails(tmp_path / "v" / "toy", "gaps")


@pytest.mark.slow
def test_vtab_class_only_in_test_refused(tmp_path: Path) -> None:
    _vtab_task(tmp_path / "v", [0, 1, 0, 1], [0, 1, 2])
    _refused(DataConfig(kind="vtab", root=str(tmp_path / "v"), task="toy"), "test", "2", "never occur in train")
    _check_fails(tmp_path / "v" / "toy", "never occur in train")


@pytest.mark.slow
def test_fgvc_label_only_in_test_refused(tmp_path: Path) -> None:
    task = tmp_path / "fgvc" / "birds"
    for split, labels in (("train", [3, 7, 3]), ("val", [3, 7]), ("test", [3, 7, 9])):
        entries = {}
        for i, lab in enumerate(labels):
            png(task / "images" / f"{split}_{i}.png", (i, lab, 0))
            entries[f"{split}_{i}.png"] = lab
        (task / f"{split}.json").write_text(json.dumps(entries))
    _refused(DataConfig(kind="fgvc", root=str(task.parent), task="birds"), "'9'", "never occur in train")
    _check_fails(task, "never occur in train")


@pytest.mark.slow
def test_imagefolder_one_class_refused(tmp_path: Path) -> None:
    image_folder(tmp_path / "one", classes=1, per_class=10)
    _refused(DataConfig(kind="imagefolder", root=str(tmp_path / "one")), "only one class", "class_0")
    _check_fails(tmp_path / "one", "only one class")
    image_folder(tmp_path / "split" / "train", 2, 3)  # class_1 has an (empty) train folder but test images
    for p in (tmp_path / "split" / "train" / "class_1").iterdir():
        p.unlink()
    image_folder(tmp_path / "split" / "test", 2, 1)
    _refused(DataConfig(kind="imagefolder", root=str(tmp_path / "split")), "class_1", "never occur in train")


# ----------------------------------------------------------------------------- E: backbone checkpoints


def test_backbone_checkpoint_of_another_architecture_refused(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import load_file, save_file

    from pfnas.model import load_backbone

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
