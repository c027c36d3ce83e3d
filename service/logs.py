"""Log lines with their context: the request id, the job id and the tenant they belong to.

The context lives in context variables: the HTTP layer sets the request id
(``service.api.request_id``) and the tenant (``service.api.gate``), a worker sets the job id and the
tenant for the job it runs (``workers.jobs``). A filter on the root handler copies what is set onto
every record, so a line logged anywhere below carries it: as fields of a JSON object with
``log_format=json`` (python-json-logger, one object a line, for a log collector), or appended as
``[key=value ...]`` to the text line for a terminal (the default).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

request_id_var: ContextVar[str | None] = ContextVar("zoofit_request_id", default=None)
job_id_var: ContextVar[str | None] = ContextVar("zoofit_job_id", default=None)
tenant_var: ContextVar[str | None] = ContextVar("zoofit_tenant", default=None)

# record attribute -> the variable it is copied from
CONTEXT_FIELDS: dict[str, ContextVar[str | None]] = {
    "request_id": request_id_var,
    "job_id": job_id_var,
    "tenant": tenant_var,
}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ContextFilter(logging.Filter):
    """Copies the context variables that are set onto the record (a value given in ``extra`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in CONTEXT_FIELDS.items():
            value = var.get()
            if value is not None and getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


class TextFormatter(logging.Formatter):
    """The plain line, then ``[request_id=... job_id=... tenant=...]`` for what the record carries."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(f"{k}={v}" for k in CONTEXT_FIELDS if (v := getattr(record, k, None)) is not None)
        return f"{line} [{context}]" if context else line


def json_formatter() -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    # Extra attributes (the context, an access line's method/path/status) become fields of their own.
    return JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
    )


def make_handler(log_format: str, stream: Any = None) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(json_formatter() if log_format == "json" else TextFormatter(TEXT_FORMAT))
    handler.addFilter(ContextFilter())
    return handler


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
    """One handler on the root logger, in ``log_format`` ("text" or "json"); uvicorn's loggers go through it."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(make_handler(log_format))
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True


@contextmanager
def log_context(**values: str | None) -> Iterator[None]:
    """Set context variables (``request_id``, ``job_id``, ``tenant``) for the block."""
    tokens = [(CONTEXT_FIELDS[k], CONTEXT_FIELDS[k].set(v)) for k, v in values.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)
