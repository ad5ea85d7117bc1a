"""The KServe protocols on both front doors, driven by KServe's own REST client and plain HTTP.

TorchServe (the ``tinyx`` archive, token auth on) and KServe's Python model server (the same
``.mar``, ``handlers/kserve_model.py``) must answer v1 and v2 with exactly what the plain
``/predictions`` and ``/explanations`` routes answer for the same images and options.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import requests

from export.client import read_keys
from tests.answer_schema import assert_valid
from tests.integration.server import KServeServer, TorchServe, concurrently, post

pytestmark = pytest.mark.integration

from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig  # noqa: E402 - the [kserve] extra


@pytest.fixture(scope="module")
def kserve_server(tiny_explainer_mar: Path, tmp_path_factory):
    with KServeServer(tmp_path_factory.mktemp("kserve"), tiny_explainer_mar, "tinyx") as ks:
        yield ks


def b64(png: bytes) -> str:
    return base64.b64encode(png).decode()


def untimed(body: dict) -> dict:
    return {k: v for k, v in body.items() if k != "timings_ms"}


class Door:
    """One front door: its base URL and the headers its clients must send."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url, self.headers = url, headers


@pytest.fixture(params=["torchserve", "kserve"])
def door(request, server: TorchServe) -> Door:
    if request.param == "torchserve":
        token = read_keys(server.workdir / "key_file.json")["inference"]
        return Door(server.client.url, {"Authorization": f"Bearer {token}"})
    ks = request.getfixturevalue("kserve_server")
    return Door(ks.url, {})


def plain(server: TorchServe, png: bytes, explain: bool, **options: Any) -> dict:
    r = post(server, json.dumps({"data": b64(png), **options}).encode(), "application/json",
             endpoint="explanations" if explain else "predictions", model="tinyx")
    assert r.status_code == 200, r.text
    return r.json()


def client(protocol: str) -> InferenceRESTClient:
    return InferenceRESTClient(RESTConfig(protocol=protocol, timeout=60))


async def _call(protocol: str, verb: str, door: Door, data: Any) -> Any:
    async with client(protocol) as c:
        if verb == "explain":
            return await c.explain(door.url, "tinyx", data, headers=door.headers)
        return await c.infer(door.url, data, model_name="tinyx", headers=dict(door.headers))


def call(protocol: str, verb: str, door: Door, data: Any) -> Any:
    return asyncio.run(_call(protocol, verb, door, data))


def test_v1_predict_and_explain_equal_the_plain_routes(door, server, sample_pngs):
    pngs = sample_pngs[:3]
    answer = call("v1", "predict", door, {"instances": [{"data": b64(p)} for p in pngs]})
    assert_valid(answer, "v1-predictions")
    assert answer["predictions"] == [plain(server, p, False) for p in pngs]
    answer = call("v1", "explain", door, {"instances": [{"data": b64(pngs[0]), "target": 1, "top_concepts": 3},
                                                        {"data": b64(pngs[1])}]})
    assert_valid(answer, "v1-explanations")
    expected = [plain(server, pngs[0], True, target=1, top_concepts=3), plain(server, pngs[1], True)]
    assert [untimed(e) for e in answer["explanations"]] == [untimed(e) for e in expected]


def v2_request(pngs: list[bytes], **parameters: Any) -> InferRequest:
    tensor = InferInput("images", [len(pngs)], "BYTES", data=[b64(p) for p in pngs])
    return InferRequest(model_name="tinyx", infer_inputs=[tensor], request_id="r-1", parameters=parameters or None)


def test_v2_infer_with_kserves_client_equals_predictions(door, server, sample_pngs):
    pngs = sample_pngs[2:5]
    response = call("v2", "infer", door, v2_request(pngs, top_k=3))
    assert response.id == "r-1" and response.model_name == "tinyx"
    outputs = {o.name: o for o in response.outputs}
    answers = [json.loads(t) for t in outputs["answer"].data]
    expected = [plain(server, p, False, top_k=3) for p in pngs]
    assert answers == expected
    assert list(outputs["label"].data) == [e["predictions"][0]["label"] for e in expected]
    np.testing.assert_allclose(outputs["probability"].as_numpy(), [e["predictions"][0]["probability"]
                                                                   for e in expected], atol=1e-6)


