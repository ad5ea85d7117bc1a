"""Compiled causal queries over a discrete Bayesian network (numpy only; no pgmpy at serve time).

For an input, every concept is observed. For a concept ``X`` and each of its states ``x``
the model answers ``P(Y | do(X = x), e_ND(X))`` where ``e_ND(X)`` is the evidence on the
non-descendants of ``X``. With every non-descendant observed, the truncated factorisation
gives (docs/methods.md, method 1)::

    P(Y | do(x), e_ND) = sum over De(X) of  prod_{d in De(X) + {Y}} P(d | pa(d))

Compilation happens once at load. For each concept the factors, their einsum subscripts
and a contraction path are fixed. Where the answer depends on few observed variables (the
non-descendant parents of ``De(X) + {Y}``), the contraction is run once for every
combination of their states and stored as a lookup table
``T[obs_1, ..., obs_k, x, y]``, so a request costs one indexing operation; otherwise the
tables are sliced at the observed states per request and contracted with the fixed path,
keeping ``X``'s state as a free axis, so one contraction gives the whole
``(states of X, states of Y)`` table.

The path is the fastest of numpy's greedy one and :func:`elimination_path` (variable
elimination) on the factors' shapes (:func:`fastest_steps`); :func:`compile_steps` fixes it
as explicit steps, pairs as batched matrix products (:class:`_Matmul`), so a request does
no planning.
"""
from __future__ import annotations

import json
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handlers.runtime.bundle import checked_document, read_document

FORMAT = "causal-bn/1"


@dataclass(frozen=True)
class CPT:
    """``P(node | parents)`` as an array of shape ``(card(node), card(parent_1), ...)``."""

    node: str
    states: tuple[Any, ...]
    parents: tuple[str, ...]
    table: np.ndarray

    @property
    def card(self) -> int:
        return len(self.states)


def _index_sizes(terms: Sequence[str], shapes: Sequence[Sequence[int]]) -> dict[str, int]:
    """Each einsum index letter of ``terms`` -> its size, from the operands' ``shapes``."""
    return {c: int(n) for term, shape in zip(terms, shapes) for c, n in zip(term, shape)}


def _flops(subscripts: str, shapes: Sequence[Sequence[int]], path: list[Any]) -> float:
    """numpy's FLOP count of ``path`` (an ``np.einsum_path`` path) for operands of ``shapes``."""
    _, info = np.einsum_path(subscripts, *[np.empty(s) for s in shapes], optimize=path)
    return float(info.split("Optimized FLOP count:")[1].split()[0])


def elimination_path(subscripts: str, shapes: Sequence[Sequence[int]], order: str = "weight") -> list[Any]:
    """An ``np.einsum`` contraction path that sums the indices out one at a time, as variable
    elimination does. The next index is, for ``order="weight"``, the one whose operands
    together span the fewest entries (min-weight order), for ``order="size"`` the one that
    leaves the smallest factor once summed out; ties by letter. Its operands are multiplied
    pairwise, smallest first, and the index is summed out with the last of them. For a
    Bayesian network's factors this often takes far fewer multiply-adds than numpy's greedy
    pairwise path, which can keep a large factor's free axes alive."""
    inputs, output = subscripts.split("->")
    ops = [set(t) for t in inputs.split(",")]
    size = _index_sizes(inputs.split(","), shapes)

    def entries(idx: set[str]) -> int:
        return int(np.prod([size[d] for d in idx]))

    def step(members: tuple[int, ...]) -> None:
        rest = [o for i, o in enumerate(ops) if i not in members]
        joined = set().union(*(ops[i] for i in members)) & set(output).union(*rest)
        path.append(members)
        ops[:] = rest + [joined]

    path: list[Any] = ["einsum_path"]
    while summed := sorted(set().union(*ops) - set(output)):
        def weight(c: str) -> tuple[int, ...]:
            span = set().union(*(o for o in ops if c in o))
            return (entries(span),) if order == "weight" else (entries(span - {c}), entries(span))

        c = min(summed, key=weight)
        while True:
            members = sorted((i for i, o in enumerate(ops) if c in o), key=lambda i: entries(ops[i]))
            if len(members) == 1:
                step((members[0],))
                break
            step((members[0], members[1]))
            if not any(c in o for o in ops):
                break
    if len(ops) > 1 or len(path) == 1:
        step(tuple(range(len(ops))))
    return path


