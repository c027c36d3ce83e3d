"""Domain errors raised below the HTTP layer; ``service.app`` maps them to status codes."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    status = 400
    retry_after: int | None = None  # seconds, sent as Retry-After (every 429 and 503 has one)

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def with_status(self, status: int) -> ServiceError:
        self.status = status
        return self

    def headers(self) -> dict[str, str] | None:
        """The answer's headers: ``Retry-After`` on a 429 (the error's) and a 503 (5 s unless it says otherwise)."""
        retry = self.retry_after if self.retry_after is not None else (5 if self.status == 503 else None)
        return None if retry is None else {"Retry-After": str(retry)}


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
    """A count limit that frees up: retry once some of the caller's work has finished (``retry_after`` s)."""

    status = 429

    def __init__(self, message: str, *, retry_after: int, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after = retry_after


class Unavailable(ServiceError):
    """Busy or away for a moment: retry after ``retry_after`` seconds."""

    status = 503

    def __init__(self, message: str, *, retry_after: int = 5, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after = retry_after
