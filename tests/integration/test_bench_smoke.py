"""`make bench-smoke`: the benchmark runs end to end on the tiny archive (no timing asserted)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_bench_smoke(tiny_full_bundle: Path, tiny_classifier: Path, tiny_data: Path, tmp_path):
    image = sorted((tiny_data / "test").glob("*/*.png"))[0]
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--bundle", str(tiny_full_bundle),
                           "--classifier", str(tiny_classifier), "--image", str(image), "--smoke",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "latest.json").read_text())
    for c in ("concurrency_1", "concurrency_8"):
        assert result[c]["predictions"]["n"] > 0 and result[c]["explanations"]["n"] > 0
        assert result[c]["explanations"]["response_bytes"] > result[c]["predictions"]["response_bytes"]
    assert result["worker_peak_rss_mb"]["explanations"] > 0
    assert result["onnxruntime_vs_torch"]["classifier_onnxruntime"]["p50_ms"] > 0
    assert "| comparison |" in (tmp_path / "latest.md").read_text()
