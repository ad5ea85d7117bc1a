"""The concepts view asking the network itself: which concepts, what it sends, what it serves."""
from __future__ import annotations

import numpy as np
import pytest

from handlers.runtime.causal import CPT, CompiledCausalModel
from handlers.runtime.concepts import ConceptLayer, ConceptSpec
from handlers.runtime.concept_view import ConceptBatch, ConceptExplainer, screening_score

S = 3
W = np.array([[1.0, -2.0], [0.5, 3.0], [-1.0, 1.0], [2.0, 0.0]])  # (4 concepts over both layers, 2 classes)


class _Input:
    name = "code"


class FakeInterventionGraph:
    """codes (M, 2, h, w) -> softmax(peaks @ W[layer's rows]); records every batch it gets."""

    def __init__(self, rows: slice) -> None:
        self.rows, self.calls = rows, []

    def get_inputs(self):
        return [_Input()]

    def run(self, _outputs, feeds):
        code = feeds["code"]
        self.calls.append(code.shape)
        logits = code.max(axis=(2, 3)) @ W[self.rows]
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return [(e / e.sum(axis=1, keepdims=True)).astype(np.float32)]


def _explainer() -> tuple[ConceptExplainer, ConceptBatch, dict[str, FakeInterventionGraph]]:
    rng = np.random.default_rng(0)
    layers = []
    for name, screen in (("a", [0.9, 0.0]), ("b", [0.0, 0.05])):
        typical = np.array([[0.0, 1.0, 2.0], [0.0, 0.5, 3.0]])
        layers.append(ConceptLayer(name, f"act_{name}", f"enc_{name}.onnx", f"dec_{name}.onnx",
                                   np.array([[0.5, 1.5], [0.25, 1.0]]), typical, (None, None), (None, None),
                                   None, f"iv_{name}.onnx", np.array(screen)))
    spec = ConceptSpec(S, tuple(layers), "net.json", "Y", {})
    cpts = [CPT(f"a/c{i}", (0, 1, 2), (), rng.dirichlet(np.ones(S))) for i in range(2)]
    cpts += [CPT(f"b/c{i}", (0, 1, 2), ("a/c0", "a/c1"), rng.dirichlet(np.ones(S), (S, S)).transpose(2, 0, 1))
             for i in range(2)]
    cpts.append(CPT("Y", (0, 1), ("b/c0", "b/c1"), rng.dirichlet(np.ones(2), (S, S)).transpose(2, 0, 1)))
    graphs = {"a": FakeInterventionGraph(slice(0, 2)), "b": FakeInterventionGraph(slice(2, 4))}
    explainer = ConceptExplainer(spec, CompiledCausalModel(cpts, "Y"), {}, graphs)
    codes = {"a": rng.uniform(0, 2, (2, 2, 4, 4)).astype(np.float32),
             "b": rng.uniform(0, 2, (2, 2, 2, 2)).astype(np.float32)}
    codes["b"][1, 1] = 0.0  # a silent channel: do() sets a flat map
    values = {k: v.max(axis=(2, 3)) for k, v in codes.items()}
    states = {k: (values[k][:, :, None] > l.edges[None]).sum(2) for k, l in zip("ab", layers)}
    return explainer, ConceptBatch(codes, values, states), graphs


def _by_hand(batch: ConceptBatch, explainer: ConceptExplainer, row: int, layer: str, c: int, target: int) -> np.ndarray:
    """P(target | do(c = x)) with the fake network, written out without set_code_peak."""
    out = []
    rows = slice(0, 2) if layer == "a" else slice(2, 4)
    for value in explainer.layers[layer].typical[c]:
        peaks = batch.codes[layer][row].max(axis=(1, 2)).astype(np.float64)
        peaks[c] = value  # rescaling a live channel, or a flat map of a silent one, both peak at value
        logits = peaks @ W[rows]
        out.append(np.exp(logits[target]) / np.exp(logits).sum())
    return np.array(out)


