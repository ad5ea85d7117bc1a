"""``"verify"`` on /explanations and sampled verification (``verify_fraction``) through the
handler with a mock context, against torch's interventions in the classifier."""
from __future__ import annotations

import base64
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from handlers.concept_handler import ConceptExplainerHandler
from handlers.runtime import metrics as M
from tests.answer_schema import assert_answer, is_explain
from tests.handler.mock_context import make_context, prepare_batch, wire_request
from tests.handler.test_metrics import RecordingCache
from tests.reference import offline_evidence, offline_network_interventions


@pytest.fixture(scope="module")
def handler(model_dir: Path) -> ConceptExplainerHandler:
    h = ConceptExplainerHandler()
    h.initialize(make_context(model_dir, {"verify_fraction": 0.0}))
    yield h
    h.close()


def explain(handler, model_dir, png: bytes, **options):
    req = wire_request(json.dumps({"data": base64.b64encode(png).decode(), **options}), "application/json",
                       explain=True)
    ctx = make_context(model_dir)
    (body,) = handler.handle(prepare_batch(ctx, [req]), ctx)
    status, answer = ctx.get_response_status(0)[0], json.loads(body)
    assert_answer(status, answer, is_explain(req))
    return status, answer


def _effect(p, state, pi):
    return p[state] - float(np.dot(pi, p))


def _recall3_under_rounding(network_effects: np.ndarray, rounding: float = 5e-7) -> set[float]:
    """The answer's recall@3 (its first three concepts against the network's three largest
    |effects|, as the server ranks them unrounded) that effects rounded to 6 decimals allow:
    one value, unless |effects| within two roundings of the third largest tie after rounding
    (the tiny model has effects of a few 1e-6), when each way of breaking that tie counts."""
    a = np.abs(network_effects)
    third = np.sort(a)[::-1][2]
    sure = {i for i in range(len(a)) if a[i] > third + 2 * rounding}
    tied = {i for i in range(len(a)) if abs(a[i] - third) <= 2 * rounding}
    shown, need = {0, 1, 2}, 3 - len(sure)
    return {round((len(sure & shown) + j) / 3, 6)
            for j in range(max(0, need - len(tied - shown)), min(need, len(tied & shown)) + 1)}


def test_verify_equals_torch_interventions(handler, model_dir, tiny_full_bundle, tiny_classifier, sample_pngs):
    """Every verified concept carries the network's own P(target | do(state)) (torch, same
    weights, to 1e-4) and its effect with the served weights; network-answered concepts agree
    with themselves; the answer's agreement is recomputed here from the numbers it lists."""
    from tests.pgmpy_reference import load_pgmpy
    model = load_pgmpy(tiny_full_bundle / "causal_network.json")
    for png in sample_pngs[:2]:
        status, body = explain(handler, model_dir, png, images=False, top_concepts=12, verify=True)
        assert status == 200
        concepts = body["concepts"]
        assert len(concepts) == 12 and all("verified" in c for c in concepts)
        evidence, predicted = offline_evidence(tiny_full_bundle, png, int8=True)
        served_e, network_e, errors = [], [], []
        for c in concepts:
            q = offline_network_interventions(tiny_full_bundle, tiny_classifier, png, c["id"], predicted)
            got = np.array([i["probability"] for i in c["verified"]["interventions"]])
            np.testing.assert_allclose(got, q, atol=1e-4)
            served = np.array([i["probability"] for i in c["interventions"]])
            if c["source"] == "network":
                np.testing.assert_allclose(served, got, atol=1e-6)
            parents = model.get_parents(c["id"])
            cpd = model.get_cpds(c["id"])
            pi = cpd.reduce([(p, evidence[p]) for p in parents], inplace=False).values if parents else cpd.values
            assert c["verified"]["effect"] == pytest.approx(_effect(q, c["state"], pi), abs=1e-4)
            assert c["verified"]["abs_error"] == pytest.approx(np.abs(served - got).mean(), abs=2e-6)
            served_e.append(c["effect"])
            network_e.append(c["verified"]["effect"])
            errors += list(np.abs(served - got))
        v = body["verification"]
        s, m = np.array(served_e), np.array(network_e)
        lin = 2 * np.mean((s - s.mean()) * (m - m.mean())) / (s.var() + m.var() + (s.mean() - m.mean()) ** 2)
        assert v["concepts"] == 12
        assert v["mae_p"] == pytest.approx(np.mean(errors), abs=2e-6)
        assert v["effect_mae"] == pytest.approx(np.abs(s - m).mean(), abs=2e-6)
        # recomputed from effects rounded to 6 decimals (error <= 5e-7 each): CCC moves by about
        # that error over the effects' spread, which is small for the tiny model's effects
        rounding = 1e-4 + 10 * 5e-7 / max(min(s.std(), m.std()), 1e-9)
        assert v["ccc"] == pytest.approx(lin, abs=rounding)
        assert v["recall3"] in _recall3_under_rounding(m)
        assert body["timings_ms"]["verify"] >= 0


