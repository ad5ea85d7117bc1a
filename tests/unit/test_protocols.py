"""Envelope detection and closing rules of the KServe protocols, without a model."""
from __future__ import annotations

import base64
import json

import pytest

from handlers.runtime.answer import ErrorAnswer, ErrorDetail, Prediction, PredictionsAnswer
from handlers.runtime.errors import InvalidImage, InvalidRequest, PayloadTooLarge
from handlers.runtime.protocols import Protocol, close_envelope, open_envelope
from handlers.runtime.service import RawRequest, Reply
from tests.answer_schema import assert_valid

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 8


def opened(value, content_type="application/json", explain=False, max_instances=4):
    return open_envelope(RawRequest(value, content_type, explain), max_bytes=1 << 20, max_instances=max_instances)


@pytest.mark.parametrize("value, content_type, protocol", [
    (PNG, "image/png", Protocol.REST),
    (b'{"data": "AAAA"}', "application/json", Protocol.REST),
    ({"data": "AAAA"}, "application/json", Protocol.REST),
    (b'{"instances": ["AAAA"]}', None, Protocol.V1),
    ('{"instances": ["AAAA"]}', "application/json", Protocol.V1),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["AAAA"]}]}, None, Protocol.V2),
    (b'{"instances": [', "application/json", Protocol.REST),  # malformed JSON: the plain parser's error
    (b"[1, 2]", "application/json", Protocol.REST),
])
def test_protocol_is_read_from_the_body(value, content_type, protocol):
    assert opened(value, content_type).protocol is protocol


def test_plain_bodies_pass_through_unchanged():
    raw = RawRequest(PNG, "image/png", True)
    env = open_envelope(raw, max_bytes=100, max_instances=1)
    assert env.instances == (raw,) and env.explain


def test_v2_elements_raw_image_bytes_and_base64_text_become_the_same_request():
    b = base64.b64encode(PNG).decode()
    env = opened({"inputs": [{"name": "x", "shape": [3], "datatype": "BYTES", "data": [PNG, b.encode(), b]}],
                  "parameters": {"top_k": 1, "binary_data_output": False}})
    assert [r.value for r in env.instances] == [{"top_k": 1, "data": b}] * 3
    assert env.error is None


def test_limits_and_malformed_envelopes_are_the_envelopes_error():
    assert isinstance(opened({"instances": ["a"] * 5}).error, PayloadTooLarge)
    assert isinstance(opened({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
                              "id": 3}).error, InvalidRequest)
    env = opened({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [None]}]})
    assert env.error is None and isinstance(env.instances[0].error, InvalidRequest)


def ok(label="a"):
    return Reply(200, PredictionsAnswer(predictions=[Prediction(index=0, label=label, probability=0.75)]))


def bad(status=400, cls=InvalidImage):
    return Reply(status, ErrorAnswer(error=ErrorDetail(type=cls.__name__, message="nope")))


def test_status_is_200_if_any_instance_was_answered_else_the_first_failure():
    env = opened({"instances": ["a", "b"]})
    wire = close_envelope(env, [bad(), ok()], "m", "2")
    assert wire.status == 200
    body = json.loads(wire.body)
    assert_valid(body, "v1-predictions")
    assert body["predictions"][0] == {"error": {"type": "InvalidImage", "message": "nope"}}
    wire = close_envelope(env, [bad(413, PayloadTooLarge), bad()], "m", "2")
    assert wire.status == 413
    assert json.loads(wire.body) == {"error": "instance 0: PayloadTooLarge: nope; instance 1: InvalidImage: nope"}


def test_v2_answer_has_one_row_per_instance():
    env = opened({"id": "x", "inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]})
    body = json.loads(close_envelope(env, [ok("cat"), bad()], "m", "2").body)
    assert_valid(body, "v2")
    out = {o["name"]: o for o in body["outputs"]}
    assert (body["id"], body["model_name"], body["model_version"]) == ("x", "m", "2")
    assert out["label"]["data"] == ["cat", ""] and out["probability"]["data"] == [0.75, 0.0]
    assert json.loads(out["answer"]["data"][1])["error"]["type"] == "InvalidImage"


def test_reply_count_must_match_instances():
    with pytest.raises(ValueError):
        close_envelope(opened({"instances": ["a", "b"]}), [ok()], "m", "2")
