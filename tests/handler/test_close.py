"""The handler's close(): stops the helper thread (ClaDec, concept graphs); the handler still answers."""
from __future__ import annotations

import json
import threading
from pathlib import Path

from handlers.concept_handler import ConceptExplainerHandler
from tests.answer_schema import assert_valid
from tests.handler.mock_context import make_context, prepare_batch, wire_request


def explain(handler: ConceptExplainerHandler, model_dir: Path, png: bytes) -> dict:
    ctx = make_context(model_dir)
    [body] = handler.handle(prepare_batch(ctx, [wire_request(png, explain=True)]), ctx)
    assert ctx.get_response_status(0)[0] == 200
    doc = json.loads(body)
    assert_valid(doc, "explanations")
    return doc


def test_close_stops_the_helper_thread_and_answers_stay_the_same(model_dir, sample_pngs):
    h = ConceptExplainerHandler()
    h.initialize(make_context(model_dir, {"overlap_views": True}))
    before = set(threading.enumerate())
    first = explain(h, model_dir, sample_pngs[0])
    threads = {t for t in set(threading.enumerate()) - before if t.name.startswith("explainer-helper")}
    assert threads and any("reference_png" in e for e in first["cladec"])
    h.close()
    assert not any(t.is_alive() for t in threads)
    again = explain(h, model_dir, sample_pngs[0])  # every view now runs in line
    assert not {t for t in set(threading.enumerate()) - before if t.name.startswith("explainer-helper")}
    first.pop("timings_ms"), again.pop("timings_ms")
    assert again == first
    h.close()  # idempotent
