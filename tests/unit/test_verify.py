"""handlers.runtime.verify against hand-computed values and a fake network."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from handlers.runtime import metrics as M
from handlers.runtime.causal import CausalRecord
from handlers.runtime.concept_view import ConceptBatch, SourcedRecord
from handlers.runtime.verify import (
    ALL_LAYERS,
    BackgroundVerifier,
    ConceptCheck,
    VerifyJob,
    agreement,
    verification_samples,
    verify_records,
)

PI = np.array([0.5, 0.25, 0.25])


def check(concept: str, layer: str, served, network, state: int = 0) -> ConceptCheck:
    return ConceptCheck(concept, layer, state, PI, np.array(served, float), np.array(network, float))


def test_agreement_by_hand():
    checks = [check("l1/c0", "l1", [0.9, 0.5, 0.1], [0.8, 0.5, 0.2]),   # effects s 0.9-0.6=0.3, m 0.8-0.575=0.225
              check("l1/c1", "l1", [0.6, 0.6, 0.6], [0.6, 0.7, 0.6]),   # s 0, m 0.6-0.625=-0.025
              check("l2/c0", "l2", [0.2, 0.8, 0.8], [0.1, 0.9, 0.8])]   # s 0.2-0.5=-0.3, m 0.1-0.475=-0.375
    a = agreement(checks)
    s, m = np.array([0.3, 0.0, -0.3]), np.array([0.225, -0.025, -0.375])
    assert a.concepts == 3
    assert a.mae_p == pytest.approx((0.1 + 0 + 0.1 + 0 + 0.1 + 0 + 0.1 + 0.1 + 0) / 9)
    assert a.effect_mae == pytest.approx((0.075 + 0.025 + 0.075) / 3)
    cov = ((s - s.mean()) * (m - m.mean())).mean()
    assert a.ccc == pytest.approx(2 * cov / (s.var() + m.var() + (s.mean() - m.mean()) ** 2))
    assert a.recall3 == 1.0  # three concepts: k = 3, every one is in both top sets
    two = agreement(checks[:1] + checks[2:] + checks[1:2])
    assert two.recall3 == 1.0


def test_recall_follows_the_answers_order_not_its_numbers():
    """The answer lists concepts in its order; recall@3 takes the first three listed."""
    net = [[0.5, 0.5, 0.5 + d] for d in (0.0, 0.0, 0.0, 0.4, 0.8, 0.6)]  # effects only for the last three
    checks = [check(f"l/c{i}", "l", [0.5, 0.5, 0.9], n) for i, n in enumerate(net)]
    assert agreement(checks).recall3 == 0.0
    assert agreement(checks[3:] + checks[:3]).recall3 == 1.0
    assert agreement(checks[:1]).ccc is None


def test_verification_samples_per_layer_and_all():
    checks = [check("l1/c0", "l1", [0.9, 0.5, 0.1], [0.8, 0.5, 0.2]), check("l2/c0", "l2", [0.2, 0.8, 0.8], [0.1, 0.9, 0.8])]
    samples = verification_samples(checks, "3")
    by = {}
    for s in samples:
        by.setdefault((s.name, dict(s.labels).get("layer")), []).append(s.value)
    assert by[(M.VERIFY_JOBS, None)] == [1.0]
    assert sorted(by[(M.VERIFY_PROBABILITY_ERROR, "l1")]) == pytest.approx([0.0, 0.1, 0.1])
    assert len(by[(M.VERIFY_PROBABILITY_ERROR, ALL_LAYERS)]) == 6
    assert set(by) >= {(M.VERIFY_AGREEMENT, "l1"), (M.VERIFY_AGREEMENT, "l2"), (M.VERIFY_AGREEMENT, ALL_LAYERS)}
    assert all(dict(s.labels)["model_version"] == "3" for s in samples)
    for s in samples:
        assert tuple(k for k, _ in s.labels) == tuple(sorted(M.METRICS[s.name][2]))


class FakeExplainer:
    """Two layers of two concepts; the 'network' answers P = 0.1 * (channel + 1) + 0.2 * state."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.interventions = {"a": object(), "b": object()}
        self.gate = gate
        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self.shares: list[bool] = []  # answer(share=...) of each call

    def where(self, concept):
        layer, c = concept.split("/c")
        return layer, int(c)

    def network_probabilities(self, batch, row, layer, channels, target):
        self.calls.append((layer, tuple(channels)))
        return 0.5, np.array([[0.1 * (c + 1) + 0.2 * s for s in range(3)] for c in channels])

    def encode(self, activations):
        if self.gate is not None:
            self.gate.wait(30)
        return ConceptBatch({}, {}, {})

    def answer(self, batch, row, target, network_concepts, share=True):
        self.shares.append(share)
        return [SourcedRecord(CausalRecord(f"{l}/c{c}", 1, PI, np.full(3, 0.5)), "bayesian_network")
                for l in "ab" for c in range(2)]


