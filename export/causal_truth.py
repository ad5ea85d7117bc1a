"""Method 1's validity in effect units: the served causal answers against the network's own.

For held-out images, the serving code (:class:`handlers.runtime.concept_view.ConceptExplainer`
over the bundle's ONNX graphs) answers every concept; the network's answer to the same
interventions comes from torch (:func:`export.concepts.run_interventions`). Both sides use
the served weights ``pi`` and observed states. The metrics are those of
:mod:`handlers.runtime.faithfulness`, pooled, per layer and per image, beside two baselines
an answer must beat: each concept's mean measured effect served to every image, and the
served answers with concept labels shuffled within each layer.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from handlers.runtime.concept_view import ConceptBatch, ConceptExplainer
from handlers.runtime.faithfulness import Truth, beats, columns_by_group, derangement, effects, truth

#: Targets of the effect-unit checks (pooled unless named per layer).
TRUTH_TARGETS = {"mae_p": 0.05, "skill": 0.5, "ccc": 0.8, "ccc_per_layer": 0.7, "ndcg5": 0.9, "recall3": 0.8}


@dataclass(frozen=True)
class EffectTable:
    """Causal answers of n images over C concepts (``ids``) with S states each.

    ``p`` (n, C, S): P(target | do(c = x)); ``pi`` (n, C, S) and ``observed`` (n, C): the
    weights and observed states the answer used; ``order`` (n, C): position of each concept
    in the answer (0 first); ``network`` (n, C): answered by the network itself."""

    ids: tuple[str, ...]
    layers: tuple[str, ...]
    p: np.ndarray
    pi: np.ndarray
    observed: np.ndarray
    order: np.ndarray
    network: np.ndarray

    @property
    def effect(self) -> np.ndarray:
        """(n, C) served effects."""
        return effects(self.p, self.pi, self.observed)

    @property
    def rank_score(self) -> np.ndarray:
        """(n, C): larger for concepts earlier in the answer (for the ranking metrics)."""
        return (self.order.shape[1] - self.order).astype(np.float64)


def served_table(explainer: ConceptExplainer, batch: ConceptBatch, targets: Sequence[int] | np.ndarray,
                 network_concepts: int | None) -> EffectTable:
    """What the serving code answers for each row of ``batch`` (targets: one class per row)."""
    ids = tuple(cid for l in explainer.spec.layers for cid in l.ids())
    layer_of = tuple(l.layer for l in explainer.spec.layers for _ in l.ids())
    col = {cid: j for j, cid in enumerate(ids)}
    n, c, s = len(targets), len(ids), explainer.spec.states
    p, pi = np.zeros((n, c, s)), np.zeros((n, c, s))
    observed, order = np.zeros((n, c), np.int64), np.zeros((n, c), np.int64)
    network = np.zeros((n, c), bool)
    for i, t in enumerate(targets):
        for pos, sourced in enumerate(explainer.answer(batch, i, int(t), network_concepts)):
            j = col[sourced.record.concept]
            p[i, j], pi[i, j] = sourced.record.probabilities, sourced.record.prior
            observed[i, j], order[i, j] = sourced.record.state, pos
            network[i, j] = sourced.source != "bayesian_network"
    return EffectTable(ids, layer_of, p, pi, observed, order, network)


def _shuffled(table: EffectTable, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Served probabilities, effects and ranking scores with concept labels permuted within
    each layer (a random derangement per layer)."""
    rng = np.random.default_rng(seed)
    perm = np.arange(len(table.ids))
    for cols in columns_by_group(table.layers).values():
        perm[cols] = cols[derangement(len(cols), rng)]
    return table.p[:, perm], table.effect[:, perm], table.rank_score[:, perm]


def _metrics(served_effect: np.ndarray, measured_effect: np.ndarray, floor: np.ndarray,
             served_p: np.ndarray | None, measured_p: np.ndarray, order: np.ndarray | None) -> Truth:
    return truth(served_effect, measured_effect, floor, served_p, measured_p if served_p is not None else None,
                 order=order)