def test_verify_some_concepts_and_nothing_else_changes(handler, model_dir, sample_pngs):
    _, plain = explain(handler, model_dir, sample_pngs[0], images=False)
    status, some = explain(handler, model_dir, sample_pngs[0], images=False, verify=3)
    assert status == 200 and some["verification"]["concepts"] == 3
    assert [("verified" in c) for c in some["concepts"]] == [True] * 3 + [False] * 5
    stripped = [{k: v for k, v in c.items() if k != "verified"} for c in some["concepts"]]
    assert stripped == plain["concepts"]
    assert "verification" not in plain and "verify" not in plain["timings_ms"]
    assert all("verified" not in c for c in plain["concepts"])
    _, off = explain(handler, model_dir, sample_pngs[0], images=False, verify=False)
    assert off["concepts"] == plain["concepts"] and "verification" not in off


@pytest.mark.parametrize("options, fragment", [
    ({"verify": 0}, "verify"),
    ({"verify": 13}, "verify"),  # more than the model's 12 concepts
    ({"verify": 9}, "top_concepts"),  # more than the answer's 8
    ({"verify": 4, "top_concepts": 2}, "top_concepts"),
    ({"verify": "yes"}, "verify"),
    ({"verify": 2.5}, "verify"),
    ({"verify": True, "views": ["features"]}, "concepts"),
])
def test_bad_verify_values_are_400(handler, model_dir, sample_pngs, options, fragment):
    status, body = explain(handler, model_dir, sample_pngs[0], images=False, **options)
    assert status == 400 and body["error"]["type"] == "InvalidOption" and fragment in body["error"]["message"]


def test_a_bad_verify_never_fails_its_neighbours(handler, model_dir, sample_pngs):
    data = base64.b64encode(sample_pngs[1]).decode()
    batch = [wire_request(json.dumps({"data": data, "verify": 99}), "application/json", explain=True, idx=0),
             wire_request(json.dumps({"data": data, "verify": True, "images": False}), "application/json",
                          explain=True, idx=1),
             wire_request(sample_pngs[1], idx=2)]
    ctx = make_context(model_dir)
    bodies = handler.handle(prepare_batch(ctx, batch), ctx)
    assert [ctx.get_response_status(i)[0] for i in range(3)] == [400, 200, 200]
    assert json.loads(bodies[1])["verification"]["concepts"] == 8


def _sampled_handler(model_dir, **settings):
    h = ConceptExplainerHandler()
    ctx = make_context(model_dir, settings)
    ctx.metrics = RecordingCache()
    h.initialize(ctx)
    return h, ctx


