"""KServe's protocols around the plain REST contract: v1 and the Open Inference Protocol (v2).

One HTTP request of a KServe protocol carries several images (*instances*). A front door
opens the request's :class:`Envelope` (:func:`open_envelope`), hands its instances to the
service together with every other request of the batch, and closes the envelope with the
instances' replies (:func:`close_envelope`). Each instance is parsed exactly as a plain
``/predictions`` or ``/explanations`` body and answered with exactly that body, so a bad
instance gets its own error while its neighbours are answered.

Which protocol a body speaks is read from its shape, because TorchServe routes
``/v1/models/{m}:predict`` and ``/v2/models/{m}/infer`` to the handler without saying which
route it was: a JSON object with ``instances`` is v1, one with ``inputs`` is v2, anything
else is the plain contract (whose JSON bodies carry ``data``).

- v1 request ``{"instances": [<instance>, ...]}``; an instance is a plain JSON body
  (``{"data": "<base64>", ...options}``) or a bare base64 string. Answer
  ``{"predictions": [<body>, ...]}`` (``{"explanations": [...]}`` on ``:explain``).
- v2 request ``{"id"?, "inputs": [{"name", "shape": [n], "datatype": "BYTES",
  "data": [<base64 image or raw image bytes>, ...]}], "parameters"?: {options}}``; the
  options apply to every instance, ``"explain": true`` asks for explanations on ``/infer``.
  Answer: see :class:`handlers.runtime.answer.V2Answer`.
- Status: 200 when at least one instance was answered; when none was, the first failed
  instance's status with ``{"error": "<Type>: <message>"}`` (KServe's error shape), as for
  a malformed envelope.
"""
from __future__ import annotations

import base64
import enum
import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from handlers.runtime import errors
from handlers.runtime import metrics as metrics_mod
from handlers.runtime.answer import (
    ErrorAnswer,
    Explanation,
    PredictionsAnswer,
    ProtocolError,
    V1Explanations,
    V1Predictions,
    V2Answer,
    V2Tensor,
)
from handlers.runtime.errors import ExplainerError, InvalidRequest, PayloadTooLarge
from handlers.runtime.request import JSON_TYPES, body_to_json_or_image
from handlers.runtime.service import ExplainerService, RawRequest, Reply

#: Parameters of the Open Inference Protocol itself (not options of this model): ignored.
V2_RESERVED_PARAMETERS = frozenset({"content_type", "headers", "binary_data_output", "binary_data",
                                    "binary_data_size"})
#: Top-level fields of a v2 request (KServe's client also sends the model's name and version).
V2_REQUEST_FIELDS = frozenset({"id", "inputs", "parameters", "outputs", "model_name", "model_version"})
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")


class Protocol(enum.Enum):
    """The protocol a request body speaks."""

    REST = "rest"  # the plain /predictions and /explanations contract
    V1 = "v1"  # KServe v1: instances -> predictions / explanations
    V2 = "v2"  # Open Inference Protocol: inputs -> outputs


@dataclass(frozen=True)
class Envelope:
    """One HTTP request opened: its protocol, its instances (one for the plain contract),
    the v2 request id, and the envelope's own error (then ``instances`` is empty)."""

    protocol: Protocol
    explain: bool
    instances: tuple[RawRequest, ...]
    request_id: str | None = None
    error: ExplainerError | None = None


@dataclass(frozen=True)
class WireReply:
    """What goes back for one HTTP request: status, the JSON body as bytes, and the protocol
    the request spoke (a front door may hand the bytes over as they are)."""

    status: int
    body: bytes
    protocol: Protocol = Protocol.REST


def _detect(raw: RawRequest, max_bytes: int) -> tuple[Protocol, dict[str, Any] | None]:
    """The body's protocol and, for a JSON object, the object. Bodies that are not JSON
    objects (images, malformed JSON) are the plain contract's to answer."""
    value = raw.value
    if isinstance(value, (bytes, bytearray, str)):
        head = value[:64].lstrip()
        looks_json = head[:1] in (b"{", "{")
        media = (raw.content_type or "").split(";")[0].strip().lower()
        if not looks_json and media not in JSON_TYPES:
            return Protocol.REST, None
        try:
            obj, _ = body_to_json_or_image(value, raw.content_type, max_bytes)
        except ExplainerError:
            return Protocol.REST, None
        value = obj
    if not isinstance(value, dict):
        return Protocol.REST, None
    if "instances" in value:
        return Protocol.V1, value
    if "inputs" in value:
        return Protocol.V2, value
    return Protocol.REST, value


