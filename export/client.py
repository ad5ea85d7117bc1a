"""A small stdlib HTTP client for TorchServe with token authorization (demo, tests, bench)."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def read_keys(key_file: str | Path) -> dict[str, str]:
    """TorchServe's ``key_file.json`` -> {"inference": key, "management": key, "API": key}."""
    data = json.loads(Path(key_file).read_text())
    return {name: entry["key"] for name, entry in data.items() if isinstance(entry, dict) and "key" in entry}


class TorchServeClient:
    """Inference and management calls; keys read from ``key_file`` when it exists."""

    def __init__(self, url: str = "http://127.0.0.1:8080", management_url: str | None = None,
                 key_file: str | Path | None = "key_file.json") -> None:
        self.url = url.rstrip("/")
        self.management_url = (management_url or self.url.rsplit(":", 1)[0] + ":8081").rstrip("/")
        self.key_file = Path(key_file) if key_file else None

    def _keys(self) -> dict[str, str]:
        if self.key_file and self.key_file.is_file():
            return read_keys(self.key_file)
        return {}

    def _call(self, method: str, url: str, body: bytes | None, headers: dict[str, str],
              timeout: float) -> tuple[int, bytes]:
        req = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def post_image(self, endpoint: str, model: str, image: bytes, content_type: str = "image/png",
                   timeout: float = 60) -> tuple[int, Any]:
        headers = {"Content-Type": content_type}
        key = self._keys().get("inference")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        status, raw = self._call("POST", f"{self.url}/{endpoint}/{model}", image, headers, timeout)
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def post_json(self, endpoint: str, model: str, body: dict[str, Any], timeout: float = 60) -> tuple[int, Any]:
        """POST a JSON request (an image as base64 ``data`` plus options)."""
        return self.post_image(endpoint, model, json.dumps(body).encode(), "application/json", timeout)

    def describe(self, model: str, timeout: float = 10) -> tuple[int, Any]:
        headers = {}
        key = self._keys().get("management")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        status, raw = self._call("GET", f"{self.management_url}/models/{model}", None, headers, timeout)
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def wait_ready(self, model: str, timeout: float = 120) -> None:
        """Block until the model has a READY worker (raises TimeoutError)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                status, body = self.describe(model)
                last = body
                if status == 200 and any(w.get("status") == "READY"
                                         for m in body for w in m.get("workers", [])):
                    return
            except (OSError, ValueError) as exc:
                last = exc
            time.sleep(0.5)
        raise TimeoutError(f"model {model} not ready after {timeout} s: {last}")
