"""KServe front door: the explainer as a ``kserve.Model`` on KServe's own Python model server.

The same bundle (or ``.mar``) the TorchServe handler serves, without TorchServe or Java:
KServe v1 ``/v1/models/{m}:predict`` and ``:explain``, and the Open Inference Protocol
``/v2/models/{m}/infer`` (``"parameters": {"explain": true}`` for explanations: KServe's
server has no v2 explain route). Requests and answers are those of the TorchServe routes
(:mod:`handlers.runtime.protocols`), and the handler's metrics appear on ``/metrics`` under
TorchServe's names and labels. Bodies over the model's ``max_request_bytes`` are refused with
413 before KServe reads them whole (:class:`BodyLimit`), as TorchServe's frontend refuses
bodies over its ``max_request_size``; beyond ``max_inflight`` requests at once the door answers
503 with ``Retry-After`` (:class:`InflightLimit`), as TorchServe does past its job queue.

Start it (loopback by default)::

    concept-explainer-kserve --mar model_store/shapes.mar --http-port 8085
    concept-explainer-kserve --bundle build/shapes/bundle --name shapes --host 0.0.0.0   # in a container
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from handlers.runtime import metrics as metrics_mod
from handlers.runtime import protocols
from handlers.runtime import settings as settings_mod
from handlers.runtime.service import ExplainerService, RawRequest
from handlers.runtime.source import ServedModel, from_bundle, from_mar, read_handler_section

log = logging.getLogger(__name__)


def _infer_request_as_dict(payload: Any) -> dict[str, Any]:
    """A kserve ``InferRequest`` (v2, JSON or binary tensors) as the JSON object it stands for."""
    inputs = []
    for tensor in payload.inputs:
        if getattr(tensor, "_raw_data", None) is not None:  # the binary extension of the protocol
            data = tensor.as_numpy().reshape(-1).tolist()
        else:
            data = tensor.data
        inputs.append({"name": tensor.name, "shape": list(tensor.shape), "datatype": tensor.datatype, "data": data})
    out: dict[str, Any] = {"inputs": inputs}
    if payload.id is not None:
        out["id"] = payload.id
    if payload.parameters:
        out["parameters"] = {k: getattr(v, "value", v) for k, v in dict(payload.parameters).items()}
    return out


class ProtocolReply(Exception):  # noqa: N818 - not an error of this process: an answer with a status
    """A non-200 answer of the protocols, turned into an HTTP response by the server's handler."""

    def __init__(self, wire: protocols.WireReply) -> None:
        super().__init__(wire.body.decode(errors="replace"))
        self.wire = wire


class ExplainerModelCore:
    """What the KServe model does, apart from KServe: ``load`` once, then answer a v1 body
    (a dict) or a v2 ``InferRequest``, each request one batch of its instances."""

    def __init__(self, source: ServedModel, exporter: metrics_mod.PrometheusExporter | None = None,
                 gpu_id: int | None = 0) -> None:
        self.source = source
        self.gpu_id = gpu_id
        self.settings = settings_mod.HandlerSettings.from_mapping(source.handler)
        self.service: ExplainerService | None = None
        self.exporter = exporter if exporter is not None else metrics_mod.PrometheusExporter(source.name)

    def load_service(self) -> None:
        self.service = ExplainerService.load(self.source.model_dir, self.settings, self.gpu_id)
        self.service.report_verification_to(self.exporter.emit)
        self.exporter.emit(self.service.baseline_samples())

    def answer(self, payload: Any, explain: bool) -> bytes | dict[str, Any]:
        """The protocol's JSON answer; a non-200 answer raises :class:`ProtocolReply`.

        A v1 (or plain) answer goes back as the bytes the answer models formatted, which
        KServe's v1 routes send as they are. A v2 answer goes back as a dict: KServe's v2 route
        validates it into its own ``InferenceResponse`` and would send bytes without a
        content type."""
        assert self.service is not None, "model used before load()"
        if isinstance(payload, (bytes, bytearray, str)):  # a body KServe did not decode (no JSON content type)
            raw = RawRequest(payload, None, explain)
        else:
            raw = RawRequest(payload if isinstance(payload, dict) else _infer_request_as_dict(payload),
                             "application/json", explain)
        batch_metrics = metrics_mod.BatchMetrics()
        (wire,) = protocols.answer_requests(self.service, [raw],
                                            self.source.name, self.service.meta.version, batch_metrics)
        try:
            self.exporter.emit(batch_metrics.samples())
        except Exception:  # noqa: BLE001 - metrics must not break serving
            log.warning("could not record metrics", exc_info=True)
        if wire.status != 200:
            raise ProtocolReply(wire)
        if wire.protocol is protocols.Protocol.V2:
            return json.loads(wire.body)
        return wire.body

    def close(self) -> None:
        if self.service is not None:
            self.service.close()


