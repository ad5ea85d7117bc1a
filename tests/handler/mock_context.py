"""A TorchServe context without a server, built from TorchServe's own classes.

Requests go through ``ts.service.Service.retrieve_data_for_inference`` (the function the
worker uses) so the handler sees exactly the ``data`` rows and headers TorchServe gives it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from ts.context import Context
from ts.service import Service

from export.archive import DEFAULT_MODEL_CONFIG


def model_dir_from_bundle(bundle: Path, dest: Path) -> Path:
    """A folder laid out like an extracted .mar: ``dest/bundle/...``."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(bundle, dest / "bundle", dirs_exist_ok=True)
    return dest


def make_context(model_dir: Path, handler_settings: dict[str, Any] | None = None, batch_size: int = 8,
                 gpu_id: int | None = None) -> Context:
    """A worker's context; ``gpu_id`` as TorchServe gives it (None: a worker without a GPU)."""
    cfg = yaml.safe_load(DEFAULT_MODEL_CONFIG.read_text())
    if handler_settings:
        cfg["handler"].update(handler_settings)
    return Context("tiny", str(model_dir), {"model": {"modelName": "tiny"}}, batch_size, gpu_id, "0.12.0",
                   model_yaml_config=cfg)


def wire_request(value: bytes | str, content_type: str = "image/png", explain: bool = False,
                 name: str = "body", idx: int = 0) -> dict[str, Any]:
    """One request in the worker's wire format (what the Java frontend sends)."""
    raw = value.encode() if isinstance(value, str) else value
    if content_type == "application/json":
        try:
            decoded: Any = json.loads(raw.decode())
        except (ValueError, UnicodeDecodeError):
            decoded = raw  # TorchServe forwards undecodable JSON as bytes
    else:
        decoded = raw
    headers = [{"name": b"Content-Type", "value": content_type.encode()}]
    if explain:
        headers.append({"name": b"explain", "value": b"True"})
    return {"requestId": f"req-{idx}".encode(), "headers": headers,
            "parameters": [{"name": name, "contentType": content_type, "value": decoded}]}


def prepare_batch(context: Context, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Do what ``Service.predict`` does before calling the handler; return ``data``."""
    headers, input_batch, req_id_map = Service.retrieve_data_for_inference(batch)
    context.request_ids = req_id_map
    context.request_processor = headers
    return input_batch
