"""bench.build_cost: each step runs as its own process and reports its own wall time and peak
memory; the tables are formatted from what was measured."""
from __future__ import annotations

import os

import pytest

from bench import build_cost


def test_a_step_reports_its_own_process_time_and_memory(tmp_path):
    env = {**os.environ, "TQDM_DISABLE": "1"}
    row = build_cost.run_step(["render", "--out", str(tmp_path / "d"), "--n-train", "20", "--n-test", "10",
                               "--size", "32", "--workers", "1"], env)
    assert len(list((tmp_path / "d" / "train").glob("*/*.png"))) == 20
    # a Python process that imported numpy and PIL holds tens of MB; this one, not the test's
    assert row["seconds"] > 0 and 30 < row["peak_mb"] < 2000


def test_a_failing_step_stops_the_measurement_with_its_output(tmp_path):
    with pytest.raises(RuntimeError, match="concept-explainer concepts .* failed"):
        build_cost.run_step(["concepts", "--bundle", str(tmp_path / "none"), "--data", str(tmp_path)],
                            {**os.environ})


def test_tables_sum_the_steps_and_take_the_largest_peak():
    steps = {"render": {"seconds": 1.0, "peak_mb": 100.0}, "concepts": {"seconds": 10.5, "peak_mb": 900.0},
             "cladec": {"seconds": 4.0, "peak_mb": 300.0}}
    result = {"sizes": {"32": steps}, "concepts_64": [{"setting": "k 4", "seconds": 3.0, "peak_mb": 200.0}]}
    text = build_cost.markdown(result)
    assert "| **total** | **15.5** / 900 |" in text and "| k 4 | 3.0 | 200 |" in text
    assert "| 32×32 px | 16 s | 10 s | 4 s | 900 MB |" in build_cost.headline(result)
