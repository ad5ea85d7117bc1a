"""The explainer service: everything a TorchServe worker does, without TorchServe.

:class:`ExplainerService` takes a batch of raw requests and returns one reply per request.
Each request is parsed and validated on its own, so a bad request gets its own 4xx reply
while its neighbours in the batch are answered; the valid images of the batch go through
the classifier in one onnxruntime run, and explanation views reuse its activations.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handlers.runtime import errors
from handlers.runtime.answer import (
    ClaDecImage,
    ErrorAnswer,
    Explanation,
    Features,
    Intervention,
    ModelInfo,
    Prediction,
    PredictionsAnswer,
    Target,
    Timings,
    Verification,
    Verified,
)
from handlers.runtime.bundle import Bundle, load_bundle
from handlers.runtime.cladec import ClaDecOptions, ClaDecRunner, ClaDecView
from handlers.runtime.classifier import OnnxClassifier, make_session, softmax
from handlers.runtime.concept_view import ConceptBatch, ConceptExplainer, ConceptsPart
from handlers.runtime.devices import in_use, plan_devices
from handlers.runtime.errors import ExplanationsUnavailable
from handlers.runtime.features import FeatureView
from handlers.runtime.imaging import decode_image, normalize, to_pixels
from handlers.runtime.metrics import (
    CONCEPT_STATE,
    ERRORS,
    PREDICTED_CLASS,
    REQUESTS,
    STAGE_LATENCY,
    STAGES,
    VERIFY_OFFLINE_AGREEMENT,
    VERIFY_OFFLINE_PROBABILITY_ERROR,
    BatchMetrics,
    Sample,
)
from handlers.runtime.quantized import int8_variants
from handlers.runtime.request import (
    Defaults,
    ResolvedExplain,
    ResolvedPredict,
    parse_explain,
    parse_predict,
    resolve_explain,
    resolve_predict,
)
from handlers.runtime.settings import HandlerSettings
from handlers.runtime.validity import bundle_validity
from handlers.runtime.verify import ALL_LAYERS, BackgroundVerifier, VerifyJob, agreement, verify_records

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawRequest:
    """One request as the server delivered it: the body (bytes, str or decoded JSON),
    its content type, and whether it came in on the explanations endpoint. ``error``: a
    front door already found the request bad (e.g. one element of a protocol envelope);
    the request is answered with it."""

    value: Any
    content_type: str | None = None
    explain: bool = False
    error: errors.ExplainerError | None = None


@dataclass(frozen=True)
class Reply:
    """One answer: HTTP status and the typed body (:mod:`handlers.runtime.answer`)."""

    status: int
    answer: PredictionsAnswer | Explanation | ErrorAnswer

    @property
    def body(self) -> dict[str, Any]:
        """The JSON body as Python objects (formatted by the answer models)."""
        return self.answer.wire()

    def wire_json(self) -> bytes:
        """The JSON body as sent."""
        return self.answer.wire_json()


@dataclass(frozen=True)
class _Item:
    """A request that parsed and decoded: its position in the batch, settled options and pixels (H, W, C)."""

    index: int
    request: ResolvedPredict | ResolvedExplain
    pixels: np.ndarray


@dataclass(frozen=True)
class _RowViews:
    """One image's explanation views before ClaDec joins them; ``*_ms``: unrounded milliseconds
    of the stages that ran (None: not run)."""

    target: Target
    concepts: ConceptsPart | None
    features: Features | None
    features_ms: float | None
    verification: Verification | None = None
    verify_ms: float | None = None


@dataclass(frozen=True)
class _BatchStages:
    """What every row of a batch shares: stage milliseconds (unrounded) and the batch size."""

    decode_ms: float
    classifier_ms: float
    concepts_ms: float | None
    batch_size: int


def release_freed_heap() -> bool:
    """Return memory freed by the C heap to the operating system (glibc ``malloc_trim``).

    Building onnxruntime sessions parses and copies every model; glibc keeps the freed
    copies mapped, so a worker that has just loaded a bundle holds far more memory than it
    uses (``make bench`` reports worker memory). Returns whether memory was released (False
    without glibc)."""
    import ctypes
    try:
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # the process's own C library
    except OSError:
        return False
    return bool(trim(0)) if trim is not None else False


def _ms(t0: float) -> float:
    """Milliseconds since ``t0`` (``time.perf_counter``), unrounded: the answer rounds."""
    return (time.perf_counter() - t0) * 1000


class ExplainerService:
    """Loaded model bundle plus onnxruntime sessions; stateless across requests."""

    def __init__(self, bundle: Bundle, settings: HandlerSettings, classifier: OnnxClassifier,
                 concepts: ConceptExplainer | None = None, cladec: ClaDecView | None = None,
                 features: FeatureView | None = None, device: str = "cpu",
                 providers: Sequence[str] = ("CPUExecutionProvider",), int8_graphs: Sequence[str] = ()) -> None:
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
        self.device, self.providers = device, tuple(providers)
        self.model_info = ModelInfo(name=self.meta.name, version=self.meta.version, artifact_sha256=bundle.sha256,
                                    device=device, providers=list(providers), int8_graphs=sorted(int8_graphs))
        self.validity = bundle_validity(concepts.spec.report if concepts is not None else None,
                                        features.report if features is not None else None)
        self._defaults = Defaults(
            classes=tuple(self.meta.classes), views=self.views,
            num_concepts=concepts.num_concepts if concepts is not None else 0, top_k=settings.top_k,
            top_concepts=settings.top_concepts, cladec_reference=settings.cladec_reference,
            cladec_alphas=settings.cladec_alphas, cladec_image_format=settings.cladec_image_format)
        self._monitor_rng = random.Random(0)
        self._cladec_runner = ClaDecRunner(cladec, settings.overlap_views)
        self._verify_buffer: list[Sample] = []
        self._verify_lock = threading.Lock()
        self.verifier: BackgroundVerifier | None = None
        if concepts is not None and concepts.interventions:
            self.verifier = BackgroundVerifier(concepts, self.meta.version, self._buffer_samples,
                                               capacity=settings.verify_queue)

    def report_verification_to(self, sink: Callable[[list[Sample]], None], version: str | None = None) -> None:
        """Send the samples of sampled verification (``verify_fraction``) to ``sink`` as each job
        finishes (a front door's metrics, from the verifier's thread), labelled with ``version``
        (default: the bundle's). Until a front door calls this, they join the next batch's metrics."""
        if self.verifier is not None:
            self.verifier.sink = sink
            if version is not None:
                self.verifier.version = version

    def _buffer_samples(self, samples: list[Sample]) -> None:
        with self._verify_lock:
            self._verify_buffer.extend(samples)

    def _drain_buffer(self, metrics: BatchMetrics) -> None:
        with self._verify_lock:
            samples, self._verify_buffer = self._verify_buffer, []
        for sample in samples:
            metrics.add(sample)

    def close(self) -> None:
        """Release what the service holds beyond its sessions: the ClaDec reference thread and
        the verification thread (its queued jobs are finished first, within a few seconds).
        Idempotent; the service still answers afterwards (ClaDec then runs in line; sampled
        verification stops)."""
        self._cladec_runner.close()
        if self.verifier is not None:
            self.verifier.close()

    @classmethod
    def load(cls, model_dir: str | Path, settings: HandlerSettings, gpu_id: int | None = 0) -> ExplainerService:
        """Verify and load the bundle under ``model_dir / settings.bundle_dir``, every session on
        the worker's GPU ``gpu_id`` (None: no GPU for this worker) when the providers allow it.

        Raises:
            handlers.runtime.errors.ArtifactError: missing or corrupted artifacts.
        """
        import onnxruntime as ort
        bundle = load_bundle(Path(model_dir) / settings.bundle_dir)
        meta = bundle.metadata
        plan = plan_devices(settings.providers, gpu_id, ort.get_available_providers())
        if plan.fallback is not None:
            (log.info if gpu_id is None else log.warning)("running on the CPU although %s was requested: %s",
                                                          "/".join(settings.providers), plan.fallback)
        if plan.device.startswith("cuda") and hasattr(ort, "preload_dlls"):
            try:  # CUDA/cuDNN from the nvidia pip packages (onnxruntime-gpu[cuda,cudnn]) when present
                ort.preload_dlls()
            except Exception:  # noqa: BLE001 - system libraries may still serve; the session reports
                log.warning("onnxruntime.preload_dlls() failed", exc_info=True)
        threads = settings.intra_op_threads
        classifier = OnnxClassifier.from_bundle(bundle, plan.providers, threads)
        # 8-bit explanation graphs (never the classifier), on the CPU provider only: on a GPU
        # the quantize/dequantize pairs would run around float kernels for nothing.
        int8 = int8_variants(bundle) if settings.cpu_int8 and plan.device == "cpu" else {}

        def open_graph(name: str) -> Any:
            return make_session(bundle.path(int8.get(name, name)), plan.providers, threads)

        concepts = cladec = features = None
        if "concepts" in meta.extra:
            concepts = ConceptExplainer.load(bundle, meta.extra["concepts"], open_graph)
        if "cladec" in meta.extra:
            cladec = ClaDecView.load(bundle, meta.extra["cladec"], open_graph, settings.cladec_chunk_rows)
        if "features" in meta.extra:
            features = FeatureView.load(bundle, meta.extra["features"])
        providers, device = in_use(classifier.session.get_providers(), plan)
        service = cls(bundle, settings, classifier, concepts, cladec, features, device, providers, list(int8))
        release_freed_heap()
        log.info("loaded bundle %s (sha256 %s) on %s with %s; views %s; 8-bit graphs %s", bundle.root,
                 bundle.sha256, device, list(providers), list(service.views), sorted(int8) or "none")
        return service

    def baseline_samples(self) -> list[Any]:
        """Gauges with each concept's training-time state distribution (for drift scores), and
        zero increments of every concept-state counter so that states never seen in traffic
        still exist as series (a drift score needs them)."""
        from handlers.runtime.metrics import CONCEPT_BASELINE, EXECUTION_PROVIDER, Sample
        out = [Sample(EXECUTION_PROVIDER, 1.0, (("provider", self.providers[0]), ("device", self.device)))]
        if self.concepts is None:
            return out
        out += self.offline_verification_samples()
        for layer in self.concepts.spec.layers:
            if layer.baseline is None:
                continue
            for c, cid in enumerate(layer.ids()):
                for st, ratio in enumerate(layer.baseline[c]):
                    labels = (("concept", cid), ("state", str(st)))
                    out.append(Sample(CONCEPT_BASELINE, float(ratio), labels))
                    out.append(Sample(CONCEPT_STATE, 0.0, labels))
        return out

    def offline_verification_samples(self) -> list[Sample]:
        """Gauges with the bundle's offline figures that live verification is compared with:
        per concept layer and over all layers, the mean agreement (recall@3) and the mean
        absolute error of ``P(target | do(state))`` on the export's held-out images. None for
        a bundle exported without its effect-truth report."""
        report = (self.concepts.spec.report or {}).get("effect_truth") if self.concepts is not None else None
        if not report or self.verifier is None:
            return []
        figures = {**{layer: m for layer, m in report["per_layer"].items()}, ALL_LAYERS: report["answer"]}
        out = []
        for layer, m in figures.items():
            labels = (("layer", layer), ("model_version", self.verifier.version))
            for name, key in ((VERIFY_OFFLINE_AGREEMENT, "recall3"), (VERIFY_OFFLINE_PROBABILITY_ERROR, "mae_p")):
                if m.get(key) is not None:
                    out.append(Sample(name, float(m[key]), labels))
        return out

    # -- request handling ---------------------------------------------------------------

    def _parse(self, raw: RawRequest) -> ResolvedPredict | ResolvedExplain:
        """Parse one request and settle every option (:mod:`handlers.runtime.request`)."""
        if not raw.explain:
            return resolve_predict(parse_predict(raw.value, raw.content_type, max_bytes=self.settings.max_request_bytes,
                                                 num_classes=len(self.meta.classes)), self._defaults)
        if not self.views:
            raise ExplanationsUnavailable(
                f"model {self.meta.name} was archived without explanation artifacts; use /predictions")
        req = parse_explain(raw.value, raw.content_type, max_bytes=self.settings.max_request_bytes,
                            classes=self.meta.classes,
                            num_concepts=self.concepts.num_concepts if self.concepts else 0,
                            views=self.views, layers=self.cladec.layers if self.cladec else (),
                            alphas=self.cladec.alphas if self.cladec else ())
        return resolve_explain(req, self._defaults)

    def _prepare(self, i: int, raw: RawRequest) -> _Item:
        if raw.error is not None:
            raise raw.error
        req = self._parse(raw)
        image = decode_image(req.image, max_pixels=self.settings.max_image_pixels,
                             allowed_formats=self.settings.allowed_formats)
        return _Item(i, req, to_pixels(image, self.meta.input))

    def handle_batch(self, requests: Sequence[RawRequest], metrics: BatchMetrics | None = None) -> list[Reply]:
        """Answer every request of a batch, one reply per request in order; never raises for a
        bad request.

        ``metrics``, if given, receives the batch's observations (requests, errors, predicted
        classes, concept states of explained and monitored requests, stage latencies).
        """
        metrics = metrics if metrics is not None else BatchMetrics()
        self._drain_buffer(metrics)
        replies: dict[int, Reply] = {}
        items: list[_Item] = []
        jobs: list[VerifyJob] = []
        t0 = time.perf_counter()
        for i, raw in enumerate(requests):
            try:
                items.append(self._prepare(i, raw))
            except Exception as exc:  # noqa: BLE001 - every failure becomes this request's reply
                replies[i] = self._error_reply(exc)
        decode_ms = _ms(t0)
        if items:
            try:
                answered = self._answer(items, decode_ms, metrics, jobs)
            except Exception as exc:  # noqa: BLE001 - a server fault answers the valid requests with 500
                answered = {it.index: self._error_reply(exc) for it in items}
            replies.update(answered)
        final = [replies.get(i) or self._error_reply(RuntimeError("no reply"), log_fault=False)
                 for i in range(len(requests))]
        for raw, reply in zip(requests, final):
            endpoint = "explanations" if raw.explain else "predictions"
            metrics.count(REQUESTS, endpoint=endpoint, status=str(reply.status))
            if isinstance(reply.answer, ErrorAnswer):
                metrics.count(ERRORS, error_type=reply.answer.error.type)
            elif isinstance(reply.answer, Explanation):
                stages = reply.answer.timings_ms.stages()
                for stage in STAGES:
                    if stage in stages:
                        metrics.observe(STAGE_LATENCY, stages[stage] / 1000.0, stage=stage)
        for job in jobs:  # the batch is answered: sampled verification goes to the background
            assert self.verifier is not None
            self.verifier.offer(job)
        return final

    def _answer(self, items: list[_Item], decode_ms: float, metrics: BatchMetrics,
                jobs: list[VerifyJob]) -> dict[int, Reply]:
        """The replies of the valid requests of a batch: batch index -> reply. Rows are
        positions in ``items`` (and in the classifier's batch). Rows sampled for background
        verification are appended to ``jobs``."""
        t0 = time.perf_counter()
        x = normalize(np.stack([it.pixels for it in items]), self.meta.input)
        # The reference autoencoders need only the input: with overlap_views they start now,
        # on the runner's thread, beside the classifier; the decoders follow them there once
        # the activations exist, beside the concept and feature views on this thread.
        with self._cladec_runner.begin(x, self._cladec_wishes(items)) as cladec_job:
            out = self.classifier(x)
            probs = softmax(out.logits)
            classifier_ms = _ms(t0)
            cladec_job.decode(out.activations)  # with overlap_views: beside the views below
            for row in range(len(items)):
                metrics.count(PREDICTED_CLASS, 1, **{"class": self.meta.classes[int(np.argmax(probs[row]))]})
            explain_rows = [r for r, it in enumerate(items) if isinstance(it.request, ResolvedExplain)]
            monitored = [r for r, it in enumerate(items) if not isinstance(it.request, ResolvedExplain)
                         and self.settings.monitor_fraction > 0 and self._monitor_rng.random() < self.settings.monitor_fraction]
            concept_batch, concepts_ms = None, None
            if (explain_rows or monitored) and self.concepts is not None:
                t1 = time.perf_counter()
                concept_batch = self.concepts.encode(out.activations)
                concepts_ms = _ms(t1)
                for row in sorted(set(explain_rows) | set(monitored)):
                    for concept, state in concept_batch.evidence(row).items():
                        metrics.count(CONCEPT_STATE, concept=concept, state=str(state))
            shared = _BatchStages(decode_ms, classifier_ms, concepts_ms, len(items))
            views: dict[int, _RowViews | Exception] = {}
            for row in explain_rows:
                it = items[row]
                assert isinstance(it.request, ResolvedExplain)
                try:
                    views[row] = self._explain(it.request, row, it.pixels, probs[row], concept_batch,
                                               out.activations)
                except Exception as exc:  # noqa: BLE001 - this request only
                    views[row] = exc
            cladec = cladec_job.finish(out.activations)
        jobs += self._sampled_jobs(items, probs, views, out.activations)
        replies: dict[int, Reply] = {}
        for row, it in enumerate(items):
            predictions = Prediction.top(probs[row], self.meta.classes, it.request.top_k)
            view = views.get(row)
            if view is None:
                replies[it.index] = Reply(200, PredictionsAnswer(predictions=predictions))
            elif isinstance(view, Exception):
                replies[it.index] = self._error_reply(view)
            elif cladec.error is not None and row in cladec.wanted:
                replies[it.index] = self._error_reply(cladec.error)
            else:
                replies[it.index] = Reply(200, self._explanation(predictions, view, shared, cladec.images.get(row),
                                                                 cladec.ms))
        return replies

    def _sampled_jobs(self, items: list[_Item], probs: np.ndarray, views: dict[int, _RowViews | Exception],
                      activations: dict[str, np.ndarray]) -> list[VerifyJob]:
        """Verification jobs of the rows sampled at ``verify_fraction`` (answered explanations,
        their target) and ``verify_fraction_predictions`` (predictions, the predicted class)."""
        verifier, settings = self.verifier, self.settings
        if verifier is None or self.concepts is None:
            return []
        jobs = []
        for row, it in enumerate(items):
            view = views.get(row)
            if isinstance(it.request, ResolvedExplain):
                if not isinstance(view, _RowViews) or not verifier.sampled(settings.verify_fraction):
                    continue
                target = view.target.index
            elif verifier.sampled(settings.verify_fraction_predictions):
                target = int(np.argmax(probs[row]))
            else:
                continue
            acts = {layer.layer: activations[layer.layer][row:row + 1].copy() for layer in self.concepts.spec.layers}
            jobs.append(VerifyJob(acts, target, settings.network_concepts))
        return jobs

    def _cladec_wishes(self, items: list[_Item]) -> dict[int, ClaDecOptions]:
        """Row -> what it asks of ClaDec, for the rows that want ClaDec images."""
        if self.cladec is None:
            return {}
        return {r: it.request.cladec for r, it in enumerate(items)
                if isinstance(it.request, ResolvedExplain) and it.request.cladec is not None}

    def _explain(self, req: ResolvedExplain, row: int, pixels: np.ndarray, probs: np.ndarray,
                 concept_batch: ConceptBatch | None, activations: dict[str, np.ndarray]) -> _RowViews:
        """The concepts and features views of one image (row of the batch; pixels (H, W, C),
        probs (K,), activations layer -> (N, ...))."""
        target = req.target_index(probs)
        concepts = features = features_ms = None
        if req.wants("concepts") and self.concepts is not None:
            assert concept_batch is not None
            concepts = self.concepts.explain(concept_batch, row, target, req.top_concepts,
                                             pixels if req.images else None, heatmap=req.heatmap,
                                             network_concepts=self.settings.network_concepts)
        verification = verify_ms = None
        if req.verify:
            t0 = time.perf_counter()
            concepts, verification = self._verify(req.verify, concepts, concept_batch, row, target)
            verify_ms = _ms(t0)
        if req.wants("features") and self.features is not None:
            t0 = time.perf_counter()
            features = self.features.explain(activations[self.features.layer][row], target)
            features_ms = _ms(t0)
        return _RowViews(Target(index=target, label=self.meta.classes[target]), concepts, features, features_ms,
                          verification, verify_ms)

    def _verify(self, n: int, view: ConceptsPart | None, batch: ConceptBatch | None, row: int,
                target: int) -> tuple[ConceptsPart, Verification]:
        """The concepts view with the network's own answers on its first ``n`` concepts (the
        request's settled ``verify``), and their agreement.

        Raises:
            ExplanationsUnavailable: the archive has no intervention graphs."""
        assert view is not None and batch is not None and self.concepts is not None
        if not self.concepts.interventions:
            raise ExplanationsUnavailable(f"model {self.meta.name} was archived without intervention graphs; "
                                          "verify needs them")
        checks = verify_records(self.concepts, batch, row, target, view.records[:n])
        concepts = list(view.concepts)
        for i, check in enumerate(checks):
            verified = Verified(interventions=[Intervention(state=x, probability=float(p))
                                               for x, p in enumerate(check.network)],
                                effect=check.network_effect, abs_error=float(check.abs_errors.mean()))
            concepts[i] = concepts[i].model_copy(update={"verified": verified})
        a = agreement(checks)
        verification = Verification(concepts=a.concepts, mae_p=a.mae_p, effect_mae=a.effect_mae, ccc=a.ccc,
                                    recall3=a.recall3)
        return ConceptsPart(concepts, view.causal_ms, view.encode_ms, view.records), verification

    def _explanation(self, predictions: list[Prediction], view: _RowViews, shared: _BatchStages,
                     cladec: list[ClaDecImage] | None, cladec_ms: float) -> Explanation:
        """One explanation body; ``cladec_ms`` is reported only to a row with ClaDec images."""
        concepts = view.concepts
        timings = Timings(decode=shared.decode_ms, classifier=shared.classifier_ms, batch_size=shared.batch_size,
                          concepts=shared.concepts_ms,
                          causal=concepts.causal_ms if concepts is not None else None,
                          encode=concepts.encode_ms if concepts is not None else None,
                          features=view.features_ms,
                          cladec=cladec_ms if cladec is not None else None, verify=view.verify_ms)
        return Explanation(predictions=predictions, target=view.target,
                           concepts=concepts.concepts if concepts is not None else None,
                           verification=view.verification,
                           features=view.features, validity=self.validity, model=self.model_info,
                           timings_ms=timings, cladec=cladec)

    @staticmethod
    def _error_reply(exc: BaseException, log_fault: bool = True) -> Reply:
        status, answer = errors.to_answer(exc)
        if status >= 500 and log_fault:
            log.error("request failed with a server fault", exc_info=exc)
        return Reply(status, answer)
