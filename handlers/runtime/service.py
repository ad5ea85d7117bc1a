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
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handlers.runtime import errors
from handlers.runtime.answer import (
    ErrorAnswer,
    Explanation,
    ModelInfo,
    Prediction,
    PredictionsAnswer,
    Target,
    Timings,
)
from handlers.runtime.bundle import Bundle, load_bundle
from handlers.runtime.cladec import ClaDecRunner, ClaDecView
from handlers.runtime.classifier import OnnxClassifier, make_session, softmax
from handlers.runtime.concept_view import ConceptExplainer
from handlers.runtime.devices import in_use, plan_devices
from handlers.runtime.errors import ExplanationsUnavailable
from handlers.runtime.features import FeatureView
from handlers.runtime.helper import HelperThread
from handlers.runtime.imaging import cladec_image_format, decode_image, normalize, to_pixels
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
from handlers.runtime.verify import ALL_LAYERS, BackgroundVerifier, VerifyJob
from handlers.runtime.views import ClaDecStep, ConceptsStep, FeaturesStep, Part, Rows, VerifyStep, View

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


def limit_blas_threads(threads: int) -> int | None:
    """Limit numpy's BLAS to ``threads`` threads for the whole process (0: leave it); returns
    the BLAS libraries' thread count afterwards (the smallest), or None when unchanged or
    ``threadpoolctl`` is missing (then a warning is logged)."""
    if threads <= 0:
        return None
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        log.warning("threadpoolctl is not installed: numpy's BLAS keeps its default threads")
        return None
    threadpool_limits(limits=threads, user_api="blas")
    counts = [int(p["num_threads"]) for p in threadpool_info() if p.get("user_api") == "blas"]
    return min(counts) if counts else None


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
            cladec_alphas=settings.cladec_alphas,
            cladec_image_format=cladec_image_format(settings.cladec_image_format, self.meta.input.height,
                                                    self.meta.input.width))
        self._monitor_rng = random.Random(0)
        # The views, in the order they run on a batch (a later one reads the earlier ones' parts).
        self.steps: list[View] = []
        # One helper thread beside the request thread, shared by ClaDec and the concept graphs
        # (handlers.runtime.helper); overlap_views off: every view in line.
        helper = self._helper = HelperThread("explainer-helper") if settings.overlap_views else None
        if concepts is not None:
            concepts.use_helper(helper)
            self.steps += [ConceptsStep(concepts, settings.network_concepts), VerifyStep(concepts, self.meta.name)]
        if features is not None:
            self.steps.append(FeaturesStep(features))
        if cladec is not None:
            self.steps.append(ClaDecStep(ClaDecRunner(cladec, helper)))
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
        """Release what the service holds beyond its sessions: the helper thread (ClaDec and
        the concept graphs) and the verification thread (its queued jobs are finished first,
        within a few seconds). Idempotent; the service still answers afterwards (every view
        then runs in line; sampled verification stops)."""
        for step in self.steps:
            step.close()
        if self._helper is not None:
            self._helper.close()
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
        limit_blas_threads(settings.blas_threads)
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
            if concepts.tables_answer(settings.network_concepts):
                concepts.network.precompile()  # the tables answer some concepts: at load, not on a request
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
        absolute error of ``P(target | do(state))`` on the export's held-out images. Empty for
        a bundle exported without its effect-truth report."""
        report = (self.concepts.spec.report or {}).get("effect_truth") if self.concepts is not None else None
        if not report or self.verifier is None:
            return []
        figures = {**report["per_layer"], ALL_LAYERS: report["answer"]}
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
        classes, concept states of the monitored requests, stage latencies).
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
        requests = {r: it.request for r, it in enumerate(items) if isinstance(it.request, ResolvedExplain)}
        with ExitStack() as stack:
            runs = [stack.enter_context(step.open(x, requests)) for step in self.steps] if requests else []
            out = self.classifier(x)
            probs = softmax(out.logits)
            classifier_ms = _ms(t0)
            for run in runs:
                run.classified(out.activations)
            for row in range(len(items)):
                metrics.count(PREDICTED_CLASS, 1, **{"class": self.meta.classes[int(np.argmax(probs[row]))]})
            # concept states are counted for a sample of every endpoint's requests (explanations
            # included: each counted row costs one metric line per concept, about 1 ms through
            # TorchServe for the demo's 24); the shares the drift monitor compares are unbiased
            monitored = [r for r in range(len(items))
                         if self.settings.monitor_fraction > 0 and self._monitor_rng.random() < self.settings.monitor_fraction]
            concept_batch, concepts_ms = None, None
            if (requests or monitored) and self.concepts is not None:
                t1 = time.perf_counter()
                concept_batch = self.concepts.encode(out.activations)
                concepts_ms = _ms(t1)
                for row in monitored:
                    for concept, state in concept_batch.evidence(row).items():
                        metrics.count(CONCEPT_STATE, concept=concept, state=str(state))
            rows = Rows(requests, [it.pixels for it in items], probs, out.activations, concept_batch,
                        {r: req.target_index(probs[r]) for r, req in requests.items()})
            parts: dict[int, list[Part]] = {r: [] for r in requests}
            for run in runs:
                for row, part in run.parts(rows, parts).items():
                    parts[row].append(part)
        batch_ms = _BatchStages(decode_ms, classifier_ms, concepts_ms, len(items))
        replies: dict[int, Reply] = {}
        for row, it in enumerate(items):
            predictions = Prediction.top(probs[row], self.meta.classes, it.request.top_k)
            if row not in requests:
                replies[it.index] = Reply(200, PredictionsAnswer(predictions=predictions))
                continue
            error = next((p.error for p in parts[row] if p.error is not None), None)
            if error is not None:
                replies[it.index] = self._error_reply(error)
                continue
            explanation = self._explanation(predictions, rows.targets[row], parts[row], batch_ms)
            stages = explanation.timings_ms.stages()  # the stage metrics are the answer's own timings
            for stage in STAGES:
                if stage in stages:
                    metrics.observe(STAGE_LATENCY, stages[stage] / 1000.0, stage=stage)
            replies[it.index] = Reply(200, explanation)
        jobs += self._sampled_jobs(items, probs, rows.targets, replies, out.activations)
        return replies

    def _sampled_jobs(self, items: list[_Item], probs: np.ndarray, targets: Mapping[int, int],
                      replies: Mapping[int, Reply], activations: dict[str, np.ndarray]) -> list[VerifyJob]:
        """Verification jobs of the rows sampled at ``verify_fraction`` (answered explanations,
        their target) and ``verify_fraction_predictions`` (predictions, the predicted class)."""
        verifier, settings = self.verifier, self.settings
        if verifier is None or self.concepts is None:
            return []
        jobs = []
        for row, it in enumerate(items):
            if isinstance(it.request, ResolvedExplain):
                if replies[it.index].status != 200 or not verifier.sampled(settings.verify_fraction):
                    continue
                target = targets[row]
            elif verifier.sampled(settings.verify_fraction_predictions):
                target = int(np.argmax(probs[row]))
            else:
                continue
            acts = {layer.layer: activations[layer.layer][row:row + 1].copy() for layer in self.concepts.spec.layers}
            jobs.append(VerifyJob(acts, target, settings.network_concepts))
        return jobs

    def _explanation(self, predictions: list[Prediction], target: int, parts: Sequence[Part],
                     batch: _BatchStages) -> Explanation:
        """One explanation body from its views' parts: their fields and stage milliseconds,
        beside the batch's stages (decode, classifier and concept encoders, once per batch)."""
        fields: dict[str, Any] = {}
        ms: dict[str, float] = {}
        for part in parts:
            fields.update(part.fields)
            ms.update(part.ms)
        timings = Timings(decode=batch.decode_ms, classifier=batch.classifier_ms, batch_size=batch.batch_size,
                          concepts=batch.concepts_ms, **ms)
        return Explanation(predictions=predictions, target=Target(index=target, label=self.meta.classes[target]),
                           validity=self.validity, model=self.model_info, timings_ms=timings, **fields)

    @staticmethod
    def _error_reply(exc: BaseException, log_fault: bool = True) -> Reply:
        status, answer = errors.to_answer(exc)
        if status >= 500 and log_fault:
            log.error("request failed with a server fault", exc_info=exc)
        return Reply(status, answer)
