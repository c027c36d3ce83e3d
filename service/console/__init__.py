"""The console: static pages served by the API at ``/`` that use the same ``/v1`` routes as any client.

Hand-written HTML, CSS and ES modules (no build step, nothing from a CDN). ``/`` answers
``index.html``; the assets are under ``/console/``. Every answer carries a Content-Security-Policy
that allows only this origin's scripts, styles and connections (no inline script), and blob: images
(report figures and thumbnails are fetched with the bearer header and shown from blob URLs).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).parent

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# Assets are not fingerprinted: cached briefly, then revalidated with their ETag.
ASSET_CACHE = "public, max-age=300, must-revalidate"
ASSET_TYPES = frozenset({".html", ".css", ".js", ".svg"})


class ConsoleAssets(StaticFiles):
    """StaticFiles with cache and security headers; only the console's own file types."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        if Path(path).suffix not in ASSET_TYPES:  # not this package's Python files
            # As a missing asset: the app's HTTPException handler answers with its problem document.
            raise HTTPException(status_code=404)
        response = await super().get_response(path, scope)
        if response.status_code in (200, 304):
            response.headers["Cache-Control"] = ASSET_CACHE
        response.headers.update(SECURITY_HEADERS)
        return response


def mount_console(app: FastAPI) -> None:
    """Serve the console: ``/`` (index.html) and ``/console/*`` (its scripts and styles)."""

    @app.get("/", include_in_schema=False, operation_id="console-index")
    def console_index() -> FileResponse:
        return FileResponse(
            STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache", **SECURITY_HEADERS}
        )

    app.mount("/console", ConsoleAssets(directory=STATIC_DIR, html=False), name="console")
