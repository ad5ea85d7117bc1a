"""The compiled causal model against pgmpy's own answers on random layered networks."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from pgmpy.factors.discrete import TabularCPD
from pgmpy.inference import CausalInference, VariableElimination
from pgmpy.models import DiscreteBayesianNetwork

from handlers.runtime.causal import (
    TIMED_ABOVE_FLOPS,
    CompiledCausalModel,
    candidate_paths,
    compile_steps,
    elimination_path,
    fastest_steps,
    preferred_layouts,
    relaid,
    run_steps,
)


def random_layered_network(seed: int, layer_sizes=(3, 3, 3), max_states=4, max_indegree=2, y_states=3,
                           y_indegree=2) -> DiscreteBayesianNetwork:
    """Concepts in layers; edges only from one layer to the next and from the last to Y."""
    rng = np.random.default_rng(seed)
    layers = [[f"l{i}/c{j}" for j in range(n)] for i, n in enumerate(layer_sizes)]
    card = {n: int(rng.integers(2, max_states + 1)) for layer in layers for n in layer}
    card["Y"] = y_states
    parents: dict[str, list[str]] = {}
    for i, layer in enumerate(layers):
        for n in layer:
            k = int(rng.integers(0, min(max_indegree, len(layers[i - 1])) + 1)) if i else 0
            parents[n] = sorted(rng.choice(layers[i - 1], size=k, replace=False).tolist()) if k else []
    parents["Y"] = sorted(rng.choice(layers[-1], size=min(y_indegree, len(layers[-1])), replace=False).tolist())
    model = DiscreteBayesianNetwork()
    model.add_nodes_from(list(card))
    model.add_edges_from([(p, n) for n, ps in parents.items() for p in ps])
    for n, ps in parents.items():
        cols = int(np.prod([card[p] for p in ps])) if ps else 1
        values = rng.dirichlet(np.full(card[n], 0.7), size=cols).T
        model.add_cpds(TabularCPD(n, card[n], values, evidence=ps or None,
                                  evidence_card=[card[p] for p in ps] or None,
                                  state_names={v: list(range(card[v])) for v in [n, *ps]}))
    model.check_model()
    return model


def random_evidence(model, rng) -> dict[str, int]:
    return {n: int(rng.integers(model.get_cardinality(n))) for n in model.nodes() if n != "Y"}


def pgmpy_do_surgery(model, x, state, evidence_nd):
    mutilated = model.do([x])
    q = VariableElimination(mutilated).query(["Y"], evidence={x: state, **evidence_nd}, show_progress=False)
    return q.values


NETWORKS = [
    dict(seed=0),
    dict(seed=1, layer_sizes=(2, 4, 3), max_indegree=3),
    dict(seed=2, layer_sizes=(4, 2), max_states=3, y_states=5, y_indegree=2),
    dict(seed=3, layer_sizes=(3, 3, 3, 2), max_indegree=2, y_indegree=2),
    dict(seed=4, layer_sizes=(5,), y_indegree=3),
    dict(seed=5, layer_sizes=(3, 4, 4), max_states=3, max_indegree=3, y_indegree=3),
    # the demo's shape: the outcome has every last-layer concept as a parent, so an early
    # concept's query runs through one large factor (the contraction steps' batched products)
    dict(seed=6, layer_sizes=(4, 4, 5), max_states=3, max_indegree=3, y_states=4, y_indegree=5),
]


@pytest.fixture(params=["lookup", "contraction", "relaid"])
def compile_mode(request, monkeypatch):
    """Run a test with precomputed lookup tables, with per-request contractions reading the
    CPTs as they are, and with per-request contractions reading every CPT from a copy laid
    out for its batched product (on these small networks only with the threshold at 1)."""
    if request.param in ("contraction", "relaid"):
        monkeypatch.setattr(CompiledCausalModel, "MAX_LOOKUP_ENTRIES", 0)
    if request.param == "contraction":
        monkeypatch.setattr(CompiledCausalModel, "MAX_PREPARED_ENTRIES", 0)
    if request.param == "relaid":
        monkeypatch.setattr(CompiledCausalModel, "PREPARE_MIN_ENTRIES", 1)
    return request.param


@pytest.mark.parametrize("params", NETWORKS)
def test_matches_pgmpy_graph_surgery(params, compile_mode):
    model = random_layered_network(**params)
    compiled = CompiledCausalModel.from_pgmpy(model, outcome="Y")
    uses_lookup = all(p.lookup is not None for p in compiled.precompile()._plans.values())
    assert uses_lookup == (compile_mode == "lookup")
    relaid_tables = sum(a is not None for p in compiled._plans.values() for a in p.prepared)
    has_products = any(len(p.factors) > 1 for p in compiled._plans.values())  # not where Y is the only descendant
    assert (relaid_tables > 0) == (compile_mode == "relaid" and has_products)
    rng = np.random.default_rng(100 + params["seed"])
    for _ in range(3):
        e = random_evidence(model, rng)
        for x in compiled.concepts:
            nd = {n: s for n, s in e.items() if n != x and n not in compiled.descendants(x)}
            table = compiled.interventions(e, x)
            assert table.shape == (model.get_cardinality(x), model.get_cardinality("Y"))
            for s in range(model.get_cardinality(x)):
                np.testing.assert_allclose(table[s], pgmpy_do_surgery(model, x, s, nd), atol=1e-9, rtol=0)


@pytest.mark.parametrize("params", NETWORKS[:3])
def test_matches_pgmpy_causal_inference(params, compile_mode):
    """``CausalInference.query`` with an empty adjustment set: valid here by the back-door
    criterion because every parent of X is in the evidence. (pgmpy 1.1.2's default adjustment
    path drops evidence outside the adjustment set, CausalInference.py step 4.2, so it
    answers a different question whenever other concepts are observed.)"""
    model = random_layered_network(**params)
    compiled = CompiledCausalModel.from_pgmpy(model, outcome="Y")
    ci = CausalInference(model)
    e = random_evidence(model, np.random.default_rng(7))
    for x in compiled.concepts:
        nd = {n: s for n, s in e.items() if n != x and n not in compiled.descendants(x)}
        table = compiled.interventions(e, x)
        for s in range(model.get_cardinality(x)):
            assert set(model.get_parents(x)) <= set(nd)
            ref = ci.query(["Y"], do={x: s}, evidence=nd or None, adjustment_set=set(),
                           show_progress=False).values
            np.testing.assert_allclose(table[s], ref, atol=1e-9, rtol=0)


def test_effect_and_sensitivity_follow_their_definitions():
    model = random_layered_network(seed=11, layer_sizes=(3, 3))
    compiled = CompiledCausalModel.from_pgmpy(model)
    e = random_evidence(model, np.random.default_rng(3))
    for target in range(3):
        for rec in compiled.explain(e, target):
            x = rec.concept
            p = rec.probabilities
            parents = model.get_parents(x)
            cpd = model.get_cpds(x)
            pi = cpd.reduce([(q, e[q]) for q in parents], inplace=False).values if parents else cpd.values
            pi = pi / pi.sum()
            xo = e[x]
            assert rec.state == xo
            assert rec.effect == pytest.approx(p[xo] - float(pi @ p), abs=1e-12)
            assert rec.sensitivity == pytest.approx(float(pi @ np.abs(p - p[xo])), abs=1e-12)


def test_json_roundtrip_is_exact(tmp_path):
    model = random_layered_network(seed=6)
    compiled = CompiledCausalModel.from_pgmpy(model)
    compiled.save(tmp_path / "bn.json")
    again = CompiledCausalModel.from_file(tmp_path / "bn.json")
    for n, cpt in compiled.cpts.items():
        assert again.cpts[n].parents == cpt.parents and again.cpts[n].states == cpt.states
        assert np.array_equal(again.cpts[n].table, cpt.table)
    e = random_evidence(model, np.random.default_rng(0))
    for x in compiled.concepts:
        assert np.array_equal(again.interventions(e, x), compiled.interventions(e, x))


def test_concept_without_path_to_outcome_has_no_effect():
    model = random_layered_network(seed=8, layer_sizes=(3, 3), y_indegree=1)
    compiled = CompiledCausalModel.from_pgmpy(model)
    e = random_evidence(model, np.random.default_rng(1))
    for rec in compiled.explain(e, 0):
        if "Y" not in compiled.descendants(rec.concept):
            assert abs(rec.effect) < 1e-15 and abs(rec.sensitivity) < 1e-15


def test_bad_evidence_and_inputs():
    model = random_layered_network(seed=9)
    compiled = CompiledCausalModel.from_pgmpy(model)
    e = random_evidence(model, np.random.default_rng(2))
    x = compiled.concepts[-1]
    with pytest.raises(ValueError, match="unknown concept"):
        compiled.interventions(e, "nope")
    bad = dict(e)
    bad[compiled.concepts[0]] = 99
    parents_of_y = model.get_parents("Y")
    missing = {k: v for k, v in e.items() if k != parents_of_y[0]}
    with pytest.raises(ValueError, match="lacks"):
        compiled.explain(missing, 0)
    with pytest.raises(ValueError, match="not a state"):
        compiled.explain(bad, 0)
    with pytest.raises(ValueError, match="not a state"):
        compiled.explain(e, 7)
    assert compiled.interventions(e, x).sum(axis=1) == pytest.approx(np.ones(model.get_cardinality(x)))


def test_rejects_cycles_and_bad_tables():
    from handlers.runtime.causal import CPT
    a = CPT("a", (0, 1), ("b",), np.full((2, 2), 0.5))
    b = CPT("b", (0, 1), ("a",), np.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="cycle"):
        CompiledCausalModel([a, b], "b")
    with pytest.raises(ValueError, match="sum to one"):
        CompiledCausalModel([CPT("a", (0, 1), (), np.array([0.2, 0.2]))], "a")
    with pytest.raises(ValueError, match="shape"):
        CompiledCausalModel([CPT("a", (0, 1), (), np.array([0.5, 0.3, 0.2]))], "a")


def test_evidence_combinations_exhaustive_small_network(compile_mode):
    """Every evidence combination of a tiny network, against pgmpy."""
    model = random_layered_network(seed=12, layer_sizes=(2, 2), max_states=2, y_states=2, y_indegree=2)
    compiled = CompiledCausalModel.from_pgmpy(model)
    nodes = [n for n in compiled.concepts]
    for states in itertools.product(*[range(model.get_cardinality(n)) for n in nodes]):
        e = dict(zip(nodes, states))
        x = nodes[0]
        nd = {n: s for n, s in e.items() if n != x and n not in compiled.descendants(x)}
        for s in range(model.get_cardinality(x)):
            np.testing.assert_allclose(compiled.interventions(e, x)[s], pgmpy_do_surgery(model, x, s, nd), atol=1e-9)


def test_queries_are_compiled_on_first_use_with_the_same_answers():
    """A worker whose interventions the network answers never compiles the tables; a query
    compiles only its own concept, and gives what the precompiled model gives."""
    model = random_layered_network(**NETWORKS[0])
    lazy = CompiledCausalModel.from_pgmpy(model, outcome="Y")
    eager = CompiledCausalModel.from_pgmpy(model, outcome="Y").precompile()
    assert lazy._plans == {} and set(eager._plans) == set(eager.concepts)
    e = random_evidence(model, np.random.default_rng(7))
    x = lazy.concepts[0]
    np.testing.assert_array_equal(lazy.interventions(e, x), eager.interventions(e, x))
    assert set(lazy._plans) == {x}
    assert [r.probabilities.tolist() for r in lazy.explain(e, 0)] == [r.probabilities.tolist() for r in eager.explain(e, 0)]
    with pytest.raises(ValueError, match="unknown concept"):
        lazy.interventions(e, "Y")


def random_contraction(rng: np.random.Generator) -> tuple[str, list[np.ndarray]]:
    """A random einsum of 2-7 operands over up to 9 indices, no index repeated within an
    operand (as for the factors of a Bayesian network), 0-3 output indices."""
    letters = "abcdefghi"[: int(rng.integers(3, 10))]
    size = {c: int(rng.integers(1, 5)) for c in letters}
    terms = ["".join(rng.choice(list(letters), size=min(len(letters), int(rng.integers(1, 5))), replace=False))
             for _ in range(int(rng.integers(2, 8)))]
    used = sorted(set("".join(terms)))
    out = "".join(rng.choice(used, size=min(len(used), int(rng.integers(0, 4))), replace=False))
    ops = [rng.random([size[c] for c in t]) for t in terms]
    return ",".join(terms) + "->" + out, ops


@pytest.mark.parametrize("seed", range(40))
def test_compiled_steps_match_numpy_einsum(seed):
    """The steps (batched products for pairs, C einsum otherwise) give numpy's einsum result
    along either path, including indices summed within one operand and scalar outputs."""
    rng = np.random.default_rng(seed)
    sub, ops = random_contraction(rng)
    shapes = [o.shape for o in ops]
    expected = np.einsum(sub, *ops)
    greedy, _ = np.einsum_path(sub, *ops, optimize="greedy")
    runs = [(compile_steps(sub, shapes, path), ops) for path in (greedy, *candidate_paths(sub, shapes))]
    for path in candidate_paths(sub, shapes):  # operands laid out as the batched products want them
        laid = preferred_layouts(sub, shapes, path, min_entries=1)
        relaid_ops = relaid(ops, sub, laid)
        runs.append((compile_steps(laid, [o.shape for o in relaid_ops], path), relaid_ops))
    laid, steps = fastest_steps(sub, ops)
    runs.append((steps, relaid(ops, sub, laid)))
    for steps, operands in runs:
        got = run_steps(steps, operands)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def _flops(sub, shapes, path):
    _, info = np.einsum_path(sub, *[np.ones(s) for s in shapes], optimize=path)
    return float(info.split("Optimized FLOP count:")[1].split()[0])


def test_elimination_path_beats_greedy_on_a_hub():
    """A factor with many parents (the outcome's CPT) and a chain above each parent: summing
    the parents out one at a time takes fewer multiply-adds than numpy's greedy pairing, and
    the timed choice among the candidates (both are candidates) computes the same table."""
    # y | p1..p6;  p_i | q_i, q_(i+1);  q_i | x  -> the query's table (x, y): the demo's
    # layer3 -> Y hub with layer2 parents shared between layer3 concepts
    parents = "bcdefg"
    chains = "hijklm"
    terms = (["y" + parents] + [p + q + r for p, q, r in zip(parents, chains, chains[1:] + chains[:1])]
             + [q + "x" for q in chains])
    sub = ",".join(terms) + "->xy"
    shapes = [[4] * len(t) for t in terms]
    greedy, _ = np.einsum_path(sub, *[np.ones(s) for s in shapes], optimize="greedy")
    elim = elimination_path(sub, shapes)
    assert _flops(sub, shapes, elim) < _flops(sub, shapes, greedy)
    assert greedy in candidate_paths(sub, shapes) and elim in candidate_paths(sub, shapes)
    rng = np.random.default_rng(0)
    ops = [rng.random(s) for s in shapes]
    assert _flops(sub, shapes, greedy) > TIMED_ABOVE_FLOPS  # so the choice is timed
    laid, fastest = fastest_steps(sub, ops)
    for steps, operands in ((compile_steps(sub, shapes, elim), ops), (fastest, relaid(ops, sub, laid))):
        np.testing.assert_allclose(run_steps(steps, operands), np.einsum(sub, *ops), rtol=1e-12)


def test_preferred_layouts_put_large_operands_in_the_products_order():
    """A large input operand is relaid in the order its batched product reads it, so the
    product's permutation of it is the identity (it enters without a copy); small ones keep
    their order; only the order within terms changes."""
    sub = "qojp,jpa->aqo"  # (q o | j p) x (j p | a): q, o own; j, p summed
    shapes = [(10, 4, 4, 4), (4, 4, 4)]
    path = ["einsum_path", (0, 1)]
    laid = preferred_layouts(sub, shapes, path, min_entries=100)
    big, small = laid.split("->")[0].split(",")
    assert sorted(big) == sorted("qojp") and small == "jpa"
    step = compile_steps(laid, [(10, 4, 4, 4) if big[0] == "q" else tuple(4 if c != "q" else 10 for c in big), (4, 4, 4)], path)[0]
    assert step.matmul is not None
    perm = step.matmul.perm_a if step.members[0] == 0 else step.matmul.perm_b
    assert perm == tuple(range(4))
    assert preferred_layouts(sub, shapes, path, min_entries=10_000) == sub