def noise_floor(null_p: np.ndarray, measured_p: np.ndarray, observed: np.ndarray,
                layers: Sequence[str]) -> dict[str, float]:
    """Per layer: mean |P(target) with the layer's autoencoder spliced in and no change -
    P(target | do(c = typical value of its observed state))| over images and the layer's
    concepts. Moving a concept within its own state is a change the discrete answer cannot
    express, so effects below this size are under the method's resolution.

    null_p: (n, L) spliced, unchanged P(target) per concept layer (in ``columns_by_group``
    order); measured_p (n, C, S); observed (n, C)."""
    at_obs = np.take_along_axis(measured_p, observed[..., None], axis=-1)[..., 0]
    out = {}
    for li, (layer, cols) in enumerate(columns_by_group(layers).items()):
        out[layer] = float(np.abs(null_p[:, li:li + 1] - at_obs[:, cols]).mean())
    return out


def effect_truth(served: EffectTable, measured_p: np.ndarray, null_p: np.ndarray,
                 bayesian: EffectTable | None = None, shuffles: int = 5, seed: int = 0) -> dict[str, Any]:
    """The effect-unit report of ``served`` against the network's ``measured_p`` (n, C, S).

    ``null_p`` (n, L): see :func:`noise_floor`. ``bayesian``: the Bayesian network's own
    answers (every concept), reported beside as a diagnostic. Returns the pooled, per-layer
    and baseline metrics, which baselines the answer beats, and the layers below resolution.
    """
    layers = served.layers
    groups = columns_by_group(layers)
    floor_by_layer = noise_floor(null_p, measured_p, served.observed, layers)
    floor = np.array([floor_by_layer[l] for l in layers])
    measured = effects(measured_p, served.pi, served.observed)
    s_eff = served.effect

    def metrics(eff: np.ndarray, p: np.ndarray | None, order: np.ndarray | None, cols: np.ndarray | None = None) -> Truth:
        if cols is None:
            return _metrics(eff, measured, floor, p, measured_p, order)
        return _metrics(eff[:, cols], measured[:, cols], floor[cols], None if p is None else p[:, cols],
                        measured_p[:, cols], None if order is None else order[:, cols])

    answer = metrics(s_eff, served.p, served.rank_score)
    per_layer = {l: metrics(s_eff, served.p, served.rank_score, cols) for l, cols in groups.items()}
    # baseline: each concept's mean over the images, served to every image
    mean_eff = np.broadcast_to(measured.mean(axis=0, keepdims=True), measured.shape)
    mean_p = np.broadcast_to(measured_p.mean(axis=0, keepdims=True), measured_p.shape)
    baseline_mean = metrics(mean_eff, mean_p, None)
    runs = [_shuffled(served, seed + k) for k in range(shuffles)]
    shuffled_runs = [metrics(e, p, o) for p, e, o in runs]
    baseline_shuffled = _average(shuffled_runs)
    below = [l for l, cols in groups.items() if float(np.abs(measured[:, cols]).mean()) <= floor_by_layer[l]]
    out: dict[str, Any] = {
        "images": int(measured.shape[0]), "concepts": int(measured.shape[1]),
        "answer": answer.to_json(),
        "per_layer": {l: {**t.to_json(), "noise_floor": round(floor_by_layer[l], 6),
                          "effect_mass": round(float(np.abs(measured[:, groups[l]]).sum()), 6)}
                      for l, t in per_layer.items()},
        "network_answered_share": round(float(served.network.mean()), 6),
        "baselines": {"mean_effect": baseline_mean.to_json(), "shuffled_concepts": baseline_shuffled.to_json()},
        "beats": {"mean_effect": beats(answer, baseline_mean), "shuffled_concepts": beats(answer, baseline_shuffled)},
        "below_resolution": below,
    }
    if bayesian is not None:
        out["bayesian_network_alone"] = metrics(bayesian.effect, bayesian.p, bayesian.rank_score).to_json()
    return out