@dataclass(frozen=True)
class _Matmul:
    """``out = a ⊗ b`` as one batched matrix product: indices only one operand has and the
    output lacks are summed first; then ``a`` is laid out (batch, a's own, summed), ``b``
    (batch, summed, b's own), multiplied with ``np.matmul`` and put in the output's order.
    The same route numpy's optimised einsum takes for a pair, with its planning done once."""

    sum_a: tuple[int, ...]
    sum_b: tuple[int, ...]
    layout_a: str  # the order of a's indices (after its own sums) that makes perm_a the identity
    layout_b: str
    perm_a: tuple[int, ...]
    perm_b: tuple[int, ...]
    shape_a: tuple[int, int, int]
    shape_b: tuple[int, int, int]
    shape_ab: tuple[int, ...]
    perm_out: tuple[int, ...]

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if self.sum_a:
            a = a.sum(axis=self.sum_a)
        if self.sum_b:
            b = b.sum(axis=self.sum_b)
        ab = np.matmul(a.transpose(self.perm_a).reshape(self.shape_a), b.transpose(self.perm_b).reshape(self.shape_b))
        return ab.reshape(self.shape_ab).transpose(self.perm_out)

    @classmethod
    def plan(cls, a: str, b: str, out: str, size: Mapping[str, int]) -> _Matmul:
        sum_a = tuple(i for i, c in enumerate(a) if c not in b and c not in out)
        sum_b = tuple(i for i, c in enumerate(b) if c not in a and c not in out)
        a = "".join(c for i, c in enumerate(a) if i not in sum_a)
        b = "".join(c for i, c in enumerate(b) if i not in sum_b)
        batch = [c for c in out if c in a and c in b]
        summed = [c for c in a if c in b and c not in out]
        own_a, own_b = [c for c in a if c not in b], [c for c in b if c not in a]

        def n(cs: Sequence[str]) -> int:
            return int(np.prod([size[c] for c in cs]))

        order = batch + own_a + own_b
        return cls(sum_a, sum_b, "".join(batch + own_a + summed), "".join(batch + summed + own_b),
                   tuple(a.index(c) for c in batch + own_a + summed),
                   tuple(b.index(c) for c in batch + summed + own_b), (n(batch), n(own_a), n(summed)),
                   (n(batch), n(summed), n(own_b)), tuple(size[c] for c in order),
                   tuple(order.index(c) for c in out))


@dataclass(frozen=True)
class Step:
    """One step of a compiled contraction: the operand positions it takes, its explicit
    subscripts and, for two operands, a batched matrix product fixed at compile time
    (:class:`_Matmul`); other steps run in numpy's C einsum."""

    members: tuple[int, ...]
    subscripts: str
    matmul: _Matmul | None = None

    def __call__(self, *operands: np.ndarray) -> np.ndarray:
        if self.matmul is None:
            return np.einsum(self.subscripts, *operands)
        return self.matmul(*operands)


def candidate_paths(subscripts: str, shapes: Sequence[Sequence[int]]) -> list[list[Any]]:
    """Distinct contraction paths worth trying: numpy's greedy one and
    :func:`elimination_path` in both orders."""
    greedy, _ = np.einsum_path(subscripts, *[np.empty(s) for s in shapes], optimize="greedy")
    out: list[list[Any]] = []
    for path in (greedy, elimination_path(subscripts, shapes), elimination_path(subscripts, shapes, "size")):
        if path not in out:
            out.append(path)
    return out


