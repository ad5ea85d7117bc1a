"""bench.concept_seeds: medians and ranges of the concepts checks over seeds."""
from __future__ import annotations

from bench.concept_seeds import format_summary, meets, summarise


def _report(mae_p: float, agreement: float, passed: bool) -> dict:
    answer = {"mae_p": mae_p, "mae": 0.01, "skill": 0.6, "ccc": 0.9, "ndcg5": 1.0, "recall3": 0.9}
    return {"checks": [{"name": "agreement layer1", "measured": agreement, "target": ">= 0.97", "passed": passed},
                       {"name": "effect truth mae of P(target | do)", "measured": mae_p, "target": "<= 0.05",
                        "passed": mae_p <= 0.05}],
            "effect_truth": {"answer": answer, "bayesian_network_alone": None,
                             "baselines": {"mean_effect": {**answer, "mae_p": 0.2}, "shuffled_concepts": answer}}}


def test_medians_ranges_and_targets():
    summary = summarise({0: _report(0.04, 0.96, False), 2: _report(0.08, 0.98, True), 1: _report(0.01, 0.99, True)})
    assert summary["seeds"] == [0, 1, 2]
    a = summary["checks"]["agreement layer1"]
    assert a["values"] == [0.96, 0.99, 0.98] and a["median"] == 0.98 and (a["min"], a["max"]) == (0.96, 0.99)
    assert a["passed"] == [False, True, True]
    m = summary["checks"]["effect truth mae of P(target | do)"]
    assert m["median"] == 0.04 and meets(m["median"], m["target"])
    assert summary["effect_truth"]["served"]["mae_p"]["median"] == 0.04
    assert summary["effect_truth"]["mean effect"]["mae_p"]["values"] == [0.2, 0.2, 0.2]
    assert summary["effect_truth"]["BN alone"]["mae_p"]["median"] is None
    text = format_summary(summary)
    assert "agreement layer1" in text and "0.98" in text and "yes" in text


def test_meets_reads_the_target_operators():
    assert meets(0.97, ">= 0.97") and not meets(0.969, ">= 0.97")
    assert meets(0.05, "<= 0.05") and not meets(0.051, "<= 0.05")
    assert meets(0, "== 0 metrics lost") and not meets(1, "== 0") and meets(None, ">= 1") is None
