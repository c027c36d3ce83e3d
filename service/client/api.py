"""``Zoofit``: one method per API operation, returning the API's JSON as plain dicts."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from service.client.errors import ApiError, raise_for_error
from service.client.events import Event, iter_events
from service.client.uploads import Progress, multipart, upload_body

__all__ = ["ApiError", "Zoofit"]

FIGURES = ("curves", "confusion", "reliability")
LR_FINDER = "lr_finder"  # only a report with a learning-rate range test (optimizer.lr 'auto') has this one


class Zoofit:
    """A zoofit API at ``base_url``, used with the API key ``key``.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000`` (the ``/v1`` prefix is added here).
        key: the bearer API key (``zoofit keys create``); None for unauthenticated routes only.
        http: an ``httpx.Client`` to send requests with (tests pass a ``fastapi.testclient.TestClient``);
            by default one is made for ``base_url`` and closed by :meth:`close`.
        timeout: seconds per request (uploads and predictions of big batches may need more).
    """

    def __init__(self, base_url: str, key: str | None = None, *, http: httpx.Client | None = None,
                 timeout: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.key = key
        self._owned = http is None
        self.http = http if http is not None else httpx.Client(base_url=self.base_url, timeout=timeout)

    def __enter__(self) -> Zoofit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owned:
            self.http.close()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return raise_for_error(self.http.request(method, f"/v1{path}", headers=headers, **kwargs))

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    def ready(self) -> bool:
        """The API answers ``/readyz`` with 200 (database and broker reachable)."""
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    # presets
    def presets(self) -> dict[str, Any]:
        return dict(self._json("GET", "/presets"))

    def preset(self, name: str) -> dict[str, Any]:
        """The preset called ``name``; an error listing the valid names otherwise."""
        presets = self.presets()["data"]
        for p in presets:
            if p["name"] == name:
                return dict(p)
        raise ValueError(f"no preset {name!r}; the API has: {', '.join(p['name'] for p in presets)}")

    # datasets
    def upload_dataset(self, path: str | Path, name: str | None = None, on_bad_file: str = "reject",
                       on_bytes: Progress | None = None) -> dict[str, Any]:
        """Upload an archive (.zip, .tar, .tar.gz) as it is, or a folder of ``<class>/<image>`` zipped on the fly.

        ``on_bytes(n)`` is called as each chunk of the file goes out; ``uploads.upload_size`` gives the total.
        """
        body = upload_body(Path(path))
        content_type, chunks, length = multipart(body, {"name": name} if name else {}, on_bytes)
        headers = {"Content-Type": content_type}
        if length is not None:
            headers["Content-Length"] = str(length)
        return dict(self._json("POST", "/datasets", content=chunks, headers=headers,
                               params={"on_bad_file": on_bad_file}))

    def datasets(self, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        return dict(self._json("GET", "/datasets", params={"offset": offset, "limit": limit}))

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/datasets/{dataset_id}"))

    def delete_dataset(self, dataset_id: str) -> None:
        self._request("DELETE", f"/datasets/{dataset_id}")

    # jobs
    def create_job(self, job: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit ``job`` (a ``dataset_id`` plus any recipe fields); :func:`service.client.build_job` makes one."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return dict(self._json("POST", "/jobs", json=job, headers=headers))

    def jobs(self, status: str | None = None, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        params: dict[str, Any] = {"offset": offset, "limit": limit}
        if status:
            params["status"] = status
        return dict(self._json("GET", "/jobs", params=params))

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/jobs/{job_id}"))

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return dict(self._json("POST", f"/jobs/{job_id}/cancel"))

    def events(self, job_id: str, last_event_id: str | None = None, **kwargs: Any) -> Iterator[Event]:
        """The job's events up to ``done`` (see :func:`service.client.events.iter_events`)."""
        return iter_events(self.http, f"/v1/jobs/{job_id}/events", self.headers, last_event_id=last_event_id,
                           **kwargs)

    # models
    def models(self, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        return dict(self._json("GET", "/models", params={"offset": offset, "limit": limit}))

    def model(self, model_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/models/{model_id}"))

    def delete_model(self, model_id: str) -> None:
        self._request("DELETE", f"/models/{model_id}")

    def report(self, model_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/models/{model_id}/report"))

    def figure(self, model_id: str, name: str) -> bytes:
        """One PNG of the report: ``curves``, ``confusion``, ``reliability``, or ``lr_finder`` (with lr 'auto')."""
        if name not in (*FIGURES, LR_FINDER):
            raise ValueError(f"no figure {name!r}; choose from {', '.join((*FIGURES, LR_FINDER))}")
        return self._request("GET", f"/models/{model_id}/report/{name}.png").content

    def predict(self, model_id: str, images: Iterable[str | Path], top_k: int = 5, tta: str = "none"
                ) -> dict[str, Any]:
        """Top-k labels of each image file (streamed from disk), from the model's ensemble."""
        with ExitStack() as stack:
            files = [("files", (Path(p).name, stack.enter_context(Path(p).open("rb")))) for p in images]
            return dict(self._json("POST", f"/models/{model_id}/predict", files=files,
                                   params={"top_k": top_k, "tta": tta}))

    # -- exports
    def create_export(self, model_id: str, fmt: str, quantization: str = "none") -> dict[str, Any]:
        """Ask for the model's bundle in ``fmt``; the existing export when there is one."""
        return dict(self._json("POST", f"/models/{model_id}/exports",
                               json={"format": fmt, "quantization": quantization}))

    def exports(self, model_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/models/{model_id}/exports"))

    def export(self, model_id: str, export_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/models/{model_id}/exports/{export_id}"))

    def download_export(self, model_id: str, export_id: str, dest: str | Path) -> Path:
        """Stream the export's zip into ``dest`` (written to a temporary name, then renamed)."""
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.part")
        with self.http.stream("GET", f"/v1/models/{model_id}/exports/{export_id}/download",
                              headers=self.headers) as r:
            if r.status_code >= 400:
                r.read()
                raise_for_error(r)
            with tmp.open("wb") as f:
                for chunk in r.iter_bytes():
                    f.write(chunk)
        tmp.replace(dest)
        return dest

