"""Domain errors of the explainer and the one place that maps them to HTTP status.

Everything a client can get wrong raises a subclass of :class:`ExplainerError` carrying
its HTTP status; :func:`to_answer` turns any exception into ``(status, ErrorAnswer)``.
Unknown exceptions are faults of the server (500)
and their details are not echoed to clients.
"""
from __future__ import annotations

import re

from handlers.runtime.answer import ErrorAnswer, ErrorDetail

#: An object's default repr, e.g. ``<_io.BytesIO object at 0x7f528bffe6b0>``, and a bare address.
_INTERNAL = re.compile(r"<[^<>]*\bat 0x[0-9a-fA-F]+>|\b0x[0-9a-fA-F]{6,}\b")


def client_text(message: str) -> str:
    """``message`` as a client may read it: object reprs and memory addresses that a library's
    message carries (Pillow names the ``BytesIO`` it read) are removed."""
    text = re.sub(r"\s+([:;,.])", r"\1", re.sub(r"\s{2,}", " ", _INTERNAL.sub("", message)))
    return text.strip().rstrip(":").strip()


class ExplainerError(Exception):
    """Base of all errors a request can cause. ``status`` is the HTTP status code; the
    message is what the client reads (:func:`client_text`)."""

    status: int = 400

    def __init__(self, message: str) -> None:
        message = client_text(message)
        super().__init__(message)
        self.message = message

    @property
    def type(self) -> str:
        return type(self).__name__


class InvalidRequest(ExplainerError):
    """The body is empty, not valid JSON, or JSON of the wrong shape."""


class InvalidImage(ExplainerError):
    """The bytes are not a decodable image, or the image is truncated or corrupt."""


class InvalidOption(ExplainerError):
    """An option (target, top_k, views, ...) has the wrong type or an unknown value."""


class UnknownTarget(InvalidOption):
    """The explanation target is not a class of the model."""


class ExplanationsUnavailable(ExplainerError):
    """The model was archived without the artifacts of the requested explanation."""

    status = 501


class UnsupportedMediaType(ExplainerError):
    """Content type or image format the handler does not accept."""

    status = 415


class PayloadTooLarge(ExplainerError):
    """Request body or decoded image exceeds the configured limits."""

    status = 413


class ArtifactError(Exception):
    """The model bundle is missing a file or a file does not match its manifest hash.

    Raised at load time: the model refuses to load rather than serve wrong answers.
    """


def to_answer(exc: BaseException) -> tuple[int, ErrorAnswer]:
    """Map an exception to ``(status, ErrorAnswer)``."""
    if isinstance(exc, ExplainerError):
        return exc.status, ErrorAnswer(error=ErrorDetail(type=exc.type, message=exc.message))
    return 500, ErrorAnswer(error=ErrorDetail(type="InternalError", message="internal server error"))
