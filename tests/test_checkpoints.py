"""Run files are data, never code: checkpoints load without unpickling objects, carry a sha256 that refuses a changed
byte, and a truncated checkpoint, a truncated policy.json or a full disk is one ``pfnas: error:`` line naming the
file (exit 2), never a traceback."""
from __future__ import annotations

import errno
import hashlib
import os
import random
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, one_error_line, tiny_config

from pfnas import cli
from pfnas.config import PfnasError, dump_config
from pfnas.engine import Experiment, rng_state, run_search, set_rng_state
from pfnas.runtime import load_checkpoint, save_checkpoint, write_atomic


@pytest.fixture
def tiny_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(search={"epochs": 1}).model_dump(mode="json")))
    return path


def _run(capsys, *args: str) -> tuple[int, str]:
    rc = cli.main(list(args))
    return rc, capsys.readouterr().err


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


class _Payload:
    """Unpickling this creates the folder ``marker``: code that ran from a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_crafted_checkpoint_is_refused_and_its_payload_never_runs(tmp_path, tiny_yaml, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out, marker = tmp_path / "out", tmp_path / "payload-ran"
    out.mkdir()
    dump_config(tiny_config(search={"epochs": 1}), out / "config.yaml")  # a folder the run accepts as its own
    ckpt = out / "search.pt"
    torch.save({"phase": "search", "epoch": 0, "evil": _Payload(marker)}, ckpt)
    rc, err = _run(capsys, "run", "-c", str(tiny_yaml), "-o", str(out))
    assert rc == 2 and not marker.exists()
    one_error_line(err, str(ckpt))
    # whoever can write the checkpoint can write its checksum too: the sha256 is no defence, weights_only is
    _sidecar(ckpt).write_text(f"{hashlib.sha256(ckpt.read_bytes()).hexdigest()}  search.pt\n")
    with pytest.raises(PfnasError, match="search.pt"):
        load_checkpoint(ckpt)
    assert not marker.exists()
    # plain data, but not a checkpoint of this phase (the payload's dict without it): one line, not a KeyError
    torch.save({"phase": "search", "epoch": 0}, ckpt)
    _sidecar(ckpt).unlink()
    rc, err = _run(capsys, "run", "-c", str(tiny_yaml), "-o", str(out))
    assert rc == 2
    one_error_line(err, str(ckpt), "does not fit")


def _tensor_bytes(path: Path) -> tuple[int, int]:
    """(offset, length) in ``path`` of the largest tensor record of a torch zip checkpoint (stored uncompressed)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _tensors(obj, key: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested checkpoint, by its path of keys."""
    if isinstance(obj, torch.Tensor):
        return {key: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: t for name, v in items for k, t in _tensors(v, f"{key}/{name}").items()}


def test_a_flipped_byte_in_a_checkpoint_tensor_is_refused(tmp_path, capsys):
    cfg = tiny_config(search={"epochs": 2})
    out = tmp_path / "run"
    run_search(Experiment.build(cfg), out, stop_after=1)
    ckpt = out / "search.pt"
    before = torch.load(ckpt, map_location="cpu", weights_only=True)
    offset, size = _tensor_bytes(ckpt)
    raw = bytearray(ckpt.read_bytes())
    raw[offset + size // 2] ^= 0x40
    ckpt.write_bytes(bytes(raw))
    after = torch.load(ckpt, map_location="cpu", weights_only=True)  # loads silently: only the sha256 can tell
    assert [k for k, t in _tensors(before).items() if not torch.equal(t, _tensors(after)[k])]
    with pytest.raises(PfnasError) as ei:
        run_search(Experiment.build(cfg), out)
    msg = str(ei.value)
    assert "\n" not in msg and str(ckpt) in msg and "sha256" in msg


@pytest.mark.slow
def test_truncated_checkpoints_are_one_line_exit_2(tmp_path, tiny_yaml, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    rc, err = _run(capsys, "run", "-c", str(tiny_yaml), "-o", str(out))
    assert rc == 0, err
    search, retrain = out / "search.pt", out / "retrain.pt"
    whole = search.read_bytes()
    search.write_bytes(whole[: len(whole) // 2])
    _sidecar(search).unlink(missing_ok=True)  # a checkpoint of an older pfnas: no checksum, the truncation itself is caught
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "pfnas", "run", "-c", str(tiny_yaml), "--out", str(out)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    one_error_line(r.stderr, str(search), "truncated")
    search.write_bytes(whole)  # whole again (and without a sidecar it still loads); now the retrain checkpoint
    cut = retrain.read_bytes()
    retrain.write_bytes(cut[: len(cut) - 100])
    rc, err = _run(capsys, "run", "-c", str(tiny_yaml), "-o", str(out))
    assert rc == 2
    one_error_line(err, str(retrain))


def test_a_truncated_policy_json_is_one_line_exit_2(tmp_path, tiny_yaml, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    rc, err = _run(capsys, "run", "-c", str(tiny_yaml), "-o", str(out))
    assert rc == 0, err
    policy = out / "policy.json"
    text = policy.read_text()
    policy.write_text(text[: len(text) // 2])
    rc, err = _run(capsys, "run", "-c", str(tiny_yaml), "-o", str(out))
    assert rc == 2
    one_error_line(err, str(policy))


def _disk_with(free: int, monkeypatch) -> None:
    """``os.write`` as on a disk with ``free`` bytes left: what fits is written, then ENOSPC (as the kernel does)."""
    real = os.write
    left = [free]

    def write(fd, data):
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real(fd, bytes(data)[: left[0]])
        left[0] -= n
        return n

    monkeypatch.setattr(os, "write", write)


def test_a_full_disk_says_no_space_left_and_keeps_the_previous_checkpoint(tmp_path, tiny_yaml, capsys, monkeypatch):
    ckpt = tmp_path / "ck" / "search.pt"
    first = {"epoch": 1, "w": torch.arange(50_000.0)}
    save_checkpoint(first, ckpt)
    with monkeypatch.context() as m:
        _disk_with(100_000, m)  # less than the checkpoint: the write stops part way
        with pytest.raises(PfnasError) as ei:
            save_checkpoint({"epoch": 2, "w": torch.zeros(50_000)}, ckpt)
    msg = str(ei.value)
    assert "\n" not in msg and "no space left" in msg and str(ckpt) in msg
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["search.pt", "search.pt.sha256"]
    kept = load_checkpoint(ckpt)  # whole, and its checksum still matches
    assert kept["epoch"] == 1 and torch.equal(kept["w"], first["w"])

    policy = tmp_path / "policy.json"
    write_atomic(policy, '{"0": "add"}')
    with monkeypatch.context() as m:
        _disk_with(3, m)
        with pytest.raises(PfnasError, match="no space left"):
            write_atomic(policy, '{"0": "prepend", "1": "add"}')
    assert policy.read_text() == '{"0": "add"}'

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _disk_with(0, monkeypatch)
    rc, err = _run(capsys, "run", "-c", str(tiny_yaml), "-o", str(tmp_path / "out"))
    assert rc == 2
    one_error_line(err, "no space left", str(tmp_path / "out"))
    assert not list((tmp_path / "out").rglob("*.tmp")) and not list((tmp_path / "out").rglob("*.pt"))


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.standard_normal()  # a cached gaussian is part of numpy's state too
    save_checkpoint({"rng": rng_state()}, tmp_path / "rng.pt")
    draws = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == draws


def test_a_checkpoint_of_an_older_pfnas_still_loads(tmp_path):
    """Before checksums: no sidecar, and numpy's RNG state stored as an ndarray."""
    np.random.seed(7)
    old = {"rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
           "epoch": 3}
    torch.save(old, tmp_path / "search.pt")
    st = load_checkpoint(tmp_path / "search.pt")
    assert st["epoch"] == 3
    draws = np.random.standard_normal(3).tolist()
    set_rng_state(st["rng"])
    assert np.random.standard_normal(3).tolist() == draws
