"""Domain errors of the explainer and the one place that maps them to HTTP status.

Everything a client can get wrong raises a subclass of :class:`ExplainerError` carrying
its HTTP status; :func:`to_answer` turns any exception into ``(status, ErrorAnswer)``.
Unknown exceptions are faults of the server (500)
and their details are not echoed to clients.
"""
from __future__ import annotations

from handlers.runtime.answer import ErrorAnswer, ErrorDetail


class ExplainerError(Exception):
    """Base of all errors a request can cause. ``status`` is the HTTP status code."""

    status: int = 400

    def __init__(self, message: str) -> None:
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
