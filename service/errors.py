"""Domain errors raised below the HTTP layer; ``service.app`` maps them to status codes."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    status = 400

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def with_status(self, status: int) -> ServiceError:
        self.status = status
        return self


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class BadRequest(ServiceError):
    status = 400


class TooLarge(ServiceError):
    status = 413


class Unprocessable(ServiceError):
    """Well-formed, but over a limit no retry will pass (a job too big for this service)."""

    status = 422


class TooManyRequests(ServiceError):
    """A count limit that frees up: retry once some of the caller's work has finished."""

    status = 429


class Unavailable(ServiceError):
    status = 503
