"""Errors of the offline pipeline (a light module: the CLI catches them without importing torch)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


class PipelineError(RuntimeError):
    """A step cannot run with the given configuration or inputs (the CLI prints the message and
    exits with status 1)."""


def describe_checks(failed: list[dict[str, Any]]) -> str:
    """Failed checks as one line: ``name = measured (target ...); ...``."""
    return "; ".join(f"{c['name']} = {c['measured']} (target {c['target']})" for c in failed)


class FailedChecksError(PipelineError):
    """``archive`` refused a bundle whose concept validity checks failed (``failed``: those checks)."""

    def __init__(self, bundle: Path, failed: list[dict[str, Any]]) -> None:
        self.bundle = bundle
        self.failed = failed
        super().__init__(f"refusing to archive {bundle}: concept validity checks failed: {describe_checks(failed)}. "
                         "Improve the bundle, or pass --accept-failed-checks (accept_failed_checks=True) to archive "
                         "it anyway (answers then carry the failed checks in their validity block).")
