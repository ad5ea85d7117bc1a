"""TorchServe entry point: the only module that knows TorchServe.

It translates TorchServe's batch (``data`` list plus ``context``) into
:class:`handlers.runtime.service.RawRequest` objects, sets each request's HTTP status and
content type, and returns one JSON body per request. All logic lives in
``handlers.runtime`` so the core can move to another server. TorchServe's loader requires
exactly one class in this module.
"""
from __future__ import annotations

import logging
from typing import Any

from handlers.runtime import metrics as metrics_mod
from handlers.runtime import protocols
from handlers.runtime import service as service_mod
from handlers.runtime import settings as settings_mod

log = logging.getLogger(__name__)

_BODY_KEYS = ("data", "body", "file", "image")


def _header(headers: dict[str, Any], name: str) -> str | None:
    lname = name.lower()
    for key, value in headers.items():
        if key.lower() == lname and isinstance(value, str):
            return value
    return None


class ConceptExplainerHandler:
    """TorchServe custom handler: ``initialize(context)`` once, ``handle(data, context)`` per batch."""

    def __init__(self) -> None:
        self.service: service_mod.ExplainerService | None = None
        self.initialized = False
        self._metric_objects: dict[str, Any] = {}
        self.model_name = ""
        self.model_version = ""

    def initialize(self, context: Any) -> None:
        """Read settings once, verify and load the bundle. A bad bundle fails loading."""
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        settings = settings_mod.HandlerSettings.from_mapping(yaml_config.get("handler"))
        model_dir = context.system_properties.get("model_dir")
        gpu_id = context.system_properties.get("gpu_id")  # TorchServe: this worker's GPU, None without one
        self.service = service_mod.ExplainerService.load(model_dir, settings,
                                                         None if gpu_id is None else int(gpu_id))
        self.model_name = getattr(context, "model_name", "") or self.service.meta.name
        manifest = getattr(context, "manifest", None) or {}
        self.model_version = str(manifest.get("model", {}).get("modelVersion") or self.service.meta.version)
        # Sampled verification reports from its own thread as each job finishes: TorchServe's
        # backend metrics are log lines, which any thread may write.
        self.service.report_verification_to(lambda samples: self._emit(context, samples), self.model_version)
        self._emit(context, self.service.baseline_samples())
        self.initialized = True

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[bytes]:
        """One JSON body per request, with per-request status and content type set.

        A request may be a KServe v1/v2 envelope of several images: every envelope's
        instances join one service batch, and each envelope is answered in its protocol."""
        assert self.service is not None, "handler used before initialize()"
        batch_metrics = metrics_mod.BatchMetrics()
        wires = protocols.answer_requests(self.service, [self._raw_request(i, row, context)
                                                         for i, row in enumerate(data or [])],
                                          self.model_name, self.model_version, batch_metrics)
        failed = sum(w.status >= 400 for w in wires)
        log.info("handled batch n=%d ok=%d failed=%d", len(wires), len(wires) - failed, failed)
        for i, wire in enumerate(wires):
            context.set_response_status(wire.status, "", idx=i)
            context.set_response_content_type(i, "application/json")
        self._emit(context, batch_metrics.samples())
        return [w.body for w in wires]

    def close(self) -> None:
        """Release the service's threads (TorchServe has no unload hook; a host that stops
        the handler, or a test, calls this). Idempotent."""
        if self.service is not None:
            self.service.close()

    def _emit(self, context: Any, samples: list[metrics_mod.Sample]) -> None:
        """Hand samples to TorchServe's metrics API (declared in metrics.yaml). Metrics never
        fail a request: a missing or broken metrics cache only logs."""
        cache = getattr(context, "metrics", None)
        if cache is None:
            return
        for sample in samples:
            try:
                metric = self._metric_objects.get(sample.name)
                kind, unit, label_names = metrics_mod.METRICS[sample.name]
                if metric is None:
                    metric = self._metric_objects[sample.name] = self._lookup_metric(cache, sample.name, kind, unit,
                                                                                     label_names)
                labels = dict(sample.labels)
                metric.add_or_update(sample.value, [self.model_name, *[labels[n] for n in label_names]])
            except Exception:  # noqa: BLE001 - metrics must not break serving
                log.warning("could not record metric %s", sample.name, exc_info=True)

    @staticmethod
    def _lookup_metric(cache: Any, name: str, kind: str, unit: str, label_names: tuple[str, ...]) -> Any:
        from ts.metrics.metric_type_enum import MetricTypes
        metric_type = {"counter": MetricTypes.COUNTER, "gauge": MetricTypes.GAUGE,
                       "histogram": MetricTypes.HISTOGRAM}[kind]
        try:
            return cache.get_metric(name, metric_type)
        except Exception:  # noqa: BLE001 - not declared in metrics.yaml: declare it now
            return cache.add_metric_to_cache(name, unit, ["ModelName", *label_names], metric_type)

    @staticmethod
    def _raw_request(idx: int, row: dict[str, Any], context: Any) -> service_mod.RawRequest:
        headers: dict[str, Any] = {}
        try:
            headers = context.get_all_request_header(idx) or {}
        except (AttributeError, IndexError, TypeError):
            pass
        key = next((k for k in _BODY_KEYS if k in row), None)
        if key is None and len(row) == 1:
            key = next(iter(row))
        value = row.get(key) if key is not None else None
        part = headers.get(key) if key is not None else None
        content_type = part.get("content-type") if isinstance(part, dict) else None
        content_type = content_type or _header(headers, "Content-Type")
        explain = (_header(headers, "explain") or "").lower() == "true"
        return service_mod.RawRequest(value=value, content_type=content_type, explain=explain)
