"""The concept network's tables and structure rules, against brute-force counts, a known
generating model, and pgmpy on the exported tiny network."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from export.causal_fit import choose_parents, fit_table, logistic_table, one_hot, one_hot_configs


def _additive_logistic(rng: np.random.Generator, cards: list[int], child_card: int, n: int):
    """Rows from a known main-effects softmax model; returns (states, child, true table)."""
    coefs = [rng.normal(0, 1.5, (c, child_card)) for c in cards]
    states = np.stack([rng.integers(0, c, n) for c in cards], axis=1)
    logits = sum(coefs[j][states[:, j]] for j in range(len(cards)))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    child = np.array([rng.choice(child_card, p=row) for row in p])
    grid = np.indices(cards).reshape(len(cards), -1).T
    g = sum(coefs[j][grid[:, j]] for j in range(len(cards)))
    true = np.exp(g - g.max(1, keepdims=True))
    true /= true.sum(1, keepdims=True)
    return states, child, true.T.reshape([child_card, *cards])


def test_one_hot_blocks():
    x = one_hot(np.array([[0, 2], [1, 0]]), [2, 3])
    np.testing.assert_array_equal(x, [[1, 0, 0, 0, 1], [0, 1, 1, 0, 0]])
    assert one_hot_configs([2, 3]).shape == (6, 5) and one_hot_configs([]).shape == (1, 0)


def test_seen_configurations_answer_their_counts_when_backoff_is_tiny():
    rng = np.random.default_rng(0)
    states = rng.integers(0, 3, (500, 2))
    child = rng.integers(0, 4, 500)
    fit = fit_table(states, child, [3, 3], 4, backoff=1e-9)
    for a in range(3):
        for b in range(3):
            sel = (states[:, 0] == a) & (states[:, 1] == b)
            assert fit.support[a, b] == sel.sum()
            if sel.any():
                freq = np.bincount(child[sel], minlength=4) / sel.sum()
                np.testing.assert_allclose(fit.table[:, a, b], freq, atol=1e-6)
    np.testing.assert_allclose(fit.table.sum(axis=0), 1.0)


def test_unseen_configurations_answer_the_generating_model_not_uniform():
    rng = np.random.default_rng(1)
    cards = [3, 3, 3]
    states, child, true = _additive_logistic(rng, cards, 4, 6000)
    hidden = (states[:, 0] == 2) & (states[:, 1] == 2) & (states[:, 2] == 1)
    fit = fit_table(states[~hidden], child[~hidden], cards, 4, backoff=5.0)
    assert fit.support[2, 2, 1] == 0
    cell = fit.table[:, 2, 2, 1]
    np.testing.assert_allclose(cell, true[:, 2, 2, 1], atol=0.06)
    assert np.abs(cell - 0.25).max() > 0.1  # not the flat prior
    assert fit.table.min() > 0


def test_logistic_table_recovers_a_main_effects_model():
    rng = np.random.default_rng(2)
    states, child, true = _additive_logistic(rng, [3, 2], 3, 8000)
    table = logistic_table(states, child, [3, 2], 3, l2=0.0)
    np.testing.assert_allclose(table, true, atol=0.04)


def test_table_without_parents_is_the_marginal():
    child = np.array([0] * 30 + [1] * 60 + [2] * 10)
    fit = fit_table(np.zeros((100, 0), np.int64), child, [], 3, backoff=5.0)
    np.testing.assert_allclose(fit.table, [0.3, 0.6, 0.1], atol=1e-4)


def test_choose_parents_caps_and_thresholds():
    infl = np.array([0.5, 0.01, 0.3, 0.2])
    assert choose_parents(infl, 2, 0.05) == [0, 2]
    assert choose_parents(infl, 10, 0.05) == [0, 2, 3]
    assert choose_parents(infl, 10, 0.9) == []


def test_exported_network_answers_equal_pgmpy(tiny_concept_bundle: Path):
    """The interventionally fitted tiny network, compiled, against pgmpy's do() + VE."""
    from handlers.runtime.causal import CompiledCausalModel
    from tests.pgmpy_reference import do_query, load_pgmpy
    path = tiny_concept_bundle / "causal_network.json"
    compiled = CompiledCausalModel.from_file(path)
    model = load_pgmpy(path)
    rng = np.random.default_rng(3)
    for _ in range(3):
        ev = {x: int(rng.integers(0, 3)) for x in compiled.concepts}
        for x in compiled.concepts:
            ours = compiled.interventions(ev, x)
            for s in range(3):
                np.testing.assert_allclose(ours[s], do_query(model, x, s, ev), atol=1e-9)


def test_concept_report_has_checks_and_interventional_rows(tiny_concept_bundle: Path):
    report = json.loads((tiny_concept_bundle / "concepts.json").read_text())["report"]
    net = report["network"]
    assert net["rows_interventional"] == 60 * 3 * 4 * 3  # images x layers x concepts x states
    names = {c["name"] for c in report["checks"]}
    assert {"fidelity", "effect truth mae of P(target | do)", "effect truth ccc", "effect truth ndcg@5 median",
            "effect truth recall@3 mean", "effect truth beats baseline mean_effect",
            "effect truth beats baseline shuffled_concepts"} <= names
    truth = report["effect_truth"]
    assert set(truth["per_layer"]) == {"layer1", "layer2", "layer3"} and truth["network_concepts"] == 12
    probes = report["network_probes"]["layers"]
    assert set(probes) == {"layer1", "layer2", "layer3"} and all(1 <= l["probes"] <= 3 for l in probes.values())
    assert 0.0 <= truth["answer"]["mae_p"] <= 1.0
    cv = report["causal_validity"]
    assert 0.0 <= cv["interventions_on_unseen_configurations"] <= 1.0
    assert set(cv["spearman_per_layer"]) == {"layer1", "layer2", "layer3"}


def test_archive_refuses_a_bundle_that_fails_its_checks(tiny_concept_bundle: Path, tmp_path: Path):
    """A bundle whose concepts report has a failed check is refused, naming it. (The tiny model
    may pass or fail its checks depending on the run: a one-class classifier agrees with
    everything, so the failure is written into a copy of the bundle, its manifest rewritten.)"""
    from export.archive import write_bundle
    from export.concepts import failed_checks
    from export.pipeline import ArchiveStep, FailedChecksError, archive
    from handlers.runtime.bundle import ModelMetadata

    def fail_fidelity(tmp: Path) -> ModelMetadata:
        doc = json.loads((tmp / "concepts.json").read_text())
        for check in doc["report"]["checks"]:
            if check["name"] == "fidelity":
                check.update(measured=0.1, passed=False)
        (tmp / "concepts.json").write_text(json.dumps(doc))
        return ModelMetadata.from_json(json.loads((tmp / "metadata.json").read_text()))
    bundle = write_bundle(tmp_path / "bundle", fail_fidelity, base=tiny_concept_bundle)
    failed = failed_checks(json.loads((bundle / "concepts.json").read_text())["report"])
    assert "fidelity" in [c["name"] for c in failed]
    step = ArchiveStep(bundle=bundle, name="t", version="0.1", model_store=tmp_path)
    with pytest.raises(FailedChecksError) as err:
        archive(step)
    assert "fidelity" in str(err.value) and "--accept-failed-checks" in str(err.value)
    assert not (tmp_path / "t.mar").exists()