#: Below this many multiply-adds (numpy's count) a contraction takes the path with the fewest;
#: above it the candidates are timed. Counts mislead for large factors: a path with five times
#: the multiply-adds ran faster on the demo's largest query (745 vs 933 us), its pairs being
#: plain matrix products and its intermediates smaller.
TIMED_ABOVE_FLOPS = 1e5


def preferred_layouts(subscripts: str, shapes: Sequence[Sequence[int]], path: Sequence[Any],
                      min_entries: int = 4096) -> str:
    """``subscripts`` with the indices of each input operand of at least ``min_entries``
    entries reordered as the batched product that takes it wants them (:class:`_Matmul`), so
    that, given in that layout and contiguous, the operand enters the product without a
    copy. Only the order within terms changes; ``path`` stays valid."""
    inputs, output = subscripts.split("->")
    terms = inputs.split(",")
    new = list(terms)
    origin: list[int | None] = list(range(len(terms)))  # input operand behind each position
    for step in compile_steps(subscripts, shapes, path):
        if step.matmul is not None:
            mm = step.matmul
            for pos, layout, summed in ((step.members[0], mm.layout_a, mm.sum_a), (step.members[1], mm.layout_b, mm.sum_b)):
                i = origin[pos]
                if i is not None and not summed and int(np.prod(shapes[i])) >= min_entries:
                    new[i] = layout
        origin = [o for k, o in enumerate(origin) if k not in step.members] + [None]
    return ",".join(new) + "->" + output


def relaid(operands: Sequence[np.ndarray], subscripts: str, layouts: str) -> list[np.ndarray]:
    """``operands`` of ``subscripts`` transposed to the term orders of ``layouts`` (contiguous
    copies where an order changed)."""
    old, new = subscripts.split("->")[0].split(","), layouts.split("->")[0].split(",")
    return [op if a == b else np.ascontiguousarray(op.transpose([a.index(c) for c in b]))
            for op, a, b in zip(operands, old, new)]


def fastest_steps(subscripts: str, operands: Sequence[np.ndarray], repeats: int = 3,
                  min_entries: int | None = 4096) -> tuple[str, tuple[Step, ...]]:
    """The fastest of :func:`candidate_paths` on ``operands``, each with its operands in
    :func:`preferred_layouts`: returns (its subscripts, the order of each input's indices
    the steps expect; its compiled steps). The path with the fewest multiply-adds when that
    is under ``TIMED_ABOVE_FLOPS``, else the one whose best of ``repeats`` runs is quickest
    (planning by measurement, as FFTW and cuDNN do). Every candidate computes the same
    contraction; only the summation order, so the last bits, can differ. Operands of at least
    ``min_entries`` entries are relaid; None keeps every operand's order (``subscripts`` is
    returned unchanged)."""
    shapes = [o.shape for o in operands]
    counted = sorted((_flops(subscripts, shapes, path), k, path)
                     for k, path in enumerate(candidate_paths(subscripts, shapes)))
    candidates = [path for _, _, path in counted]
    laid = [subscripts if min_entries is None else preferred_layouts(subscripts, shapes, path, min_entries)
            for path in candidates]
    ops = [relaid(operands, subscripts, sub) for sub in laid]
    compiled = [(sub, compile_steps(sub, [o.shape for o in op], path)) for sub, op, path in zip(laid, ops, candidates)]
    if len(compiled) == 1 or counted[0][0] < TIMED_ABOVE_FLOPS:
        return compiled[0]

    def best_time(k: int) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run_steps(compiled[k][1], ops[k])
            times.append(time.perf_counter() - t0)
        return min(times)

    return compiled[min(range(len(compiled)), key=best_time)]


def _step(members: tuple[int, ...], terms: Sequence[str], out: str, size: Mapping[str, int]) -> Step:
    sub = ",".join(terms) + "->" + out
    if len(terms) != 2 or any(len(set(t)) != len(t) for t in terms) or len(set(out)) != len(out):
        return Step(members, sub)
    return Step(members, sub, _Matmul.plan(terms[0], terms[1], out, size))


