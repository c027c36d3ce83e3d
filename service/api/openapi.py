"""The OpenAPI document as clients need it, on top of what FastAPI builds."""

from __future__ import annotations

from typing import Any

from service.problems import add_problem_schemas


def finish_schema(openapi: dict[str, Any]) -> dict[str, Any]:
    """Add the ``Problem`` components the error responses refer to, and mark file uploads binary.

    FastAPI writes an uploaded file as OpenAPI 3.1 does (``contentMediaType: application/octet-stream``);
    openapi-python-client (up to 0.29 at least, its issue #1417) and other generators only know the
    3.0 form (``format: binary``) and would send the file as a text field. Both together suit both.
    """
    add_problem_schemas(openapi)
    _mark_binary(openapi.get("components", {}).get("schemas", {}))
    return openapi


def _mark_binary(node: Any) -> None:
    if isinstance(node, dict):
        if node.get("type") == "string" and node.get("contentMediaType") == "application/octet-stream":
            node.setdefault("format", "binary")
        for value in node.values():
            _mark_binary(value)
    elif isinstance(node, list):
        for value in node:
            _mark_binary(value)
