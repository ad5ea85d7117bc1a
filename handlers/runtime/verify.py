"""Checking served causal numbers against the network they explain.

For the concepts of an answer, the method's own interventions are run through the network
(the concept's code channel set to each state's typical value, decoded, the rest of the
classifier run: the bundle's intervention graphs, one run per concept layer over all the
answer's (concept, state) pairs of that layer). Each concept then carries the network's
``P(target | do(state))`` and effect beside the served ones, and the answer its agreement.

Two users of this module:

- a request with ``"verify": true`` (on the request path, :func:`verify_records` and
  :func:`agreement`);
- sampled production traffic (:class:`BackgroundVerifier`): a share of served answers is
  re-derived and verified over *every* concept of the model after the reply has gone, on a
  bounded queue that drops work rather than delay a request, and the outcome is reported as
  metrics (:func:`verification_samples`).

The metric definitions are those of :mod:`handlers.runtime.faithfulness`, so the live
figures are the same statistics as the bundle's offline effect-truth report.
"""
from __future__ import annotations

import logging
import queue
import random
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from handlers.runtime.concept_view import ConceptBatch, ConceptExplainer, SourcedRecord
from handlers.runtime.faithfulness import ccc, recall_at_k
from handlers.runtime.metrics import (
    VERIFY_AGREEMENT,
    VERIFY_JOBS,
    VERIFY_PROBABILITY_ERROR,
    Sample,
)

log = logging.getLogger(__name__)

#: The label of the figures over all concept layers together.
ALL_LAYERS = "all"


@dataclass(frozen=True)
class ConceptCheck:
    """One concept's served numbers beside the network's own.

    ``served`` and ``network`` (S,): ``P(target | do(state))``; the effects use the same
    weights ``prior`` (S,) and observed ``state`` on both sides."""

    concept: str
    layer: str
    state: int
    prior: np.ndarray
    served: np.ndarray
    network: np.ndarray

    def _effect(self, p: np.ndarray) -> float:
        return float(p[self.state] - self.prior @ p)

    @property
    def served_effect(self) -> float:
        return self._effect(self.served)

    @property
    def network_effect(self) -> float:
        return self._effect(self.network)

    @property
    def abs_errors(self) -> np.ndarray:
        """(S,) ``|served p - network p|`` per state."""
        return np.abs(self.served - self.network)


@dataclass(frozen=True)
class Agreement:
    """Agreement of a set of concept checks: ``mae_p`` = mean |served p - network p| over
    (concept, state); ``effect_mae`` = mean |served effect - network effect|; Lin's ``ccc`` of
    the effects (None for fewer than two concepts); ``recall3`` = share of the network's three
    largest |effects| among the answer's first three concepts (k = the number of concepts
    when fewer), as the offline report ranks an answer by its order."""

    concepts: int
    mae_p: float
    effect_mae: float
    ccc: float | None
    recall3: float


def verify_records(explainer: ConceptExplainer, batch: ConceptBatch, row: int, target: int,
                   records: Sequence[SourcedRecord]) -> list[ConceptCheck]:
    """The network's answers to the interventions of ``records`` (the concepts of one answer,
    in its order) on image ``row`` of ``batch``: one intervention-graph run per concept layer.

    Raises:
        ValueError: the bundle has no intervention graph for a layer of ``records``.
    """
    by_layer: dict[str, list[int]] = {}
    for i, sourced in enumerate(records):
        layer, _ = explainer.where(sourced.record.concept)
        if layer not in explainer.interventions:
            raise ValueError(f"the archive has no intervention graph for concept layer {layer}")
        by_layer.setdefault(layer, []).append(i)
    network: dict[int, np.ndarray] = {}
    for layer, idx in by_layer.items():
        channels = [explainer.where(records[i].record.concept)[1] for i in idx]
        _, probs = explainer.network_probabilities(batch, row, layer, channels, target)
        network.update(zip(idx, probs))
    return [ConceptCheck(concept=s.record.concept, layer=explainer.where(s.record.concept)[0],
                         state=s.record.state, prior=s.record.prior, served=s.record.probabilities,
                         network=network[i])
            for i, s in enumerate(records)]


def agreement(checks: Sequence[ConceptCheck]) -> Agreement:
    """The :class:`Agreement` of ``checks`` (at least one), given in the answer's order."""
    if not checks:
        raise ValueError("agreement needs at least one concept check")
    served = np.array([c.served_effect for c in checks])
    network = np.array([c.network_effect for c in checks])
    return Agreement(concepts=len(checks),
                     mae_p=float(np.mean(np.concatenate([c.abs_errors for c in checks]))),
                     effect_mae=float(np.abs(served - network).mean()),
                     ccc=ccc(served, network),
                     recall3=recall_at_k(np.arange(len(checks), 0, -1, dtype=np.float64), network, 3))