def test_v2_explanations(door, server, sample_pngs):
    """KServe's server has no v2 explain route: the ``explain`` parameter asks for explanations
    on ``/infer`` (TorchServe answers it the same way, and also on ``/v2/models/{m}/explain``)."""
    png = sample_pngs[5]
    expected = untimed(plain(server, png, True, top_concepts=2))
    response = call("v2", "infer", door, v2_request([png], top_concepts=2, explain=True))
    (text,) = {o.name: o for o in response.outputs}["answer"].data
    assert untimed(json.loads(text)) == expected
    if "Authorization" in door.headers:
        body = v2_request([png], top_concepts=2).to_rest()[0]
        r = requests.post(f"{door.url}/v2/models/tinyx/explain", json=body, headers=door.headers, timeout=60)
        assert r.status_code == 200, r.text
        assert_valid(r.json(), "v2")
        (text,) = {o["name"]: o for o in r.json()["outputs"]}["answer"]["data"]
        assert untimed(json.loads(text)) == expected


def test_verify_on_v1_instances_and_v2_parameters(door, server, sample_pngs):
    """``verify`` travels as an option of a v1 instance and as a v2 parameter; the answers equal
    the plain route's, and a bad value fails only its own instance."""
    png = sample_pngs[1]
    expected = untimed(plain(server, png, True, images=False, verify=True))
    assert expected["verification"]["concepts"] == len(expected["concepts"])
    answer = call("v1", "explain", door, {"instances": [{"data": b64(png), "images": False, "verify": True},
                                                        {"data": b64(png), "verify": 99}]})
    assert_valid(answer, "v1-explanations")
    assert untimed(answer["explanations"][0]) == expected
    assert answer["explanations"][1]["error"]["type"] == "InvalidOption"
    response = call("v2", "infer", door, v2_request([png], images=False, verify=True, explain=True))
    (text,) = {o.name: o for o in response.outputs}["answer"].data
    assert untimed(json.loads(text)) == expected


def test_mixed_instances_and_the_error_shape(door, sample_pngs):
    good = b64(sample_pngs[0])
    r = requests.post(f"{door.url}/v1/models/tinyx:predict", headers=door.headers, timeout=60,
                      json={"instances": [{"data": good}, {"data": "AAAA"}, {"data": good, "top_k": 99}]})
    assert r.status_code == 200, r.text
    kinds = [p["error"]["type"] if "error" in p else "ok" for p in r.json()["predictions"]]
    assert kinds == ["ok", "InvalidImage", "InvalidOption"]
    r = requests.post(f"{door.url}/v1/models/tinyx:predict", headers=door.headers, timeout=60,
                      json={"instances": [{"data": "AAAA"}]})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
    assert_valid(r.json(), "protocol-error")
    assert r.json()["error"].startswith("InvalidImage: ")
    with pytest.raises(httpx.HTTPStatusError, match="InvalidRequest: the input tensor must have datatype"):
        call("v2", "infer", door, InferRequest(model_name="tinyx", infer_inputs=[
            InferInput("x", [1], "FP32", data=[1.0])]))


