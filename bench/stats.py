"""Latency statistics and result files shared by the benchmark scripts."""
from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_json(path: str | Path, result: Any) -> None:
    """A result as indented JSON at ``path``, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile of xs by nearest rank (q in 0..100); NaN for no samples."""
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))] if s else float("nan")


def summary(xs: list[float]) -> dict[str, float]:
    """p50 and p99 in ms (2 decimals) and the sample count."""
    return {"p50_ms": round(statistics.median(xs), 2), "p99_ms": round(percentile(xs, 99), 2), "n": len(xs)}


def alternating_times(fns: dict[str, Callable[[], Any]], n: int, warmup: int = 3) -> dict[str, list[float]]:
    """Milliseconds of ``n`` calls of each function, called in rounds whose order flips every
    round (so each sees the same machine state); the first ``warmup`` rounds, which warm
    caches and allocators, are not kept."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(n + warmup):
        for name in (names if i % 2 else names[::-1]):
            t = time.perf_counter()
            fns[name]()
            if i >= warmup:
                times[name].append((time.perf_counter() - t) * 1000)
    return times
