"""bench.cladec_steps: a ClaDec decoder per step count, scored by the classifier."""
from __future__ import annotations

from pathlib import Path

from bench.cladec_steps import measure


def test_each_step_count_trains_a_decoder_and_scores_it(tiny_classifier: Path, tiny_data: Path):
    rows = measure(tiny_classifier, tiny_data, "layer2", [1, 30], train_images=200, eval_images=50,
                   batch_size=32, width=16, precision="fp32")
    assert [r["steps"] for r in rows] == [1, 30]
    for r in rows:
        assert 0.0 <= r["recognised"] <= 1.0 and 0.0 < r["mse"] < 1.0 and r["seconds"] >= 0
    # training lowers the reconstruction error
    assert rows[1]["mse"] < rows[0]["mse"]