def compile_steps(subscripts: str, shapes: Sequence[Sequence[int]], path: Sequence[Any]) -> tuple[Step, ...]:
    """A contraction path turned into explicit steps, run by :func:`run_steps` without numpy
    re-planning the contraction on every call. As in numpy's paths, each step removes its
    operands from the list and appends its result; a step keeps the indices that a later
    operand or the output still needs, and the last step writes the output's order."""
    inputs, output = subscripts.split("->")
    terms = inputs.split(",")
    size = _index_sizes(terms, shapes)
    moves = [tuple(m) for m in path if not isinstance(m, str)]
    steps = []
    for k, members in enumerate(moves):
        rest = [t for i, t in enumerate(terms) if i not in members]
        if k == len(moves) - 1:
            out = output
        else:
            out = "".join(sorted(set("".join(terms[i] for i in members)) & set(output + "".join(rest))))
        steps.append(_step(members, [terms[i] for i in members], out, size))
        terms = rest + [out]
    if len(terms) != 1:
        raise ValueError(f"the path leaves {len(terms)} operands")
    return tuple(steps)


def run_steps(steps: Sequence[Step], operands: Sequence[np.ndarray]) -> np.ndarray:
    """Run :func:`compile_steps`' steps on ``operands``; returns the contraction's result."""
    ops = list(operands)
    for step in steps:
        result = step(*(ops[i] for i in step.members))
        ops = [o for i, o in enumerate(ops) if i not in step.members]
        ops.append(result)
    return ops[0]


@dataclass(frozen=True)
class _Plan:
    """Precompiled contraction for one intervened concept."""

    concept: str
    outcome_is_descendant: bool
    # per factor: node name and, per parent axis, either ("obs", parent) or ("keep", parent)
    factors: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]
    subscripts: str
    steps: tuple[Step, ...]
    # per factor: None (the CPT is sliced as it is) or the CPT with its observed parents' axes
    # first and the rest in the order the steps want, contiguous: sliced, it is one block
    prepared: tuple[np.ndarray | None, ...] = ()
    lookup_vars: tuple[str, ...] = ()
    lookup: np.ndarray | None = None  # (card(obs_1), ..., card(obs_k), states of X, states of Y)