def test_a_hosts_own_model_server_keeps_the_answers_statuses(tiny_explainer_mar, tmp_path, sample_pngs):
    """create_model under a plain kserve.ModelServer (no concept-explainer-kserve): a bad
    instance is still a 400 in the protocol's error shape, a bad v2 tensor too, and a good
    request still answers."""
    with KServeServer(tmp_path, tiny_explainer_mar, "tinyx", plain=True) as ks:
        r = requests.post(f"{ks.url}/v1/models/tinyx:predict", timeout=60, json={"instances": [{"data": "AAAA"}]})
        assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), r.text
        assert_valid(r.json(), "protocol-error")
        assert r.json()["error"].startswith("InvalidImage: ")
        # without a JSON content type KServe hands the model the undecoded bytes
        r = requests.post(f"{ks.url}/v1/models/tinyx:predict", timeout=60, data=b'{"instances": [{"data": "AAAA"}]}')
        assert r.status_code == 400 and r.json()["error"].startswith("InvalidImage: "), r.text
        r = requests.post(f"{ks.url}/v1/models/tinyx:predict", timeout=60, data=b"\x89PNG not json")
        assert r.status_code == 400, r.text
        r = requests.post(f"{ks.url}/v2/models/tinyx/infer", timeout=60,
                          json={"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]})
        assert r.status_code == 400, r.text
        r = requests.post(f"{ks.url}/v1/models/tinyx:predict", timeout=60,
                          json={"instances": [{"data": b64(sample_pngs[0])}]})
        assert r.status_code == 200 and "predictions" in r.json()
        assert r.headers["content-type"] == "application/json"


def test_v1_answers_are_the_bytes_the_answer_models_format(kserve_server, tiny_explainer_mar, sample_pngs, tmp_path):
    """The model hands KServe the formatted v1 body as it is (no bytes -> dict -> bytes), which
    reaches the client with a JSON content type; v2 answers stay a dict for KServe's own
    response model."""
    from handlers.kserve_model import ExplainerModelCore
    from handlers.runtime.source import from_mar
    core = ExplainerModelCore(from_mar(tiny_explainer_mar, tmp_path), gpu_id=None)
    core.load_service()
    try:
        v1 = core.answer({"instances": [{"data": b64(sample_pngs[0])}]}, True)
        assert isinstance(v1, bytes) and json.loads(v1)["explanations"][0]["concepts"]
        v2 = core.answer(v2_request([sample_pngs[0]]).to_rest()[0], False)
        assert isinstance(v2, dict) and v2["outputs"][0]["name"] == "answer"
    finally:
        core.close()
    for verb in ("predict", "explain"):
        r = requests.post(f"{kserve_server.url}/v1/models/tinyx:{verb}", timeout=60,
                          json={"instances": [{"data": b64(sample_pngs[0]), "images": False}] if verb == "explain"
                                else [{"data": b64(sample_pngs[0])}]})
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        body = r.json()
        if verb == "explain":
            body["explanations"][0].pop("timings_ms")
            raw = r.content.decode()
            assert raw.startswith('{"explanations":[{"predictions":[{"index":') and ", " not in raw[:200]
        else:
            assert r.content == json.dumps(body, separators=(",", ":")).encode()


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def test_a_body_over_the_limit_is_refused_before_it_is_read(kserve_server):
    """max_request_bytes (10 MiB, TorchServe's max_request_size) holds on the KServe door
    before any parsing: a declared 300 MB body is refused unread, a chunked one at the
    first 10 MiB; the server's memory does not grow by the body, and it answers after."""
    before = _rss(kserve_server.proc.pid)
    conn = http.client.HTTPConnection("127.0.0.1", kserve_server.port, timeout=30)
    conn.putrequest("POST", "/v1/models/tinyx:predict")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(300 * 2**20))
    conn.endheaders()
    sent = 0
    with contextlib.suppress(OSError):  # the server closes the connection once it has refused
        for _ in range(300):
            conn.send(b"a" * 2**20)
            sent += 1
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"].startswith("PayloadTooLarge: request body is 314572800")
    assert sent < 300
    chunks = (b"a" * 2**20 for _ in range(300))  # no Content-Length: chunked transfer
    r2 = requests.post(f"{kserve_server.url}/v1/models/tinyx:predict", data=chunks, timeout=60,
                       headers={"Content-Type": "application/json"})
    assert r2.status_code == 413 and r2.json()["error"].startswith("PayloadTooLarge: ")
    assert_valid(r2.json(), "protocol-error")
    assert _rss(kserve_server.proc.pid) - before < 50 * 2**20
    ok = requests.post(f"{kserve_server.url}/v1/models/tinyx:predict", json={"instances": [{"data": "AAAA"}]},
                       timeout=60)
    assert ok.status_code == 400


def test_torchserve_token_auth_holds_on_the_kserve_routes(server, sample_pngs):
    """The handler is never reached without the inference token."""
    body = {"instances": [{"data": b64(sample_pngs[0])}]}
    for path in ("/v1/models/tinyx:predict", "/v1/models/tinyx:explain", "/v2/models/tinyx/infer"):
        r = requests.post(f"{server.client.url}{path}", json=body, timeout=30)
        # TorchServe 0.12 answers a missing token with 400 InvalidKeyException (as on /predictions)
        assert r.status_code in (400, 401) and "InvalidKeyException" in r.text, (path, r.status_code, r.text)


def _series(text: str) -> dict[str, set[tuple[str, ...]]]:
    """Metric family -> the label-name sets of its concept_explainer samples."""
    from prometheus_client.parser import text_string_to_metric_families
    out: dict[str, set[tuple[str, ...]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("concept_explainer") and not s.name.endswith("_created"):
                out.setdefault(s.name, set()).add(tuple(sorted(s.labels)))
    return out


def test_both_doors_expose_the_handlers_metrics_under_one_set_of_names(server, kserve_server, sample_pngs):
    png = b64(sample_pngs[1])
    token = read_keys(server.workdir / "key_file.json")["inference"]
    for url, headers in ((server.client.url, {"Authorization": f"Bearer {token}"}), (kserve_server.url, {})):
        for verb in ("predict", "explain"):
            r = requests.post(f"{url}/v1/models/tinyx:{verb}", headers=headers, timeout=60,
                              json={"instances": [{"data": png}, {"data": "AAAA"}]})
            assert r.status_code == 200
    ts = _series(requests.get(server.metrics_url, timeout=10).text)
    ks = _series(requests.get(f"{kserve_server.url}/metrics", timeout=10).text)
    assert ks, "no concept_explainer metrics on the KServe server"
    assert set(ks) == set(ts)
    for name in ks:
        assert ks[name] == ts[name], (name, ks[name], ts[name])


def test_the_kserve_storage_layout_starts_torchserve_as_kserves_runtime_does(tiny_explainer_mar, tmp_path,
                                                                              sample_pngs):
    """``kserve-storage`` output, started the way the kserve-torchserve runtime starts it (only the
    ports and /mnt/models moved to loopback and a temporary folder): the snapshot loads the
    model and v1 and v2 answer without a token (the cluster's ingress authenticates)."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    from export.pipeline import KServeStorageStep, kserve_storage
    from tests.integration.server import free_port

    root = tmp_path / "mnt-models"
    kserve_storage(KServeStorageStep(mar=tiny_explainer_mar, out=root))
    config = root / "config" / "config.properties"
    text = config.read_text().replace("/mnt/models", str(root))
    port = free_port()
    for key, value in {"inference_address": f"http://127.0.0.1:{port}",
                       "management_address": f"http://127.0.0.1:{free_port()}",
                       "metrics_address": f"http://127.0.0.1:{free_port()}",
                       "grpc_inference_port": str(free_port()), "grpc_management_port": str(free_port())}.items():
        text = re.sub(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
    config.write_text(text)
    env = dict(os.environ, LOG_LOCATION=str(tmp_path / "logs"), METRICS_LOCATION=str(tmp_path / "logs"),
               TMPDIR=str(tmp_path))
    cmd = [str(Path(sys.executable).parent / "torchserve"), "--start", "--foreground", "--ncs",
           f"--model-store={root / 'model-store'}", f"--ts-config={config}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=open(tmp_path / "ts.out", "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        body = {"instances": [{"data": b64(sample_pngs[0])}]}
        while True:
            try:
                r = requests.post(f"{url}/v1/models/tinyx:predict", json=body, timeout=30)
                if r.status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "ts.out").read_text()[-3000:]
            time.sleep(0.5)
        assert_valid(r.json(), "v1-predictions")
        r = requests.post(f"{url}/v2/models/tinyx/infer", timeout=30, json={"inputs": [
            {"name": "x", "shape": [1], "datatype": "BYTES", "data": [b64(sample_pngs[1])]}]})
        assert r.status_code == 200 and r.json()["model_name"] == "tinyx" and r.json()["model_version"] == "0.1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_saturation_answers_503_with_retry_after_never_a_timeout(tiny_explainer_mar, tmp_path, sample_pngs):
    """max_inflight 2: of 24 explanations sent 12 at a time, the ones beyond the bound are
    answered 503 at once with Retry-After in KServe's error shape; every other one is 200,
    none times out or fails, and health stays answered meanwhile."""
    body = {"instances": [{"data": b64(png)} for png in sample_pngs[:4]]}
    with KServeServer(tmp_path, tiny_explainer_mar, "tinyx", settings={"max_inflight": 2}) as ks:
        def ask(_: int) -> requests.Response:
            return requests.post(f"{ks.url}/v1/models/tinyx:explain", json=body, timeout=60)
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(ask, range(24)))
            health = requests.get(f"{ks.url}/v1/models/tinyx", timeout=10)
        statuses = [r.status_code for r in answers]
        assert set(statuses) <= {200, 503} and statuses.count(200) >= 2 and statuses.count(503) >= 1, statuses
        for r in answers:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1" and r.json()["error"].startswith("ServiceUnavailable: ")
                assert_valid(r.json(), "protocol-error")
        assert health.status_code == 200
        after = requests.post(f"{ks.url}/v1/models/tinyx:predict", json={"instances": [{"data": b64(sample_pngs[0])}]},
                              timeout=60)
        assert after.status_code == 200  # the bound frees up: nothing leaked


def test_sigterm_mid_traffic_finishes_the_requests_in_flight_and_exits_0(tiny_explainer_mar, tmp_path, sample_pngs):
    """What Kubernetes does on every rolling update: SIGTERM while 8 clients ask for
    explanations. Readiness answers 503 at once while liveness and inference go on for the
    drain (1.5 s here); every request sent before the socket closes is answered 200 (the ones
    in flight complete after it), later ones are refused, and the server exits 0 well within
    drain + grace period."""
    body = {"instances": [{"data": b64(png)} for png in sample_pngs[:2]]}
    outcomes: list[tuple[float, float, int | str]] = []
    done = threading.Event()
    drain = 1.5
    with KServeServer(tmp_path, tiny_explainer_mar, "tinyx", args=["--drain-seconds", str(drain)]) as ks:
        def client() -> None:
            while not done.is_set():
                t0 = time.monotonic()
                try:  # a new connection per request: no keep-alive race with the shutdown
                    r = requests.post(f"{ks.url}/v1/models/tinyx:explain", json=body, timeout=60,
                                      headers={"Connection": "close"})
                    outcomes.append((t0, time.monotonic(), r.status_code))
                except requests.RequestException as exc:
                    outcomes.append((t0, time.monotonic(), type(exc).__name__))
                    time.sleep(0.05)
        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(3.0)
        signalled = time.monotonic()
        os.kill(ks.proc.pid, signal.SIGTERM)
        time.sleep(0.3)
        ready = requests.get(f"{ks.url}/v1/models/tinyx", timeout=10)
        v2_ready = requests.get(f"{ks.url}/v2/health/ready", timeout=10)
        live = requests.get(f"{ks.url}/v2/health/live", timeout=10)
        during = requests.post(f"{ks.url}/v1/models/tinyx:predict", json={"instances": [{"data": b64(sample_pngs[0])}]},
                               timeout=60)
        asked_during = time.monotonic() - signalled
        code = ks.proc.wait(timeout=40)
        stopped = time.monotonic()
        done.set()
        for t in threads:
            t.join(timeout=70)
    assert code == 0 and drain <= stopped - signalled < drain + 30, (code, stopped - signalled)
    assert ready.status_code == v2_ready.status_code == 503 and ready.json()["error"].startswith("ModelNotReady")
    assert live.status_code == 200 and during.status_code == 200 and asked_during < drain
    closed = signalled + drain  # the listening socket closes when the drain ends
    before = [o for o in outcomes if o[0] < closed - 0.2]  # surely accepted before the socket closed
    assert len(before) >= 16 and all(o[2] == 200 for o in before), [o[2] for o in before if o[2] != 200]
    assert any(o[2] == 200 and o[1] > closed for o in outcomes), "no request in flight completed after the close"
    answered = [o[2] for o in outcomes if isinstance(o[2], int)]
    assert set(answered) == {200}, answered  # every answer a 200; the rest were refused connections


def _hostile_kserve_bodies(good: bytes, n: int, seed: int = 0) -> list[tuple[str, bytes, str, int | None]]:
    """(route, body, content type, expected status or None for "any 4xx") for n hostile requests
    on the KServe door's own routes."""
    from tests.integration.test_reliability import bomb_png
    rng = np.random.default_rng(seed)
    g = b64(good)

    def v1(*instances: dict) -> bytes:
        return json.dumps({"instances": list(instances)}).encode()

    def v2(**tensor: Any) -> bytes:
        return json.dumps({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [g], **tensor}]}
                          ).encode()
    kinds = [
        lambda: ("predict", v1({"data": b64(rng.bytes(int(rng.integers(1, 400))))}), "application/json", 400),
        lambda: ("predict", v1({"data": b64(good[: int(rng.integers(8, len(good) - 40))])}), "application/json", 400),
        lambda: ("predict", v1({"data": "!!" + g[:50]}), "application/json", 400),
        lambda: ("predict", v1({"data": g, "top_k": int(rng.integers(-5, 0))}), "application/json", 400),
        lambda: ("explain", v1({"data": g, "target": "no-such-class"}), "application/json", 400),
        lambda: ("explain", v1({"data": g, "top_concepts": 10**9}), "application/json", 400),
        lambda: ("predict", v1({"data": b64(bomb_png(60_000, 60_000))}), "application/json", 413),
        lambda: ("predict", v1({"data": b64(b"GIF89a" + rng.bytes(30))}), "application/json", 415),
        lambda: ("predict", v1(*[{"data": g}] * 33), "application/json", 413),
        lambda: ("predict", v1(), "application/json", 400),
        lambda: ("predict", b'{"instances": [' + rng.bytes(8), "application/json", None),
        lambda: ("predict", b"[" * 5000 + b"]" * 5000, "application/json", None),
        lambda: ("predict", b'{"instances": [{"data": "\xff\xfe\xfd"}]}', "application/json", None),
        lambda: ("predict", json.dumps({"instances": "not a list"}).encode(), "application/json", 400),
        lambda: ("infer", v2(shape=[3]), "application/json", None),
        lambda: ("infer", v2(datatype="FP32", data=[1.0]), "application/json", None),
    ]
    out = []
    for i in range(n):
        route, body, ctype, status = kinds[i % len(kinds)]()
        out.append((route, body, ctype, status))
    return out


def test_1000_hostile_requests_on_the_kserve_door_get_4xx_and_the_server_stays(kserve_server, sample_pngs):
    """The TorchServe door's hostile-input test, on the KServe door's own routes: 1,000 hostile
    bodies mixed with valid ones at 8 clients; every hostile one a 4xx with a JSON error and
    no internal repr, every valid one the same answer, and the same process afterwards."""
    pid = kserve_server.proc.pid
    good = sample_pngs[0]
    url = {"predict": f"{kserve_server.url}/v1/models/tinyx:predict",
           "explain": f"{kserve_server.url}/v1/models/tinyx:explain",
           "infer": f"{kserve_server.url}/v2/models/tinyx/infer"}
    valid = json.dumps({"instances": [{"data": b64(good)}]}).encode()
    reference = requests.post(url["predict"], data=valid, headers={"Content-Type": "application/json"}, timeout=60)
    assert reference.status_code == 200
    jobs: list[tuple[str, bytes, str, int | None]] = []
    for i, job in enumerate(_hostile_kserve_bodies(good, 1000)):
        jobs.append(job)
        if i % 5 == 0:
            jobs.append(("predict", valid, "application/json", 200))

    def send(job: tuple[str, bytes, str, int | None]) -> tuple[int, bytes]:
        route, body, ctype, _ = job
        r = requests.post(url[route], data=body, headers={"Content-Type": ctype}, timeout=60)
        return r.status_code, r.content

    results, seconds = concurrently(send, jobs)
    wrong = []
    for (route, body, _, expected), (status, content) in zip(jobs, results):
        ok = status == expected if expected is not None else 400 <= status < 500
        if not ok:
            wrong.append((route, body[:60], expected, status, content[:200]))
            continue
        doc = json.loads(content)
        if expected == 200:
            if doc != reference.json():
                wrong.append(("wrong answer", content[:200]))
        elif not (isinstance(doc.get("error"), str) and doc["error"]) or "0x" in doc["error"]:
            wrong.append(("error body", content[:200]))
    assert not wrong, wrong[:5]
    assert kserve_server.proc.poll() is None and kserve_server.proc.pid == pid
    print(f"\nKServe door: {len(jobs)} requests (1000 hostile) in {seconds:.1f} s, 0 wrong, 0 5xx, same process")


def test_short_soak_of_the_kserve_door(kserve_server, sample_pngs):
    """8 clients for 15 s of explanations and predictions on the KServe door
    (:func:`bench.kserve_soak.soak`, what ``make soak-kserve`` runs for 2 minutes): no errors,
    and the server's resident memory in the last 4 s within 5 % of the first 4 s (the
    TorchServe door's soak, tests/integration/test_soak.py, on the other front door)."""
    from bench.kserve_soak import soak
    result = soak(kserve_server, sample_pngs[0], seconds=15, clients=8, max_requests=5000, window=4)
    assert result["requests"] > 100 and result["errors"] == 0, result
    assert set(result["latency_ms"]) == {"predict", "explain"}
    assert result["rss_mb"]["growth"] < 0.05, result["rss_mb"]
    print(f"\nKServe door soak: {result['requests']} requests in {result['seconds']} s at 8 clients, 0 errors, "
          f"RSS {result['rss_mb']['first']} -> {result['rss_mb']['last']} MB")
