"""Where and how a run computes, and the files it writes and reads back.

* the device (:func:`resolve_device`), the one bf16 rule (:func:`uses_bf16`, :func:`autocast`), seeding and the
  RNG state a checkpoint keeps (:func:`rng_state`, plain data and tensors);
* files written whole or not at all, and data only, never code: :func:`write_atomic` writes through a temporary
  file and ``os.replace``; :func:`save_checkpoint` and :func:`load_checkpoint` keep torch checkpoints with a
  ``<name>.sha256`` sidecar and load them with ``weights_only=True``. Every failure is a one-line
  :class:`~pfnas.errors.RunFileError` naming the file.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import random
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import PfnasError, RunFileError

SIDECAR_SUFFIX = ".sha256"
# numpy arrays (numpy's RNG state in checkpoints of older pfnas versions): plain data, no callable beyond these
_NUMPY_ARRAY_GLOBALS = [np.ndarray((0,)).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _why(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return e.strerror or os.strerror(e.errno or errno.EIO)


def write_atomic(path: str | Path, data: bytes | str, what: str = "") -> None:
    """Write ``data`` (str as UTF-8) to ``path`` whole or not at all: a temporary file in the same folder, synced,
    then ``os.replace``. A failed write (disk full, quota, I/O error) removes the temporary file, leaves the previous
    ``path`` as it was and raises a one-line RunFileError naming ``path`` (``what``: its kind, e.g. "checkpoint")."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    view = memoryview(data.encode() if isinstance(data, str) else data)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        with suppress(OSError):
            tmp.unlink()
        raise RunFileError(f"cannot write {what + ' ' if what else ''}{path}: {_why(e)}") from None


def sidecar_path(path: str | Path) -> Path:
    """The ``<name>.sha256`` file next to checkpoint ``path``."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _listed_digests(sidecar: Path) -> list[str]:
    """The sha256 digests a sidecar accepts (``sha256sum`` lines; two while a checkpoint is being replaced)."""
    try:
        lines = sidecar.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [ln.split()[0].lower() for ln in lines if ln.split() and len(ln.split()[0]) == 64]


def _sidecar_text(digests: list[str], name: str) -> str:
    return "".join(f"{d}  {name}\n" for d in dict.fromkeys(digests))


def save_checkpoint(obj: Any, path: str | Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically, with its sha256 in ``<path>.sha256``.

    The sidecar lists the old and the new digest while the checkpoint is replaced, so a process killed at any point
    leaves a checkpoint its sidecar accepts. A full disk is a RunFileError ("no space left"); a failure while
    writing the checkpoint keeps the previous one."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    digest = hashlib.sha256(data).hexdigest()
    side = sidecar_path(path)
    if side.is_file():
        accepted = _listed_digests(side)
    else:  # a checkpoint without a sidecar (older pfnas) or none yet
        accepted = [hashlib.sha256(path.read_bytes()).hexdigest()] if path.is_file() else []
    if accepted:
        write_atomic(side, _sidecar_text(accepted + [digest], path.name), "checkpoint checksum")
    try:
        write_atomic(path, data, "checkpoint")
    except RunFileError as e:
        raise RunFileError(f"{e}; the previous checkpoint is kept" if path.is_file() else str(e)) from None
    write_atomic(side, _sidecar_text([digest], path.name), "checkpoint checksum")


def load_checkpoint(path: str | Path) -> Any:
    """What :func:`save_checkpoint` wrote to ``path``, loaded with ``weights_only=True`` (tensors and plain data:
    never code) onto the CPU.

    A sidecar ``<path>.sha256`` must list the file's sha256 (a flipped bit is refused). Checkpoints of older pfnas
    versions have no sidecar: they still load, unverified, still weights-only (numpy arrays allowed as data).
    Unreadable, truncated, changed or not-plain-data files are a one-line RunFileError naming ``path``.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RunFileError(f"cannot read checkpoint {path}: {_why(e)}") from None
    side = sidecar_path(path)
    if side.is_file() and hashlib.sha256(data).hexdigest() not in _listed_digests(side):
        raise RunFileError(f"checkpoint {path} does not match its sha256 in {side.name} (truncated, or changed after "
                           "pfnas wrote it); restore both files or start fresh with another --out")
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise RunFileError(f"checkpoint {path} holds objects other than tensors and plain data; refused "
                               "(loading it could run code)") from None
        reason = str(e)
    except Exception as e:  # noqa: BLE001 - torch reports a cut zip archive as RuntimeError, EOFError, ...
        reason = str(e)
    first = (reason.strip().splitlines() or ["unreadable"])[0][:160]
    raise RunFileError(f"checkpoint {path} is truncated or corrupt ({first}); start fresh with another --out")


# ----------------------------------------------------------------------------- device, precision, RNG
def resolve_device(name: str = "auto") -> torch.device:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; anything unknown or unavailable is a PfnasError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise PfnasError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PfnasError(f"device {name!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise PfnasError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise PfnasError(f"device {name!r} requested but MPS is not available")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as plain data and tensors, so a weights-only load restores them."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": random.getstate(), "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached)),
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    """Restore :func:`rng_state` (numpy's keys as a list, or as an array in checkpoints of older versions)."""
    random.setstate(st["python"])
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def uses_bf16(precision: str, device: torch.device) -> bool:
    """The one bf16 rule: ``bf16`` always, ``auto`` on CUDA only, ``fp32`` never."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: str):
    """bf16 autocast where :func:`uses_bf16` says so, else a disabled autocast context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(precision, device))


# ----------------------------------------------------------------------------- process locks
def try_lock(path: str | Path) -> tuple[int, str | None]:
    """A non-blocking exclusive ``flock`` on ``path`` (created; the kernel drops it when the process dies, so a
    killed holder leaves no stale lock). Held: ``(fd, None)`` with this pid written into the file; close ``fd`` to
    release. Held by another process: ``(-1, pid)``, the pid that process wrote ("" if none). No flock on this
    platform: ``(fd, None)`` without a lock."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl
    except ImportError:  # no flock on this platform: no lock
        return fd, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            os.close(fd)
            raise
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        os.close(fd)
        return -1, holder if holder.isdigit() else ""
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd, None