class CompiledCausalModel:
    """Interventional queries ``P(outcome | do(X = x), evidence on non-descendants of X)``.

    Build with :meth:`from_pgmpy` (export time) or :meth:`from_file` (serve time).
    Evidence maps every concept (every node except the outcome) to its observed state
    (a state name as in the network; for this project's networks, ints ``0..S-1``).
    """

    #: Largest precomputed lookup table per concept, in float64 entries (2 MB); larger ones
    #: cost more load time than they save (``python -m bench.causal_speed``).
    MAX_LOOKUP_ENTRIES = 250_000
    #: Most floating-point operations spent on tabulating one concept in a single einsum;
    #: costlier tables are filled one observed combination at a time (at most
    #: ``MAX_LOOKUP_COMBINATIONS``) or not at all (the plan is contracted per request). The
    #: trade between load-time tables and per-request contraction is measured by
    #: ``python -m bench.causal_speed``; the figures are in docs/benchmarks.md and docs/validity.md.
    MAX_TABULATION_FLOPS = 2e8
    MAX_LOOKUP_COMBINATIONS = 256
    #: Budget, in float64 entries over all concepts (32 MB), for CPTs of at least
    #: ``PREPARE_MIN_ENTRIES`` entries stored a second time in the layout a query's batched
    #: products read without copying (:func:`preferred_layouts`). On the demo six copies of
    #: the outcome's table (31 MB) took the full table of 24 concepts from 2.65 to 1.98 ms in
    #: process. Queries compiled once it is spent read the CPTs as they are.
    MAX_PREPARED_ENTRIES = 4_000_000
    PREPARE_MIN_ENTRIES = 4096

    def __init__(self, cpts: Sequence[CPT], outcome: str) -> None:
        self.cpts: dict[str, CPT] = {c.node: c for c in cpts}
        if outcome not in self.cpts:
            raise ValueError(f"outcome {outcome!r} is not a node of the network")
        self.outcome = outcome
        for c in cpts:
            expected = (c.card, *(self.cpts[p].card for p in c.parents))
            if tuple(c.table.shape) != expected:
                raise ValueError(f"CPT of {c.node} has shape {c.table.shape}, expected {expected}")
            if not np.allclose(c.table.sum(axis=0), 1.0, atol=1e-6):
                raise ValueError(f"CPT of {c.node} does not sum to one over the node's states")
        self.children: dict[str, list[str]] = {n: [] for n in self.cpts}
        for c in cpts:
            for p in c.parents:
                self.children[p].append(c.node)
        self.order = self._topological_order()
        self.concepts: tuple[str, ...] = tuple(n for n in self.order if n != outcome)
        self._state_index = {n: {s: i for i, s in enumerate(c.states)} for n, c in self.cpts.items()}
        # compiled on first use (:meth:`_plan`), or all at once by :meth:`precompile`: a worker
        # whose interventions the network itself answers never needs them
        self._plans: dict[str, _Plan] = {}

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_pgmpy(cls, model: Any, outcome: str = "Y") -> CompiledCausalModel:
        """From a fitted ``pgmpy`` ``DiscreteBayesianNetwork`` (CPDs attached)."""
        cpts = []
        for node in model.nodes():
            cpd = model.get_cpds(node)
            if cpd is None:
                raise ValueError(f"node {node!r} has no CPD")
            variables = list(cpd.variables)
            card = [int(c) for c in cpd.cardinality]
            values = np.asarray(cpd.get_values(), dtype=np.float64).reshape(card)
            states = tuple(cpd.state_names[node]) if cpd.state_names else tuple(range(card[0]))
            cpts.append(CPT(str(node), states, tuple(str(v) for v in variables[1:]), values))
        return cls(cpts, outcome)

    def to_json(self) -> dict[str, Any]:
        """Portable form: graph, state names and CPTs (2-D, parents' states in C order)."""
        return {"format": FORMAT, "outcome": self.outcome, "nodes": [
            {"name": n, "states": list(self.cpts[n].states), "parents": list(self.cpts[n].parents),
             "cpd": self.cpts[n].table.reshape(self.cpts[n].card, -1).tolist()} for n in self.order]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CompiledCausalModel:
        data = checked_document(data, FORMAT, "the causal network")
        cards = {n["name"]: len(n["states"]) for n in data["nodes"]}
        cpts = [CPT(n["name"], tuple(n["states"]), tuple(n["parents"]),
                    np.asarray(n["cpd"], dtype=np.float64).reshape([cards[n["name"]], *(cards[p] for p in n["parents"])]))
                for n in data["nodes"]]
        return cls(cpts, data["outcome"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()) + "\n")

    @classmethod
    def from_file(cls, path: str | Path) -> CompiledCausalModel:
        return cls.from_json(read_document(path, FORMAT))

    def _topological_order(self) -> list[str]:
        indeg = {n: len(c.parents) for n, c in self.cpts.items()}
        ready = sorted(n for n, d in indeg.items() if d == 0)
        order: list[str] = []
        while ready:
            n = ready.pop(0)
            order.append(n)
            for ch in sorted(self.children[n]):
                indeg[ch] -= 1
                if indeg[ch] == 0:
                    ready.append(ch)
        if len(order) != len(self.cpts):
            raise ValueError("the network has a cycle")
        return order

    def descendants(self, node: str) -> set[str]:
        out: set[str] = set()
        stack = list(self.children[node])
        while stack:
            n = stack.pop()
            if n not in out:
                out.add(n)
                stack.extend(self.children[n])
        return out

    def _compile(self, x: str) -> _Plan:
        de = self.descendants(x)
        if self.outcome not in de:
            spec = tuple(("obs", p) for p in self.cpts[self.outcome].parents)
            return _Plan(x, False, ((self.outcome, spec),), "", ())
        members = [n for n in self.order if n in de]
        letters = {n: chr(ord("a") + i) if i < 26 else chr(ord("A") + i - 26) for i, n in enumerate([x, *members])}
        if len(letters) > 52:
            raise ValueError(f"concept {x} has {len(members)} descendants; at most 51 are supported")
        factors: list[tuple[str, tuple[tuple[str, str], ...]]] = []
        terms: list[str] = []
        for n in members:
            axes: list[tuple[str, str]] = []
            sub = letters[n]
            for p in self.cpts[n].parents:
                if p == x or p in de:
                    axes.append(("keep", p))
                    sub += letters[p]
                else:
                    axes.append(("obs", p))
            factors.append((n, tuple(axes)))
            terms.append(sub)
        subscripts = ",".join(terms) + "->" + letters[x] + letters[self.outcome]
        # the factors as a request slices them (any observed state: the shapes are the same)
        sample = [self._sliced(n, spec, {p: 0 for kind, p in spec if kind == "obs"}) for n, spec in factors]
        relaid_above = self.PREPARE_MIN_ENTRIES if self.prepared_entries() < self.MAX_PREPARED_ENTRIES else None
        laid, steps = fastest_steps(subscripts, sample, min_entries=relaid_above)
        prepared: list[np.ndarray | None] = []
        for (n, spec), term, want in zip(factors, terms, laid.split("->")[0].split(",")):
            if term == want:
                prepared.append(None)
                continue
            obs_axes = [1 + k for k, (kind, _) in enumerate(spec) if kind == "obs"]
            kept = [0] + [1 + k for k, (kind, _) in enumerate(spec) if kind == "keep"]  # the term's order
            prepared.append(np.ascontiguousarray(self.cpts[n].table.transpose(obs_axes + [kept[term.index(c)] for c in want])))
        return _Plan(x, True, tuple(factors), laid, steps, tuple(prepared))

    def prepared_entries(self) -> int:
        """Float64 entries held by the compiled queries' relaid CPT copies (``MAX_PREPARED_ENTRIES``)."""
        return sum(t.size for plan in self._plans.values() for t in plan.prepared if t is not None)

    def _with_lookup(self, plan: _Plan) -> _Plan:
        """Precompute the plan's answers for every combination of its observed variables when
        the table has at most ``MAX_LOOKUP_ENTRIES`` entries: by transposing the outcome's CPT
        when it is the only factor, else by one contraction that keeps the observed variables
        as free axes (:meth:`_contract_all`)."""
        x, y = plan.concept, self.outcome
        obs = sorted({p for _, spec in plan.factors for kind, p in spec if kind == "obs"})
        cards = [self.cpts[p].card for p in obs]
        combos = int(np.prod(cards))
        sx, sy = self.cpts[x].card, self.cpts[y].card
        if combos * sx * sy > self.MAX_LOOKUP_ENTRIES:
            return plan
        if len(plan.factors) == 1:
            node, spec = plan.factors[0]  # the outcome; its parents are observed or X itself
            axes = [p for _, p in spec]
            moved = np.moveaxis(self.cpts[node].table, 0, -1)  # (parents..., y)
            if x in axes:
                table = np.transpose(moved, [axes.index(p) for p in obs] + [axes.index(x), len(axes)])
            else:
                table = np.transpose(moved, [axes.index(p) for p in obs] + [len(axes)])
                table = np.broadcast_to(table[..., None, :], table.shape[:-1] + (sx, sy))
        else:
            at_once = self._contract_all(plan, obs)
            if at_once is not None:
                table = at_once
            elif combos <= self.MAX_LOOKUP_COMBINATIONS:
                table = np.empty((*cards, sx, sy))
                for combo in np.ndindex(*cards):
                    table[combo] = self._contract(plan, dict(zip(obs, combo, strict=True)))
            else:
                return plan
        # a lookup answers every request: the relaid CPT copies the contraction read are dropped
        return _Plan(**{**plan.__dict__, "lookup_vars": tuple(obs), "lookup": np.ascontiguousarray(table),
                        "prepared": (None,) * len(plan.factors)})

    def _contract_all(self, plan: _Plan, obs: Sequence[str]) -> np.ndarray | None:
        """The plan's answers for every combination of the observed variables ``obs`` at once:
        (card(obs_1), ..., card(obs_k), states of X, states of Y), by one einsum whose
        observed axes stay free instead of being sliced; None when that contraction would
        cost more than ``MAX_TABULATION_FLOPS`` (free axes can blow up the intermediates)."""
        names = [plan.concept, *obs, *(n for n, _ in plan.factors)]
        names = list(dict.fromkeys(names))
        if len(names) > 52:
            raise ValueError(f"too many variables to tabulate concept {plan.concept}")
        letter = {n: chr(ord("a") + i) if i < 26 else chr(ord("A") + i - 26) for i, n in enumerate(names)}
        terms, ops = [], []
        for node, spec in plan.factors:
            terms.append(letter[node] + "".join(letter[p] for _, p in spec))
            ops.append(self.cpts[node].table)
        out = "".join(letter[p] for p in obs) + letter[plan.concept] + letter[self.outcome]
        subscripts = ",".join(terms) + "->" + out
        path, info = np.einsum_path(subscripts, *ops, optimize="greedy")
        flops = float(info.split("Optimized FLOP count:")[1].split()[0])
        if flops > self.MAX_TABULATION_FLOPS:
            return None
        return np.einsum(subscripts, *ops, optimize=path)

    def _sliced(self, node: str, spec: tuple[tuple[str, str], ...], index: Mapping[str, int]) -> np.ndarray:
        """``node``'s CPT with its observed parents fixed at state indices ``index``; kept
        parents stay as axes."""
        return self.cpts[node].table[(slice(None),) + tuple(
            slice(None) if kind == "keep" else index[p] for kind, p in spec)]

    def _contract(self, plan: _Plan, index: Mapping[str, int]) -> np.ndarray:
        """The plan's (states of X, states of Y) table for observed state indices ``index``."""
        if not plan.outcome_is_descendant:
            node, spec = plan.factors[0]
            row = self._sliced(node, spec, index)
            return np.broadcast_to(row, (self.cpts[plan.concept].card, row.shape[0])).copy()
        return run_steps(plan.steps, [
            self._sliced(n, spec, index) if table is None else table[tuple(index[p] for kind, p in spec if kind == "obs")]
            for (n, spec), table in zip(plan.factors, plan.prepared)])

    def _plan(self, concept: str) -> _Plan:
        """The compiled query of ``concept`` (compiled and kept on first use).

        Raises:
            ValueError: not a concept of the network."""
        plan = self._plans.get(concept)
        if plan is None:
            if concept not in self.cpts or concept == self.outcome:
                raise ValueError(f"unknown concept {concept!r}")
            plan = self._plans[concept] = self._with_lookup(self._compile(concept))
        return plan

    def precompile(self) -> CompiledCausalModel:
        """Compile every concept's query now (lookup tables included) rather than on its first
        request; for workers whose answers come from the tables. Returns self."""
        for x in self.concepts:
            self._plan(x)
        return self

    # -- queries ---------------------------------------------------------------------------

    def _index(self, evidence: Mapping[str, Hashable], node: str) -> int:
        try:
            return self._state_index[node][evidence[node]]
        except KeyError:
            if node not in evidence:
                raise ValueError(f"evidence lacks concept {node!r}") from None
            raise ValueError(f"{evidence[node]!r} is not a state of {node!r}: {list(self.cpts[node].states)}") from None

    def _at_parents(self, node: str, evidence: Mapping[str, Hashable]) -> np.ndarray:
        """``P(node | its parents as observed in evidence)``, shape (states of node,)."""
        parents = self.cpts[node].parents
        return self._sliced(node, tuple(("obs", p) for p in parents),
                            {p: self._index(evidence, p) for p in parents})

    def interventions(self, evidence: Mapping[str, Hashable], concept: str) -> np.ndarray:
        """``P(outcome | do(concept = x), e_ND)`` for every state x.

        Returns float64 array (states of concept, states of outcome); each row sums to one.
        """
        plan = self._plan(concept)
        if plan.lookup is not None:
            return plan.lookup[tuple(self._index(evidence, p) for p in plan.lookup_vars)]
        needed = {p for _, spec in plan.factors for kind, p in spec if kind == "obs"}
        return self._contract(plan, {p: self._index(evidence, p) for p in needed})

    def prior(self, evidence: Mapping[str, Hashable], concept: str) -> np.ndarray:
        """``pi(x) = P(concept = x | its parents as observed)``, shape (states of concept,)."""
        return self._at_parents(concept, evidence)

    def weights(self, evidence: Mapping[str, Hashable]) -> list[tuple[str, int, np.ndarray]]:
        """Per concept in topological order: (id, observed state index, ``pi`` (S,)); what
        :meth:`explain` gives without the tables' interventions, for answers whose
        ``P(target | do(x))`` come from elsewhere."""
        return [(x, self._index(evidence, x), self.prior(evidence, x)) for x in self.concepts]

    def outcome_posterior(self, evidence: Mapping[str, Hashable]) -> np.ndarray:
        """``P(outcome | all concepts observed)`` = the outcome's CPT at its parents' states."""
        return self._at_parents(self.outcome, evidence)

    def explain(self, evidence: Mapping[str, Hashable], target: Hashable) -> list[CausalRecord]:
        """Per concept: observed state, ``pi`` and ``P(Y = target | do(X = x), e_ND)`` for
        every state (docs/methods.md). Records are in topological order; sort them as the
        caller needs."""
        t = self._index({self.outcome: target}, self.outcome)
        return [CausalRecord(x, self._index(evidence, x), self.prior(evidence, x),
                             self.interventions(evidence, x)[:, t]) for x in self.concepts]


@dataclass(frozen=True)
class CausalRecord:
    """One concept's causal answer for one image.

    ``prior`` (S,): ``pi(x) = P(X = x | parents as observed)``; ``probabilities`` (S,):
    ``p[x] = P(target | do(X = x))``; ``state``: the observed state ``x_o``."""

    concept: str
    state: int
    prior: np.ndarray
    probabilities: np.ndarray

    @property
    def effect(self) -> float:
        """``p[x_o] - sum_x pi(x) p[x]``."""
        p = self.probabilities
        return float(p[self.state] - self.prior @ p)

    @property
    def sensitivity(self) -> float:
        """``sum_x pi(x) |p[x] - p[x_o]|``."""
        p = self.probabilities
        return float(self.prior @ np.abs(p - p[self.state]))

    def answered_by(self, probabilities: np.ndarray) -> CausalRecord:
        """The same concept with other ``P(target | do(x))`` (S,), e.g. the network's own."""
        return CausalRecord(self.concept, self.state, self.prior, np.asarray(probabilities, dtype=np.float64))

    def anchored_at(self, level: float) -> CausalRecord:
        """The same differences between states, moved so that ``p[x_o] = level``:
        ``p'[x] = clip(level + p[x] - p[x_o], 0, 1)``. Used to put the Bayesian network's answer
        at the network's own ``P(target)``; the effect and sensitivity are unchanged unless a
        value is clipped."""
        p = self.probabilities
        return self.answered_by(np.clip(level + p - p[self.state], 0.0, 1.0))
