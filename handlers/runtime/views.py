"""The explanation views behind one interface.

A view adds fields to the explanations of a batch. The service opens every registered view
once per batch (:meth:`View.open`), before the classifier runs, and asks each, in
registration order, for its :class:`Part` of each row that wants it. A part carries the
answer fields the view adds, the stage milliseconds it spent and, instead, the error that
stopped it for that row; the service builds every reply, its ``timings_ms`` and the stage
metrics from the parts in one place. A later view sees the parts of the earlier ones (the
verification view checks the concepts view's records); a row whose earlier part failed is
not offered to later views.

Adding a view is one class here (or in its own module) and one line in
:func:`handlers.runtime.service.ExplainerService.__init__`'s registration.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from handlers.runtime.answer import Intervention, Verification, Verified
from handlers.runtime.cladec import ClaDecJob, ClaDecRunner
from handlers.runtime.concept_view import ConceptBatch, ConceptExplainer
from handlers.runtime.errors import ExplanationsUnavailable
from handlers.runtime.features import FeatureView
from handlers.runtime.request import ResolvedExplain
from handlers.runtime.verify import agreement, verify_records


@dataclass(frozen=True)
class Part:
    """One view's contribution to one row's explanation: answer ``fields`` (a later view's
    value of a field replaces an earlier one's), unrounded stage milliseconds ``ms`` (keys of
    :class:`handlers.runtime.answer.Timings`), values for later views (``carry``), or the
    ``error`` that stopped the view for this row."""

    fields: Mapping[str, Any] = field(default_factory=dict)
    ms: Mapping[str, float] = field(default_factory=dict)
    carry: Mapping[str, Any] = field(default_factory=dict)
    error: BaseException | None = None


@dataclass(frozen=True)
class Rows:
    """What a batch has computed that views read. Rows are positions in the batch.

    requests: the explained rows' settled requests; pixels: row -> uint8 (H, W, C) model
    input; probs: (N, K) class probabilities; activations: layer -> (N, ...); concepts: the
    concept encoders' output (None when no row needed it); targets: row -> class explained."""

    requests: Mapping[int, ResolvedExplain]
    pixels: Sequence[np.ndarray]
    probs: np.ndarray
    activations: Mapping[str, np.ndarray]
    concepts: ConceptBatch | None
    targets: Mapping[int, int]


class ViewRun:
    """One view's work on one batch: :meth:`classified` once the activations exist (a view
    may start work on another thread there), then :meth:`parts`."""

    def classified(self, activations: Mapping[str, np.ndarray]) -> None:
        """The classifier's activations of the batch exist (layer -> (N, ...))."""

    def parts(self, rows: Rows, earlier: Mapping[int, Sequence[Part]]) -> dict[int, Part]:
        """Row -> this view's part, for the rows that want the view; ``earlier``: row -> the
        parts of the views registered before this one."""
        raise NotImplementedError


class View:
    """Base of the views: :meth:`open` one :class:`ViewRun` per batch. Views that work row by
    row implement :meth:`wants` and :meth:`row` and inherit the rest."""

    @contextmanager
    def open(self, x: np.ndarray, requests: Mapping[int, ResolvedExplain]) -> Iterator[ViewRun]:
        """The batch's run of this view; ``x``: the normalised batch (N, C, H, W), requests:
        the explained rows' settled requests."""
        yield _RowByRow(self)

    def wants(self, req: ResolvedExplain) -> bool:
        raise NotImplementedError

    def row(self, rows: Rows, row: int, earlier: Sequence[Part]) -> Part:
        """This view's part of one row (exceptions become the row's error)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release threads the view holds across batches. Idempotent."""


class _RowByRow(ViewRun):
    def __init__(self, view: View) -> None:
        self.view = view

    def parts(self, rows: Rows, earlier: Mapping[int, Sequence[Part]]) -> dict[int, Part]:
        out: dict[int, Part] = {}
        for row, req in rows.requests.items():
            if not self.view.wants(req) or any(p.error is not None for p in earlier.get(row, ())):
                continue
            try:
                out[row] = self.view.row(rows, row, earlier.get(row, ()))
            except Exception as exc:  # noqa: BLE001 - this request only
                out[row] = Part(error=exc)
        return out


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


