"""Which device a job trains on: the job's ``device`` against this worker's hardware.

A job asks for ``any`` device, ``cpu`` or ``cuda`` (``TrainSpec.device``), and ``service.queue``
routes it to the matching queue. A worker may still receive a job of another kind (an operator
subscribed it to a queue by hand, ``ZOOFIT_WORKER_QUEUES``): a cpu job then trains on the CPU of
a GPU worker, and a cuda job on a worker without a GPU fails at once, saying so. A cuda job never
trains on the CPU: someone who asked for a GPU learns that they did not get one.
"""

from __future__ import annotations

from models import runtime
from models.errors import ZooError
from models.spec import JOB_DEVICES, check_name
from service.config import Settings
from service.queue import TRAIN_CUDA_QUEUE


class DeviceUnavailable(ZooError):
    """The job asks for a device this worker does not have."""


def training_device(job_device: str, settings: Settings, worker: str = "this worker") -> str:
    """The device ``models.training.train`` gets for a job that asks for ``job_device``.

    Args:
        job_device: the job's ``device``: ``any``, ``cpu`` or ``cuda``.
        settings: this worker's settings (``device``: ``auto``, ``cpu`` or ``cuda``).
        worker: the worker's name, for the error.

    Returns:
        ``settings.device`` for ``any`` (``auto`` picks the GPU if there is one), ``cpu`` for a cpu
        job even on a GPU worker, ``cuda`` for a cuda job on a worker with a GPU.

    Raises:
        DeviceUnavailable: a cuda job on a worker without a GPU (``ZOOFIT_DEVICE=cpu``, or none found).
        UnknownNameError: ``job_device`` is none of the valid names.
    """
    check_name("device", job_device, JOB_DEVICES)
    if job_device == "any":
        return settings.device
    if job_device == "cpu":
        return "cpu"
    # ZOOFIT_DEVICE=cuda asserts a GPU; looked for all the same, for this error rather than torch's.
    if settings.device != "cpu" and runtime.has_cuda():
        return "cuda"
    why = "ZOOFIT_DEVICE=cpu" if settings.device == "cpu" else f"ZOOFIT_DEVICE={settings.device}, no CUDA device found"
    raise DeviceUnavailable(
        f"this job asks for cuda; worker {worker} has no GPU ({why}), and a cuda job never trains on the CPU. "
        f"Only GPU workers should consume the {TRAIN_CUDA_QUEUE!r} queue (ZOOFIT_WORKER_QUEUES)"
    )
