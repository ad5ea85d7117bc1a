"""The TorchServe handler with a mock context: batching, per-request errors, exact answers."""
from __future__ import annotations

import base64
import importlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from handlers.runtime.errors import ArtifactError
from tests.answer_schema import assert_answer, assert_valid, is_explain
from tests.handler.mock_context import make_context, model_dir_from_bundle, prepare_batch, wire_request
from tests.reference import reference_probabilities

handler_module = importlib.import_module("handlers.concept_handler")


@pytest.fixture(scope="module")
def model_dir(tiny_bundle: Path, tmp_path_factory) -> Path:
    return model_dir_from_bundle(tiny_bundle, tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def handler(model_dir: Path):
    h = handler_module.ConceptExplainerHandler()
    h.initialize(make_context(model_dir))
    return h


def run(handler, model_dir, batch):
    ctx = make_context(model_dir)
    data = prepare_batch(ctx, batch)
    bodies = handler.handle(data, ctx)
    assert len(bodies) == len(batch)
    out = []
    for i, body in enumerate(bodies):
        status, _ = ctx.get_response_status(i)
        assert ctx.get_response_content_type(i) == "application/json"
        out.append((status, json.loads(body)))
        assert_answer(status, out[-1][1], is_explain(batch[i]))
    return out


def test_module_defines_exactly_one_class():
    from ts.utils.util import list_classes_from_module
    assert [c.__name__ for c in list_classes_from_module(handler_module)] == ["ConceptExplainerHandler"]


def test_single_image_matches_direct_onnxruntime(handler, model_dir, tiny_bundle, sample_pngs):
    [(status, body)] = run(handler, model_dir, [wire_request(sample_pngs[0])])
    assert status == 200
    ref = reference_probabilities(tiny_bundle, sample_pngs[0])
    preds = body["predictions"]
    assert len(preds) == 5
    assert [p["index"] for p in preds] == list(np.argsort(-ref, kind="stable")[:5])
    for p in preds:
        assert p["probability"] == pytest.approx(ref[p["index"]], abs=2e-6)


def test_batch_of_eight_equals_one_by_one(handler, model_dir, sample_pngs):
    pngs = (sample_pngs * 2)[:8]
    batched = run(handler, model_dir, [wire_request(p, idx=i) for i, p in enumerate(pngs)])
    single = [run(handler, model_dir, [wire_request(p)])[0] for p in pngs]
    for (s1, b1), (s2, b2) in zip(batched, single):
        assert s1 == s2 == 200
        assert [p["index"] for p in b1["predictions"]] == [p["index"] for p in b2["predictions"]]
        np.testing.assert_allclose([p["probability"] for p in b1["predictions"]],
                                   [p["probability"] for p in b2["predictions"]], atol=1e-5)


def test_bad_request_in_a_batch_does_not_fail_neighbours(handler, model_dir, sample_pngs):
    good = sample_pngs[1]
    batch = [
        wire_request(good, idx=0),
        wire_request(b"not an image", idx=1),
        wire_request(good[: len(good) // 2], idx=2),
        wire_request(b"", idx=3),
        wire_request('{"data": ', "application/json", idx=4),
        wire_request(json.dumps({"data": base64.b64encode(good).decode(), "top_k": 2}), "application/json", idx=5),
        wire_request(json.dumps({"data": "%%%"}), "application/json", idx=6),
        wire_request(good, "text/plain", idx=7),
    ]
    out = run(handler, model_dir, batch)
    statuses = [s for s, _ in out]
    assert statuses == [200, 400, 400, 400, 400, 200, 400, 415]
    assert out[1][1]["error"]["type"] == "InvalidImage"
    assert out[4][1]["error"]["type"] == "InvalidRequest"
    assert out[7][1]["error"]["type"] == "UnsupportedMediaType"
    assert len(out[5][1]["predictions"]) == 2
    assert out[0][1]["predictions"][0] == out[5][1]["predictions"][0]


def test_pixel_limit_from_model_config(model_dir, sample_pngs):
    h = handler_module.ConceptExplainerHandler()
    h.initialize(make_context(model_dir, {"max_image_pixels": 100}))
    [(status, body)] = run(h, model_dir, [wire_request(sample_pngs[0])])
    assert status == 413 and body["error"]["type"] == "PayloadTooLarge"


def test_explanations_endpoint_without_artifacts_is_501(handler, model_dir, sample_pngs):
    [(status, body)] = run(handler, model_dir, [wire_request(sample_pngs[0], explain=True)])
    assert status == 501 and body["error"]["type"] == "ExplanationsUnavailable"


def test_multipart_field_named_data(handler, model_dir, sample_pngs):
    [(status, body)] = run(handler, model_dir, [wire_request(sample_pngs[0], name="data")])
    assert status == 200 and body["predictions"]


def test_corrupted_bundle_refuses_to_load(model_dir, tmp_path):
    broken = model_dir_from_bundle(model_dir / "bundle", tmp_path / "broken")
    onnx = broken / "bundle" / "classifier.onnx"
    data = bytearray(onnx.read_bytes())
    data[1000] ^= 0xFF
    onnx.write_bytes(bytes(data))
    h = handler_module.ConceptExplainerHandler()
    with pytest.raises(ArtifactError, match="classifier.onnx"):
        h.initialize(make_context(broken))


def test_wire_response_carries_per_request_status(handler, model_dir, sample_pngs):
    """TorchServe's own response encoder sends each request's status code."""
    from ts.protocol.otf_message_handler import create_predict_response
    ctx = make_context(model_dir)
    data = prepare_batch(ctx, [wire_request(sample_pngs[0], idx=0), wire_request(b"junk", idx=1)])
    bodies = handler.handle(data, ctx)
    msg = bytes(create_predict_response(bodies, ctx.request_ids, "Prediction success", 200, context=ctx))
    replies = parse_wire_response(msg)
    assert [(r[0], r[1]) for r in replies] == [("req-0", 200), ("req-1", 400)]
    assert_valid(json.loads(replies[0][2]), "predictions"), assert_valid(json.loads(replies[1][2]), "error")
    assert "predictions" in json.loads(replies[0][2]) and json.loads(replies[1][2])["error"]["type"] == "InvalidImage"


def parse_wire_response(msg: bytes) -> list[tuple[str, int, bytes]]:
    """Decode the worker's predict response frame into (request id, HTTP status, body)."""
    pos = 0

    def take_int() -> int:
        nonlocal pos
        (v,) = struct.unpack_from("!i", msg, pos)
        pos += 4
        return v

    def take_bytes() -> bytes:
        nonlocal pos
        n = take_int()
        out = msg[pos:pos + n]
        pos += n
        return out

    take_int()  # batch status code
    take_bytes()  # batch message
    replies = []
    while True:
        n = take_int()
        if n == -1:
            return replies
        req_id = msg[pos:pos + n].decode()
        pos += n
        take_bytes()  # content type
        code = take_int()
        take_bytes()  # reason phrase
        for _ in range(take_int()):  # response headers
            take_bytes()
            take_bytes()
        replies.append((req_id, code, take_bytes()))
