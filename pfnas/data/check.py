"""``pfnas data check``: validate a data set folder and report every problem instead of raising."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from PIL import Image

from pfnas.config import DataError
from pfnas.data.decode import decode_workers
from pfnas.data.formats import (
    FGVC_SPLIT_FILES,
    KINDS,
    VTAB_SPLIT_FILES,
    is_image,
    Issues,
    Listing,
    subdirs,
    list_task,
)
from pfnas.data.task import SPLITS


@dataclass
class DataReport:
    """Outcome of :func:`check_dataset`; ``warnings`` are hints that do not make the set invalid."""

    path: str
    kind: str
    classes: int
    counts: dict[str, int]
    broken: list[str]
    problems: list[str]
    warnings: list[str] = field(default_factory=list)
    tasks: dict[str, int] = field(default_factory=dict)  # task -> classes when ``path`` holds several tasks

    @property
    def ok(self) -> bool:
        return not self.problems and not self.broken

    def render(self, limit: int = 20):
        """A rich Table for ``pfnas data check``."""
        from rich.table import Table

        status = "[green]OK[/green]" if self.ok else "[red]FAILED[/red]"
        table = Table(title=f"{self.path} ({self.kind}) {status}", show_header=True)
        table.add_column("item")
        table.add_column("value", overflow="fold")
        if self.tasks:
            for t, c in self.tasks.items():
                table.add_row(f"{t} classes", str(c))
        else:
            table.add_row("classes", str(self.classes))
        for k, v in self.counts.items():
            table.add_row(k, str(v))
        for label, items, style in (
            ("problem", self.problems, "red"),
            ("broken", self.broken, "red"),
            ("warning", self.warnings, "yellow"),
        ):
            for msg in items[:limit]:
                table.add_row(f"[{style}]{label}[/{style}]", msg)
            if len(items) > limit:
                table.add_row(f"[{style}]{label}[/{style}]", f"... {len(items) - limit} more")
        return table



def _detect_task(d: Path) -> str | None:
    if any((d / f).is_file() for f in VTAB_SPLIT_FILES.values()):
        return "vtab"
    if any((d / f).is_file() for f in FGVC_SPLIT_FILES.values()):
        return "fgvc"
    if any((d / s).is_dir() for s in ("train", "val", "test")):
        return "imagefolder"
    try:
        subs = [p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if subs and any(is_image(f) for s in subs for f in s.iterdir()):
            return "imagefolder"
    except OSError:
        return None
    return None



def _verify_one(path: Path) -> str | None:
    try:
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, still reads every byte
            im.load()
        return None
    except Exception as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__



def _verify(paths: Iterable[Path]) -> dict[Path, str]:
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=decode_workers()) as ex:
        errors = list(ex.map(_verify_one, paths, chunksize=32))
    return {p: e for p, e in zip(paths, errors) if e is not None}



def _check_one(kind: str, d: Path, issues: Issues, seed: int = 0) -> Listing:
    listing = list_task(kind, d, issues, seed)
    existing = {p for entries in listing.splits.values() for p, _ in entries if p.is_file()}
    for p, err in sorted(_verify(existing).items()):
        issues.broken_file(f"{p}: unreadable ({err})")
    return listing



def _single_report(kind: str, d: Path, issues: Issues) -> DataReport:
    listing = _check_one(kind, d, issues)
    counts = {s: len(listing.splits[s]) for s in SPLITS if s in listing.splits}
    return DataReport(str(d), kind, listing.num_classes, counts, issues.broken, issues.problems, issues.warnings)



def check_dataset(path: str | Path, kind: str | None = None, task: str | None = None) -> DataReport:
    """Validate a data set folder without raising; only a missing ``path`` raises :class:`DataError`.

    ``path`` may be one task folder or a root of several tasks (each is checked). ``kind=None``
    auto-detects VTAB txt splits, FGVC json splits, ImageFolder class folders and HTA roots.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data path not found: {root}")
    try:
        return _check(root, kind, task)
    except (DataError, OSError) as e:
        return DataReport(str(root), kind or "unknown", 0, {}, [], [str(e)])



def _check(root: Path, kind: str | None, task: str | None) -> DataReport:
    if kind is not None and kind not in KINDS:
        return DataReport(str(root), str(kind), 0, {}, [], [f"unknown kind {kind!r}; choose from {list(KINDS)}"])
    if kind == "synthetic":
        return DataReport(str(root), kind, 0, {}, [], ["kind 'synthetic' is generated in memory; nothing to check"])
    if not root.is_dir():
        return DataReport(str(root), kind or "unknown", 0, {}, [], [f"{root} is not a directory"])
    base = root
    if task:
        base = root / task
        if not base.is_dir():
            msg = f"task directory not found: {base} (available: {', '.join(subdirs(root)[:20])})"
            return DataReport(str(base), kind or "unknown", 0, {}, [], [msg])
    here = _detect_task(base)
    if kind is None:
        single = here
    elif kind == "hta":
        single = "hta" if (base / "train").is_dir() else None
    elif kind == "imagefolder":
        single = "imagefolder"
    else:
        single = kind if here == kind else None
    issues = Issues(strict=False)
    if single is not None:
        return _single_report(single, base, issues)
    # A root of several tasks: detect each sub folder.
    task_kinds: dict[str, str] = {}
    for name in subdirs(base):
        k = _detect_task(base / name)
        if k == "imagefolder" and (base / name / "train").is_dir():
            k = "hta"
        if k is not None and (kind is None or k == kind):
            task_kinds[name] = k
    if not task_kinds and kind is not None:
        return _single_report(kind, base, issues)  # reports the missing split files
    if not task_kinds:
        return DataReport(
            str(base), "unknown", 0, {}, [],
            [f"no data set found in {base} (expected VTAB txt splits, FGVC json splits or class folders)"],
        )
    kinds_found = sorted(set(task_kinds.values()))
    if len(kinds_found) > 1:
        issues.warn(f"mixed layouts under {base}: {kinds_found}")
    counts: dict[str, int] = {}
    tasks: dict[str, int] = {}
    for name, k in task_kinds.items():
        listing = _check_one(k, base / name, issues)
        tasks[name] = listing.num_classes
        counts.update({f"{name}/{s}": len(listing.splits[s]) for s in SPLITS if s in listing.splits})
    return DataReport(
        str(base), "+".join(kinds_found), 0, counts, issues.broken, issues.problems, issues.warnings, tasks
    )
