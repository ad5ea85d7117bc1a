"""The integration tests' TorchServe: the launcher lives in :mod:`bench.server` (the benchmarks
use it too); ``workers`` is a test helper."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.server import REPO, KServeServer, TorchServe, config_from_shipped, free_port, post

__all__ = ["REPO", "KServeServer", "TorchServe", "concurrently", "config_from_shipped", "free_port", "post",
           "workers"]


def concurrently(send: Callable[[Any], Any], jobs: Sequence[Any], clients: int = 8) -> tuple[list[Any], float]:
    """``send`` applied to every job from ``clients`` threads: the results in job order and
    the seconds it took."""
    t0 = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(send, jobs))
    return results, time.monotonic() - t0


def workers(ts: TorchServe, model: str = "tiny") -> list[tuple[str, str]]:
    status, body = ts.client.describe(model)
    assert status == 200
    return [(w["id"], w["startTime"]) for w in body[0]["workers"]]
