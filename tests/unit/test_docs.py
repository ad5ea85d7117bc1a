"""The documentation: the site builds in strict mode, the README stays a short door whose links
resolve, and the figures written from the last ``make bench`` match its committed results."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import figures

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _build(root: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """``mkdocs build --strict`` of ``root/docs`` as ``make docs`` runs it (from ``root``, the
    config named by its relative path: docs/mkdocs.yml keeps its pages beside it)."""
    mkdocs = Path(sys.executable).parent / "mkdocs"
    return subprocess.run([str(mkdocs), "build", "--strict", "-f", "docs/mkdocs.yml", "-d", str(site)], cwd=root,
                          capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=300)


def test_the_site_builds_in_strict_mode(tmp_path):
    """A broken link or anchor, a page missing from the navigation or a nav entry without a
    page fails the build (``--strict`` turns MkDocs' warnings into errors)."""
    result = _build(REPO, tmp_path / "site")
    assert result.returncode == 0, result.stderr[-3000:]
    for page in ("index", "rest-api", "kserve", "deployment", "own-model", "methods", "benchmarks", "validity",
                 "reliability", "monitoring", "architecture", "changelog"):
        site = tmp_path / "site"
        assert (site / "index.html" if page == "index" else site / page / "index.html").exists(), page


def test_a_strict_build_fails_on_a_broken_link(tmp_path):
    """The check itself can fail: a copy of the docs with one dead link does not build."""
    import shutil
    docs = tmp_path / "docs"
    shutil.copytree(REPO / "docs", docs)
    (docs / "index.md").write_text((docs / "index.md").read_text() + "\n[gone](no-such-page.md)\n")
    result = _build(tmp_path, tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-page.md" in result.stdout + result.stderr


def test_the_readme_is_a_short_door_whose_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert "⟨FILL" not in text
    targets = [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]
    assert targets, "the README links into the documentation"
    for target in targets:
        path, _, anchor = target.partition("#")
        if path:
            assert (REPO / path).exists(), f"README links to missing {path}"


def test_headline_and_benchmark_tables_are_written_from_the_committed_results():
    """``make docs-figures`` output equals the README's and the benchmark page's blocks."""
    results = json.loads(figures.RESULTS.read_text())
    assert figures.stale(results) == []


def test_a_hand_edited_figure_is_caught(tmp_path):
    results = json.loads(figures.RESULTS.read_text())
    readme, page = tmp_path / "README.md", tmp_path / "benchmarks.md"
    readme.write_text(README.read_text())
    page.write_text(figures.BENCH_PAGE.read_text())
    files = {"headline": readme, "tables": page, "build-cost": page, "build-cost-headline": readme}
    assert figures.stale(results, files) == []
    demo = next(s for s in results["sizes"] if s["input"] == "64x64")
    shown = f"(**{demo['concurrency_1']['ratio_p50']}×**)"
    assert shown in readme.read_text()
    readme.write_text(readme.read_text().replace(shown, "(**1.01×**)", 1))
    assert figures.stale(results, files) == ["README.md: block 'headline'"]
    figures.write(results, files)
    assert figures.stale(results, files) == []


def test_blocks_need_their_markers():
    with pytest.raises(ValueError, match="markers"):
        figures.replace_block("no markers here", "headline", "x")


#: Sections the pages promise (the README, the issues' figures and other pages link to them); a
#: docs edit that drops one by accident fails here instead of going unnoticed.
SECTIONS = {
    "validity.md": ["Method 1: concept validity report", "Method 2: ClaDec evaluation", "Method 3: class-specific features",
                    "Method 4: layer analysis", "The trained 224 px model", "Real images: scikit-learn's handwritten digits"],
    "methods.md": ["1. Causal concept attributions", "2. ClaDec: decoding a layer's activations",
                   "3. Class-specific penultimate features", "4. Information-theoretic layer analysis"],
    "benchmarks.md": ["The last `make bench`", "What limits the misses", "Levers, kept or dropped", "What a build costs"],
}


@pytest.mark.parametrize("page", sorted(SECTIONS))
def test_pages_keep_their_sections(page):
    headings = [line.lstrip("#").strip() for line in (REPO / "docs" / page).read_text().splitlines()
                if line.startswith("## ")]
    missing = [s for s in SECTIONS[page] if s not in headings]
    assert not missing, f"docs/{page} lost its sections {missing}"
    assert all(len((REPO / "docs" / page).read_text().split(f"## {s}\n", 1)[1].split("\n## ", 1)[0].strip()) > 200
               for s in SECTIONS[page]), f"a section of docs/{page} is (nearly) empty"