def open_envelope(raw: RawRequest, *, max_bytes: int, max_instances: int) -> Envelope:
    """Open one HTTP request. Never raises: a malformed envelope is returned with ``error``.

    ``raw.value`` is the body as the server delivered it (bytes, str, or decoded JSON);
    ``raw.explain`` whether it came in on an explain route.
    """
    protocol, obj = _detect(raw, max_bytes)
    if protocol is Protocol.REST:
        plain = raw if obj is None else RawRequest(obj, "application/json", raw.explain)
        return Envelope(Protocol.REST, raw.explain, (plain,))
    assert obj is not None
    try:
        if protocol is Protocol.V1:
            return _open_v1(obj, raw.explain, max_instances)
        return _open_v2(obj, raw.explain, max_instances)
    except ExplainerError as exc:
        request_id = obj.get("id") if protocol is Protocol.V2 and isinstance(obj.get("id"), str) else None
        return Envelope(protocol, raw.explain, (), request_id, exc)


def _count_ok(n: int, max_instances: int, what: str) -> None:
    if n == 0:
        raise InvalidRequest(f"{what} is empty: send at least one image")
    if n > max_instances:
        raise PayloadTooLarge(f"{what} holds {n} images; the limit is {max_instances} per request")


def _open_v1(obj: dict[str, Any], explain: bool, max_instances: int) -> Envelope:
    unknown = sorted(set(obj) - {"instances"})
    if unknown:
        raise InvalidRequest(f"unknown fields {unknown}; a KServe v1 request is {{\"instances\": [...]}}")
    instances = obj["instances"]
    if not isinstance(instances, list):
        raise InvalidRequest(f'"instances" must be a list, got {type(instances).__name__}')
    _count_ok(len(instances), max_instances, '"instances"')
    raws = tuple(RawRequest({"data": inst} if isinstance(inst, str) else inst, "application/json", explain)
                 for inst in instances)
    return Envelope(Protocol.V1, explain, raws)


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        return [x for item in data for x in _flatten(item)]
    return [data]


def _v2_element(element: Any) -> str:
    """One element of a BYTES tensor as the base64 text of an image. Raw image bytes (the
    binary extension of the protocol) are recognised by their signature."""
    if isinstance(element, (bytes, bytearray)):
        element = bytes(element)
        if element.startswith(_IMAGE_MAGIC):
            return base64.b64encode(element).decode()
        try:
            return element.decode("ascii")
        except UnicodeDecodeError:
            return base64.b64encode(element).decode()  # not an image: the image decoder says so
    if isinstance(element, str):
        return element
    raise InvalidRequest(f"BYTES elements must be base64 strings, got {type(element).__name__}")


def _open_v2(obj: dict[str, Any], explain: bool, max_instances: int) -> Envelope:
    unknown = sorted(set(obj) - V2_REQUEST_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown fields {unknown}; an inference request has {sorted(V2_REQUEST_FIELDS)}")
    request_id = obj.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidRequest(f'"id" must be a string, got {type(request_id).__name__}')
    inputs = obj["inputs"]
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidRequest('"inputs" must be a list of exactly one tensor: the images as a BYTES tensor')
    tensor = inputs[0]
    datatype = tensor.get("datatype")
    if datatype != "BYTES":
        raise InvalidRequest(f'the input tensor must have datatype "BYTES" (encoded images), got {datatype!r}')
    data = _flatten(tensor.get("data"))
    shape = tensor.get("shape")
    if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                               for d in shape) or math.prod(shape) != len(data)):
        raise InvalidRequest(f'the input tensor\'s "shape" {json.dumps(shape)[:40]} does not match its '
                             f"{len(data)} data elements")
    _count_ok(len(data), max_instances, "the input tensor")
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidRequest('"parameters" must be an object')
    options = {k: v for k, v in params.items() if k not in V2_RESERVED_PARAMETERS and k != "explain"}
    wants = params.get("explain", False)
    if not isinstance(wants, bool):
        raise InvalidRequest('the "explain" parameter must be true or false')
    explain = explain or wants
    raws: list[RawRequest] = []
    for element in data:
        try:
            raws.append(RawRequest({**options, "data": _v2_element(element)}, "application/json", explain))
        except InvalidRequest as exc:
            raws.append(RawRequest(None, None, explain, error=exc))  # answered with this error
    return Envelope(Protocol.V2, explain, tuple(raws), request_id)