def _average(runs: Sequence[Truth]) -> Truth:
    """Field-wise mean of several runs (fields None in every run stay None)."""
    fields = runs[0].__dict__.keys()
    values: dict[str, Any] = {}
    for f in fields:
        kept = [getattr(r, f) for r in runs if getattr(r, f) is not None]
        values[f] = float(np.mean(kept)) if kept else None
    return Truth(**values)


def truth_checks(report: dict[str, Any]) -> list[tuple[str, float | None, str, bool]]:
    """(name, measured, target, passed) of the effect-unit checks of :func:`effect_truth`'s
    report: pooled targets, CCC per layer above resolution, and beating both baselines on
    every metric."""
    a, t = report["answer"], TRUTH_TARGETS
    out: list[tuple[str, float | None, str, bool]] = []

    def at_least(name: str, v: float | None, target: float) -> None:
        out.append((name, v, f">= {target}", v is not None and v >= target))

    mae_p = a["mae_p"]
    out.append(("effect truth mae of P(target | do)", mae_p, f"<= {t['mae_p']}", mae_p is not None and mae_p <= t["mae_p"]))
    at_least("effect truth skill over no effect", a["skill"], t["skill"])
    at_least("effect truth ccc", a["ccc"], t["ccc"])
    for layer, m in report["per_layer"].items():
        if layer not in report["below_resolution"]:
            at_least(f"effect truth ccc {layer}", m["ccc"], t["ccc_per_layer"])
    at_least("effect truth ndcg@5 median", a["ndcg5"], t["ndcg5"])
    at_least("effect truth recall@3 mean", a["recall3"], t["recall3"])
    for name, won in report["beats"].items():
        lost = [k for k, ok in won.items() if not ok]
        out.append((f"effect truth beats baseline {name}", len(lost), "== 0 metrics lost", not lost))
    return out


_ROWS = (("mae_p", "mean abs. error of P(target | do)"), ("mae", "mean abs. error of the effect"),
         ("skill", "effect skill over 'no effect'"), ("ccc", "Lin's CCC of the effect"),
         ("ndcg5", "per image nDCG@5, median"), ("recall3", "per image recall@3, mean"),
         ("sign", "sign agreement, |effect|-weighted"), ("spearman_resolved", "Spearman above the noise floor"),
         ("spearman", "Spearman pooled (diagnostic)"), ("spearman_per_image", "Spearman per image (diagnostic)"))


def format_truth(report: dict[str, Any]) -> str:
    """The effect-unit report as a table: the served answer beside the Bayesian network alone
    and the two baselines, then the per-layer figures."""
    cols = [("served", report["answer"]), ("BN alone", report.get("bayesian_network_alone")),
            ("mean effect", report["baselines"]["mean_effect"]),
            ("shuffled", report["baselines"]["shuffled_concepts"])]
    cols = [(n, c) for n, c in cols if c is not None]

    def cell(v: Any) -> str:
        return "" if v is None else f"{v:.3f}"
    lines = [f"effect truth on {report['images']} held-out images, {report['concepts']} concepts "
             f"(network answers {report['network_concepts']} per image)",
             f"{'':<36}" + "".join(f"{n:>12}" for n, _ in cols)]
    for key, label in _ROWS:
        lines.append(f"{label:<36}" + "".join(f"{cell(c.get(key)):>12}" for _, c in cols))
    lines.append(f"{'layer':<12}{'noise floor':>12}{'mean |m|':>10}{'mae_p':>8}{'skill':>8}{'ccc':>8}")
    for layer, m in report["per_layer"].items():
        flag = "  below resolution" if layer in report["below_resolution"] else ""
        lines.append(f"{layer:<12}{m['noise_floor']:>12.4f}{m['measured_mean_abs']:>10.4f}{cell(m['mae_p']):>8}"
                     f"{cell(m['skill']):>8}{cell(m['ccc']):>8}{flag}")
    return "\n".join(lines)
