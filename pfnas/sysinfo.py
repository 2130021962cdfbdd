"""Facts about this machine and this code, with no torch import: CPU model, package versions, git commit,
OS user and file digests. Used by run provenance, the bench and model exports."""
from __future__ import annotations

import functools
import getpass
import hashlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from ._version import __version__

PACKAGE_DIR = Path(__file__).resolve().parent
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


@functools.lru_cache(maxsize=8)
def git_commit(path: str | None = None) -> str | None:
    """``git rev-parse HEAD`` in ``path`` (default: the pfnas package, then the cwd); None outside a checkout."""
    dirs = [Path(path)] if path else [PACKAGE_DIR, Path.cwd()]
    for d in dirs:
        try:
            r = subprocess.run(["git", "-C", str(d), "rev-parse", "HEAD"], capture_output=True, text=True,
                               timeout=3, check=False)
        except (OSError, subprocess.SubprocessError):  # no git, a hung filesystem
            continue
        sha = r.stdout.strip()
        if r.returncode == 0 and len(sha) >= 40:
            return sha
    return None


def package_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """Versions of pfnas, torch and timm (from the installed metadata: torch is not imported)."""
    return {"pfnas.version": __version__, "pfnas.torch": package_version("torch"), "pfnas.timm": package_version("timm")}


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`); ``unknown`` if neither."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() or "unknown"
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in a container
        return os.environ.get("USER", "unknown")


def file_sha256(path: str | Path) -> str:
    """sha256 of a file (cached by path, size and mtime, so a big checkpoint is hashed once per process)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _FILE_DIGESTS[key] = h.hexdigest()
    return _FILE_DIGESTS[key]