def _spliced_by_hand(batch: ConceptBatch, row: int, layer: str, target: int) -> float:
    """P(target) with the fake network on the unchanged code: the anchor of the layer."""
    rows = slice(0, 2) if layer == "a" else slice(2, 4)
    logits = batch.codes[layer][row].max(axis=(1, 2)).astype(np.float64) @ W[rows]
    return float(np.exp(logits[target]) / np.exp(logits).sum())


def test_without_intervention_graphs_the_bayesian_network_answers_alone():
    explainer, batch, _ = _explainer()
    explainer = ConceptExplainer(explainer.spec, explainer.network, {}, None)
    answer = explainer.answer(batch, 0, 1, network_concepts=8)
    assert {s.source for s in answer} == {"bayesian_network"}
    expected = {r.concept: r for r in explainer.network.explain(batch.evidence(0), 1)}
    for s in answer:
        np.testing.assert_array_equal(s.record.probabilities, expected[s.record.concept].probabilities)


@pytest.mark.parametrize("row", [0, 1])
def test_bayesian_network_answers_are_anchored_at_the_spliced_network(row):
    """network_concepts 0: each layer's graph runs once, on its unchanged code, and every
    answer is the tables' differences moved to that level (clipped to [0, 1])."""
    explainer, batch, graphs = _explainer()
    answer = explainer.answer(batch, row, 1, network_concepts=0)
    assert {s.source for s in answer} == {"bayesian_network"}
    assert [g.calls for g in graphs.values()] == [[(1, 2, 4, 4)], [(1, 2, 2, 2)]]
    tables = {r.concept: r for r in explainer.network.explain(batch.evidence(row), 1)}
    clipped = 0
    for s in answer:
        bn = tables[s.record.concept]
        level = _spliced_by_hand(batch, row, s.record.concept.split("/")[0], 1)
        raw = level + bn.probabilities - bn.probabilities[bn.state]
        np.testing.assert_allclose(s.record.probabilities, np.clip(raw, 0, 1), atol=1e-6)
        assert s.record.probabilities[s.record.state] == pytest.approx(level, abs=1e-6)
        np.testing.assert_array_equal(s.record.prior, bn.prior)
        if np.all((raw >= 0) & (raw <= 1)):
            assert s.record.effect == pytest.approx(bn.effect, abs=1e-6)
        else:
            clipped += 1
    assert clipped < len(answer)  # the effect-preserving case is exercised


@pytest.mark.parametrize("row", [0, 1])
def test_the_screened_concepts_are_answered_by_the_network(row):
    explainer, batch, graphs = _explainer()
    records = explainer.network.explain(batch.evidence(row), 0)
    scores = {r.concept: screening_score(r, explainer._screen[r.concept]) for r in records}
    chosen = sorted(scores, key=lambda c: (-scores[c], c))[:2]
    answer = explainer.answer(batch, row, 0, network_concepts=2)
    assert [s.source for s in answer] == ["network"] * 2 + ["bayesian_network"] * 2
    assert {s.record.concept for s in answer[:2]} == set(chosen)
    for part in (answer[:2], answer[2:]):
        assert [abs(s.record.effect) for s in part] == sorted((abs(s.record.effect) for s in part), reverse=True)
    tables = {r.concept: r for r in records}
    for s in answer[2:]:
        level = _spliced_by_hand(batch, row, s.record.concept.split("/")[0], 0)
        assert s.record.probabilities[s.record.state] == pytest.approx(level, abs=1e-6)
        bn = tables[s.record.concept]
        np.testing.assert_allclose(s.record.probabilities,
                                   np.clip(level + bn.probabilities - bn.probabilities[bn.state], 0, 1), atol=1e-6)
    for s in answer[:2]:
        layer, c = s.record.concept.split("/c")
        np.testing.assert_allclose(s.record.probabilities, _by_hand(batch, explainer, row, layer, int(c), 0),
                                   rtol=1e-6)
        bn = next(r for r in records if r.concept == s.record.concept)
        np.testing.assert_array_equal(s.record.prior, bn.prior)  # pi stays the Bayesian network's
        assert s.record.effect == pytest.approx(s.record.probabilities[s.record.state]
                                                - bn.prior @ s.record.probabilities)
    sent = [shape for g in graphs.values() for shape in g.calls]
    assert sum(shape[0] for shape in sent) == 2 * S + 2 and len(sent) == 2  # one run per layer, with its anchor


