"""Run files are data, never code: checkpoints load without unpickling objects, carry a sha256 that refuses a changed
byte, and a full disk keeps the previous checkpoint. What the CLI makes of a crafted or truncated checkpoint, a
truncated policy.json or a full disk (one ``pfnas: error:`` line naming the file, exit 2) is in
tests/test_cli_exit_codes.py."""
from __future__ import annotations

import hashlib
import random
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Payload, disk_with, sidecar, tiny_config

from pfnas.config import PfnasError
from pfnas.engine import Experiment, rng_state, run_search, set_rng_state
from pfnas.runtime import load_checkpoint, save_checkpoint, write_atomic


def test_a_crafted_checkpoint_is_refused_and_its_payload_never_runs(tmp_path):
    """``pfnas run`` on such a folder: tests/test_cli_exit_codes.py."""
    marker = tmp_path / "payload-ran"
    ckpt = tmp_path / "out" / "search.pt"
    ckpt.parent.mkdir()
    torch.save({"phase": "search", "epoch": 0, "evil": Payload(marker)}, ckpt)
    # whoever can write the checkpoint can write its checksum too: the sha256 is no defence, weights_only is
    sidecar(ckpt).write_text(f"{hashlib.sha256(ckpt.read_bytes()).hexdigest()}  search.pt\n")
    with pytest.raises(PfnasError, match="search.pt"):
        load_checkpoint(ckpt)
    assert not marker.exists()


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


def test_a_full_disk_says_no_space_left_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """``pfnas run`` on a full disk: tests/test_cli_exit_codes.py."""
    ckpt = tmp_path / "ck" / "search.pt"
    first = {"epoch": 1, "w": torch.arange(50_000.0)}
    save_checkpoint(first, ckpt)
    with monkeypatch.context() as m:
        disk_with(100_000, m)  # less than the checkpoint: the write stops part way
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
        disk_with(3, m)
        with pytest.raises(PfnasError, match="no space left"):
            write_atomic(policy, '{"0": "prepend", "1": "add"}')
    assert policy.read_text() == '{"0": "add"}'


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
