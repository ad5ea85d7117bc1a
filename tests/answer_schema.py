"""Validate answers against the published JSON Schemas (docs/schema/<kind>.schema.json).

Every test that receives an answer checks it here, so a body that drifts from the
published contract fails the test that produced it.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "docs" / "schema"
KINDS = ("predictions", "explanations", "error", "v1-predictions", "v1-explanations", "v2", "protocol-error")


@functools.cache
def validator(kind: str) -> Draft202012Validator:
    """The validator of one kind of body: "predictions", "explanations" or "error"."""
    if kind not in KINDS:
        raise ValueError(f"unknown answer kind {kind!r}; kinds: {KINDS}")
    schema = json.loads((SCHEMA_DIR / f"{kind}.schema.json").read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def assert_valid(body: Any, kind: str) -> None:
    """Fail with every violation when ``body`` (parsed JSON) is not a valid ``kind`` answer."""
    problems = sorted(validator(kind).iter_errors(body), key=lambda e: list(e.absolute_path))
    if problems:
        lines = [f"  at /{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in problems[:10]]
        raise AssertionError(f"answer is not a valid {kind} body:\n" + "\n".join(lines))


def kind_of(status: int, explain: bool) -> str:
    """The kind of body an answer must be: an error for 4xx/5xx, else the endpoint's."""
    if status >= 400:
        return "error"
    return "explanations" if explain else "predictions"


def assert_answer(status: int, body: Any, explain: bool) -> None:
    """:func:`assert_valid` for an answer of the ``/explanations`` (``explain``) or ``/predictions`` endpoint."""
    assert_valid(body, kind_of(status, explain))


def is_explain(wire_request: dict[str, Any]) -> bool:
    """Whether a request in TorchServe's wire format (tests/handler/mock_context.py) goes to /explanations."""
    return any(h["name"].lower() == b"explain" and h["value"].lower() == b"true" for h in wire_request["headers"])
