"""The bundle's validity figures, served with every explanation so a client knows how far
to trust it. Read once at load from the reports the offline steps wrote into the bundle."""
from __future__ import annotations

from typing import Any, Mapping


def _round(v: Any, digits: int = 4) -> Any:
    return round(float(v), digits) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def concept_validity(report: Mapping[str, Any]) -> dict[str, Any]:
    """Short form of a concepts report: held-out agreement (worst layer), fidelity, causal
    validity (pooled, mean per image, per layer), the share of served interventions read at
    a parent configuration no fitting row had, and the checks that failed."""
    cv = report.get("causal_validity", {})
    agreement = report.get("agreement", {})
    checks = report.get("checks", [])
    out: dict[str, Any] = {
        "agreement_min": _round(min(agreement.values())) if agreement else None,
        "fidelity": _round(report.get("fidelity")),
        "causal_spearman": _round(cv.get("spearman")),
        "causal_spearman_per_image": _round(cv.get("spearman_per_image_mean")),
        "causal_spearman_per_layer": {k: _round(v) for k, v in cv.get("spearman_per_layer", {}).items()},
    }
    if "interventions_on_unseen_configurations" in cv:
        out["unseen_configurations"] = _round(cv["interventions_on_unseen_configurations"])
    out["failed_checks"] = [c["name"] for c in checks if not c.get("passed", False)]
    out["checked"] = bool(checks)
    return out


def bundle_validity(concepts: Mapping[str, Any] | None, features: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``validity`` block of an explanation.

    concepts / features: the reports stored in concepts.json / features.json (None where the
    view is absent). ``passed`` is true only when the concept checks ran and all passed.
    """
    out: dict[str, Any] = {}
    if concepts is not None:
        out["concepts"] = concept_validity(concepts)
    if features is not None:
        agree = features.get("decomposed_agreement_held_out", features.get("agreement_decomposed_vs_full"))
        out["features"] = {"decomposed_agreement": _round(agree)}
    c = out.get("concepts")
    out["passed"] = bool(c and c["checked"] and not c["failed_checks"])
    return out
