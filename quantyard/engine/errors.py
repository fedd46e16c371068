"""The engine's error taxonomy (pure Python: the API imports it to map errors to responses).

Every failure the engine can explain is a ConversionError with a stable `code` and a
`retryable` flag; programmer errors (TypeError, AssertionError, ...) propagate unchanged.
"""

from __future__ import annotations


class ConversionError(Exception):
    """Base of every error the engine raises on purpose."""

    code: str = "conversion_error"
    retryable: bool = False

    def __init__(self, message: str, *, details: dict | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict = dict(details or {})

    def to_dict(self) -> dict:
        """JSON-able form, e.g. for a job's error column."""
        return {"code": self.code, "message": self.message, "details": self.details}


class InvalidModel(ConversionError):
    """The source is not a usable model (missing files, corrupt headers, bad config)."""

    code = "invalid_model"


class UnsupportedArchitecture(ConversionError):
    """The source's architecture is not one the engine can convert."""

    code = "unsupported_architecture"


class UnsupportedTarget(ConversionError):
    """The requested format or quantization is not offered."""

    code = "unsupported_target"


class ValidationFailed(ConversionError):
    """The artifact was written but does not behave like its source."""

    code = "validation_failed"


class Cancelled(ConversionError):
    """Raised by a progress callback to stop a conversion cooperatively."""

    code = "cancelled"


class ResourceExhausted(ConversionError):
    """Out of memory or disk; worth retrying elsewhere or later."""

    code = "resource_exhausted"
    retryable = True


class ResourceLimit(ConversionError):
    """The conversion hit its own memory, scratch-disk or time limit (or preflight saw that it
    would): the same model would hit it again, so it is not retried."""

    code = "resource_limit"


__all__ = [
    "ConversionError",
    "InvalidModel",
    "UnsupportedArchitecture",
    "UnsupportedTarget",
    "ValidationFailed",
    "Cancelled",
    "ResourceExhausted",
    "ResourceLimit",
]
