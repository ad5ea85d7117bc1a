"""The explainer service: everything a TorchServe worker does, without TorchServe.

:class:`ExplainerService` takes a batch of raw requests and returns one reply per request.
Each request is parsed and validated on its own, so a bad request gets its own 4xx reply
while its neighbours in the batch are answered; the valid images of the batch go through
the classifier in one onnxruntime run, and explanation views reuse its activations.
"""
from __future__ import annotations

import logging
import random
from concurrent.futures import Future, ThreadPoolExecutor, wait
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from handlers.runtime import errors
from handlers.runtime.bundle import Bundle, load_bundle
from handlers.runtime.cladec import ClaDecView
from handlers.runtime.classifier import OnnxClassifier, make_session, softmax
from handlers.runtime.errors import ExplanationsUnavailable
from handlers.runtime.explain import ConceptExplainer
from handlers.runtime.features import FeatureView
from handlers.runtime.imaging import decode_image, normalize, to_pixels
from handlers.runtime.metrics import CONCEPT_STATE, ERRORS, PREDICTED_CLASS, REQUESTS, STAGE_LATENCY, STAGES, BatchMetrics
from handlers.runtime.schema import ExplainRequest, PredictRequest, parse_explain, parse_predict, top_predictions
from handlers.runtime.settings import HandlerSettings
from handlers.runtime.validity import bundle_validity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawRequest:
    """One request as the server delivered it: the body (bytes, str or decoded JSON),
    its content type, and whether it came in on the explanations endpoint."""

    value: Any
    content_type: str | None = None
    explain: bool = False


@dataclass
class Reply:
    """One answer: HTTP status and JSON-serialisable body."""

    status: int
    body: dict[str, Any]
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class _Item:
    index: int
    request: PredictRequest | ExplainRequest
    pixels: np.ndarray


def release_freed_heap() -> bool:
    """Return memory freed by the C heap to the operating system (glibc ``malloc_trim``).

    Building onnxruntime sessions parses and copies every model; glibc keeps the freed
    copies mapped. After loading the ResNet-18/224 bundle this takes a process from 404 to
    205 MB resident. Returns whether memory was released (False without glibc)."""
    import ctypes
    try:
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # the process's own C library
    except OSError:
        return False
    return bool(trim(0)) if trim is not None else False


# ClaDec rows of a batch grouped by what they ask for: (layers or None for all, with references)
_GroupKey = tuple[tuple[str, ...] | None, bool]
_Groups = dict[_GroupKey, list[int]]


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)


