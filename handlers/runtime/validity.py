"""The bundle's validity figures, served with every explanation so a client knows how far
to trust it. Read once at load from the reports the offline steps wrote into the bundle."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from handlers.runtime.answer import ConceptValidity, EffectTruth, FeaturesValidity, Validity


def _number(v: Any) -> float | None:
    """A report figure as a float; None where the report has none."""
    return None if v is None else float(v)


def concept_validity(report: Mapping[str, Any]) -> ConceptValidity:
    """Short form of a concepts report: held-out agreement (worst layer), fidelity, causal
    validity (pooled, mean per image, per layer), the share of served interventions read at
    a parent configuration no fitting row had, and the checks that failed."""
    cv = report.get("causal_validity", {})
    agreement = report.get("agreement", {})
    checks = report.get("checks", [])
    return ConceptValidity(
        agreement_min=min(agreement.values()) if agreement else None,
        fidelity=_number(report.get("fidelity")),
        causal_spearman=_number(cv.get("spearman")),
        causal_spearman_per_image=_number(cv.get("spearman_per_image_mean")),
        causal_spearman_per_layer={k: _number(v) for k, v in cv.get("spearman_per_layer", {}).items()},
        unseen_configurations=_number(cv.get("interventions_on_unseen_configurations")),
        effect_truth=effect_truth(report["effect_truth"]) if "effect_truth" in report else None,
        failed_checks=[c["name"] for c in checks if not c.get("passed", False)],
        checked=bool(checks),
    )


def effect_truth(report: Mapping[str, Any]) -> EffectTruth:
    """Short form of the concepts report's ``effect_truth`` block."""
    a = report["answer"]
    return EffectTruth(mae_p=_number(a["mae_p"]), effect_mae=float(a["mae"]), skill=_number(a["skill"]),
                       ccc=_number(a["ccc"]), ccc_per_layer={l: _number(m["ccc"]) for l, m in report["per_layer"].items()},
                       ndcg5=_number(a["ndcg5"]), recall3=_number(a["recall3"]),
                       below_resolution=list(report["below_resolution"]), network_concepts=int(report["network_concepts"]))


def bundle_validity(concepts: Mapping[str, Any] | None, features: Mapping[str, Any] | None) -> Validity:
    """The ``validity`` block of an explanation.

    concepts / features: the reports stored in concepts.json / features.json (None where the
    view is absent). ``passed`` is true only when the concept checks ran and all passed.
    """
    c = concept_validity(concepts) if concepts is not None else None
    f = None
    if features is not None:
        agree = features.get("decomposed_agreement_held_out", features.get("agreement_decomposed_vs_full"))
        f = FeaturesValidity(decomposed_agreement=_number(agree))
    return Validity(concepts=c, features=f, passed=c is not None and c.checked and not c.failed_checks)
