"""One root exception, split into permanent and retryable (see architecture.md).

A permanent error fails the item at once with an error code from the contract; a retryable
error (network, database, broker) is retried by the stage's caller. The message of an
`ItemError` is shown to users: it says what to fix, never a stack trace.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    INVALID_ROW = "invalid_row"
    REFERENCE_NOT_FOUND = "reference_not_found"
    REFERENCE_FORBIDDEN = "reference_forbidden"
    REFERENCE_NOT_IMAGE = "reference_not_image"
    REFERENCE_TOO_LARGE = "reference_too_large"
    NO_FACE = "no_face"
    MODEL_ERROR = "model_error"
    INTERNAL = "internal"


class IpbatchError(Exception):
    """Root of every error ipbatch raises on purpose."""


class ConfigError(IpbatchError):
    """Bad settings or command-line usage (exit code 2)."""


class RetryableError(IpbatchError):
    """A transient failure (storage, database, broker): the same call may work later."""


class ItemError(IpbatchError):
    """A permanent failure of one item: recorded with its code, never retried."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"


class ObjectNotFound(IpbatchError):
    """An object store key or local file does not exist."""
