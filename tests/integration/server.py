"""The integration tests' TorchServe: the launcher lives in :mod:`bench.server` (the benchmarks
use it too); ``workers`` is a test helper."""
from __future__ import annotations

from bench.server import REPO, KServeServer, TorchServe, config_from_shipped, free_port, post

__all__ = ["REPO", "KServeServer", "TorchServe", "config_from_shipped", "free_port", "post", "workers"]


def workers(ts: TorchServe, model: str = "tiny") -> list[tuple[str, str]]:
    status, body = ts.client.describe(model)
    assert status == 200
    return [(w["id"], w["startTime"]) for w in body[0]["workers"]]