def by_layer(checks: Sequence[ConceptCheck]) -> dict[str, list[ConceptCheck]]:
    """Checks grouped by concept layer, plus :data:`ALL_LAYERS` with every check; layers in
    first-seen order."""
    out: dict[str, list[ConceptCheck]] = {}
    for c in checks:
        out.setdefault(c.layer, []).append(c)
    return {**out, ALL_LAYERS: list(checks)}


def verification_samples(checks: Sequence[ConceptCheck], version: str) -> list[Sample]:
    """Metric samples of one verified answer over every concept of the model: per layer (and
    over all layers) the absolute error of each ``P(target | do(state))`` and the answer's
    agreement (recall@3 of its ranking against the network's), and one verified job."""
    out = []
    for layer, group in by_layer(checks).items():
        labels = (("layer", layer), ("model_version", version))
        out += [Sample(VERIFY_PROBABILITY_ERROR, float(e), labels) for c in group for e in c.abs_errors]
        out.append(Sample(VERIFY_AGREEMENT, agreement(group).recall3, labels))
    # last: a reader that sees the job counted sees its observations
    return out + [Sample(VERIFY_JOBS, 1.0, (("model_version", version), ("outcome", "verified")))]


@dataclass(frozen=True)
class VerifyJob:
    """One served image to verify: its activations at the concept layers (layer -> (1, ...)),
    the explained class and how many concepts the network answered when it was served."""

    activations: dict[str, np.ndarray]
    target: int
    network_concepts: int | None


def _stop_thread(jobs: queue.Queue[VerifyJob | None], thread: threading.Thread, timeout: float = 5.0) -> None:
    """Ask a verifier's thread to stop after the queued jobs and wait for it (``timeout`` s)."""
    try:
        jobs.put(None, timeout=timeout)
    except queue.Full:
        return
    thread.join(timeout)


class BackgroundVerifier:
    """Verifies sampled answers on one background thread, after their replies have gone.

    ``offer`` never blocks and never raises: a job that finds the queue full (``capacity``)
    is dropped and counted. Each finished job's samples go to ``sink`` (a front door's
    metrics), as do the counts of dropped and failed jobs. ``fraction``: the share of
    offered rows that are sampled (0: none; the sampling uses its own seeded generator)."""

    def __init__(self, explainer: ConceptExplainer, version: str, sink: Callable[[list[Sample]], None],
                 capacity: int = 64, seed: int = 0) -> None:
        self.explainer = explainer
        self.version = version
        self.sink = sink
        self._queue: queue.Queue[VerifyJob | None] = queue.Queue(maxsize=capacity)
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._idle = threading.Condition()
        self._pending = 0
        self._thread: threading.Thread | None = None
        self._at_exit: weakref.finalize | None = None
        self._closed = False

    def sampled(self, fraction: float) -> bool:
        """Whether one row is sampled at ``fraction`` (0..1)."""
        if fraction <= 0:
            return False
        with self._rng_lock:
            return fraction >= 1 or self._rng.random() < fraction

    def offer(self, job: VerifyJob) -> bool:
        """Queue ``job``; False (and a dropped count) when the queue is full or closed."""
        if self._closed:
            return False
        with self._idle:
            self._pending += 1
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()
            self._report(Sample(VERIFY_JOBS, 1.0, (("model_version", self.version), ("outcome", "dropped"))))
            return False
        self._start()
        return True

    def _start(self) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="concept-verifier", daemon=True)
                    self._thread.start()
                    # a process that exits without close() must not tear the interpreter down
                    # under a job still inside onnxruntime (the process aborts): stop at exit
                    self._at_exit = weakref.finalize(self, _stop_thread, self._queue, self._thread)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                samples = self._verify(job)
            except Exception:  # noqa: BLE001 - a failed check is counted, never raised into serving
                log.warning("background verification failed", exc_info=True)
                samples = [Sample(VERIFY_JOBS, 1.0, (("model_version", self.version), ("outcome", "failed")))]
            self._report(*samples)
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()

    def _verify(self, job: VerifyJob) -> list[Sample]:
        batch = self.explainer.encode(job.activations)
        # in line: the worker's helper thread belongs to the live requests
        records = self.explainer.answer(batch, 0, job.target, job.network_concepts, share=False)
        return verification_samples(verify_records(self.explainer, batch, 0, job.target, records), self.version)

    def _report(self, *samples: Sample) -> None:
        try:
            self.sink(list(samples))
        except Exception:  # noqa: BLE001 - metrics must not break serving
            log.warning("could not record verification metrics", exc_info=True)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every accepted job has been verified (tests, graceful stop); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Finish the queued jobs (at most ``timeout`` seconds) and stop the thread. Idempotent."""
        if self._closed:
            return
        self.wait_idle(timeout)
        self._closed = True
        if self._at_exit is not None:
            self._at_exit.detach()
        if self._thread is not None:
            _stop_thread(self._queue, self._thread, timeout)