class BodyLimit:
    """ASGI middleware: refuse a request body over ``max_bytes`` with 413 before the server
    parses it. A ``Content-Length`` over the limit is refused unread; a body without one (or
    longer than it said) is read chunk by chunk and refused at the first byte past the limit.
    An accepted body is buffered (at most ``max_bytes``) and handed to the application."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _too_large(send, f"request body is {int(declared)} bytes; the limit is {self.max_bytes}")
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _too_large(send, f"request body exceeds the limit of {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, delivered = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        await self.app(scope, replay, send)


class InflightLimit:
    """ASGI middleware: at most ``max_inflight`` inference requests (v1 ``:predict`` /
    ``:explain``, v2 ``/infer``) in the server at once; the next one is answered 503 with
    ``Retry-After`` immediately, so a load balancer or autoscaler sees saturation instead of a
    queue that grows without bound. Health, metadata and ``/metrics`` are never refused."""

    def __init__(self, app: Any, max_inflight: int, retry_after_s: int = 1) -> None:
        self.app, self.max_inflight, self.retry_after_s = app, max_inflight, retry_after_s
        self.inflight = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.endswith((":predict", ":explain", "/infer")):
            await self.app(scope, receive, send)
            return
        if self.inflight >= self.max_inflight:
            await _refuse(send, 503, f"ServiceUnavailable: {self.inflight} requests in flight, the limit is "
                                     f"{self.max_inflight}; retry after {self.retry_after_s} s",
                          [(b"retry-after", str(self.retry_after_s).encode())])
            return
        self.inflight += 1  # one event loop: no lock needed
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1


async def _too_large(send: Any, message: str) -> None:
    await _refuse(send, 413, f"PayloadTooLarge: {message}", [(b"connection", b"close")])


async def _refuse(send: Any, status: int, message: str, headers: list[tuple[bytes, bytes]]) -> None:
    """Answer ``status`` with KServe's error shape ``{"error": message}``."""
    payload = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *headers]})
    await send({"type": "http.response.body", "body": payload})


class Draining:
    """ASGI middleware of the door's own server: once ``state["draining"]`` is set (SIGTERM),
    the readiness routes (``/v1/models/{m}``, ``/v2/health/ready``, ``/v2/models/{m}/ready``)
    answer 503 so that Kubernetes stops routing to the pod, while inference and liveness
    (``/v2/health/live``) go on being answered until the server stops."""

    def __init__(self, app: Any, state: dict[str, bool]) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.state.get("draining") and _is_readiness(scope.get("path", "")):
            await _refuse(send, 503, "ModelNotReady: the server is shutting down", [])
            return
        await self.app(scope, receive, send)


def _is_readiness(path: str) -> bool:
    parts = path.strip("/").split("/")
    return (path == "/v2/health/ready" or (len(parts) == 3 and parts[:2] == ["v1", "models"] and ":" not in parts[2])
            or (len(parts) == 4 and parts[:2] == ["v2", "models"] and parts[3] == "ready"))


