"""The README stays a user's guide (at most 250 lines, the install and test commands that .ci/run runs) and
every relative link in it and in docs/ resolves."""
from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def test_readme_is_a_guide_of_at_most_250_lines_with_the_ci_commands():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    ci = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()
          if ln.strip().startswith(("pip ", "python "))]
    assert ci and all(cmd in readme for cmd in ci), ci


def test_every_relative_link_resolves():
    broken = []
    for doc in _doc_files():
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            if path and not (doc.parent / path).exists():
                broken.append(f"{doc.relative_to(REPO)} -> {target}")
    assert not broken, broken


def test_the_checker_sees_a_broken_link(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text("see [b](b.md) and [web](https://example.org)")
    assert [t for t in LINK.findall(doc.read_text()) if not (tmp_path / t).exists() and ":" not in t] == ["b.md"]