def test_sampled_verification_reports_every_concept_after_the_reply(model_dir, sample_pngs):
    h, ctx = _sampled_handler(model_dir, verify_fraction=1.0)
    try:
        offline = [u for u in ctx.metrics.updates if u[0] == M.VERIFY_OFFLINE_AGREEMENT]
        assert {u[2][2] for u in offline} == {"layer1", "layer2", "layer3", "all"}
        assert all(0 <= u[1] <= 1 and u[2][1] == "0.1" for u in offline)
        ctx.metrics.updates.clear()
        batch = [wire_request(sample_pngs[0], explain=True, idx=0), wire_request(sample_pngs[1], idx=1),
                 wire_request(sample_pngs[2], explain=True, idx=2)]
        h.handle(prepare_batch(ctx, batch), ctx)
        assert h.service.verifier.wait_idle(30)
        updates = ctx.metrics.updates
        jobs = [u for u in updates if u[0] == M.VERIFY_JOBS]
        assert sum(v for _, v, d in jobs if d[2] == "verified") == 2  # the explanations only (predictions: 0)
        errors = [u for u in updates if u[0] == M.VERIFY_PROBABILITY_ERROR]
        # 2 answers x 12 concepts x 3 states, once under their layer and once under "all"
        assert len(errors) == 2 * 12 * 3 * 2 and all(0 <= v <= 1 for _, v, _ in errors)
        agreement = [u for u in updates if u[0] == M.VERIFY_AGREEMENT]
        assert len(agreement) == 2 * 4 and all(v in (0, 1 / 3, 2 / 3, 1) for _, v, _ in agreement)
    finally:
        h.close()


def test_a_full_queue_drops_and_counts_without_delaying_requests(model_dir, sample_pngs, monkeypatch):
    """With the verifier's thread stuck and a queue of one, every further sampled answer is
    dropped and counted while requests are answered as fast as without verification."""
    h, ctx = _sampled_handler(model_dir, verify_fraction=1.0, verify_queue=1)
    gate = threading.Event()
    verifier = h.service.verifier
    real = verifier._verify
    monkeypatch.setattr(verifier, "_verify", lambda job: (gate.wait(60), real(job))[1])
    try:
        ctx.metrics.updates.clear()
        req = wire_request(sample_pngs[0], explain=True)
        durations = []
        for i in range(6):
            t0 = time.perf_counter()
            (body,) = h.handle(prepare_batch(ctx, [req]), ctx)
            durations.append(time.perf_counter() - t0)
            assert ctx.get_response_status(0)[0] == 200 and json.loads(body)["concepts"]
            deadline = time.monotonic() + 10
            while i == 0 and verifier._queue.qsize() and time.monotonic() < deadline:
                time.sleep(0.01)  # the thread has taken the first job and is stuck on the gate
        dropped = sum(v for n, v, d in ctx.metrics.updates if n == M.VERIFY_JOBS and d[2] == "dropped")
        assert dropped == 4  # one taken by the stuck thread, one waiting in the queue
        assert max(durations) < 30  # nobody waited for the gate (60 s)
        gate.set()
        assert verifier.wait_idle(30)
        verified = sum(v for n, v, d in ctx.metrics.updates if n == M.VERIFY_JOBS and d[2] == "verified")
        assert verified == 2
    finally:
        gate.set()
        h.close()


def test_a_failing_verification_is_counted_and_serving_goes_on(model_dir, sample_pngs, monkeypatch):
    h, ctx = _sampled_handler(model_dir, verify_fraction=1.0)
    monkeypatch.setattr(h.service.verifier, "_verify", lambda job: 1 / 0)
    try:
        ctx.metrics.updates.clear()
        for _ in range(2):
            (body,) = h.handle(prepare_batch(ctx, [wire_request(sample_pngs[0], explain=True)]), ctx)
            assert ctx.get_response_status(0)[0] == 200
        assert h.service.verifier.wait_idle(30)
        failed = sum(v for n, v, d in ctx.metrics.updates if n == M.VERIFY_JOBS and d[2] == "failed")
        assert failed == 2
    finally:
        h.close()