def _guard(app: Any, settings: settings_mod.HandlerSettings) -> None:
    """Put :class:`BodyLimit` and :class:`InflightLimit` in front of KServe's application,
    once each; the application is shared by the models of a process, so the largest body
    limit and the largest in-flight bound of the models created here apply."""
    wanted: dict[Any, tuple[str, int]] = {BodyLimit: ("max_bytes", settings.max_request_bytes),
                                          InflightLimit: ("max_inflight", settings.max_inflight)}
    for m in app.user_middleware:
        if m.cls in wanted:
            key, value = wanted.pop(m.cls)
            m.kwargs[key] = max(m.kwargs[key], value)
    for cls, (key, value) in wanted.items():
        app.add_middleware(cls, **{key: value})


async def _protocol_reply(_: Any, exc: Exception) -> Any:
    """FastAPI exception handler: a :class:`ProtocolReply` as the response it carries."""
    from fastapi.responses import Response
    assert isinstance(exc, ProtocolReply)
    return Response(content=exc.wire.body, status_code=exc.wire.status, media_type="application/json")


def create_model(source: ServedModel, exporter: metrics_mod.PrometheusExporter | None = None,
                 gpu_id: int | None = 0) -> Any:
    """A ``kserve.Model`` named ``source.name`` over :class:`ExplainerModelCore`.

    A host may run it under its own ``kserve.ModelServer`` instead of :func:`serve`: non-200
    answers keep their status either way, because the handler that turns
    :class:`ProtocolReply` into a response is registered here, on the FastAPI application
    KServe's REST server runs (kserve 0.21 otherwise answers 500 for any exception a model
    raises other than its own error types).

    kserve is imported here, not with this module: it parses ``sys.argv`` when imported."""
    import kserve
    from kserve.model_server import app

    core = ExplainerModelCore(source, exporter, gpu_id)
    app.add_exception_handler(ProtocolReply, _protocol_reply)
    _guard(app, core.settings)

    class ConceptExplainerModel(kserve.Model):
        def __init__(self, name: str) -> None:
            super().__init__(name, return_response_headers=True)  # postprocess sets the content type

        def load(self) -> bool:
            core.load_service()
            self.ready = True
            return self.ready

        # Async, with the work on a thread: KServe calls a synchronous predict() on its event
        # loop, which would serve one request at a time; onnxruntime releases the GIL.
        async def predict(self, payload: Any, headers: dict[str, str] | None = None,
                          response_headers: dict[str, str] | None = None) -> bytes | dict[str, Any]:
            return await asyncio.to_thread(core.answer, payload, False)

        async def explain(self, payload: Any, headers: dict[str, str] | None = None) -> bytes | dict[str, Any]:
            return await asyncio.to_thread(core.answer, payload, True)

        def postprocess(self, result: Any, headers: dict[str, str] | None = None,
                        response_headers: dict[str, str] | None = None) -> Any:
            if isinstance(result, bytes) and response_headers is not None:
                response_headers["content-type"] = "application/json"
            return result

        def stop(self) -> None:
            core.close()
            super().stop()

    model = ConceptExplainerModel(source.name)
    model.core = core
    return model


