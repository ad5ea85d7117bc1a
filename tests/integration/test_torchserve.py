"""A real TorchServe on free loopback ports, with the shipped config (token auth on)."""
from __future__ import annotations

import base64
import contextlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.answer_schema import assert_valid
from tests.integration.server import post, workers
from tests.reference import reference_probabilities

pytestmark = pytest.mark.integration


def assert_matches_reference(body: dict, bundle: Path, png: bytes) -> None:
    assert_valid(body, "predictions")
    ref = reference_probabilities(bundle, png)
    assert [p["index"] for p in body["predictions"]] == list(np.argsort(-ref, kind="stable")[:5])
    for p in body["predictions"]:
        assert p["probability"] == pytest.approx(ref[p["index"]], abs=2e-6)


def test_token_auth_is_on(server, sample_pngs):
    r = post(server, sample_pngs[0], auth=False)
    assert r.status_code in (400, 401) and "Token" in r.text


def test_single_prediction_equals_onnxruntime(server, tiny_bundle, sample_pngs):
    r = post(server, sample_pngs[0])
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    assert_matches_reference(r.json(), tiny_bundle, sample_pngs[0])
    j = post(server, json.dumps({"data": base64.b64encode(sample_pngs[0]).decode(), "top_k": 3}).encode(),
             "application/json")
    assert j.status_code == 200 and j.json()["predictions"] == r.json()["predictions"][:3]
    assert_valid(j.json(), "predictions")


def test_concurrent_requests_are_batched_and_correct(server, tiny_bundle, sample_pngs):
    pngs = sample_pngs * 4
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda p: post(server, p), pngs))
    for png, r in zip(pngs, responses):
        assert r.status_code == 200
        assert_matches_reference(r.json(), tiny_bundle, png)
    sizes = [int(n) for n in re.findall(r"handled batch n=(\d+)", server.log())]
    assert max(sizes) > 1, f"no batch larger than one request was formed: {sizes[-40:]}"


def test_malformed_requests_get_4xx_json_and_worker_survives(server, tiny_bundle, sample_pngs):
    before = workers(server)
    good = sample_pngs[2]
    cases = [
        (b"not an image", "image/png", 400, "InvalidImage"),
        (good[: len(good) // 3], "image/png", 400, "InvalidImage"),
        (b"{\"data\": ", "application/json", 400, "InvalidRequest"),
        (json.dumps({"data": "@@@"}).encode(), "application/json", 400, "InvalidRequest"),
        (json.dumps({"data": base64.b64encode(good).decode(), "top_k": -1}).encode(), "application/json",
         400, "InvalidOption"),
        (b"GIF89a" + b"\x00" * 40, "image/gif", 415, "UnsupportedMediaType"),
        (good, "text/plain", 415, "UnsupportedMediaType"),
    ]
    with ThreadPoolExecutor(8) as pool:
        futures = [(case, pool.submit(post, server, case[0], case[1])) for case in cases * 3]
        futures += [((good, "image/png", 200, None), pool.submit(post, server, good)) for _ in range(8)]
    for (body, ctype, status, etype), fut in futures:
        r = fut.result()
        assert r.status_code == status, (ctype, r.text)
        if etype:
            err = r.json()["error"]
            assert_valid(r.json(), "error")
            assert err["type"] == etype and err["message"]
        else:
            assert_matches_reference(r.json(), tiny_bundle, good)
    assert workers(server) == before


def test_explanations_endpoint_answers_501_without_artifacts(server, sample_pngs):
    r = post(server, sample_pngs[0], endpoint="explanations")
    assert r.status_code == 501 and r.json()["error"]["type"] == "ExplanationsUnavailable"
    assert_valid(r.json(), "error")


def _worker_sockets(pid: int) -> list[str]:
    """The ``--sock-name`` of every process under the server (its Python workers)."""
    names = []
    for proc in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            args = proc.cmdline()
            names += [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--sock-name"]
    return names


def test_workers_listen_on_sockets_of_their_own_server(server):
    """TorchServe names worker sockets .ts.sock.<n> counted from 9000 in Java's temporary
    folder; a server the tests start puts them in its private folder, so it never shares them
    with a demo server (in /tmp) or another test's server."""
    sockets = _worker_sockets(server.proc.pid)
    assert sockets, "no worker processes found"
    assert all(Path(s).parent == server.tmp and Path(s).name.startswith(".ts.sock.") for s in sockets), sockets


def test_the_shipped_log_config_drops_per_request_lines_but_not_the_metrics(server, sample_pngs):
    """deploy/torchserve-log4j2.xml: the frontend's log keeps its INFO lines (models loading)
    but not the lines it writes for every request; the metric lines it drops from the log still
    reach the metrics endpoint, and the worker's own lines stay in model_log.log only."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    def explained() -> float:
        text = requests.get(server.metrics_url, timeout=10).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "concept_explainer_requests_total" and s.labels.get("ModelName") == "tinyx"
                   and s.labels.get("endpoint") == "explanations")
    before = explained()
    for png in sample_pngs[:3]:
        assert post(server, png, endpoint="explanations", model="tinyx").status_code == 200
    ts_log = server.log("ts_log.log")
    assert "tinyx" in ts_log  # the frontend still logs at INFO (the model and its worker starting)
    for per_request in ("result=[METRICS]", "Backend response time", "Looping backend response", "Flushing req.cmd"):
        assert per_request not in ts_log
    assert "handled batch" in server.log() and "handled batch" not in ts_log
    assert explained() - before == 3
