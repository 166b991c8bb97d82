"""The documents a user reads state the present and point only at things they can open.

* No text file of the package, the benchmarks or the documents cites a file that is not in the
  repository (the team's notes ``methods.md`` / ``cpu-calibration.md``, or ``../shared`` paths:
  public sources are cited instead), and none speaks of work sittings, sessions or issue numbers.
* Every relative link in the Markdown documents resolves to a file of the repository, and every
  ``#anchor`` to a heading of the page it names.

Run records written by the tools (``result.json`` of an analysis, ``benchmarks/results/*.json``)
keep the paths they were run with: they are provenance, not prose, and are not checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".html", ".sh", ".csv", ".json", ".cfg", ".yaml", ".yml"}
SCANNED = [REPO / "tsbd", REPO / "docs", REPO / "benchmarks", REPO / "README.md", REPO / "BENCHMARKS.md"]
RUN_RECORDS = [REPO / "benchmarks" / "results"]  # and every docs/analysis/*/result.json

OUTSIDE_FILES = re.compile(r"methods\.md|cpu-calibration|\.\./shared")
HISTORY_WORDS = re.compile(r"\bsittings?\b|\bsessions?\b|\bissues?\s*[-#]?\s*\d+", re.IGNORECASE)

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~)")


def _text_files() -> list[Path]:
    files = []
    for root in SCANNED:
        candidates = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        files += [p for p in candidates if p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts]
    return files


def _is_run_record(path: Path) -> bool:
    return path.name == "result.json" or any(root in path.parents for root in RUN_RECORDS)


def _hits(pattern: re.Pattern, path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [f"{path.relative_to(REPO)}:{i}: {line.strip()[:120]}" for i, line in enumerate(lines, 1)
            if pattern.search(line)]


def test_the_scan_sees_the_documents_and_the_code():
    names = {p.relative_to(REPO).as_posix() for p in _text_files()}
    assert {"README.md", "BENCHMARKS.md", "docs/README.md", "tsbd/defenses/tsbd.py"} <= names


def test_no_citation_of_files_outside_the_repository():
    hits = [h for p in _text_files() if not _is_run_record(p) for h in _hits(OUTSIDE_FILES, p)]
    assert not hits, "cite public sources (paper, BackdoorBench / authors' code with path) instead:\n" + "\n".join(hits)


def test_documents_state_the_present():
    hits = [h for p in _text_files() if not _is_run_record(p) for h in _hits(HISTORY_WORDS, p)]
    assert not hits, "no sittings, sessions or issue numbers in the project's files:\n" + "\n".join(hits)


def _markdown_files() -> list[Path]:
    return [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").rglob("*.md"))]


def _relative_links(path: Path) -> list[tuple[int, str, str]]:
    """(line, file, anchor) of every relative link outside code; file is "" for a link to this page."""
    links, in_fence = [], False
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line.strip()):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if not re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
                file, _, anchor = target.partition("#")
                links.append((i, file, anchor))
    return links


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors, in_fence = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.strip()):
            in_fence = not in_fence
        elif not in_fence and (m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
            text = re.sub(r"[`*]", "", re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1)))
            anchors.add(re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(path):
    broken = []
    for i, file, anchor in _relative_links(path):
        target = path.parent / file if file else path
        if not target.exists():
            broken.append(f"{path.relative_to(REPO)}:{i}: {file} does not exist")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{path.relative_to(REPO)}:{i}: no heading for #{anchor} in {target.relative_to(REPO)}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_link_finder_sees_links_and_skips_code_and_urls(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top: the `tsbd` page (draft)\n"
                    "[a](docs/a.md) ![b](img/b.png#x) [c](https://x.org) [d](#top-the-tsbd-page-draft)\n"
                    "`[e](not/a/link.md)`\n```\n[f](in/a/fence.md)\n# not a heading\n```\n")
    assert _relative_links(page) == [(2, "docs/a.md", ""), (2, "img/b.png", "x"), (2, "", "top-the-tsbd-page-draft")]
    assert _anchors(page) == {"top-the-tsbd-page-draft"}