class ConceptsStep(View):
    """Method 1: concept states, causal answers and heatmaps of the listed concepts."""

    def __init__(self, explainer: ConceptExplainer, network_concepts: int | None) -> None:
        self.explainer, self.network_concepts = explainer, network_concepts

    def wants(self, req: ResolvedExplain) -> bool:
        return req.wants("concepts")

    def row(self, rows: Rows, row: int, earlier: Sequence[Part]) -> Part:
        assert rows.concepts is not None
        req = rows.requests[row]
        part = self.explainer.explain(rows.concepts, row, rows.targets[row], req.top_concepts,
                                      rows.pixels[row] if req.images else None, heatmap=req.heatmap,
                                      network_concepts=self.network_concepts, atlas=req.atlas)
        return Part(fields={"concepts": part.concepts}, ms={"causal": part.causal_ms, "encode": part.encode_ms},
                    carry={"records": part.records})

    def close(self) -> None:
        self.explainer.close()


class VerifyStep(View):
    """``"verify"``: the network's own answers to the listed concepts' interventions beside the
    served ones (:mod:`handlers.runtime.verify`); reads the concepts view's part."""

    def __init__(self, explainer: ConceptExplainer, model_name: str) -> None:
        self.explainer, self.model_name = explainer, model_name

    def wants(self, req: ResolvedExplain) -> bool:
        return req.verify > 0

    def row(self, rows: Rows, row: int, earlier: Sequence[Part]) -> Part:
        if not self.explainer.interventions:
            raise ExplanationsUnavailable(f"model {self.model_name} was archived without intervention graphs; "
                                          "verify needs them")
        assert rows.concepts is not None
        t0 = time.perf_counter()
        concepts_part = next(p for p in earlier if "concepts" in p.fields)
        n = rows.requests[row].verify
        checks = verify_records(self.explainer, rows.concepts, row, rows.targets[row],
                                concepts_part.carry["records"][:n])
        concepts = list(concepts_part.fields["concepts"])
        for i, check in enumerate(checks):
            verified = Verified(interventions=[Intervention(state=x, probability=float(p))
                                               for x, p in enumerate(check.network)],
                                effect=check.network_effect, abs_error=float(check.abs_errors.mean()))
            concepts[i] = concepts[i].model_copy(update={"verified": verified})
        a = agreement(checks)
        verification = Verification(concepts=a.concepts, mae_p=a.mae_p, effect_mae=a.effect_mae, ccc=a.ccc,
                                    recall3=a.recall3)
        return Part(fields={"concepts": concepts, "verification": verification}, ms={"verify": _ms(t0)})


class FeaturesStep(View):
    """Method 3: the target's class-specific penultimate features."""

    def __init__(self, view: FeatureView) -> None:
        self.view = view

    def wants(self, req: ResolvedExplain) -> bool:
        return req.wants("features")

    def row(self, rows: Rows, row: int, earlier: Sequence[Part]) -> Part:
        t0 = time.perf_counter()
        features = self.view.explain(rows.activations[self.view.layer][row], rows.targets[row])
        return Part(fields={"features": features}, ms={"features": _ms(t0)})


class ClaDecStep(View):
    """Method 2: ClaDec and reference reconstructions. The reference autoencoders need only
    the input, so with ``overlap`` they start when the batch opens, on the runner's thread,
    beside the classifier; the decoders follow there once the activations exist, beside the
    other views."""

    def __init__(self, runner: ClaDecRunner) -> None:
        self.runner = runner

    @contextmanager
    def open(self, x: np.ndarray, requests: Mapping[int, ResolvedExplain]) -> Iterator[ViewRun]:
        wishes = {r: req.cladec for r, req in requests.items() if req.cladec is not None}
        with self.runner.begin(x, wishes) as job:
            yield _ClaDecRun(job)

    def close(self) -> None:
        self.runner.close()


class _ClaDecRun(ViewRun):
    def __init__(self, job: ClaDecJob) -> None:
        self.job = job

    def classified(self, activations: Mapping[str, np.ndarray]) -> None:
        self.job.decode(dict(activations))

    def parts(self, rows: Rows, earlier: Mapping[int, Sequence[Part]]) -> dict[int, Part]:
        outcome = self.job.finish(dict(rows.activations))
        if outcome.error is not None:
            return {row: Part(error=outcome.error) for row in outcome.wanted}
        return {row: Part(fields={"cladec": images}, ms={"cladec": outcome.ms}) for row, images in outcome.images.items()}

