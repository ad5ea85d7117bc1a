"""A real Prometheus (Debian's package) on a free loopback port for the integration tests,
and helpers to read its query API."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.integration.server import free_port

PROMETHEUS = shutil.which("prometheus")


class Prometheus:
    """``with Prometheus(workdir, targets, rule_files) as url``: scrapes ``targets`` (host:port)
    every second and evaluates ``rule_files`` every second."""

    def __init__(self, workdir: Path, targets: list[str], rule_files: list[Path] = (), timeout: float = 60) -> None:
        if PROMETHEUS is None:
            print("\nSKIP: the prometheus binary is not installed (Debian package 'prometheus'); "
                  "make test installs it where apt-get is available")
            pytest.skip("prometheus is not installed")
        self.workdir, self.targets, self.rule_files, self.timeout = Path(workdir), targets, list(rule_files), timeout
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> str:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [{"job_name": "torchserve", "static_configs": [{"targets": self.targets}]}]}))
        log = self.workdir / "prometheus.log"
        self.proc = subprocess.Popen([PROMETHEUS, f"--config.file={self.workdir / 'prometheus.yml'}",
                                     f"--storage.tsdb.path={self.workdir / 'data'}",
                                     f"--web.listen-address=127.0.0.1:{self.port}"],
                                    stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return self.url
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        self.proc.kill()
        raise RuntimeError(log.read_text()[-2000:])

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


def query(url: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    """An instant query (at ``at``, Unix seconds; default now): the result vector."""
    params: dict[str, Any] = {"query": expr}
    if at is not None:
        params["time"] = at
    r = requests.get(f"{url}/api/v1/query", params=params, timeout=10)
    r.raise_for_status()
    return r.json()["data"]["result"]


def wait_for(url: str, expr: str, expected: float, timeout: float = 30) -> float:
    """Poll ``expr`` until its first value equals ``expected`` (1e-6)."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        res = query(url, expr)
        value = float(res[0]["value"][1]) if res else None
        if value is not None and abs(value - expected) < 1e-6:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{expr} = {value}, expected {expected}")


def alert_expression(rules: Path, alert: str, window: str) -> str:
    """The expression of ``alert`` in a rules file with its range windows set to ``window``."""
    import re
    for group in yaml.safe_load(rules.read_text())["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                return re.sub(r"\[\d+[smhd]\]", f"[{window}]", rule["expr"])
    raise KeyError(alert)
