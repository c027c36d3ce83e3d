"""The zoofit HTTP client shared by the ``zoofit`` subcommands and users' scripts.

It imports only httpx, httpx-sse, rich, PyYAML and the standard library, so a laptop without
torch or the service's own dependencies can drive a remote zoofit::

    from service.client import Zoofit

    zf = Zoofit("http://gpu-box:8000", key="zf_...")
    ds = zf.upload_dataset("photos/")          # a folder is zipped on the fly
    job = zf.create_job({"dataset_id": ds["id"], **zf.preset("fast")["job"]})
    for event in zf.events(job["id"]):
        print(event.type, event.data)
"""

from service.client.api import ApiError, Zoofit
from service.client.events import Event
from service.client.recipe import build_job, deep_merge, parse_set

__all__ = ["ApiError", "Event", "Zoofit", "build_job", "deep_merge", "parse_set"]