# -- closing ----------------------------------------------------------------------------------


def _one_line(answer: ErrorAnswer) -> str:
    return f"{answer.error.type}: {answer.error.message}"


def _protocol_error(status: int, message: str) -> WireReply:
    return WireReply(status, ProtocolError(error=message).wire_json())


def close_envelope(envelope: Envelope, replies: Sequence[Reply], model_name: str, model_version: str) -> WireReply:
    """The HTTP answer of one envelope from its instances' replies (same order); the served
    model's name and version go into v2 answers."""
    if envelope.protocol is Protocol.REST:
        (reply,) = replies
        return WireReply(reply.status, reply.wire_json())
    if envelope.error is not None:
        status, answer = errors.to_answer(envelope.error)
        return _protocol_error(status, _one_line(answer))
    if len(replies) != len(envelope.instances):
        raise ValueError(f"{len(replies)} replies for {len(envelope.instances)} instances")
    if all(r.status >= 400 for r in replies):
        lines = [_one_line(r.answer) for r in replies if isinstance(r.answer, ErrorAnswer)]
        message = lines[0] if len(lines) == 1 else "; ".join(f"instance {i}: {m}" for i, m in enumerate(lines))
        return _protocol_error(replies[0].status, message)
    if envelope.protocol is Protocol.V1:
        body: V1Predictions | V1Explanations | V2Answer
        if envelope.explain:
            body = V1Explanations(explanations=[_instance(r, Explanation) for r in replies])
        else:
            body = V1Predictions(predictions=[_instance(r, PredictionsAnswer) for r in replies])
        return WireReply(200, body.wire_json(), Protocol.V1)
    return WireReply(200, _v2_answer(envelope, replies, model_name, model_version).wire_json(), Protocol.V2)


def _instance(reply: Reply, kind: type) -> Any:
    if not isinstance(reply.answer, (kind, ErrorAnswer)):
        raise TypeError(f"expected {kind.__name__} or ErrorAnswer, got {type(reply.answer).__name__}")
    return reply.answer


def _v2_answer(envelope: Envelope, replies: Sequence[Reply], model_name: str, model_version: str) -> V2Answer:
    n = len(replies)
    labels: list[str] = []
    probabilities: list[float] = []
    for reply in replies:
        answer = reply.answer
        if isinstance(answer, (PredictionsAnswer, Explanation)):
            labels.append(answer.predictions[0].label)
            probabilities.append(float(answer.predictions[0].probability))
        else:
            labels.append("")
            probabilities.append(0.0)
    texts = [r.wire_json().decode() for r in replies]
    return V2Answer(
        id=envelope.request_id or str(uuid.uuid4()), model_name=model_name, model_version=model_version,
        outputs=[V2Tensor(name="answer", datatype="BYTES", shape=[n], data=texts,
                          parameters={"content_type": "application/json"}),
                 V2Tensor(name="label", datatype="BYTES", shape=[n], data=labels),
                 V2Tensor(name="probability", datatype="FP32", shape=[n], data=probabilities)])


def answer_requests(service: ExplainerService, raws: Sequence[RawRequest], model_name: str, model_version: str,
                    metrics: metrics_mod.BatchMetrics) -> list[WireReply]:
    """What every front door does with one batch of HTTP requests: open each envelope, answer
    all their instances in one service batch, close each envelope in its protocol, and count
    the response bytes. One :class:`WireReply` per request, in order."""
    settings = service.settings
    envelopes = [open_envelope(raw, max_bytes=settings.max_request_bytes, max_instances=settings.max_instances)
                 for raw in raws]
    replies = service.handle_batch([raw for env in envelopes for raw in env.instances], metrics)
    out, start = [], 0
    for env in envelopes:
        wire = close_envelope(env, replies[start:start + len(env.instances)], model_name, model_version)
        start += len(env.instances)
        metrics.count(metrics_mod.RESPONSE_BYTES, len(wire.body),
                      endpoint="explanations" if env.explain else "predictions")
        out.append(wire)
    return out
