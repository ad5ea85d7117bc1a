"""The concepts step's validity over several seeds: medians and ranges, not one lucky fit.

Copies a built bundle once per seed, re-runs ``concept-explainer concepts`` on each copy (a
fresh process, as a user runs it: new autoencoders, bins, Bayesian network, intervention
graphs and validity report on the same classifier), then prints every check of the bundle
with its value per seed, the median, the range and whether the median meets the target,
followed by the effect-unit table (served answer, Bayesian network alone, both baselines).

    python -m bench.concept_seeds --bundle build/shapes/bundle --classifier build/shapes/classifier \\
        --data data/shapes --seeds 0 1 2 --out build/concept-seeds

Seeds whose copy already holds a report are read, not rebuilt (``--rebuild`` refits them).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Effect-unit rows of the summary: (key in the effect-truth answer, label).
TRUTH_ROWS = (("mae_p", "mean abs. error of P(target | do)"), ("mae", "mean abs. error of the effect"),
              ("skill", "effect skill over 'no effect'"), ("ccc", "Lin's CCC of the effect, pooled"),
              ("ndcg5", "per image nDCG@5, median"), ("recall3", "per image recall@3, mean"))
COLUMNS = (("served", ("answer",)), ("BN alone", ("bayesian_network_alone",)),
           ("mean effect", ("baselines", "mean_effect")), ("shuffled", ("baselines", "shuffled_concepts")))


def fit(bundle: Path, classifier: Path, data: Path, seed: int, out: Path, rebuild: bool) -> tuple[dict[str, Any], float]:
    """The concepts report of ``seed`` (fitting it into a copy of ``bundle`` unless present)
    and the seconds the fit took (0 when read)."""
    copy = out / f"seed{seed}"
    doc = copy / "concepts.json"
    if doc.exists() and not rebuild:
        return json.loads(doc.read_text())["report"], 0.0
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(bundle, copy)
    cmd = [str(Path(sys.executable).parent / "concept-explainer"), "concepts", "--bundle", str(copy),
           "--data", str(data), "--classifier", str(classifier), "--seed", str(seed)]
    t0 = time.perf_counter()
    with open(out / f"seed{seed}.log", "wb") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return json.loads(doc.read_text())["report"], time.perf_counter() - t0


def _get(doc: dict[str, Any], path: Sequence[str]) -> Any:
    for key in path:
        doc = doc.get(key) if isinstance(doc, dict) else None  # type: ignore[assignment]
    return doc


def summarise(reports: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per check and per effect-unit cell: the value of each seed, the median and the range."""
    def stats(values: list[float | None]) -> dict[str, Any]:
        known = [v for v in values if v is not None]
        return {"values": values, "median": statistics.median(known) if known else None,
                "min": min(known) if known else None, "max": max(known) if known else None}

    seeds = sorted(reports)
    names = list(dict.fromkeys(c["name"] for s in seeds for c in reports[s]["checks"]))
    checks = {}
    for name in names:
        by_seed = [next((c for c in reports[s]["checks"] if c["name"] == name), None) for s in seeds]
        target = next(c["target"] for c in by_seed if c is not None)
        checks[name] = {**stats([None if c is None else c["measured"] for c in by_seed]), "target": target,
                        "passed": [None if c is None else c["passed"] for c in by_seed]}
    truth = {col: {key: stats([_get(reports[s]["effect_truth"], (*path, key)) for s in seeds]) for key, _ in TRUTH_ROWS}
             for col, path in COLUMNS}
    return {"seeds": seeds, "checks": checks, "effect_truth": truth}


def meets(median: float | None, target: str) -> bool | None:
    """Whether a median meets a check's target written as ">= x", "<= x" or "== x ..."."""
    if median is None:
        return None
    op, value = target.split()[0], float(target.split()[1])
    return {">=": median >= value, "<=": median <= value, "==": median == value}.get(op)


def format_summary(summary: dict[str, Any]) -> str:
    def cell(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    seeds = summary["seeds"]
    lines = [f"{'check':<44}" + "".join(f"{'seed ' + str(s):>10}" for s in seeds)
             + f"{'median':>10}{'range':>18}   target     median meets", "-" * (92 + 10 * len(seeds))]
    for name, c in summary["checks"].items():
        ok = meets(c["median"], c["target"])
        lines.append(f"{name:<44}" + "".join(f"{cell(v):>10}" for v in c["values"]) + f"{cell(c['median']):>10}"
                     f"{cell(c['min']) + '..' + cell(c['max']):>18}   {c['target']:<10} "
                     f"{'n/a' if ok is None else 'yes' if ok else 'NO'}")
    def short(v: float) -> str:
        return f"{v:.3f}"
    lines += ["", f"effect units, median (range) over seeds {', '.join(map(str, seeds))}:",
              f"{'':<36}" + "".join(f"{col:>24}" for col, _ in COLUMNS)]
    for key, label in TRUTH_ROWS:
        row = f"{label:<36}"
        for col, _ in COLUMNS:
            s = summary["effect_truth"][col][key]
            text = "" if s["median"] is None else f"{short(s['median'])} ({short(s['min'])}..{short(s['max'])})"
            row += f"{text:>24}"
        lines.append(row)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a bundle built with concepts (build/NAME/bundle)")
    parser.add_argument("--classifier", type=Path, required=True, help="the classifier folder it was exported from")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("build/concept-seeds"))
    parser.add_argument("--rebuild", action="store_true", help="refit seeds whose copy already has a report")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    reports = {}
    for seed in args.seeds:
        reports[seed], seconds = fit(args.bundle, args.classifier, args.data, seed, args.out, args.rebuild)
        print(f"seed {seed}: {'read' if not seconds else f'fitted in {seconds:.0f} s'}", flush=True)
    summary = summarise(reports)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