def serve(model: Any, host: str, port: int, grace_period_s: int = 30, drain_s: float = 5.0) -> None:
    """Load the model and run KServe's REST server (v1, v2, /metrics) on ``host:port`` until
    SIGINT/SIGTERM. gRPC is off: the REST protocols are this front door's contract.

    SIGTERM (what Kubernetes sends on a rolling update or scale-down) shuts down gracefully:
    readiness answers 503 at once (:class:`Draining`) while requests go on being served for
    ``drain_s`` seconds, the time Kubernetes needs to take the pod out of its endpoints; then
    the server stops accepting connections, finishes the requests in flight within
    ``grace_period_s`` and returns, and the process exits 0. A second signal skips the drain.
    (uvicorn re-raises the signal it caught once it has stopped; the no-op handler installed
    here receives it instead of the default one, which would end the process with -15.)"""
    from kserve import ModelServer
    from kserve.model_server import FASTAPI_APP_IMPORT_STRING, app
    from kserve.protocol.rest.server import RESTServer

    # kserve 0.21 answers v1 with FastAPI's ORJSONResponse, which FastAPI now flags on every request.
    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")
    model.load()
    server = ModelServer(http_port=port, enable_grpc=False, workers=1, enable_latency_logging=False)
    server.register_model(model)
    rest = RESTServer(FASTAPI_APP_IMPORT_STRING, server.dataplane, server.model_repository_extension, port,
                      workers=1, grace_period=grace_period_s)
    rest.config.host = host  # KServe binds every interface; a local server stays on loopback
    state = {"draining": False}
    app.add_middleware(Draining, state=state)
    uv = getattr(rest, "_server", None)  # the uvicorn.Server (kserve 0.21, pinned); without it: no drain
    if uv is not None and drain_s > 0:
        stop = uv.handle_exit

        def drain_then_stop(signum: int, frame: Any) -> None:
            if state["draining"]:
                stop(signum, frame)
                return
            state["draining"] = True
            log.info("signal %d: readiness is false; serving %.1f s more, then stopping", signum, drain_s)
            threading.Timer(drain_s, stop, args=(signum, frame)).start()
        uv.handle_exit = drain_then_stop  # uvicorn installs self.handle_exit as the signal handler
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stopping.append(signum))
    log.info("serving %s on http://%s:%d (KServe v1, v2)", model.name, host, port)
    try:
        rest.run()
    finally:
        model.core.close()
    log.info("stopped%s", f" on signal {stopping[0]}" if stopping else "")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``concept-explainer-kserve``."""
    parser = argparse.ArgumentParser(prog="concept-explainer-kserve",
                                     description="Serve an explaining model on KServe's Python model server.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--mar", type=Path, help="a .mar built by concept-explainer archive")
    source.add_argument("--bundle", type=Path, help="a bundle folder (build/NAME/bundle)")
    parser.add_argument("--name", help="model name (default: the .mar's or the bundle's)")
    parser.add_argument("--config", type=Path, help="model-config.yaml whose handler: settings to serve with: over the "
                                                    ".mar's own, or over the built-in defaults for --bundle")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s)")
    parser.add_argument("--http-port", type=int, default=8085, help="HTTP port (default: %(default)s)")
    parser.add_argument("--grace-period", type=int, default=30,
                        help="seconds SIGTERM waits for the requests in flight before the server stops; keep it "
                             "below the pod's terminationGracePeriodSeconds (default: %(default)s)")
    parser.add_argument("--drain-seconds", type=float, default=5.0,
                        help="after SIGTERM, seconds readiness answers 503 while requests are still served, before "
                             "the server stops accepting (default: %(default)s)")
    parser.add_argument("--verify-fraction", type=float, default=None,
                        help="share of explanations verified against the network after their reply, 0 to 1 "
                             "(handler setting verify_fraction; default: the model's setting)")
    parser.add_argument("--verify-fraction-predictions", type=float, default=None,
                        help="the same for predictions (handler setting verify_fraction_predictions)")
    parser.add_argument("--gpu-id", type=int, default=-1,
                        help="GPU for every session when the providers include CUDA ([gpu] flavour); -1: the CPU "
                             "(default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sys.argv = sys.argv[:1]  # kserve parses the command line when imported; these options are not its own
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="kserve-mar-") as tmp:
        try:
            if args.mar is not None:
                src = from_mar(args.mar, Path(tmp))
                handler = {**src.handler, **(read_handler_section(args.config) if args.config else {})}
                src = ServedModel(args.name or src.name, src.model_dir, handler)
            else:
                src = from_bundle(args.bundle, args.name, args.config)
            flags = {"verify_fraction": args.verify_fraction,
                     "verify_fraction_predictions": args.verify_fraction_predictions}
            src = ServedModel(src.name, src.model_dir, {**src.handler, **{k: v for k, v in flags.items() if v is not None}})
            settings_mod.HandlerSettings.from_mapping(src.handler)  # a bad setting fails here, naming it
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            print(f"concept-explainer-kserve: cannot read the model: {exc}", file=sys.stderr)
            return 2
        serve(create_model(src, gpu_id=None if args.gpu_id < 0 else args.gpu_id), args.host, args.http_port,
              args.grace_period, args.drain_seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
