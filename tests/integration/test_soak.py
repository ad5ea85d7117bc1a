"""A short version of `make soak` (bench/soak.py) against the test TorchServe."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
BENCH = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_short_soak(server, sample_pngs):
    soak = load_soak()
    result = soak.soak(server.client, "tinyx", sample_pngs[0], seconds=15, clients=8, max_requests=5000, window=4)
    print(f"\n{result}")
    assert result["requests"] > 50
    assert result["errors"] == 0 and result["worker_restarts"] == 0
    assert result["predictions"]["requests"] > 0 and result["explanations"]["requests"] > 0
    assert result["worker_rss_growth_pct"] < 5, result
