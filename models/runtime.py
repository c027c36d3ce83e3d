"""Where and how torch runs: the device, the CPU cores this process may use, torch's thread count.

Imported by the training loop and by the serving path alike; torch is imported only inside the
functions that need it, so the CLI and the API can count cores without loading torch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# What runs a served model's forward passes (``models.artifact.load_predictor``).
PREDICT_RUNTIMES = ("torch", "onnxruntime")
# Images in one inference pass (the feature cache, validation, predict, the planner's probes). On a CPU
# small batches keep the early layers' activations in the caches: Lite0 runs 2-8x faster per image in
# batches of about this many pixels (16 images at 96 px, 3 at 224 px) than in batches of 128
# (benchmarks/inference_batch.py, BENCHMARKS.md). A GPU wants large batches.
CPU_INFERENCE_PIXELS = 16 * 96 * 96
GPU_INFERENCE_BATCH = 128
# onnxruntime plans its own memory and wants larger batches: a 3-member Lite0 ensemble at 128 px predicts
# 514 img/s in batches of 64 and 307-355 in batches of 9 (2 threads, 2026-12-07).
ONNX_INFERENCE_BATCH = 64


def resolve_device(device: str | None) -> torch.device:
    """``None`` or ``auto``: the first CUDA GPU if there is one, else the CPU; otherwise as given."""
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def inference_batch(device: torch.device, size: int, runtime: str = "torch") -> int:
    """How many images of ``size`` x ``size`` pixels one inference pass on ``device`` takes at once.

    ``runtime``: one of ``PREDICT_RUNTIMES``, what runs the pass.
    """
    if runtime == "onnxruntime":
        return ONNX_INFERENCE_BATCH
    if device.type != "cpu":
        return GPU_INFERENCE_BATCH
    return max(1, min(GPU_INFERENCE_BATCH, round(CPU_INFERENCE_PIXELS / (size * size))))


def has_cuda() -> bool:
    """Whether this host has a CUDA GPU torch can use, asked without initializing CUDA where possible.

    ``torch.cuda.device_count`` asks NVML first; ``torch.cuda.is_available`` initializes the CUDA
    driver, and a process that did so before it forks (Celery's prefork worker choosing its queues)
    leaves children that cannot use the GPU.
    """
    import torch

    return torch.cuda.device_count() > 0


def available_cpus() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch runs with ``n`` CPU threads inside the block, with its previous setting after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