def test_every_concept_asked_when_network_concepts_exceeds_them():
    explainer, batch, graphs = _explainer()
    answer = explainer.answer(batch, 1, 1, network_concepts=99)
    assert [s.source for s in answer] == ["network"] * 4
    assert [g.calls for g in graphs.values()] == [[(1 + 2 * S, 2, 4, 4)], [(1 + 2 * S, 2, 2, 2)]]
    view = explainer.explain(batch, 1, 1, top=3, pixels=None, network_concepts=99)
    assert [c.id for c in view.concepts] == [s.record.concept for s in answer[:3]]
    assert all(c.source == "network" and c.heatmap_png is None for c in view.concepts)


def test_the_bench_reports_what_each_count_buys(tiny_full_bundle, tiny_data, capsys):
    """bench.network_answers: with every concept answered by the network at every state the
    ranking is the network's own (recall@3 = nDCG@5 = 1); the others are measured against it."""
    import re

    from bench.network_answers import main
    assert main(["--bundle", str(tiny_full_bundle), "--data", str(tiny_data), "--images", "4", "--repeats", "1",
                 "--counts", "0", "1000"]) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"(network_concepts=\d+|exact)\s+recall@3 mean ([0-9.]+)", out))
    assert set(rows) == {"network_concepts=0", "network_concepts=12", "exact"}
    assert float(rows["exact"]) == 1.0 and all(0.0 <= float(v) <= 1.0 for v in rows.values())
    assert out.splitlines()[-1].startswith("exact") and "nDCG@5 median 1.000" in out.splitlines()[-1]
    errors = dict(re.findall(r"(network_concepts=\d+|exact)\s+error of P\(target \| do\) ([0-9.]+)", out))
    assert set(errors) == set(rows) and float(errors["exact"]) == 0.0  # exact is the reference itself
    assert all(0.0 <= float(v) <= 1.0 for v in errors.values())


# --- answers from fewer network runs: probes and interpolation -----------------------------

def test_probe_states_are_the_farthest_from_the_peak_lower_state_first_on_ties():
    from handlers.runtime.concepts import probe_states
    typical = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [0.5, 1.0, 3.0]])
    peaks = np.array([1.0, 1.9, 0.0])
    assert probe_states(typical, peaks, 1).tolist() == [[0], [0], [2]]
    assert probe_states(typical, peaks, 2).tolist() == [[0, 2], [0, 1], [1, 2]]
    assert probe_states(typical, peaks, 3).tolist() == [[0, 1, 2]] * 3
    assert probe_states(typical, peaks, 7).shape == (3, 3)  # capped at S


@pytest.mark.parametrize("peak, probed, probed_p, expected", [
    # one probe: the line through (peak, anchor) and the probe, both ways beyond
    (1.0, [[0]], [[0.2]], [0.2, 0.5, 0.8]),
    # two probes around the peak: the middle state is read off the two segments
    (1.5, [[0, 2]], [[0.2, 0.9]], [0.2, 0.2 + 1.0 * 0.3 / 1.5, 0.9]),
    # a peak below every typical value (silent channel, peak 0): extrapolation above
    (0.0, [[2]], [[0.8]], [0.5 + 1.0 / 3.0 * 0.3, 0.5 + 2.0 / 3.0 * 0.3, 0.8]),
])
def test_interpolated_states_by_hand(peak, probed, probed_p, expected):
    from handlers.runtime.concepts import interpolate_states
    typical = np.array([[0.0, 1.0, 2.0]]) if peak != 0.0 else np.array([[1.0, 2.0, 3.0]])
    out = interpolate_states(typical, np.array([peak]), 0.5, np.array(probed), np.array(probed_p))
    np.testing.assert_allclose(out[0], expected, rtol=0, atol=1e-12)


