"""The explainer service: everything a TorchServe worker does, without TorchServe.

:class:`ExplainerService` takes a batch of raw requests and returns one reply per request.
Each request is parsed and validated on its own, so a bad request gets its own 4xx reply
while its neighbours in the batch are answered; the valid images of the batch go through
the classifier in one onnxruntime run.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from handlers.runtime import errors
from handlers.runtime.bundle import Bundle, load_bundle
from handlers.runtime.classifier import OnnxClassifier, make_session, softmax
from handlers.runtime.errors import ExplainerError
from handlers.runtime.imaging import decode_image, normalize, to_pixels
from handlers.runtime.schema import PredictRequest, parse_predict, top_predictions
from handlers.runtime.settings import HandlerSettings

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


class ExplanationsUnavailable(ExplainerError):
    """This bundle carries no explanation artifacts yet."""

    status = 501


class ExplainerService:
    """Loaded model bundle plus onnxruntime sessions; stateless across requests."""

    def __init__(self, bundle: Bundle, settings: HandlerSettings, classifier: OnnxClassifier) -> None:
        self.bundle = bundle
        self.meta = bundle.metadata
        self.settings = settings
        self.classifier = classifier

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
        log.info("loaded bundle %s (sha256 %s) on %s", bundle.root, bundle.sha256, session.get_providers())
        return cls(bundle, settings, classifier)

    # -- request handling ---------------------------------------------------------------

    def _prepare(self, raw: RawRequest) -> tuple[PredictRequest, np.ndarray]:
        if raw.explain:
            raise ExplanationsUnavailable(
                f"model {self.meta.name} was archived without explanation artifacts; use /predictions")
        req = parse_predict(raw.value, raw.content_type, max_bytes=self.settings.max_request_bytes,
                            num_classes=len(self.meta.classes))
        image = decode_image(req.image, max_pixels=self.settings.max_image_pixels,
                             allowed_formats=self.settings.allowed_formats)
        return req, to_pixels(image, self.meta.input)

    def handle_batch(self, requests: Sequence[RawRequest]) -> list[Reply]:
        """Answer every request of a batch; never raises for a bad request."""
        replies: list[Reply | None] = [None] * len(requests)
        parsed: list[tuple[int, PredictRequest, np.ndarray]] = []
        t0 = time.perf_counter()
        for i, raw in enumerate(requests):
            try:
                req, pixels = self._prepare(raw)
                parsed.append((i, req, pixels))
            except Exception as exc:  # noqa: BLE001 - every failure becomes this request's reply
                replies[i] = self._error_reply(exc)
        decode_ms = (time.perf_counter() - t0) * 1000 / max(len(requests), 1)
        if parsed:
            try:
                self._predict(parsed, replies, decode_ms)
            except Exception as exc:  # noqa: BLE001 - a server fault answers the valid requests with 500
                for i, _, _ in parsed:
                    replies[i] = self._error_reply(exc)
        return [r if r is not None else Reply(500, errors.to_http(RuntimeError())[1]) for r in replies]

    def _predict(self, parsed: list[tuple[int, PredictRequest, np.ndarray]],
                 replies: list[Reply | None], decode_ms: float) -> None:
        t0 = time.perf_counter()
        x = normalize(np.stack([p for _, _, p in parsed]), self.meta.input)
        out = self.classifier(x)
        probs = softmax(out.logits)
        classifier_ms = (time.perf_counter() - t0) * 1000
        for row, (i, req, _) in enumerate(parsed):
            k = min(req.top_k or self.settings.top_k, len(self.meta.classes))
            replies[i] = Reply(200, {"predictions": top_predictions(probs[row], self.meta.classes, k)},
                               {"decode": decode_ms, "classifier": classifier_ms})

    @staticmethod
    def _error_reply(exc: BaseException) -> Reply:
        status, body = errors.to_http(exc)
        if status >= 500:
            log.exception("request failed with a server fault", exc_info=exc)
        return Reply(status, body)
