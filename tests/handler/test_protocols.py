"""KServe v1 and Open Inference Protocol (v2) envelopes through the handler (mock context).

Every instance must get exactly the body the plain endpoint gives the same image and
options (timings aside), in order, with its own error when bad.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from handlers.concept_handler import ConceptExplainerHandler
from tests.answer_schema import assert_answer, assert_valid
from tests.handler.mock_context import make_context, prepare_batch, wire_request


@pytest.fixture(scope="module")
def handler(model_dir: Path) -> ConceptExplainerHandler:
    h = ConceptExplainerHandler()
    h.initialize(make_context(model_dir))
    yield h
    h.close()


def b64(png: bytes) -> str:
    return base64.b64encode(png).decode()


def send(handler, model_dir, bodies: list[tuple[Any, bool]]) -> list[tuple[int, dict]]:
    """One TorchServe batch of JSON bodies (body, explain) -> [(status, parsed body)]."""
    ctx = make_context(model_dir)
    batch = [wire_request(json.dumps(b), "application/json", explain=e, idx=i) for i, (b, e) in enumerate(bodies)]
    out = handler.handle(prepare_batch(ctx, batch), ctx)
    return [(ctx.get_response_status(i)[0], json.loads(body)) for i, body in enumerate(out)]


def plain(handler, model_dir, png: bytes, explain: bool, **options) -> dict:
    ((status, body),) = send(handler, model_dir, [({"data": b64(png), **options}, explain)])
    assert status == 200
    assert_answer(status, body, explain)
    return body


def untimed(body: dict) -> dict:
    """The body without what differs between two runs of the same request: timings."""
    return {k: v for k, v in body.items() if k != "timings_ms"}


def test_v1_predict_answers_every_instance_in_order(handler, model_dir, sample_pngs):
    good0, good1 = sample_pngs[0], sample_pngs[3]
    body = {"instances": [{"data": b64(good0)}, {"data": "not base64!"}, b64(good1), {"data": b64(b"GIF89a...")}]}
    ((status, answer),) = send(handler, model_dir, [(body, False)])
    assert status == 200
    assert_valid(answer, "v1-predictions")
    preds = answer["predictions"]
    assert len(preds) == 4
    assert preds[0] == plain(handler, model_dir, good0, False)
    assert preds[1]["error"]["type"] == "InvalidRequest"
    assert preds[2] == plain(handler, model_dir, good1, False)
    assert preds[3]["error"]["type"] in {"InvalidImage", "UnsupportedMediaType"}


def test_v1_explain_instances_carry_their_own_options(handler, model_dir, sample_pngs):
    png = sample_pngs[1]
    body = {"instances": [{"data": b64(png), "target": 2, "top_concepts": 3},
                          {"data": b64(png), "views": ["features"]},
                          {"data": b64(png), "target": "no such class"}]}
    ((status, answer),) = send(handler, model_dir, [(body, True)])
    assert status == 200
    assert_valid(answer, "v1-explanations")
    first, second, bad = answer["explanations"]
    assert untimed(first) == untimed(plain(handler, model_dir, png, True, target=2, top_concepts=3))
    assert untimed(second) == untimed(plain(handler, model_dir, png, True, views=["features"]))
    assert first["target"]["index"] == 2 and len(first["concepts"]) == 3
    assert "concepts" not in second
    assert bad["error"]["type"] == "UnknownTarget"


def v2_outputs(answer: dict) -> dict[str, dict]:
    return {o["name"]: o for o in answer["outputs"]}


def test_v2_infer_matches_predictions_and_echoes_the_id(handler, model_dir, sample_pngs):
    pngs = sample_pngs[:3]
    body = {"id": "req-42", "inputs": [{"name": "images", "shape": [3], "datatype": "BYTES",
                                        "data": [b64(p) for p in pngs]}],
            "parameters": {"top_k": 2, "content_type": "base64"}}
    ((status, answer),) = send(handler, model_dir, [(body, False)])
    assert status == 200
    assert_valid(answer, "v2")
    assert answer["id"] == "req-42" and answer["model_name"] == "tiny" and answer["model_version"] == "0.1"
    out = v2_outputs(answer)
    assert out["answer"]["shape"] == [3] and out["answer"]["datatype"] == "BYTES"
    for i, png in enumerate(pngs):
        expected = plain(handler, model_dir, png, False, top_k=2)
        assert json.loads(out["answer"]["data"][i]) == expected
        assert out["label"]["data"][i] == expected["predictions"][0]["label"]
        assert out["probability"]["data"][i] == expected["predictions"][0]["probability"]


def test_v2_explain_by_route_or_parameter_and_nested_data(handler, model_dir, sample_pngs):
    png = sample_pngs[2]
    expected = untimed(plain(handler, model_dir, png, True, top_concepts=2))
    by_route = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "BYTES", "data": [[b64(png)]]}],
                "parameters": {"top_concepts": 2}}
    by_parameter = {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [b64(png)]}],
                    "parameters": {"top_concepts": 2, "explain": True}}
    answers = send(handler, model_dir, [(by_route, True), (by_parameter, False)])
    for status, answer in answers:
        assert status == 200
        assert_valid(answer, "v2")
        (text,) = v2_outputs(answer)["answer"]["data"]
        assert untimed(json.loads(text)) == expected
        assert json.loads(text)["timings_ms"]["batch_size"] == 2  # both envelopes in one classifier run


def test_v2_mixed_instances_and_failed_rows(handler, model_dir, sample_pngs):
    body = {"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "data": [b64(sample_pngs[0]), 7]}]}
    ((status, answer),) = send(handler, model_dir, [(body, False)])
    assert status == 200
    out = v2_outputs(answer)
    assert json.loads(out["answer"]["data"][1])["error"]["type"] == "InvalidRequest"
    assert out["label"]["data"][1] == "" and out["probability"]["data"][1] == 0.0
    assert out["label"]["data"][0] != ""


@pytest.mark.parametrize("body, explain, status, starts", [
    ({"instances": "abc"}, False, 400, "InvalidRequest: \"instances\" must be a list"),
    ({"instances": []}, False, 400, "InvalidRequest: \"instances\" is empty"),
    ({"instances": [{"data": "x"}], "extra": 1}, False, 400, "InvalidRequest: unknown fields ['extra']"),
    ({"instances": [{"data": "AAAA"}] * 33}, False, 413, "PayloadTooLarge"),
    ({"instances": [{"data": "AAAA"}]}, False, 400, "InvalidImage"),
    ({"instances": [{"data": "AAAA", "top_concepts": 2}]}, False, 400, "InvalidOption: unknown fields"),
    ({"instances": [{"data": "AAAA"}, {"data": "!"}]}, True, 400, "instance 0: InvalidImage"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, False, 400,
     "InvalidRequest: the input tensor must have datatype \"BYTES\""),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "data": ["a"]}]}, False, 400,
     "InvalidRequest: the input tensor's \"shape\""),
    ({"inputs": []}, False, 400, "InvalidRequest: \"inputs\" must be a list of exactly one tensor"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["AAAA"]}],
      "parameters": {"colour": "red"}}, False, 400, "InvalidOption: unknown fields ['colour']"),
])
def test_protocol_errors_use_kserves_error_shape(handler, model_dir, body, explain, status, starts):
    ((got, answer),) = send(handler, model_dir, [(body, explain)])
    assert got == status
    assert_valid(answer, "protocol-error")
    assert answer["error"].startswith(starts), answer["error"]


def test_a_bad_envelope_does_not_fail_its_neighbours(handler, model_dir, sample_pngs):
    png = sample_pngs[4]
    answers = send(handler, model_dir, [({"instances": 5}, False), ({"data": b64(png)}, False),
                                        ({"instances": [b64(png)]}, False)])
    assert answers[0][0] == 400
    assert answers[1] == (200, plain(handler, model_dir, png, False))
    assert answers[2] == (200, {"predictions": [answers[1][1]]})