def test_interpolation_extends_the_outer_segment_below_the_points():
    from handlers.runtime.concepts import interpolate_states
    # points (0.5, 0.4) [anchor] and (3, 0.9) [probe of state 2]; state 0 at x = 0 lies below both
    out = interpolate_states(np.array([[0.0, 1.0, 3.0]]), np.array([0.5]), 0.4, np.array([[2]]), np.array([[0.9]]))
    slope = 0.5 / 2.5
    np.testing.assert_allclose(out[0], [0.4 - 0.5 * slope, 0.4 + 0.5 * slope, 0.9], atol=1e-12)


def test_the_rows_sent_equal_one_set_code_peak_per_probe():
    from handlers.runtime.concept_view import intervened_codes
    from handlers.runtime.concepts import set_code_peak
    explainer, batch, _ = _explainer()
    for layer, row in (("a", 0), ("b", 1)):  # b row 1 has a silent channel
        code = batch.codes[layer][row:row + 1]
        typical = explainer.layers[layer].typical
        probed = np.array([[0, 2], [1, 2]])
        expected = np.concatenate([code] + [set_code_peak(code, c, float(typical[c, x])) for c in range(2) for x in probed[c]])
        np.testing.assert_array_equal(intervened_codes(code, [0, 1], typical, probed), expected)


def _with_probes(explainer: ConceptExplainer, probes: int) -> ConceptExplainer:
    import dataclasses
    spec = dataclasses.replace(explainer.spec, layers=tuple(dataclasses.replace(l, probes=probes)
                                                            for l in explainer.spec.layers))
    return ConceptExplainer(spec, explainer.network, explainer.sessions, explainer.interventions)