def test_verify_records_runs_one_batch_per_layer_in_the_answers_order():
    fake = FakeExplainer()
    records = FakeExplainer().answer(None, 0, 0, 0)
    records = [records[3], records[0], records[2]]  # b/c1, a/c0, b/c0
    checks = verify_records(fake, ConceptBatch({}, {}, {}), 0, 0, records)
    assert sorted(fake.calls) == [("a", (0,)), ("b", (1, 0))]
    assert [c.concept for c in checks] == ["b/c1", "a/c0", "b/c0"]
    np.testing.assert_allclose(checks[0].network, [0.2, 0.4, 0.6])
    assert checks[0].network_effect == pytest.approx(0.4 - PI @ np.array([0.2, 0.4, 0.6]))


def test_verify_records_refuses_a_layer_without_graph():
    fake = FakeExplainer()
    fake.interventions = {"a": object()}
    with pytest.raises(ValueError, match="layer b"):
        verify_records(fake, ConceptBatch({}, {}, {}), 0, 0, fake.answer(None, 0, 0, 0))


def test_background_verifier_drops_when_full_and_never_blocks():
    gate = threading.Event()
    got: list = []
    fake = FakeExplainer(gate)
    v = BackgroundVerifier(fake, "1", got.extend, capacity=1)
    job = VerifyJob({}, 0, 0)
    assert v.offer(job)
    for _ in range(200):  # wait until the thread holds the first job
        if v._queue.qsize() == 0:
            break
        threading.Event().wait(0.01)
    assert v.offer(job) and not v.offer(job) and not v.offer(job)
    outcomes = [dict(s.labels)["outcome"] for s in got if s.name == M.VERIFY_JOBS]
    assert outcomes == ["dropped", "dropped"]
    gate.set()
    assert v.wait_idle(10)
    outcomes = [dict(s.labels)["outcome"] for s in got if s.name == M.VERIFY_JOBS]
    assert outcomes.count("verified") == 2
    assert fake.shares == [False, False]  # in line: the worker's helper thread is the live requests'
    v.close()
    assert not v.offer(job)


def test_sampling_fraction():
    v = BackgroundVerifier(FakeExplainer(), "1", lambda s: None, seed=3)
    assert not any(v.sampled(0.0) for _ in range(100)) and all(v.sampled(1.0) for _ in range(100))
    share = np.mean([v.sampled(0.1) for _ in range(5000)])
    assert 0.08 < share < 0.12


_EXIT_SCRIPT = """
import sys, threading, time
sys.path.insert(0, {root!r})
from tests.unit.test_verify import FakeExplainer
from handlers.runtime.verify import BackgroundVerifier, VerifyJob

class Slow(FakeExplainer):
    def encode(self, activations):
        time.sleep(0.2)  # a job still inside its graphs when the main thread ends
        return super().encode(activations)

done = []
v = BackgroundVerifier(Slow(), "1", lambda samples: done.append(1) or print("verified", flush=True))
for _ in range(3):
    assert v.offer(VerifyJob({{}}, 0, 0))
# no close(): the process exits with three jobs queued
"""


def test_a_process_that_exits_without_close_finishes_its_verifications(tmp_path):
    """The verifier's thread is a daemon; at exit it is stopped and joined (after the queued
    jobs) rather than torn down mid-job, which in a real worker aborted the process from inside
    onnxruntime ("terminate called without an active exception")."""
    import subprocess
    import sys
    from pathlib import Path
    root = str(Path(__file__).resolve().parents[2])
    run = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT.format(root=root)], capture_output=True, text=True,
                         timeout=60, cwd=root)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("verified") == 3, (run.stdout, run.stderr)