class ExplainerService:
    """Loaded model bundle plus onnxruntime sessions; stateless across requests."""

    def __init__(self, bundle: Bundle, settings: HandlerSettings, classifier: OnnxClassifier,
                 concepts: ConceptExplainer | None = None, cladec: ClaDecView | None = None,
                 features: FeatureView | None = None) -> None:
        self.bundle = bundle
        self.meta = bundle.metadata
        self.settings = settings
        self.classifier = classifier
        self.concepts = concepts
        self.cladec = cladec
        self.features = features
        self.views: tuple[str, ...] = tuple(v for v, on in (("concepts", concepts is not None),
                                                            ("cladec", cladec is not None),
                                                            ("features", features is not None)) if on)
        self.model_info = {"name": self.meta.name, "version": self.meta.version, "artifact_sha256": bundle.sha256}
        self.validity = bundle_validity(concepts.spec.report if concepts is not None else None,
                                        features.report if features is not None else None)
        self._monitor_rng = random.Random(0)
        self._pool: ThreadPoolExecutor | None = None  # created on first use (overlap_views)

    @classmethod
    def load(cls, model_dir: str | Path, settings: HandlerSettings) -> "ExplainerService":
        """Verify and load the bundle under ``model_dir / settings.bundle_dir``.

        Raises:
            handlers.runtime.errors.ArtifactError: missing or corrupted artifacts.
        """
        bundle = load_bundle(Path(model_dir) / settings.bundle_dir)
        meta = bundle.metadata
        session = make_session(bundle.path(meta.classifier_file), settings.providers, settings.intra_op_threads)
        classifier = OnnxClassifier(session, meta.input_name, meta.logits_name,
                                    {l.name: l.output for l in meta.layers})
        concepts = cladec = features = None
        if "concepts" in meta.extra:
            concepts = ConceptExplainer.load(bundle, meta.extra["concepts"], settings.providers,
                                             settings.intra_op_threads)
        if "cladec" in meta.extra:
            cladec = ClaDecView.load(bundle, meta.extra["cladec"], settings.providers, settings.intra_op_threads)
        if "features" in meta.extra:
            features = FeatureView.load(bundle, meta.extra["features"])
        service = cls(bundle, settings, classifier, concepts, cladec, features)
        release_freed_heap()
        log.info("loaded bundle %s (sha256 %s) on %s; views %s", bundle.root, bundle.sha256,
                 session.get_providers(), list(service.views))
        return service

    def baseline_samples(self) -> list[Any]:
        """Gauges with each concept's training-time state distribution (for drift scores), and
        zero increments of every concept-state counter so that states never seen in traffic
        still exist as series (a drift score needs them)."""
        from handlers.runtime.metrics import CONCEPT_BASELINE, Sample
        if self.concepts is None:
            return []
        out = []
        for layer in self.concepts.spec.layers:
            if layer.baseline is None:
                continue
            for c, cid in enumerate(layer.ids()):
                for st, ratio in enumerate(layer.baseline[c]):
                    labels = (("concept", cid), ("state", str(st)))
                    out.append(Sample(CONCEPT_BASELINE, float(ratio), labels))
                    out.append(Sample(CONCEPT_STATE, 0.0, labels))
        return out

    # -- request handling ---------------------------------------------------------------

    def _parse(self, raw: RawRequest) -> PredictRequest | ExplainRequest:
        if not raw.explain:
            return parse_predict(raw.value, raw.content_type, max_bytes=self.settings.max_request_bytes,
                                 num_classes=len(self.meta.classes))
        if not self.views:
            raise ExplanationsUnavailable(
                f"model {self.meta.name} was archived without explanation artifacts; use /predictions")
        return parse_explain(raw.value, raw.content_type, max_bytes=self.settings.max_request_bytes,
                             classes=self.meta.classes,
                             num_concepts=self.concepts.num_concepts if self.concepts else 0,
                             views=self.views, layers=self.cladec.layers if self.cladec else ())

    def _prepare(self, i: int, raw: RawRequest) -> _Item:
        req = self._parse(raw)
        image = decode_image(req.image, max_pixels=self.settings.max_image_pixels,
                             allowed_formats=self.settings.allowed_formats)
        return _Item(i, req, to_pixels(image, self.meta.input))

    def handle_batch(self, requests: Sequence[RawRequest], metrics: BatchMetrics | None = None) -> list[Reply]:
        """Answer every request of a batch; never raises for a bad request.

        ``metrics``, if given, receives the batch's observations (requests, errors, predicted
        classes, concept states of explained and monitored requests, stage latencies).
        """
        metrics = metrics if metrics is not None else BatchMetrics()
        replies: list[Reply | None] = [None] * len(requests)
        items: list[_Item] = []
        t0 = time.perf_counter()
        for i, raw in enumerate(requests):
            try:
                items.append(self._prepare(i, raw))
            except Exception as exc:  # noqa: BLE001 - every failure becomes this request's reply
                replies[i] = self._error_reply(exc)
        decode_ms = _ms(t0)
        if items:
            try:
                self._answer(items, replies, decode_ms, metrics)
            except Exception as exc:  # noqa: BLE001 - a server fault answers the valid requests with 500
                for it in items:
                    replies[it.index] = self._error_reply(exc)
        final = [r if r is not None else Reply(500, errors.to_http(RuntimeError())[1]) for r in replies]
        for raw, reply in zip(requests, final):
            endpoint = "explanations" if raw.explain else "predictions"
            metrics.count(REQUESTS, endpoint=endpoint, status=str(reply.status))
            if reply.status >= 400:
                metrics.count(ERRORS, error_type=reply.body["error"]["type"])
            elif endpoint == "explanations":
                for stage in STAGES:
                    if stage in reply.timings_ms:
                        metrics.observe(STAGE_LATENCY, reply.timings_ms[stage] / 1000.0, stage=stage)
        return final

    def _answer(self, items: list[_Item], replies: list[Reply | None], decode_ms: float,
                metrics: BatchMetrics) -> None:
        t0 = time.perf_counter()
        x = normalize(np.stack([it.pixels for it in items]), self.meta.input)
        groups = self._cladec_groups(items)
        # The reference autoencoders need only the input: with overlap_views they start now,
        # on the view thread, beside the classifier and the concept view.
        ref_job = self._start_references(x, groups)
        bodies: dict[int, tuple[dict[str, Any], dict[str, float]]] = {}
        cladec_out: dict[int, list[dict[str, Any]]] = {}
        cladec_ms, cladec_error = 0.0, None
        try:
            out = self.classifier(x)
            probs = softmax(out.logits)
            shared = {"decode": decode_ms, "classifier": _ms(t0), "batch_size": len(items)}
            explain_rows = [r for r, it in enumerate(items) if isinstance(it.request, ExplainRequest)]
            for row in range(len(items)):
                metrics.count(PREDICTED_CLASS, **{"class": self.meta.classes[int(np.argmax(probs[row]))]})
            monitored = [r for r, it in enumerate(items) if not isinstance(it.request, ExplainRequest)
                         and self.settings.monitor_fraction > 0 and self._monitor_rng.random() < self.settings.monitor_fraction]
            concept_batch = None
            if (explain_rows or monitored) and self.concepts is not None:
                t1 = time.perf_counter()
                concept_batch = self.concepts.encode(out.activations)
                shared["concepts"] = _ms(t1)
                for row in sorted(set(explain_rows) | set(monitored)):
                    for concept, state in concept_batch.evidence(row).items():
                        metrics.count(CONCEPT_STATE, concept=concept, state=str(state))
            for row, it in enumerate(items):
                req = it.request
                k = min(req.top_k or self.settings.top_k, len(self.meta.classes))
                body: dict[str, Any] = {"predictions": top_predictions(probs[row], self.meta.classes, k)}
                timings = dict(shared)
                if isinstance(req, ExplainRequest):
                    try:
                        self._explain(req, row, it.pixels, probs[row], concept_batch, out.activations, body, timings)
                    except Exception as exc:  # noqa: BLE001 - this request only
                        replies[it.index] = self._error_reply(exc)
                        continue
                bodies[row] = body, timings
            try:
                cladec_out, cladec_ms = self._finish_cladec(groups, out.activations, x, ref_job)
            except Exception as exc:  # noqa: BLE001 - fails the requests that wanted ClaDec, not the batch
                cladec_error = exc
        finally:  # never leave the reference job running into the next batch
            if ref_job is not None:
                wait([ref_job])
        cladec_rows = {r for rows in groups.values() for r in rows}
        for row, (body, timings) in bodies.items():
            if cladec_error is not None and row in cladec_rows:
                replies[items[row].index] = self._error_reply(cladec_error)
                continue
            if row in cladec_out:
                body["cladec"] = cladec_out[row]
                timings["cladec"] = cladec_ms  # reported only to the requests that got reconstructions
            replies[items[row].index] = Reply(200, body, timings)

    def _cladec_groups(self, items: list[_Item]) -> _Groups:
        """The rows that want ClaDec images, grouped by (layers, with references)."""
        groups: _Groups = {}
        if self.cladec is None:
            return groups
        for r, it in enumerate(items):
            req = it.request
            if isinstance(req, ExplainRequest) and self._wants(req, "cladec") and req.images:
                reference = self.settings.cladec_reference if req.reference is None else req.reference
                groups.setdefault((req.layers, reference), []).append(r)
        return groups

    def _references(self, x: np.ndarray, groups: _Groups) -> tuple[dict[_GroupKey, dict[str, list[str]]], float]:
        """RefAE images per group that asks for them, and the milliseconds it took."""
        assert self.cladec is not None
        t0 = time.perf_counter()
        refs = {key: self.cladec.references(x, rows, key[0]) for key, rows in groups.items() if key[1]}
        return refs, _ms(t0)

    def _start_references(self, x: np.ndarray, groups: _Groups) -> Future | None:
        """The reference images on the view thread (``overlap_views``); None when none are
        wanted, or when :meth:`_finish_cladec` is to make them in line."""
        if not self.settings.overlap_views or not any(ref for _, ref in groups):
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="cladec-ref")
        return self._pool.submit(self._references, x, groups)

    def _finish_cladec(self, groups: _Groups, activations: dict[str, np.ndarray], x: np.ndarray,
                       ref_job: Future | None) -> tuple[dict[int, list[dict[str, Any]]], float]:
        """Decode the rows' activations, attach the reference images (from ``ref_job`` or made
        here) and return the entries per row with the ClaDec milliseconds (decoders plus
        references; the references may have run beside the classifier)."""
        if not groups:
            return {}, 0.0
        assert self.cladec is not None
        t0 = time.perf_counter()
        out: dict[int, list[dict[str, Any]]] = {}
        for (layers, _), rows in groups.items():
            for r, entries in zip(rows, self.cladec.reconstructions(activations, rows, layers)):
                out[r] = entries
        decode_ms = _ms(t0)
        refs, refs_ms = ref_job.result() if ref_job is not None else self._references(x, groups)
        for (layers, reference), rows in groups.items():
            if reference:
                self.cladec.attach_references([out[r] for r in rows], refs[(layers, reference)], layers)
        return out, round(decode_ms + refs_ms, 3)

    def _wants(self, req: Any, view: str) -> bool:
        return isinstance(req, ExplainRequest) and view in (req.views or self.views)

    def _explain(self, req: ExplainRequest, row: int, pixels: np.ndarray, probs: np.ndarray,
                 concept_batch: Any, activations: dict[str, np.ndarray], body: dict[str, Any],
                 timings: dict[str, float]) -> None:
        if req.target is None:
            target = int(np.argmax(probs))
        elif isinstance(req.target, str):
            target = self.meta.classes.index(req.target)
        else:
            target = int(req.target)
        body["target"] = {"index": target, "label": self.meta.classes[target]}
        views = req.views or self.views
        if "concepts" in views and self.concepts is not None:
            top = min(req.top_concepts or self.settings.top_concepts, self.concepts.num_concepts)
            body["concepts"] = self.concepts.explain(concept_batch, row, target, top,
                                                     pixels if req.images else None, timings,
                                                     heatmap=req.heatmap)
        if "features" in views and self.features is not None:
            t0 = time.perf_counter()
            body["features"] = self.features.explain(activations[self.features.layer][row], target)
            timings["features"] = _ms(t0)
        body["validity"] = self.validity
        body["model"] = self.model_info
        body["timings_ms"] = timings

    @staticmethod
    def _error_reply(exc: BaseException) -> Reply:
        status, body = errors.to_http(exc)
        if status >= 500:
            log.error("request failed with a server fault", exc_info=exc)
        return Reply(status, body)