@pytest.mark.parametrize("row", [0, 1])
def test_one_probe_per_concept_answers_every_concept_from_fewer_rows(row):
    """probes 1: the network runs 1 + K rows per layer (not 1 + K S); the probed state's
    probability is the network's, the others lie on the line through it and the anchor."""
    explainer, batch, graphs = _explainer()
    answer = _with_probes(explainer, 1).answer(batch, row, 1, network_concepts=None)
    assert [s.source for s in answer] == ["network_interpolated"] * 4
    assert [g.calls for g in graphs.values()] == [[(3, 2, 4, 4)], [(3, 2, 2, 2)]]
    priors = {r.concept: r.prior for r in explainer.network.explain(batch.evidence(row), 1)}
    for s in answer:
        layer, c = s.record.concept.split("/c")
        c = int(c)
        exact = _by_hand(batch, explainer, row, layer, c, 1)
        typical = explainer.layers[layer].typical[c]
        peak = float(batch.codes[layer][row, c].max())
        far = int(np.argmax(np.abs(typical - peak)))
        anchor = _spliced_by_hand(batch, row, layer, 1)
        line = anchor + (exact[far] - anchor) * (typical - peak) / (typical[far] - peak)
        line[far] = exact[far]
        np.testing.assert_allclose(s.record.probabilities, line, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(s.record.prior, priors[s.record.concept])
        assert s.record.effect == pytest.approx(line[s.record.state] - priors[s.record.concept] @ line, abs=1e-6)


def test_probes_at_every_state_are_the_exact_network_answer():
    explainer, batch, _ = _explainer()
    exact = explainer.answer(batch, 0, 1, network_concepts=None)
    probed = _with_probes(explainer, S).answer(batch, 0, 1, network_concepts=None)
    assert [s.source for s in probed] == ["network"] * 4
    for a, b in zip(exact, probed):
        np.testing.assert_array_equal(a.record.probabilities, b.record.probabilities)


def test_probes_round_trip_and_out_of_range_probes_are_refused(tmp_path):
    import dataclasses

    from handlers.runtime.errors import ArtifactError
    explainer, _, graphs = _explainer()
    spec = _with_probes(explainer, 2).spec
    spec.save(tmp_path / "concepts.json")
    assert [l.probes for l in ConceptSpec.from_file(tmp_path / "concepts.json").layers] == [2, 2]
    legacy = dataclasses.replace(spec, layers=tuple(dataclasses.replace(l, probes=None) for l in spec.layers))
    legacy.save(tmp_path / "legacy.json")
    assert "probes" not in (tmp_path / "legacy.json").read_text()
    with pytest.raises(ArtifactError, match="probes 4"):
        _with_probes(explainer, S + 1)
    with pytest.raises(ArtifactError, match="probes 0"):
        ConceptExplainer(dataclasses.replace(spec, layers=(dataclasses.replace(spec.layers[0], probes=0), spec.layers[1])),
                         explainer.network, {}, graphs)


def _interventions(p: np.ndarray, anchor: np.ndarray, peaks: np.ndarray, observed: np.ndarray):
    """A one-layer :class:`export.concepts.Interventions` holding what choose_probes reads:
    p (N, K, S), anchor (N,), peaks and observed states (N, K)."""
    from export.concepts import Interventions
    n = p.shape[0]
    return Interventions(("a",), [{}], [{}], [np.zeros(p.shape[1:][::-1] + (n,), np.int64)], [p.transpose(1, 2, 0)],
                         {"a": observed}, np.zeros(n, np.int64), anchor[None], {"a": peaks})


def test_choose_probes_takes_one_probe_where_the_network_is_linear_along_the_peak():
    from export.concepts import choose_probes
    rng = np.random.default_rng(1)
    n, typical = 40, np.array([[0.0, 1.0, 2.0], [0.0, 0.5, 3.0]])
    peaks = rng.uniform(0, 3, (n, 2))
    observed = (peaks[:, :, None] > np.array([[0.5, 1.5], [0.25, 1.0]])[None]).sum(2)
    anchor = rng.uniform(0.2, 0.8, n)
    slope = np.array([0.1, -0.05])
    p = anchor[:, None, None] + slope[None, :, None] * (typical[None] - peaks[:, :, None])
    pi = rng.dirichlet(np.ones(3), (n, 2))
    chosen, report = choose_probes(_interventions(p, anchor, peaks, observed), pi, observed, {"a": typical})
    assert chosen == {"a": 1}
    assert report["layers"]["a"]["tried"]["1"]["effect_mae"] == pytest.approx(0.0, abs=1e-12)
    floor = np.abs(anchor[:, None] - np.take_along_axis(p, observed[..., None], -1)[..., 0]).mean()
    assert report["layers"]["a"]["noise_floor"] == pytest.approx(floor, abs=1e-6)


def test_choose_probes_needs_more_where_the_network_bends():
    """Peaks sit exactly at their state's typical value (noise floor 0) and P is quadratic in
    the peak: one probe leaves an error, two probes and the anchor pin all three states."""
    from export.concepts import choose_probes
    rng = np.random.default_rng(2)
    n, typical = 30, np.array([[0.0, 1.0, 2.0]])
    observed = rng.integers(0, 3, (n, 1))
    peaks = typical[0, observed]
    anchor = rng.uniform(0.3, 0.6, n)
    p = anchor[:, None, None] + 0.2 * (typical[None] - peaks[:, :, None]) ** 2
    pi = rng.dirichlet(np.ones(3), (n, 1))
    chosen, report = choose_probes(_interventions(p, anchor, peaks, observed), pi, observed, {"a": typical})
    assert chosen == {"a": 2}
    tried = report["layers"]["a"]["tried"]
    assert tried["1"]["effect_mae"] > 0.01 and tried["2"]["effect_mae"] == pytest.approx(0.0, abs=1e-12)
    assert report["layers"]["a"]["noise_floor"] == 0.0


def test_the_tables_answer_only_when_the_network_answers_fewer_than_every_concept():
    """What the worker compiles at load follows this: a count at or above the number of
    concepts is the same as "all"."""
    explainer, _, _ = _explainer()
    assert explainer.num_concepts == 4
    assert [explainer.tables_answer(n) for n in (None, 4, 100)] == [False, False, False]
    assert [explainer.tables_answer(n) for n in (0, 3)] == [True, True]
    no_graphs = ConceptExplainer(explainer.spec, explainer.network, explainer.sessions, None)
    assert no_graphs.tables_answer(None) and no_graphs.tables_answer(100)


def test_the_graph_thread_changes_no_number_and_close_runs_in_line():
    """Some layers' graphs run on the explainer's helper thread; after close() every graph
    runs here. Both give the very same answers."""
    import threading
    import time
    explainer, batch, _ = _explainer()
    shipped, where = explainer.network_probabilities, []

    def slowed(*args, **kwargs):  # long enough for the helper to join before this thread is done
        where.append(threading.current_thread().name)
        time.sleep(0.05)
        return shipped(*args, **kwargs)
    explainer.network_probabilities = slowed
    before = set(threading.enumerate())  # other tests' explainers may hold graph threads of their own
    threaded = [explainer.answer(batch, row, 1, None) for row in range(2)]
    own = [t for t in set(threading.enumerate()) - before if t.name.startswith("concept-graphs")]
    assert own and any(name.startswith("concept-graphs") for name in where)
    assert explainer.answer(batch, 0, 1, None, share=False) is not None
    assert all(name == threading.current_thread().name for name in where[-len(explainer.spec.layers):])
    explainer.close()
    explainer.close()  # idempotent
    in_line = [explainer.answer(batch, row, 1, None) for row in range(2)]
    for a_list, b_list in zip(threaded, in_line):
        assert [(a.record.concept, a.source, a.record.effect) for a in a_list] == \
            [(b.record.concept, b.source, b.record.effect) for b in b_list]
        for a, b in zip(a_list, b_list):
            np.testing.assert_array_equal(a.record.probabilities, b.record.probabilities)
    assert not any(t.is_alive() for t in own) and explainer.helper is None


def test_costliest_first_orders_by_cost_then_name():
    from handlers.runtime.concept_view import costliest_first
    assert costliest_first({"layer1": 1.5, "layer2": 1.9, "layer3": 0.65}) == ["layer2", "layer1", "layer3"]
    assert costliest_first({"b": 1.0, "a": 1.0}) == ["a", "b"]  # ties by name
    assert costliest_first({}) == []


def _busy_helper(name: str):
    """A helper whose thread is held by a first job until the returned event is set."""
    import threading

    from handlers.runtime.helper import HelperThread
    helper, started, release = HelperThread(name), threading.Event(), threading.Event()
    blocker = helper.submit(lambda: (started.set(), release.wait(10))[1])
    assert blocker is not None and started.wait(10)
    return helper, release, blocker


def test_run_shared_leaves_every_task_to_the_caller_while_the_helper_is_busy():
    """The helper is held by an earlier job (as by ClaDec): the caller runs every task itself,
    in order, and returns without waiting for the helper; the helper's share is cancelled."""
    import threading

    from handlers.runtime.helper import run_shared
    helper, release, blocker = _busy_helper("busy")
    ran: list[tuple[int, str]] = []
    run_shared([lambda i=i: ran.append((i, threading.current_thread().name)) for i in range(3)], helper)
    assert ran == [(i, threading.current_thread().name) for i in range(3)]
    release.set()
    assert blocker.result(timeout=10)
    helper.close()


def test_urgent_jobs_run_before_the_waiting_ones():
    from handlers.runtime.helper import HelperThread
    helper, release, _ = _busy_helper("order")
    order: list[str] = []
    later = [helper.submit(order.append, "normal 1"), helper.submit(order.append, "urgent", urgent=True),
             helper.submit(order.append, "normal 2")]
    release.set()
    for f in later:
        assert f is not None and f.result(timeout=10) is None
    assert order == ["urgent", "normal 1", "normal 2"]
    helper.close()
    assert helper.submit(order.append, "after close") is None
    fresh = HelperThread("unused")
    assert fresh.submit(len, "") is not None
    fresh.close()


def test_close_runs_the_waiting_jobs_first():
    helper, release, _ = _busy_helper("closing")
    waiting = [helper.submit(lambda i=i: i * i) for i in range(4)]
    release.set()
    helper.close()
    assert [f.result(timeout=0) for f in waiting if f is not None] == [0, 1, 4, 9]


def test_run_shared_hands_tasks_to_a_free_helper_and_waits_for_them():
    """A free helper takes tasks from the same queue: each task runs exactly once, some on the
    helper, and run_shared returns only after the helper's task is done."""
    import threading
    import time

    from handlers.runtime.helper import HelperThread, run_shared
    helper = HelperThread("free")
    seen: list[str] = []
    lock = threading.Lock()

    def task() -> None:
        time.sleep(0.02)
        with lock:
            seen.append(threading.current_thread().name)
    run_shared([task] * 6, helper)
    assert len(seen) == 6
    assert any(name.startswith("free") for name in seen) and threading.current_thread().name in seen
    helper.close()
    run_shared([task] * 2, helper)  # closed: in line
    assert seen[-2:] == [threading.current_thread().name] * 2


def test_run_shared_raises_the_helpers_error_after_the_callers_task():
    """The caller's first task is slow and succeeds; the helper takes the second, which fails:
    the error comes out of run_shared once the caller's task is done, and the third task
    never starts."""
    import threading
    import time

    from handlers.runtime.helper import HelperThread, run_shared
    helper = HelperThread("errors")
    done: list[str] = []
    here = threading.current_thread().name

    def slow() -> None:
        time.sleep(0.2)
        done.append(threading.current_thread().name)

    def boom() -> None:
        raise ValueError("graph failed")
    with pytest.raises(ValueError, match="graph failed"):
        run_shared([slow, boom, slow], helper)
    assert done == [here]
    with pytest.raises(ValueError, match="graph failed"):  # the caller's own error
        run_shared([boom, boom], helper)
    helper.close()


def test_the_graph_split_follows_measured_costs():
    """Each graph run is timed into its layer's milliseconds per row; the layers are then taken
    costliest measured first, whatever their row counts."""
    explainer, batch, _ = _explainer()
    explainer.answer(batch, 0, 1, None)
    assert set(explainer._ms_per_row) == {l.layer for l in explainer.spec.layers}
    assert all(v > 0 for v in explainer._ms_per_row.values())
    layers = [l.layer for l in explainer.spec.layers]
    explainer._ms_per_row.update({layers[0]: 100.0, layers[1]: 0.001})
    assert explainer._cost(layers[0], 1) > explainer._cost(layers[1], 4)
    explainer.close()


def test_a_bundle_without_atlas_answers_atlas_requests_without_one():
    """Bundles built before the atlas (or with --atlas-images 0) have none: "atlas": true then adds nothing."""
    explainer, batch, _ = _explainer()
    assert explainer.atlas is None and all(l.atlas is None for l in explainer.spec.layers)
    part = explainer.explain(batch, 0, 1, None, None, atlas=True)
    assert part.concepts and all(c.atlas is None and "atlas" not in c.wire() for c in part.concepts)
    explainer.close()


def test_answers_run_in_line_when_the_graph_thread_cannot_take_work():
    """At interpreter shutdown a background verification may still ask: the pool refuses new
    work, and the answer runs every graph in line instead of failing."""
    explainer, batch, _ = _explainer()
    want = explainer.answer(batch, 0, 1, None)
    assert explainer.helper is not None and explainer.helper._pool is not None  # started by the first answer
    explainer.helper._pool.shutdown(wait=True)  # refuses new futures, as at interpreter shutdown
    got = explainer.answer(batch, 0, 1, None)
    assert [(r.record.concept, r.record.effect) for r in got] == [(r.record.concept, r.record.effect) for r in want]
    explainer.close()


def test_use_helper_closes_only_the_explainers_own_thread():
    """The service hands every view one shared helper; swapping it out again (None: in line)
    must not close it under the other views."""
    from handlers.runtime.helper import HelperThread
    explainer, batch, _ = _explainer()
    own = explainer.helper
    shared = HelperThread("shared")
    explainer.use_helper(shared)
    assert own is not None and own.closed and not shared.closed
    explainer.use_helper(None)
    assert not shared.closed and explainer.helper is None
    want = explainer.answer(batch, 0, 1, None)  # in line
    explainer.use_helper(shared)
    got = explainer.answer(batch, 0, 1, None)
    assert [(r.record.concept, r.record.effect) for r in got] == [(r.record.concept, r.record.effect) for r in want]
    shared.close()
