"""Compiled causal model vs pgmpy for the full per-request table (all concepts x all states).

    python -m bench.causal_speed --bundle build/shapes/bundle [--requests 20]

Evidence sets are drawn by ancestral sampling from the network itself. For each one the
three implementations run back to back (compiled, pgmpy CausalInference, pgmpy do + VE),
in rotating order; medians and the ratio are printed and written as JSON. The answers
are compared too (max abs difference), so the speed-up is for the same numbers.
"""
from __future__ import annotations

import argparse
import json
import os
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


def compare(bundle: Path, requests: int = 20, seed: int = 0) -> dict:
    """The full per-request table (every concept, every state) for ``requests`` evidence sets:
    compiled vs pgmpy CausalInference vs pgmpy do + variable elimination, in rotating order.
    Returns medians (ms), speed-ups and the largest difference between the answers."""
    warnings.simplefilter("ignore")
    from pgmpy.inference import CausalInference, VariableElimination
    compiled = CompiledCausalModel.from_file(Path(bundle) / "causal_network.json").precompile()
    bn = to_pgmpy(compiled)
    ci = CausalInference(bn)
    rng = np.random.default_rng(seed)
    times: dict[str, list[float]] = {"compiled": [], "pgmpy_causal_inference": [], "pgmpy_do_ve": []}
    worst = 0.0
    for r in range(requests):
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
    return {"concepts": len(compiled.concepts), "states": int(sum(compiled.cpts[x].card for x in compiled.concepts)),
            "requests": requests, "median_ms": {k: round(v, 3) for k, v in med.items()},
            "speedup_vs_causal_inference": round(med["pgmpy_causal_inference"] / med["compiled"], 1),
            "speedup_vs_do_ve": round(med["pgmpy_do_ve"] / med["compiled"], 1),
            "max_abs_difference": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="build/shapes/bundle")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--out", default="bench/results/causal_speed.json")
    args = ap.parse_args()
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           **compare(Path(args.bundle), args.requests)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
