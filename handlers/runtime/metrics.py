"""Handler metrics: names, labels and per-batch aggregation (TorchServe-free).

The service reports what happened in a batch as a list of :class:`Sample`; the handler
module hands them to TorchServe's metrics API (declared in ``metrics.yaml``), which exposes
them on TorchServe's Prometheus endpoint. Counters are aggregated per batch, so one batch
costs one update per label set, not one per request.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

REQUESTS = "concept_explainer_requests_total"
ERRORS = "concept_explainer_errors_total"
RESPONSE_BYTES = "concept_explainer_response_bytes_total"
PREDICTED_CLASS = "concept_explainer_predicted_class_total"
CONCEPT_STATE = "concept_explainer_concept_state_total"
CONCEPT_BASELINE = "concept_explainer_concept_state_baseline_ratio"
STAGE_LATENCY = "concept_explainer_stage_latency_seconds"
EXECUTION_PROVIDER = "concept_explainer_execution_provider"
VERIFY_PROBABILITY_ERROR = "concept_explainer_verify_probability_error"
VERIFY_AGREEMENT = "concept_explainer_verify_agreement"
VERIFY_JOBS = "concept_explainer_verify_total"
VERIFY_OFFLINE_AGREEMENT = "concept_explainer_verify_offline_agreement"
VERIFY_OFFLINE_PROBABILITY_ERROR = "concept_explainer_verify_offline_probability_error"

#: name -> (kind, unit, label names); must match metrics.yaml.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    REQUESTS: ("counter", "Count", ("endpoint", "status")),
    ERRORS: ("counter", "Count", ("error_type",)),
    RESPONSE_BYTES: ("counter", "Bytes", ("endpoint",)),
    PREDICTED_CLASS: ("counter", "Count", ("class",)),
    CONCEPT_STATE: ("counter", "Count", ("concept", "state")),
    CONCEPT_BASELINE: ("gauge", "Ratio", ("concept", "state")),
    STAGE_LATENCY: ("histogram", "Seconds", ("stage",)),
    # 1 for the worker's first execution provider in use and its device (a worker that fell back
    # to the CPU shows provider="CPUExecutionProvider", device="cpu").
    EXECUTION_PROVIDER: ("gauge", "Count", ("provider", "device")),
    # Sampled verification of served explanations (verify_fraction), per concept layer and
    # layer="all": |served - network| of each P(target | do(state)) of a verified answer, and the
    # answer's agreement (recall@3 of its ranking against the network's own effects).
    VERIFY_PROBABILITY_ERROR: ("histogram", "Probability", ("model_version", "layer")),
    VERIFY_AGREEMENT: ("histogram", "Ratio", ("model_version", "layer")),
    # Verification jobs by outcome: verified, dropped (queue full), failed.
    VERIFY_JOBS: ("counter", "Count", ("model_version", "outcome")),
    # The same two figures measured offline on the export's held-out images (the bundle's
    # effect-truth report): what the live figures are compared with.
    VERIFY_OFFLINE_AGREEMENT: ("gauge", "Ratio", ("model_version", "layer")),
    VERIFY_OFFLINE_PROBABILITY_ERROR: ("gauge", "Probability", ("model_version", "layer")),
}
STAGES = ("decode", "classifier", "concepts", "causal", "cladec", "features", "encode", "verify")


@dataclass(frozen=True)
class Sample:
    """One metric update: counters add ``value``; histograms observe it; gauges set it."""

    name: str
    value: float
    labels: tuple[tuple[str, str], ...]


class BatchMetrics:
    """Collects one batch's observations and turns them into aggregated samples."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.observations: list[Sample] = []

    def count(self, name: str, value: float = 1, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        self.counts[key] = self.counts.get(key, 0) + value

    def observe(self, name: str, value: float, **labels: str) -> None:
        self.observations.append(Sample(name, float(value), tuple(sorted(labels.items()))))

    def add(self, sample: Sample) -> None:
        """One sample made elsewhere: counters are aggregated, the rest kept as they are."""
        if METRICS[sample.name][0] == "counter":
            key = (sample.name, tuple(sorted(sample.labels)))
            self.counts[key] = self.counts.get(key, 0) + sample.value
        else:
            self.observations.append(Sample(sample.name, sample.value, tuple(sorted(sample.labels))))

    def samples(self) -> list[Sample]:
        return [Sample(n, float(v), l) for (n, l), v in sorted(self.counts.items())] + self.observations


class PrometheusExporter:
    """Feeds :class:`Sample` lists into a ``prometheus_client`` registry under the names and
    labels TorchServe exposes for ``metrics.yaml`` (``ModelName``, the metric's own labels,
    ``Hostname``), so one dashboard reads either server. Used by front doors that serve
    their own ``/metrics`` (the KServe model server)."""

    def __init__(self, model_name: str, registry: Any = None, hostname: str | None = None) -> None:
        import socket

        import prometheus_client
        self._prom = prometheus_client
        self.registry = registry if registry is not None else prometheus_client.REGISTRY
        self.model_name = model_name
        self.hostname = hostname or socket.gethostname()
        self._metrics: dict[str, Any] = {}
        self._lock = threading.Lock()  # front doors may emit from several request threads

    def _metric(self, name: str) -> Any:
        with self._lock:
            metric = self._metrics.get(name)
            if metric is None:
                kind, unit, label_names = METRICS[name]
                labels = ["ModelName", *label_names, "Hostname"]
                cls = {"counter": self._prom.Counter, "gauge": self._prom.Gauge,
                       "histogram": self._prom.Histogram}[kind]
                metric = self._metrics[name] = cls(name, f"{name} ({unit})", labels, registry=self.registry)
            return metric

    def emit(self, samples: list[Sample]) -> None:
        """Counters add, gauges set, histograms observe each sample."""
        for sample in samples:
            kind = METRICS[sample.name][0]
            labels = dict(sample.labels)
            child = self._metric(sample.name).labels(
                self.model_name, *[labels[n] for n in METRICS[sample.name][2]], self.hostname)
            if kind == "counter":
                child.inc(sample.value)
            elif kind == "gauge":
                child.set(sample.value)
            else:
                child.observe(sample.value)
