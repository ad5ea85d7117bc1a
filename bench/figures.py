"""The README's headline figures and the benchmark page's tables, written from the committed
results of the last ``make bench`` (``bench/results/latest.json``) and of the last
``python -m bench.build_cost`` (``bench/results/build-cost.json``), so they cannot drift apart.

    python -m bench.figures            # rewrite both blocks (make docs-figures)
    python -m bench.figures --check    # exit 1 when either block differs from the results

Each block sits between ``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->``
markers; only the text between them is generated, the prose around it is written by hand.
A unit test runs the check, so a README edited by hand, or results committed without
rewriting the blocks, fail ``make test``.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "latest.json"
README = REPO / "README.md"
BENCH_PAGE = REPO / "docs" / "benchmarks.md"
BUILD_COST = REPO / "bench" / "results" / "build-cost.json"


def _size(results: dict[str, Any], px: str) -> dict[str, Any] | None:
    return next((s for s in results["sizes"] if s["input"] == px), None)


def headline(results: dict[str, Any]) -> str:
    """The README's figures block: latency against a prediction at both model sizes, Captum's
    cost against ours, answer bytes and worker memory (markdown table)."""
    demo, large = _size(results, "64x64"), _size(results, "224x224")
    rows = ["| measure | " + " | ".join(f"{s['label']} ({s['input']} px)".replace("x", "×", 1)
                                          for s in (demo, large) if s) + " |",
            "|---|" + "---|" * sum(s is not None for s in (demo, large))]

    def row(name: str, cell: Any) -> None:
        cells = []
        for s in (demo, large):
            if s is None:
                continue
            try:
                cells.append(cell(s))
            except KeyError:
                cells.append("–")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")

    def latency(c: str) -> Any:
        def cell(s: dict[str, Any]) -> str:
            m = s[c]
            return (f"{m['explanations']['p50_ms']} vs {m['predictions']['p50_ms']} ms "
                    f"(**{m['ratio_p50']}×**)")
        return cell

    row("`/explanations` vs `/predictions` p50, one client", latency("concurrency_1"))
    row("the same, 8 clients (TorchServe batching)", latency("concurrency_8"))
    row("Captum Integrated Gradients ÷ ours: time / bytes",
        lambda s: f"**{s['captum']['speedup_p50']}×** / **{s['captum']['size_ratio']}×**")
    row("default answer: bytes (predictions / explanations)",
        lambda s: f"{s['concurrency_1']['predictions']['response_bytes']:,} / "
                  f"{s['concurrency_1']['explanations']['response_bytes']:,} B")
    row("worker peak memory ÷ a predictions-only worker",
        lambda s: f"{s['worker_peak_rss_mb']['ratio']}× ({s['worker_peak_rss_mb']['explanations']} MB)")
    note = (f"Measured {results['date']} on {results['machine']} with `{results['command']}`; every run's "
            "summary is in `bench/results/latest.json`, the full tables in [Benchmarks](docs/benchmarks.md).")
    if large is not None and "untrained" in large["label"]:
        note += (" The 224 px model is untrained: its timings, bytes and memory are real, its explanations "
                 "are not meaningful.")
    return "\n".join(rows) + "\n\n" + note


def tables(results: dict[str, Any]) -> str:
    """The benchmark page's block: the tables ``bench.run`` writes as ``latest.md``."""
    from bench.run import markdown
    return markdown(results).strip()


def build_cost(_results: dict[str, Any]) -> str:
    """The benchmark page's build-cost tables, from the committed ``bench/results/build-cost.json``
    (``python -m bench.build_cost``; its own results file, not the last ``make bench``'s)."""
    from bench.build_cost import markdown
    return markdown(json.loads(BUILD_COST.read_text())).strip()


def build_cost_headline(_results: dict[str, Any]) -> str:
    """The README's short build-cost table, from the same file as :func:`build_cost`."""
    from bench.build_cost import headline as short
    return short(json.loads(BUILD_COST.read_text())).strip()


BLOCKS = {"headline": (README, headline), "tables": (BENCH_PAGE, tables), "build-cost": (BENCH_PAGE, build_cost),
          "build-cost-headline": (README, build_cost_headline)}


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with block ``name``'s content replaced by ``body``.

    Raises:
        ValueError: the markers are missing."""
    start, end = _markers(name)
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {start} ... {end} markers")
    return pattern.sub(lambda _: f"{start}\n{body}\n{end}", text, count=1)


def stale(results: dict[str, Any], files: dict[str, Path] | None = None) -> list[str]:
    """The blocks whose text differs from what ``results`` give (empty: all current)."""
    out = []
    for name, (default, make) in BLOCKS.items():
        path = (files or {}).get(name, default)
        text = path.read_text()
        if replace_block(text, name, make(results)) != text:
            out.append(f"{path.name}: block {name!r}")
    return out


def write(results: dict[str, Any], files: dict[str, Path] | None = None) -> None:
    """Rewrite every block from ``results``."""
    for name, (default, make) in BLOCKS.items():
        path = (files or {}).get(name, default)
        path.write_text(replace_block(path.read_text(), name, make(results)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--check", action="store_true", help="exit 1 when a block differs from the results")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    if args.check:
        found = stale(results)
        for line in found:
            print(f"stale: {line} (run `make docs-figures`)", file=sys.stderr)
        return 1 if found else 0
    write(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
