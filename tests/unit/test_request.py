"""Request parsing and response formatting of the REST contract."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from handlers.runtime.answer import Prediction
from handlers.runtime.errors import InvalidOption, InvalidRequest, PayloadTooLarge, UnsupportedMediaType, to_answer
from handlers.runtime.request import parse_predict

PNG = b"\x89PNG\r\n\x1a\nrest"


def parse(value, ctype=None, max_bytes=1000):
    return parse_predict(value, ctype, max_bytes=max_bytes, num_classes=10)


def test_raw_image_bytes():
    assert parse(PNG, "image/png").image == PNG
    assert parse(bytearray(PNG), None).image == PNG
    assert parse(PNG, "application/octet-stream").top_k is None


def test_json_forms_decoded_by_torchserve_or_not():
    body = {"data": base64.b64encode(PNG).decode(), "top_k": 3}
    for value, ctype in [(body, "application/json"), (json.dumps(body).encode(), "application/json"),
                         (json.dumps(body).encode(), None), (json.dumps(body), "text/plain")]:
        req = parse(value, ctype)
        assert req.image == PNG and req.top_k == 3


@pytest.mark.parametrize("value, ctype, exc", [
    (None, None, InvalidRequest),
    (b"", "image/png", InvalidRequest),
    (b'{"data": ', "application/json", InvalidRequest),
    (b"[1, 2]", "application/json", InvalidRequest),
    ({"top_k": 1}, "application/json", InvalidRequest),
    ({"data": 12}, "application/json", InvalidRequest),
    ({"data": "not base64!!"}, "application/json", InvalidRequest),
    ({"data": "aGk=", "views": ["x"]}, "application/json", InvalidOption),
    ({"data": "aGk=", "top_k": 0}, "application/json", InvalidOption),
    ({"data": "aGk=", "top_k": 11}, "application/json", InvalidOption),
    ({"data": "aGk=", "top_k": True}, "application/json", InvalidOption),
    ({"data": "aGk=", "top_k": "3"}, "application/json", InvalidOption),
    ("plain text", "text/plain", UnsupportedMediaType),
    (PNG, "application/x-www-form-urlencoded", UnsupportedMediaType),
    (b"x" * 1001, "image/png", PayloadTooLarge),
    ({"data": "A" * 2000}, "application/json", PayloadTooLarge),
])
def test_bad_requests_raise_typed_errors(value, ctype, exc):
    with pytest.raises(exc) as info:
        parse(value, ctype)
    status, answer = to_answer(info.value)
    body = answer.wire()
    assert 400 <= status < 500
    assert body["error"]["type"] == exc.__name__ and body["error"]["message"]


def test_unknown_exceptions_are_500_without_details():
    status, answer = to_answer(KeyError("secret internals"))
    body = answer.wire()
    assert status == 500 and "secret" not in json.dumps(body)


def test_top_predictions_sorted_and_labelled():
    p = np.array([0.1, 0.5, 0.05, 0.3, 0.05])
    out = [o.wire() for o in Prediction.top(p, ["a", "b", "c", "d", "e"], 3)]
    assert [o["label"] for o in out] == ["b", "d", "a"]
    assert [o["index"] for o in out] == [1, 3, 0]
    assert out[0]["probability"] == pytest.approx(0.5)
    ties = [o.wire() for o in Prediction.top(np.array([0.25] * 4), list("wxyz"), 4)]
    assert [o["index"] for o in ties] == [0, 1, 2, 3]
