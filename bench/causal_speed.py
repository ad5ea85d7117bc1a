"""Compiled causal model vs pgmpy for the full per-request table (all concepts x all states).

    python bench/causal_speed.py --bundle build/shapes/bundle [--requests 20]

Evidence sets are drawn by ancestral sampling from the network itself. For each one the
three implementations run back to back (compiled, pgmpy CausalInference, pgmpy do + VE),
in rotating order; medians and the ratio are printed and written as JSON. The answers
are compared too (max abs difference), so the speed-up is for the same numbers.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np

from export.concepts import to_pgmpy
from handlers.runtime.causal import CompiledCausalModel


def sample_evidence(model: CompiledCausalModel, rng: np.random.Generator) -> dict[str, int]:
    values: dict[str, int] = {}
    for n in model.order:
        cpt = model.cpts[n]
        col = cpt.table[(slice(None),) + tuple(values[p] for p in cpt.parents)]
        values[n] = int(rng.choice(cpt.card, p=col / col.sum()))
    values.pop(model.outcome)
    return values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="build/shapes/bundle")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--out", default="bench/results/causal_speed.json")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    from pgmpy.inference import CausalInference, VariableElimination
    compiled = CompiledCausalModel.from_file(Path(args.bundle) / "causal_network.json")
    bn = to_pgmpy(compiled)
    ci = CausalInference(bn)
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {"compiled": [], "pgmpy_causal_inference": [], "pgmpy_do_ve": []}
    worst = 0.0
    for r in range(args.requests):
        ev = sample_evidence(compiled, rng)
        nd = {x: {k: v for k, v in ev.items() if k != x and k not in compiled.descendants(x)}
              for x in compiled.concepts}
        results = {}

        def run_compiled():
            return {x: compiled.interventions(ev, x) for x in compiled.concepts}

        def run_ci():
            return {x: np.stack([ci.query([compiled.outcome], do={x: s}, evidence=nd[x] or None,
                                          adjustment_set=set(), show_progress=False).values
                                 for s in range(compiled.cpts[x].card)]) for x in compiled.concepts}

        def run_ve():
            return {x: np.stack([VariableElimination(bn.do([x])).query(
                [compiled.outcome], evidence={x: s, **nd[x]}, show_progress=False).values
                for s in range(compiled.cpts[x].card)]) for x in compiled.concepts}

        runs = [("compiled", run_compiled), ("pgmpy_causal_inference", run_ci), ("pgmpy_do_ve", run_ve)]
        for name, fn in runs[r % 3:] + runs[:r % 3]:
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
        for name in ("pgmpy_causal_inference", "pgmpy_do_ve"):
            worst = max(worst, max(float(np.abs(results[name][x] - results["compiled"][x]).max())
                                   for x in compiled.concepts))
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
           "concepts": len(compiled.concepts), "states": int(sum(compiled.cpts[x].card for x in compiled.concepts)),
           "requests": args.requests, "median_ms": {k: round(v, 3) for k, v in med.items()},
           "speedup_vs_causal_inference": round(med["pgmpy_causal_inference"] / med["compiled"], 1),
           "speedup_vs_do_ve": round(med["pgmpy_do_ve"] / med["compiled"], 1),
           "max_abs_difference": worst}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
