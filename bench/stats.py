"""Latency statistics shared by the benchmark scripts."""
from __future__ import annotations

import statistics


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile of xs by nearest rank (q in 0..100); NaN for no samples."""
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))] if s else float("nan")


def summary(xs: list[float]) -> dict[str, float]:
    """p50 and p99 in ms (2 decimals) and the sample count."""
    return {"p50_ms": round(statistics.median(xs), 2), "p99_ms": round(percentile(xs, 99), 2), "n": len(xs)}
